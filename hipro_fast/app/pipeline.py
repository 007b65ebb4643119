"""The steps behind the ``hipro`` CLI, callable from Python.

spec -> frozen CLIP -> cached image features -> affinity -> tree -> HiPro
training / baselines -> report. Each step is a function; :class:`Run` is the
run directory (resolved config, metrics as JSON lines, checkpoints, figures and
``report.md``).
"""
from __future__ import annotations

import atexit
import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from ..data.bundled import export_image_folders
from ..distributed import group as dist_group
from ..data.clip_loading import load_clip
from ..data.feature_cache import FeatureCache, stack_views
from ..data.tasks_spec import MultiTaskSpec, SpecError, few_shot
from ..engine.prompt_forest import DEFAULT_COMBINE
from ..method import affinity as aff
from ..method import baselines, training
from ..method import checkpoint as ckpt
from ..method import protocol
from ..method import selection as sel
from ..method.export import image_tower_info
from ..method.model import HiProModel
from ..method.tree import TaskTree
from ..errors import CheckpointError, ForestError, InvalidInputError, MissingFileError, RunDirError, TreeError
from ..files import atomic_write_text, new_dir_mode, new_file_mode, remove_orphaned_temp_files
from .report import Report

__all__ = [
    "Run", "TaskFeatures", "resolve_device", "register_model_config", "load_model", "cache_features",
    "compute_affinity", "build_tree", "train_hipro", "train_selected", "evaluate_model", "save_model",
    "load_model_checkpoint", "run_compare", "export_bundled",
]

Split = dict[str, tuple[torch.Tensor, torch.Tensor]]


# ------------------------------------------------------------------ run directory
def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, torch.Tensor):
        return o.tolist()
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if hasattr(o, "__dataclass_fields__"):
        import dataclasses

        return dataclasses.asdict(o)
    return repr(o)


def dump_json(obj: Any, path: str | Path) -> Path:
    """Write `obj` as indented JSON atomically (umask permissions; a symlink at
    `path` is replaced, never followed)."""
    return atomic_write_text(path, json.dumps(obj, indent=2, default=_json_default))


RUN_MODES = ("new", "resume", "overwrite")
# config.json keys that may differ when a run is resumed: where and how it runs, not what it computes.
# options that name a file: config.json also records each one's absolute path
# ("<option>_abspath"), and a resume compares the files, not the strings typed
# (./spec.toml, its absolute path, or ../spec.toml from another folder)
PATH_OPTIONS = ("spec", "tree", "affinity", "model_config", "pretrained")

RESUME_FREE_KEYS = frozenset({
    "resume", "overwrite", "no_progress", "debug", "device", "device_resolved", "run_dir", "cache_dir",
    "workers", "batch_size", "model_resolved", *(f"{key}_abspath" for key in PATH_OPTIONS),
    # a run may resume with another number of processes (same trajectory, see hipro_fast.distributed)
    "nproc", "dist_timeout", "world_size", "backend"})


def _read_run_config(directory: Path) -> dict[str, Any] | None:
    """The config.json a hipro command wrote in `directory` (a dict with "command"), else None."""
    p = directory / "config.json"
    if p.is_symlink() or not p.is_file():
        return None
    try:
        cfg = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return cfg if isinstance(cfg, dict) and isinstance(cfg.get("command"), str) else None


RUN_LOCK = ".hipro.lock"  # in a run directory: held (flock) by the process that writes the run


def _entries(directory: Path) -> list[Path]:
    """The directory's contents but its lock file."""
    return [c for c in directory.iterdir() if c.name != RUN_LOCK]


def _lock_run_dir(directory: Path, wait_s: float = 5.0) -> int:
    """Take the run directory's lock: held until Run.close() or the end of the
    process, however it ends (the OS releases a flock with its last fd). A
    holder that is only being refused lets go within milliseconds, so this
    waits up to `wait_s`; then RunDirError naming the holder (another hipro
    process writes there). Returns the fd."""
    import fcntl
    import time

    fd = os.open(directory / RUN_LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, new_file_mode())
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError as e:
            if not isinstance(e, BlockingIOError):  # a file system without locks (some network mounts)
                warnings.warn(f"run directory {directory}: cannot lock it ({e.strerror or e}); two commands "
                              f"writing it at once would not be stopped", stacklevel=3)
                break
            if time.monotonic() < deadline:
                time.sleep(0.05)
                continue
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "?"
            os.close(fd)
            raise RunDirError(f"run directory {directory} is in use by another hipro process (pid {holder}): "
                              f"wait for it to finish, or choose another --run-dir") from None
    return fd


def _clear_directory(directory: Path) -> None:
    """Remove everything inside `directory` but its lock (symlinks are removed, not followed)."""
    for child in _entries(directory):
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# The training-recipe options of the CLI and the TrainConfig field each sets.
# config.json records the recipe they resolve to ("train_recipe"), so a resume
# compares what will be trained, not how it was spelled: `--optimizer lbfgs`
# resumes a run started with the default lbfgs, and a later change of the
# defaults cannot silently change a resumed run.
RECIPE_OPTIONS = {"optimizer": "optimizer", "lr": "lr", "epochs": "epochs", "min_steps": "min_steps",
                  "train_batch_size": "batch_size"}


def resolved_recipe(config: Any) -> dict[str, Any]:
    """The TrainConfig fields the CLI's recipe options set (config.json's "train_recipe");
    not lr for L-BFGS, which has none (its line search sets every step)."""
    return {field: getattr(config, field) for field in RECIPE_OPTIONS.values()
            if not (field == "lr" and config.optimizer == "lbfgs")}


def spec_data_digest(spec: MultiTaskSpec) -> str:
    """A digest of the data a spec names: per task its classes and, per split,
    every image's class, file name, size and mtime (not its folder: a moved
    dataset is the same data). config.json records it, so a --resume on edited,
    added or removed images is refused instead of mixing two datasets' training."""
    h = hashlib.sha256()
    for name in sorted(spec.tasks):
        task = spec.tasks[name]
        h.update(json.dumps([name, list(task.classes)]).encode())
        for split in sorted(task.splits):
            for r in task.splits[split]:
                try:
                    st = os.stat(r.path)
                    stamp = (st.st_size, st.st_mtime_ns)
                except OSError:
                    stamp = (-1, -1)
                h.update(json.dumps([split, int(r.label), os.path.basename(r.path), *stamp]).encode())
    return h.hexdigest()[:16]


# options a run directory's config.json may predate, with the value their absence meant
# (hipro train had no --select before session 14: it trained the tree alone)
IMPLIED_BEFORE_RECORDED = {"select": "none"}


def _existing_path(value: Any) -> str | None:
    """The absolute path of `value` when it names an existing file or folder
    (--tree also takes inline JSON and names: those are not paths)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        return str(Path(value).resolve()) if Path(value).exists() else None
    except OSError:  # e.g. a name too long to be a file's
        return None


def record_file_paths(config: dict[str, Any]) -> None:
    """Add "<option>_abspath" for every PATH_OPTIONS value that names an existing file or folder."""
    for key in PATH_OPTIONS:
        where = _existing_path(config.get(key))
        if where is not None:
            config[f"{key}_abspath"] = where


def _same_file(saved: Mapping[str, Any], now: Mapping[str, Any], key: str) -> bool:
    """Whether the file option `key` names the same file in both configs, however it was spelt."""
    here = _existing_path(now.get(key))
    if here is None or not isinstance(saved.get(key), str):
        return False
    # the recorded absolute path, else (a run before it was recorded) the old spelling from this folder
    return saved.get(f"{key}_abspath", _existing_path(saved[key])) == here


def check_resume_config(saved: Mapping[str, Any], config: Mapping[str, Any], directory: Path) -> None:
    """Raise RunDirError naming the first option (other than RESUME_FREE_KEYS) whose
    value differs between the run's config.json and this command: a resumed run
    must compute the same thing. The training recipe is compared as resolved
    when both record it; a run that predates the record compares the options as given."""
    now = json.loads(json.dumps(dict(config), default=_json_default))
    recorded = isinstance(saved.get("train_recipe"), dict) and isinstance(now.get("train_recipe"), dict)
    saved = {**{k: v for k, v in IMPLIED_BEFORE_RECORDED.items() if k in now}, **saved}
    for key in now:
        if key in RESUME_FREE_KEYS or key not in saved or saved[key] == now[key]:
            continue
        if key in PATH_OPTIONS and _same_file(saved, now, key):
            continue
        if recorded and key in RECIPE_OPTIONS:
            continue  # compared below, as resolved
        if key == "tree_content":
            raise RunDirError(f"cannot resume {directory}: the --tree file now holds another tree "
                              f"({now[key]!r}, that run's: {saved[key]!r}); restore it, or pass --overwrite to "
                              f"start over")
        if key == "data":
            raise RunDirError(f"cannot resume {directory}: the spec's images differ from that run's (added, "
                              f"removed, relabelled or edited since it started, or another spec): resuming would "
                              f"train on two datasets; restore them, or pass --overwrite to start over")
        if key == "train_recipe":
            for option, field in RECIPE_OPTIONS.items():
                was, new = saved[key].get(field), now[key].get(field)
                if was != new:
                    raise RunDirError(f"cannot resume {directory}: --{option.replace('_', '-')} was {was!r} in "
                                      f"that run, now {new!r} (resolved, defaults included; rerun with "
                                      f"--{option.replace('_', '-')} {was}, or pass --overwrite to start over)")
            continue
        flag = "--" + key.replace("_", "-")
        hint = (" (that run predates the recorded training recipe, so its default meant the defaults of the "
                "version that started it: resume it with that version or with the library, fit(..., resume=True), or "
                if key in RECIPE_OPTIONS and saved[key] is None else " (rerun with the original options, or ")
        raise RunDirError(f"cannot resume {directory}: {flag} was {saved[key]!r} in that run, now {now[key]!r}"
                          f"{hint}pass --overwrite to start over)")


class Run:
    """A run directory: config.json, metrics.jsonl, checkpoints/, figures, report.md.

    mode (checked before anything is written, so a refused run touches nothing):
      "new": the directory must not exist or be empty (RunDirError otherwise);
      "resume": continue the run of the same `command` in it (its config.json must
        agree with `config` except RESUME_FREE_KEYS); `resumed` says whether there
        was one (an absent or empty directory starts a new run);
      "overwrite": delete the contents of a previous run of the same `command`
        first (a non-empty directory without a hipro config.json, or with
        another command's run, is refused, never deleted).
    `resumable`: whether the command offers --resume (only for the message).

    Files are written with the umask's permissions and never through a symlink:
    JSON and text atomically (a symlink is replaced), metrics.jsonl appended with
    O_NOFOLLOW, and path() refuses a name that is a symlink.
    """

    def __init__(self, run_dir: str | Path | None, command: str, config: Mapping[str, Any] | None = None,
                 mode: str = "new", resumable: bool = False, writer: bool = True, resumed: bool = False,
                 before_writing: Callable[[], None] | None = None):
        if mode not in RUN_MODES:
            raise InvalidInputError(f"run mode must be one of {RUN_MODES}, got {mode!r}")
        self.writer = writer
        if not writer:
            # Rank > 0 of a multi-process run: rank 0 owns the run directory (and
            # decided `resumed`); this rank reads its checkpoints but writes its
            # own copies of figures and JSON to a scratch folder, removed at exit.
            self.dir, self.command, self.resumed = Path(run_dir), command, bool(resumed)
            self._scratch = Path(tempfile.mkdtemp(prefix="hipro-rank-"))
            atexit.register(shutil.rmtree, self._scratch, True)
            self.metrics_path = self._scratch / "metrics.jsonl"
            self.report = Report(self._scratch, title=f"hipro {command}")
            return
        self.command = command
        before_writing = before_writing or (lambda: None)
        if run_dir is not None:
            self.dir = Path(run_dir)
            # the refusals first, touching nothing (a foreign or finished folder stays as it was)
            self._prepare(mode, config, resumable, before_writing, dry=True)
            created = not self.dir.exists()
            if created:
                self.dir.mkdir(parents=True)
        else:
            # made here, exclusively: two runs started in the same second get two directories
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            made_runs = not Path("runs").exists()
            Path("runs").mkdir(exist_ok=True)
            for i in range(10_000):
                self.dir = Path("runs") / (f"{stamp}-{command}" + (f"-{i}" if i else ""))
                try:
                    self.dir.mkdir()
                    break
                except FileExistsError:
                    continue
            created = True
        # held from here to the end of the command: a second process (a double start, a --resume
        # while the run still trains) is refused instead of interleaving its files with this one's
        self._lock_fd = _lock_run_dir(self.dir)
        try:
            self.resumed = self._prepare(mode, config, resumable, before_writing)  # again, under the lock
        except BaseException:  # a refused run leaves nothing behind
            self.close()
            if created:
                (self.dir / RUN_LOCK).unlink(missing_ok=True)
                for made in [self.dir] + ([Path("runs")] if run_dir is None and made_runs else []):
                    try:
                        made.rmdir()
                    except OSError:
                        pass
            raise
        # a resumed run's files written when a SIGKILL stopped it (held by the lock: no live writer here),
        # its checkpoint folders' too (they were only cleaned at the next save of the same checkpoint)
        for folder, _, _ in os.walk(self.dir):
            remove_orphaned_temp_files(folder, "")
        os.ftruncate(self._lock_fd, 0)  # the writer's pid, for a refused process's message
        os.write(self._lock_fd, str(os.getpid()).encode())
        self.metrics_path = self.dir / "metrics.jsonl"
        self.report = Report(self.dir, title=f"hipro {command}")
        if config is not None:
            self.write_config(config)

    def _prepare(self, mode: str, config: Mapping[str, Any] | None, resumable: bool,
                 before_writing: Callable[[], None], dry: bool = False) -> bool:
        """The directory's checks, then `before_writing` (the caller's last checks:
        after the run directory's own refusals, before anything is deleted or
        created), then --overwrite's clearing. Returns whether a run is resumed.
        dry: the refusals alone (nothing called, nothing deleted)."""
        d = self.dir
        if d.exists() and not d.is_dir():
            raise RunDirError(f"run directory {d} exists and is not a directory")
        if dry:
            before_writing = lambda: None  # noqa: E731
        if not d.exists() or not _entries(d):
            before_writing()
            return False
        if mode == "new":
            how = ("pass --resume to continue the run in it or --overwrite to delete its contents and start over"
                   if resumable else "pass --overwrite to delete its contents and start over, or choose another "
                                     "--run-dir")
            raise RunDirError(f"run directory {d} is not empty: {how}")
        saved = _read_run_config(d)
        if saved is None:
            what = ("its config.json is not one hipro wrote (unreadable, cut short or edited)"
                    if (d / "config.json").is_file() else "it holds no config.json written by hipro")
            raise RunDirError(f"refusing to {'resume' if mode == 'resume' else 'delete the contents of'} {d}: "
                              f"it is not empty and {what}")
        if mode == "overwrite":
            if saved["command"] != self.command:
                # e.g. `hipro export --run-dir <a compare run> --overwrite`, meant for --out: another
                # command's run (its trained checkpoints) is never emptied as a side effect
                raise RunDirError(f"refusing to delete the contents of {d}: it holds a `hipro {saved['command']}` "
                                  f"run, and --overwrite replaces only a `hipro {self.command}` run; delete it "
                                  f"yourself or choose another --run-dir")
            before_writing()
            if not dry:
                _clear_directory(d)
            return False
        if saved["command"] != self.command:
            raise RunDirError(f"cannot resume {d}: it is a `hipro {saved['command']}` run, not `hipro "
                              f"{self.command}`")
        if config is not None:
            check_resume_config(saved, config, d)
        before_writing()
        return True

    def close(self) -> None:
        """Release the run directory's lock (the command is over; the process may go on)."""
        fd, self._lock_fd = getattr(self, "_lock_fd", None), None
        if fd is not None:
            os.close(fd)

    def path(self, name: str) -> Path:
        """run_dir/name (parents created); RunDirError if it is a symlink. On a
        non-writing rank: the same name in its scratch folder."""
        p = (self.dir if self.writer else self._scratch) / name
        p.parent.mkdir(parents=True, exist_ok=True)
        if p.is_symlink():
            raise RunDirError(f"{p} is a symbolic link: hipro writes only regular files in its run directory "
                              f"(remove the link)")
        return p

    def write_config(self, config: Mapping[str, Any]) -> Path:
        return dump_json(dict(config), self.path("config.json"))

    def log(self, event: str, **values) -> None:
        """Append one JSON line to metrics.jsonl (created with the umask's permissions;
        a symlink there is refused: O_NOFOLLOW)."""
        rec = {"time": round(_dt.datetime.now().timestamp(), 3), "event": event, **values}
        line = (json.dumps(rec, default=_json_default) + "\n").encode("utf-8")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
        try:
            fd = os.open(self.metrics_path, flags, 0o666)
        except OSError:
            if self.metrics_path.is_symlink():
                raise RunDirError(f"{self.metrics_path} is a symbolic link: hipro appends only to a regular "
                                  f"file (remove the link)") from None
            raise
        with os.fdopen(fd, "ab") as f:  # closes fd; writes the whole line
            f.write(line)

    def logged(self, event: str) -> int:
        """How many `event` lines metrics.jsonl holds (a resumed run's earlier ones included)."""
        try:
            lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return 0
        count = 0
        for line in lines:
            try:
                count += json.loads(line).get("event") == event
            except (json.JSONDecodeError, AttributeError):  # a line a killed writer cut short
                continue
        return count

    def write_json(self, name: str, obj: Any) -> Path:
        return dump_json(obj, self.path(name))

    def write_text(self, name: str, text: str) -> Path:
        return atomic_write_text(self.path(name), text)


def last_checkpoint_epoch(directory: str | Path) -> int | None:
    """The epoch (0-based) of the `last` checkpoint in `directory`, or None."""
    directory = Path(directory)
    if not ckpt.has_checkpoint(directory, "last"):
        return None
    return ckpt.load_checkpoint(directory, None, kind="last").epoch


# ------------------------------------------------------------------ model
def resolve_device(device: str | None) -> str:
    """"auto"/None -> "cuda" when available, else "cpu"; an explicit CUDA request
    without CUDA is an error (one line)."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    m = re.fullmatch(r"cuda(?::(\d+))?", device)
    if device != "cpu" and m is None:
        raise InvalidInputError(f"--device {device}: expected cpu, cuda, cuda:N or auto")
    if m is not None:
        if not torch.cuda.is_available():
            raise InvalidInputError(f"--device {device}: CUDA is not available on this machine")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            raise InvalidInputError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA "
                                    f"device(s), cuda:0..cuda:{torch.cuda.device_count() - 1}")
    return device


def register_model_config(path: str | Path) -> str:
    """Register an open_clip model config JSON; returns its model name (the file stem)."""
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"model config not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"{path}: invalid JSON: {e}") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise InvalidInputError(f"--model-config {path}: not an open_clip model config (no {', '.join(missing)})")
    open_clip.add_model_config(path)
    return path.stem


def check_model_args(name: str | None, pretrained: str | None, model_config: str | Path | None) -> str:
    """The model name load_model will build, after the checks that need no
    weights: the config JSON registers (it is a model config), the name is
    known, a weights path exists. Returns the name (the config's stem when
    --model is left at its default)."""
    import open_clip

    if model_config is not None:
        cfg_name = register_model_config(model_config)
        if name in (None, "hipro-tiny-clip"):
            name = cfg_name
    name = name or "hipro-tiny-clip"
    schema, _ = open_clip.factory.parse_model_name(name)  # "hf-hub:…", "local-dir:…": resolved at load
    if name != "hipro-tiny-clip" and schema is None and name not in open_clip.list_models():
        raise InvalidInputError(f"unknown model {name!r} (an open_clip model name, hipro-tiny-clip, "
                                f"or pass --model-config)")
    if pretrained is not None and not Path(pretrained).exists():
        if Path(pretrained).suffix or "/" in pretrained or "\\" in pretrained:
            raise MissingFileError(f"weights file not found: {pretrained}")
        tags = open_clip.list_pretrained_tags_by_model(name)
        # a tag: open_clip's own list says which exist (is_pretrained_cfg matches as it loads: "OpenAI", "a-b")
        if schema is None and not open_clip.pretrained.is_pretrained_cfg(name, pretrained):
            known = f"its tags: {', '.join(tags)}" if tags else "it has no open_clip tags"
            raise InvalidInputError(f"--pretrained {pretrained!r} is neither a weights file nor an open_clip tag "
                                    f"of model {name!r} ({known})")
    return name


def load_model(name: str = "hipro-tiny-clip", pretrained: str | None = None, device: str = "cpu",
               model_config: str | Path | None = None, seed: int = 0):
    """load_clip with an optional open_clip config JSON (registered first). Random
    weights (no pretrained file) are drawn with `seed`, so the same command gives
    the same model."""
    import logging

    name = check_model_args(name, pretrained, model_config)
    # (a --model-config model too: the config holds the architecture, not weights)
    if pretrained is None and name != "hipro-tiny-clip" and dist_group.is_main():
        import open_clip

        if open_clip.factory.parse_model_name(name)[0] is None:  # hf-hub: / local-dir: bring their weights
            # open_clip says so on the root logger, silenced below with its other start-up chatter
            warnings.warn(f"model {name!r} has random weights: no --pretrained was given (a weights file or an "
                          "open_clip tag such as 'openai')", stacklevel=2)
    state = torch.random.get_rng_state()
    prev = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random init on the root logger
    try:
        torch.manual_seed(seed)
        try:
            return load_clip(name, pretrained=pretrained, device=device)
        except RuntimeError as e:
            if "Model config for" in str(e) and "not found" in str(e):
                raise InvalidInputError(f"unknown model {name!r} (an open_clip model name, hipro-tiny-clip, "
                                 f"or pass --model-config)") from None
            raise
    finally:
        logging.getLogger().setLevel(prev)
        torch.random.set_rng_state(state)


# ------------------------------------------------------------------ features
@dataclass
class TaskFeatures:
    """Cached features of every task: train (few-shot), val, test splits as
    {task: (features [N, D], labels [N])} on the device; train_views {task: [N, K, D]}."""

    spec: MultiTaskSpec
    train: Split
    val: Split
    test: Split
    train_views: dict[str, torch.Tensor] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)  # "task/split" -> hit|built|stale|corrupt
    skipped: dict[str, list[str]] = field(default_factory=dict)
    shots: int | None = None
    seed: int = 0

    @property
    def tasks(self) -> dict[str, list[str]]:
        return self.spec.class_names()

    def train_for_fit(self) -> Split:
        """The training set for fit(): with augmented views, every view is a sample
        (see hipro_fast.data.feature_cache.stack_views); else the plain features."""

        out = {}
        for t, (f, y) in self.train.items():
            out[t] = stack_views(self.train_views[t], y) if t in self.train_views else (f, y)
        return out

    def missing(self, split: str) -> list[str]:
        """Tasks of the spec without any `split` features (e.g. a split that left a
        task no test image): they have no accuracy on that split."""
        have = {"train": self.train, "val": self.val, "test": self.test}[split]
        return [t for t in self.spec.tasks if t not in have]

    def summary_rows(self) -> list[dict[str, Any]]:
        rows = []
        for t in self.spec.tasks:
            rows.append({"task": t, "classes": len(self.spec.tasks[t].classes),
                         "train": int(self.train[t][0].shape[0]) if t in self.train else 0,
                         "val": int(self.val[t][0].shape[0]) if t in self.val else 0,
                         "test": int(self.test[t][0].shape[0]) if t in self.test else 0,
                         "cache": ",".join(sorted({v for k, v in self.status.items() if k.startswith(t + "/")})),
                         "skipped": sum(len(v) for k, v in self.skipped.items() if k.startswith(t + "/"))})
        return rows


class SkippedClassWarning(UserWarning):
    """skip_bad_images left a class no validation or test image."""


def _check_classes_left(task: str, split: str, classes: Sequence[str], records, enc) -> None:
    """After skip_bad_images: a class whose every image of a split was skipped.
    In training it is an error (the task would be trained without it and, with one
    class left, score 100% by construction, as the spec refuses up front); in val
    or test a warning (its accuracy no longer counts that class)."""
    had = {r.label for r in records}
    left = set(enc.labels.tolist())
    gone = [classes[c] for c in sorted(had - left)]
    if not gone:
        return
    first = next(p for p in enc.skipped if any(r.path == p and classes[r.label] == gone[0] for r in records))
    what = (f"task {task!r}: every {split} image of class {gone[0]!r} was skipped as undecodable "
            f"(--skip-bad-images; first {first})" + (f", and of {len(gone) - 1} more classes" if len(gone) > 1 else ""))
    if split == "train":
        raise SpecError(what + ": it would be trained without that class; fix or replace those images")
    warnings.warn(what + f": its {split} accuracy leaves that class out", SkippedClassWarning, stacklevel=3)


def held_out_val(task, shots: int, seed: int, per_class: int) -> list:
    """`per_class` validation records per class of `task` (a TaskData) from its
    training records that few_shot(shots, seed) did not draw; SpecError naming
    the class when too few are left (no silent fallback: the choice would rest
    on fewer images than it says)."""
    drawn = {r.path for r in few_shot(task.splits["train"], shots, seed, task=task.name, classes=task.classes)}
    rest = [r for r in task.splits["train"] if r.path not in drawn]
    for label, cname in enumerate(task.classes):
        left = sum(r.label == label for r in rest)
        if left < per_class:
            raise SpecError(f"task {task.name!r}, class {cname!r}: {left} training image(s) left after the "
                            f"{shots}-shot draw, but {per_class} are held out for validation; lower --shots "
                            "or give the task a val split")
    return few_shot(rest, per_class, seed, task=f"{task.name}/held-out-val", classes=task.classes)


def cache_features(clip, spec: MultiTaskSpec, *, shots: int | None = 16, seed: int = 0,
                   cache_dir: str | Path | None = None, device: str | None = None, views: int = 0,
                   skip_bad_images: bool = False, progress: bool = True, batch_size: int = 128,
                   num_workers: int | None = None, splits: Sequence[str] = ("train", "val", "test"),
                   log=None, val_from_train: int = 0) -> TaskFeatures:
    """Encode (or load from the cache) the few-shot training draw and the val/test splits.

    val_from_train: for a task without a val split, hold out this many images per
    class of its training images left out of the few-shot draw as its validation
    split (the protocol's rule, min(K, 4); seeded by (task, seed), independent of
    the draw's stream); 0 leaves such a task without validation. Needs shots >= 1.
    """
    if val_from_train and not shots:
        raise InvalidInputError("val_from_train holds out training images the few-shot draw left: it needs "
                                "shots >= 1 (with every training image drawn none is left)")

    fc = FeatureCache(clip, cache_dir, device=device, batch_size=batch_size, num_workers=num_workers,
                      skip_bad_images=skip_bad_images, progress=progress)
    train, val, test, views_out, status, skipped = {}, {}, {}, {}, {}, {}
    shot_tag = f"shots{shots}-seed{seed}" if shots else "all"
    for name, task in spec.tasks.items():
        for split in splits:
            records = task.splits[split]
            if split == "train":
                records = few_shot(records, shots, seed, task=name, classes=task.classes)
                tag, v = f"{name}/train/{shot_tag}", views
            elif split == "val" and not records and val_from_train:
                records, tag, v = held_out_val(task, shots, seed, val_from_train), f"{name}/val/{shot_tag}", 0
            else:
                tag, v = f"{name}/{split}", 0
            if not records:
                continue
            enc = fc.encode(records, tag=tag, views=v, seed=seed)
            status[f"{name}/{split}"] = enc.status
            if enc.skipped:
                skipped[f"{name}/{split}"] = enc.skipped
                _check_classes_left(name, split, task.classes, records, enc)
            {"train": train, "val": val, "test": test}[split][name] = (enc.features, enc.labels)
            if split == "train" and enc.views is not None:
                views_out[name] = enc.views
            if log is not None:
                log("cache", task=name, split=split, images=len(enc), status=enc.status,
                    skipped=len(enc.skipped), file=str(enc.file) if enc.file else None)
    return TaskFeatures(spec, train, val, test, views_out, status, skipped, shots, seed)


# ------------------------------------------------------------------ affinity / tree
def compute_affinity(clip, feats: TaskFeatures, method: str | None = None, progress: bool = True, **config):
    """([T, T] task affinity, task names) over the few-shot training draw
    (hipro_fast.method.affinity.task_affinity, with a progress bar over its steps)."""
    import numpy as np
    method = method or aff.DEFAULT_METHOD
    if method not in aff.METHODS:
        raise InvalidInputError(f"unknown affinity method {method!r} (methods: {', '.join(aff.METHODS)})")
    config = {k: v for k, v in config.items() if v is not None}
    steps = int(config.get("steps", aff.DEFAULTS[method]["steps"]))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"affinity ({method})", unit="step", leave=False)
    try:
        matrix = aff.task_affinity(clip, feats.tasks, feats.train_for_fit(), method=method,
                                   progress=(lambda step: bar.update(1)) if bar is not None else None, **config)
    except ForestError as e:  # say which step builds these prompts, with how many context tokens
        n_ctx = config.get("n_ctx", aff.DEFAULTS[method]["n_ctx"])
        raise ForestError(f"task-affinity step ({method}, {n_ctx} context tokens per prompt): {e}") from None
    finally:
        if bar is not None:
            bar.close()
    return np.asarray(matrix, dtype=float), list(feats.tasks)


def build_tree(matrix, names: Sequence[str], levels: int | None = None, threshold: float | None = None,
               linkage: str = "average"):
    return TaskTree.from_affinity(matrix, list(names), levels=levels, threshold=threshold, linkage=linkage)


def load_tree(spec: str, names: Sequence[str]):
    """A TaskTree from "flat", a JSON literal (a nested list, or tree.json's {"tree": ...}),
    or a tree.json path. A value starting with "[" or "{" is JSON, never a path
    (a long inline tree is not a file name)."""

    if spec == "flat":
        return TaskTree.flat(list(names))
    usage = "expected 'flat', 'auto', a tree.json file or a JSON nested list"
    shown = spec if len(spec) <= 60 else spec[:57] + "..."
    if spec.lstrip().startswith(("[", "{")):
        try:
            tree = TaskTree.from_json(spec)
        except json.JSONDecodeError as e:
            raise InvalidInputError(f"--tree: invalid JSON ({e.msg} at character {e.pos}); {usage}") from None
        except (KeyError, TypeError, ValueError) as e:
            raise TreeError(f"--tree {shown}: {_tree_problem(e)}; {usage}") from None
    else:
        p = Path(spec)
        try:
            exists = p.exists()
        except OSError:  # e.g. a name too long for the file system
            exists = False
        if p.suffix == ".json" or exists:
            if not p.is_file():
                raise MissingFileError(f"tree file not found: {p}")
            try:
                tree = TaskTree.from_json(p)
            except json.JSONDecodeError as e:
                raise InvalidInputError(f"tree file {p}: invalid JSON ({e.msg} at character {e.pos})") from None
            except (KeyError, TypeError, ValueError) as e:
                raise TreeError(f"tree file {p}: {_tree_problem(e)}") from None
        else:
            raise InvalidInputError(f"--tree {spec!r}: {usage}")
    try:
        tree.check_tasks(list(names))
    except TreeError as e:
        raise TreeError(f"--tree {shown}: {e}") from None
    return tree


def _tree_problem(e: Exception) -> str:
    return f"missing key {e}" if isinstance(e, KeyError) else " ".join(str(e).split())


# ------------------------------------------------------------------ training
def train_config_overrides(train_cfg_cls, overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Keep only the overrides TrainConfig knows (and that are set)."""
    import dataclasses

    if train_cfg_cls is None or not dataclasses.is_dataclass(train_cfg_cls):
        return {k: v for k, v in overrides.items() if v is not None}
    names = {f.name for f in dataclasses.fields(train_cfg_cls)}
    return {k: v for k, v in overrides.items() if v is not None and k in names}


def train_hipro(clip, feats: TaskFeatures, tree, *, n_ctx=16, combine: str = DEFAULT_COMBINE,
                ctx_init: str | None = None, seed: int = 0, device: str = "cpu",
                train_overrides: Mapping[str, Any] | None = None, callback=None,
                checkpoint_dir: str | Path | None = None, progress: bool = True, resume: bool = False,
                hipro_options: Mapping[str, Any] | None = None):
    """Build HiProModel on `tree` and fit it (checkpoints in `checkpoint_dir`;
    resume=True continues from its `last` checkpoint when there is one, exactly:
    see hipro_fast.method.training); returns (model holding the best contexts, FitResult)."""
    model = HiProModel(clip, feats.tasks, tree, n_ctx=n_ctx, combine=combine, ctx_init=ctx_init, seed=seed,
                       **dict(hipro_options or {}))
    model = model.to(device)
    overrides = train_config_overrides(getattr(training, "TrainConfig", None),
                                       {**(train_overrides or {}), "seed": seed, "progress": progress,
                                        "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None,
                                        "resume": bool(resume)})
    result = training.fit(model, feats.train_for_fit(), feats.val or None, callback=callback, **overrides)
    return model, result


def train_selected(clip, feats: TaskFeatures, tree, *, n_ctx=16, combine: str = DEFAULT_COMBINE,
                   ctx_init: str | None = None, seed: int = 0, device: str = "cpu",
                   select_by: str = baselines.DEFAULT_SELECT_BY, train_overrides: Mapping[str, Any] | None = None,
                   checkpoint_dir: str | Path | None = None, progress: bool = True, resume: bool = False,
                   hipro_options: Mapping[str, Any] | None = None, provenance: Mapping[str, Any] | None = None,
                   on_candidate: Callable[[str, Any, Any], None] | None = None):
    """method.selection.fit_selected on the cached features (train = the few-shot
    draw, val = the spec's val split or the held-out images): the protocol's
    HiPro as one product. With `checkpoint_dir`, each candidate's best contexts
    are saved in <checkpoint_dir>/<candidate> with `provenance` (and the
    candidate's name), and selection.json last; resume=True continues each
    candidate from its own checkpoint. on_candidate(name, model, FitResult) is
    called after each candidate's fit. Returns (SelectedModel, {candidate: FitResult})."""
    if not feats.val:
        raise InvalidInputError("per-task selection chooses on the validation split: the spec has none "
                                "(train HiPro's tree alone instead)")
    cfg = training.TrainConfig(**train_config_overrides(training.TrainConfig, {
        **(train_overrides or {}), "seed": seed, "progress": progress, "resume": bool(resume)}))

    def after_fit(cand, model, result):
        if checkpoint_dir:  # rank 0 writes; a failed write stops every rank (not a wait at the next collective)
            dist_group.main_first(lambda: save_model(model, sel.candidate_dir(checkpoint_dir, cand),
                                                     {**dict(provenance or {}), "candidate": cand}, result),
                                  f" saving candidate {cand}")
        if on_candidate is not None:
            on_candidate(cand, model, result)

    return sel.fit_selected(clip, feats.tasks, feats.train_for_fit(), feats.val, tree, n_ctx=n_ctx, combine=combine,
                            seed=seed, ctx_init=ctx_init, select_by=select_by, train_config=cfg, device=device,
                            checkpoint_dir=checkpoint_dir, extra=provenance, after_fit=after_fit,
                            **dict(hipro_options or {}))


def evaluate_model(model, data: Split) -> dict[str, float]:
    """Per-task accuracy of a HiProModel or a SelectedModel (each task by its chosen candidate)."""
    scores = model.evaluate(data) if isinstance(model, sel.SelectedModel) else training.evaluate(model, data)
    return {k: float(v) for k, v in scores.items()}


def save_model(model, directory: str | Path, extra: Mapping[str, Any] | None = None, result=None) -> Path:
    """Write `model`'s current contexts as the `best` checkpoint of `directory`,
    with `extra` (JSON-able provenance, e.g. the spec and seed) in its record.
    When fit already wrote `best` there, its tensors stay and `extra` is added to
    its record. In a multi-process run only rank 0 writes. Returns the directory."""
    directory = Path(directory)
    if dist_group.is_main() and ckpt.has_checkpoint(directory, "best"):
        # fit's own best, of this model: another run's (another tree, tasks or CLIP) is refused, not stamped
        ckpt.load_checkpoint(directory, model, kind="best", load_contexts=False)
        if extra:
            ckpt.annotate_checkpoint(directory, "best", extra)
    elif dist_group.is_main():  # rank 0 writes, once
        hist = list(getattr(result, "history", []) or [])
        epoch = int(getattr(result, "best_epoch", max(0, len(hist) - 1)) or 0)
        ckpt.save_checkpoint(directory, model, None, epoch, hist, kind="best",
                             best_epoch=epoch, best_val=getattr(result, "best_val", None),
                             train_config=getattr(result, "config", None), extra=dict(extra or {}))
    return directory


SELECTION = "selection"  # checkpoint_location's kind of a selection directory (hipro train --select per-task)


def checkpoint_location(path: str | Path) -> tuple[Path, str]:
    """A checkpoint directory (its `best`, else `last`), a <kind>.json file, or a
    selection directory (kind SELECTION; its selection.json may be named too)."""
    if not str(path).strip():  # Path("") is ".": the current folder, never meant
        raise InvalidInputError("--checkpoint is empty: name a checkpoint folder")
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"checkpoint not found: {path}")
    if path.is_file() and path.name == sel.SELECTION_FILE:
        return path.parent, SELECTION
    if path.is_dir() and sel.has_selection(path):
        return path, SELECTION
    if path.is_file():
        kind = path.stem
        if path.suffix != ".json" or kind not in ckpt.KINDS:
            raise InvalidInputError(f"{path}: expected a checkpoint directory or its best.json / last.json")
        return path.parent, kind
    for kind in ("best", "last"):
        if ckpt.has_checkpoint(path, kind):
            return path, kind
    hint = ""
    if any(ckpt.has_checkpoint(path / "checkpoints", k) for k in ("best", "last")):
        hint = f"; it is a run directory: its checkpoint is {path / 'checkpoints'}"
    elif any(ckpt.has_checkpoint(sel.candidate_dir(path, c), k) for c in baselines.SELECT_CANDIDATES
             for k in ("best", "last")):
        hint = (f"; it holds candidate folders of a `hipro train --select per-task` run that did not finish "
                f"(no {sel.SELECTION_FILE}): resume that run, or evaluate one candidate's folder")
    else:  # e.g. a compare draw's folder without selection: name what it holds
        def holds(d: Path, depth: int = 1) -> bool:  # a checkpoint or selection, or (one level down) folders of them
            if sel.has_selection(d) or any(ckpt.has_checkpoint(d, k) for k in ("best", "last")):
                return True
            return depth > 0 and any(holds(sub, depth - 1) for sub in d.iterdir() if sub.is_dir())

        inside = sorted(d.name for d in path.iterdir() if d.is_dir() and holds(d))
        if inside:
            hint = (f"; it holds the checkpoint folders {', '.join(inside[:6])}{', ...' if len(inside) > 6 else ''}"
                    ": pass one of them")
    raise MissingFileError(f"no checkpoint in {path} (best.json / last.json not found){hint}")


def load_model_checkpoint(path: str | Path, clip, device: str = "cpu"):
    """Rebuild the HiProModel a checkpoint was trained as, on `clip`, with its
    contexts; of a selection directory, the SelectedModel (every candidate
    rebuilt from its own checkpoint)."""
    directory, kind = checkpoint_location(path)
    if kind == SELECTION:
        chosen = check_selection_candidates(directory)
        models = {c: load_model_checkpoint(_candidate_checkpoint(directory, c), clip, device)
                  for c in chosen.candidates}
        return sel.SelectedModel(models, chosen)
    record = ckpt.load_checkpoint(directory, None, kind=kind)
    cfg = record.model_config
    width = getattr(getattr(clip.model, "token_embedding", None), "weight", None)
    if width is not None and "width" in cfg and int(cfg["width"]) != int(width.shape[1]):
        raise InvalidInputError(f"checkpoint {directory} was trained on a text tower of width {cfg['width']}, "
                         f"model {clip.name!r} has width {int(width.shape[1])} (pass the same --model)")
    model = HiProModel.from_config(clip, cfg).to(device)
    ckpt.load_checkpoint(directory, model, kind=kind)  # checks tasks/tree/contexts, loads the contexts
    _warn_if_other_image_tower(directory, record.extra.get("image_tower"), clip)
    progress = ckpt.epochs_trained(directory)
    if progress is not None and progress[0] < progress[1]:
        warnings.warn(f"checkpoint {directory} is of a run that stopped after {progress[0]} of its {progress[1]} "
                      f"epochs (interrupted?): its {kind} contexts are not the finished model's; resume that run "
                      "(--resume) to finish it")
    return model


def _warn_if_other_image_tower(directory: Path, trained_on: Any, clip, what: str = "checkpoint") -> None:
    """The text tower is checked with the contexts; the image tower, whose
    features the contexts were fit to, is only recorded (by `hipro train`) and
    may differ in dtype alone, so a difference is said, not refused."""
    now = image_tower_info(clip.model).get("image_tower")
    if isinstance(trained_on, str) and now is not None and now != trained_on:
        warnings.warn(f"{what} {directory} was trained on image features of tower {trained_on}; model "
                      f"{clip.name!r} has image tower {now} (other weights, or another dtype): its image features "
                      "are not those the contexts were fit to")


def warn_if_classifier_from_other_image_tower(path: str | Path, classifier, clip) -> None:
    """The warning load_model_checkpoint gives, for an exported Classifier (its clip_info)."""
    _warn_if_other_image_tower(Path(path), classifier.clip_info.get("image_tower"), clip, what="classifier")


def checkpoint_tasks(path: str | Path) -> dict[str, list[str]]:
    """{task: classes} a checkpoint (or a selection) was trained on, from its
    record alone (a command checks --task before it loads anything)."""
    directory, kind = checkpoint_location(path)
    if kind == SELECTION:
        chosen = check_selection_candidates(directory)
        return checkpoint_tasks(_candidate_checkpoint(directory, chosen.candidates[0]))
    trained = ckpt.load_checkpoint(directory, None, kind=kind).model_config.get("tasks")
    if not isinstance(trained, Mapping):
        raise CheckpointError(f"checkpoint {directory}: its record names no tasks")
    return {str(t): list(c) for t, c in trained.items()}


def check_model_matches(model, tasks: Mapping[str, Sequence[str]], where: str = "the spec") -> None:
    """Raise InvalidInputError naming the first task / class where `tasks` (from a
    spec) differs from what `model` was trained on."""
    _check_trained_tasks(model.tasks, tasks, where)


def _model_config(name: str) -> dict | None:
    """open_clip's config of model `name` (None when it is only known once the
    model is built, e.g. hf-hub: models)."""
    import open_clip

    if name == "hipro-tiny-clip":
        from ..data.bundled.tiny_clip import tiny_clip_config  # lazy: only this model needs it

        return tiny_clip_config()
    if open_clip.factory.parse_model_name(name)[0] is not None:
        return None  # hf-hub: / local-dir: configs are read (or fetched) when the model is built
    return open_clip.get_model_config(name)


def configured_text_width(name: str) -> int | None:
    """The text tower width open_clip's config of model `name` gives (None when unknown before it is built)."""
    width = ((_model_config(name) or {}).get("text_cfg") or {}).get("width")
    return int(width) if isinstance(width, int) else None


def configured_embed_dim(name: str) -> int | None:
    """The image/text embedding size open_clip's config of model `name` gives (None when unknown before it is built)."""
    dim = (_model_config(name) or {}).get("embed_dim")
    return int(dim) if isinstance(dim, int) and not isinstance(dim, bool) else None


def check_checkpoint_matches(path: str | Path, tasks: Mapping[str, Sequence[str]] | None = None,
                             where: str = "the spec", model: str | None = None) -> dict:
    """check_model_matches, and load_model_checkpoint's width check against the
    config of model `model`, from the checkpoint's record alone, before any model
    is loaded (a command can refuse before it opens its run directory). Returns
    the record's provenance (`extra`: what `hipro train` recorded, e.g. shots, seed);
    of a selection directory, every candidate is checked and the selection's is returned."""
    directory, kind = checkpoint_location(path)
    if kind == SELECTION:
        chosen = check_selection_candidates(directory)
        for c in chosen.candidates:
            check_checkpoint_matches(_candidate_checkpoint(directory, c), tasks, where, model)
        return dict(chosen.extra)
    record = ckpt.load_checkpoint(directory, None, kind=kind)
    if tasks is not None:
        trained = record.model_config.get("tasks")
        if not isinstance(trained, Mapping):
            raise CheckpointError(f"checkpoint {directory}: its record names no tasks")
        _check_trained_tasks(trained, tasks, where)
    width = configured_text_width(model) if model is not None else None
    trained_width = record.model_config.get("width")
    if width is not None and trained_width is not None and int(trained_width) != width:
        raise InvalidInputError(f"checkpoint {directory} was trained on a text tower of width {trained_width}, "
                                f"model {model!r} has width {width} (pass the same --model)")
    return dict(record.extra or {})


# provenance every candidate of a selection shares with it (what hipro train records)
_SHARED_PROVENANCE = ("spec", "model", "seed", "shots", "image_tower")


def check_selection_candidates(directory: str | Path) -> "sel.Selection":
    """The selection record of `directory`, checked against its candidate folders
    from their records alone: each was trained as that candidate
    (its recorded `candidate`), on the selection's draw (spec, model, seed,
    shots, image tower, where recorded), over exactly the tasks it chose for.
    CheckpointError naming the folder otherwise (a folder copied in from another
    run would be scored with choices made for other models)."""
    directory = Path(directory)
    chosen = sel.load_selection(directory)
    for c in chosen.candidates:
        sub = _candidate_checkpoint(directory, c)
        sub_dir, kind = checkpoint_location(sub)
        record = ckpt.load_checkpoint(sub_dir, None, kind=kind)
        extra = dict(record.extra or {})
        if "candidate" in extra and extra["candidate"] != c:
            raise CheckpointError(f"selection {directory}: folder {sub} holds candidate {extra['candidate']!r}, "
                                  f"not {c!r}")
        for key in _SHARED_PROVENANCE:
            if key in extra and key in chosen.extra and extra[key] != chosen.extra[key]:
                raise CheckpointError(f"selection {directory}: candidate {c!r} ({sub}) was trained with {key} "
                                      f"{extra[key]!r}, the selection with {chosen.extra[key]!r}: it is another "
                                      "run's model")
        trained = record.model_config.get("tasks")
        if not isinstance(trained, Mapping) or sorted(trained) != sorted(chosen.choices):
            raise CheckpointError(f"selection {directory}: candidate {c!r} ({sub}) has tasks "
                                  f"{sorted(trained) if isinstance(trained, Mapping) else None}, the selection "
                                  f"chose for {sorted(chosen.choices)}"[:400])
    return chosen


def _candidate_checkpoint(directory: Path, candidate: str) -> Path:
    sub = sel.candidate_dir(directory, candidate)
    if not sub.is_dir():
        raise CheckpointError(f"selection {directory}: candidate {candidate!r} has no checkpoint folder {sub}")
    return sub


def _check_trained_tasks(trained: Mapping[str, Sequence[str]], tasks: Mapping[str, Sequence[str]],
                         where: str) -> None:
    for task, classes in tasks.items():
        if task not in trained:
            raise InvalidInputError(f"task {task!r} of {where} is not in the checkpoint (checkpoint tasks: "
                                    f"{', '.join(trained)})")
        theirs = list(trained[task])
        if list(classes) != theirs:
            raise InvalidInputError(f"task {task!r}: {where} has classes {list(classes)}, the checkpoint {theirs}")


# ------------------------------------------------------------------ baselines
def run_compare(clip, feats: TaskFeatures, *, methods: Sequence[str] | None = None,
                seeds: Sequence[int] = (0,), tree=None, n_ctx: int | None = None, combine: str = DEFAULT_COMBINE,
                train_overrides: Mapping[str, Any] | None = None, progress: bool = True,
                checkpoint_dir: str | Path | None = None, resume: bool = False,
                hipro_options: Mapping[str, Any] | None = None, ctx_init: str | None = None):
    """baselines.compare on the cached features (train = the few-shot draw).
    With `checkpoint_dir`, every trained (method, seed) checkpoints into
    <checkpoint_dir>/<method>-seed<seed>, and resume=True continues each from there."""
    cfg = training.TrainConfig(**train_config_overrides(training.TrainConfig, {
        **(train_overrides or {}), "progress": progress,
        "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None, "resume": bool(resume)}))
    kw: dict[str, Any] = {"seeds": list(seeds), "tree": tree, "combine": combine, "train_config": cfg,
                          "ctx_init": ctx_init, **dict(hipro_options or {})}
    if n_ctx is not None:
        kw["n_ctx"] = n_ctx
    if methods:
        kw["methods"] = list(methods)
    return baselines.compare(clip, feats.tasks, feats.train_for_fit(), feats.test, feats.val or None, **kw)


def run_shots_protocol(clip, feats: TaskFeatures, *, shots: Sequence[int], seeds: Sequence[int],
                       methods: Sequence[str] | None = None, tree=None, n_ctx: int | None = None,
                       combine: str = DEFAULT_COMBINE, train_overrides: Mapping[str, Any] | None = None,
                       affinity_config: Mapping[str, Any] | None = None, progress: bool = True,
                       checkpoint_dir: str | Path | None = None, resume: bool = False,
                       hipro_options: Mapping[str, Any] | None = None, on_run=None,
                       parallel: str = "draws", ctx_init: str | None = None) -> protocol.ProtocolResult:
    """CoOp's protocol (hipro_fast.method.protocol.run_protocol) on cached features:
    `feats.train` is every training image of each task (cache_features with
    shots=None); each (K, seed) draws K training images per class from it and
    min(K, 4) validation images per class from the task's val split (`feats.val`)
    when the spec gives one, else from the remaining training images. With
    `checkpoint_dir`, each draw checkpoints under <dir>/shots<K>-seed<S>/.
    parallel: how several ranks share the grid (protocol.PARALLEL_MODES)."""
    cfg = training.TrainConfig(**train_config_overrides(training.TrainConfig, {
        **(train_overrides or {}), "progress": progress,
        "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None, "resume": bool(resume)}))
    kw: dict[str, Any] = {"shots": list(shots), "seeds": list(seeds), "tree": tree, "combine": combine,
                          "train_config": cfg, "affinity_config": dict(affinity_config or {}) or None,
                          "on_run": on_run, "pool_views": feats.train_views or None,
                          "val_pool": feats.val or None, "parallel": parallel, "ctx_init": ctx_init,
                          **dict(hipro_options or {})}
    if n_ctx is not None:
        kw["n_ctx"] = n_ctx
    if methods:
        kw["methods"] = list(methods)
    return protocol.run_protocol(clip, feats.tasks, feats.train, feats.test, **kw)


def table_results(table) -> dict[str, dict[str, float]]:
    """{method: {task: mean test accuracy}} of a ComparisonTable."""
    return {m: {t: float(a) for t, a in r.task_acc.items()} for m, r in table.results.items()}


# ------------------------------------------------------------------ bundled data
def export_bundled(root: str | Path, seed: int = 0) -> Path:
    """Export the bundled benchmark as image folders once (reused when complete
    and of the same seed). The export goes to a fresh folder beside `root` and is
    moved in place when whole, so a re-export never mixes two seeds' images and
    an interrupted one leaves nothing half-written."""

    root = Path(root)
    spec = root / "tasks.toml"
    done = root / ".complete"
    stamp = f"seed {int(seed)}\n"
    if spec.is_file() and done.is_file() and done.read_text() == stamp:
        return spec
    if root.exists() and not _is_bundled_export(root):
        raise InvalidInputError(f"{root} is not an export of the bundled benchmark and is not empty: choose "
                                "another --data-dir (an export there is replaced when re-exported)")
    root.parent.mkdir(parents=True, exist_ok=True)
    fresh = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
    old = None
    try:
        export_image_folders(fresh, seed=seed)
        (fresh / ".complete").write_text(stamp)
        _apply_umask(fresh)  # mkdtemp makes 0700; the export is shared like any folder the user makes
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.old.", dir=root.parent))
            os.replace(root, old / root.name)
        try:
            os.replace(fresh, root)
        except OSError:
            # another process finished the same export first: use it if it is this seed's
            if done.is_file() and done.read_text() == stamp:
                return spec
            if old is not None and not root.exists():
                os.replace(old / root.name, root)  # put the previous export back
            raise
    finally:
        shutil.rmtree(fresh, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return spec


def _is_bundled_export(root: Path) -> bool:
    """An empty folder, or what export_image_folders writes (tasks.toml, .complete
    and task folders of train/test folders), complete or interrupted: safe to replace."""
    if not root.is_dir():
        return False
    for entry in root.iterdir():
        if entry.name in ("tasks.toml", ".complete"):
            continue
        if not entry.is_dir() or not {c.name for c in entry.iterdir()} <= {"train", "test"}:
            return False
    return True


def _apply_umask(folder: Path) -> None:
    dir_mode, file_mode = new_dir_mode(), new_file_mode()
    for path in (folder, *folder.rglob("*")):
        path.chmod(dir_mode if path.is_dir() else file_mode)
