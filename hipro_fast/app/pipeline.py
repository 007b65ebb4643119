"""The steps behind the ``hipro`` CLI, callable from Python.

spec -> frozen CLIP -> cached image features -> affinity -> tree -> HiPro
training / baselines -> report. Each step is a function; :class:`Run` is the
run directory (resolved config, metrics as JSON lines, checkpoints, figures and
``report.md``).
"""
from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from ..data.clip_loading import load_clip
from ..data.feature_cache import FeatureCache, stack_views
from ..data.tasks_spec import MultiTaskSpec, few_shot
from ..engine.prompt_forest import DEFAULT_COMBINE
from ..method import affinity as aff
from ..method import baselines, training
from ..method import checkpoint as ckpt
from ..method.model import HiProModel
from ..method.tree import TaskTree
from .report import Report

__all__ = [
    "Run", "TaskFeatures", "resolve_device", "register_model_config", "load_model", "cache_features",
    "compute_affinity", "build_tree", "train_hipro", "evaluate_model", "save_model", "load_model_checkpoint",
    "run_compare", "export_bundled",
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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
    tmp.replace(path)
    return path


class Run:
    """A run directory: config.json, metrics.jsonl, checkpoints/, figures, report.md."""

    def __init__(self, run_dir: str | Path | None, command: str, config: Mapping[str, Any] | None = None):
        if run_dir is None:
            stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
            run_dir = Path("runs") / f"{stamp}-{command}"
            i = 1
            while run_dir.exists():
                run_dir = Path("runs") / f"{stamp}-{command}-{i}"
                i += 1
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.command = command
        self.metrics_path = self.dir / "metrics.jsonl"
        self.report = Report(self.dir, title=f"hipro {command}")
        if config is not None:
            self.write_config(config)

    def path(self, name: str) -> Path:
        p = self.dir / name
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_config(self, config: Mapping[str, Any]) -> Path:
        return dump_json(dict(config), self.dir / "config.json")

    def log(self, event: str, **values) -> None:
        rec = {"time": round(_dt.datetime.now().timestamp(), 3), "event": event, **values}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(rec, default=_json_default) + "\n")

    def write_json(self, name: str, obj: Any) -> Path:
        return dump_json(obj, self.path(name))


# ------------------------------------------------------------------ model
def resolve_device(device: str | None) -> str:
    """"auto"/None -> "cuda" when available, else "cpu"; an explicit CUDA request
    without CUDA is an error (one line)."""
    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    return str(device)


def register_model_config(path: str | Path) -> str:
    """Register an open_clip model config JSON; returns its model name (the file stem)."""
    import open_clip

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config not found: {path}")
    try:
        json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    open_clip.add_model_config(path)
    return path.stem


def load_model(name: str = "hipro-tiny-clip", pretrained: str | None = None, device: str = "cpu",
               model_config: str | Path | None = None, seed: int = 0):
    """load_clip with an optional open_clip config JSON (registered first). Random
    weights (no pretrained file) are drawn with `seed`, so the same command gives
    the same model."""
    import logging

    if model_config is not None:
        cfg_name = register_model_config(model_config)
        if name in (None, "hipro-tiny-clip"):
            name = cfg_name
    if pretrained is not None and not Path(pretrained).exists() and Path(pretrained).suffix:
        raise FileNotFoundError(f"weights file not found: {pretrained}")
    state = torch.random.get_rng_state()
    prev = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns about random init on the root logger
    try:
        torch.manual_seed(seed)
        try:
            return load_clip(name, pretrained=pretrained, device=device)
        except RuntimeError as e:
            if "Model config for" in str(e) and "not found" in str(e):
                raise ValueError(f"unknown model {name!r} (an open_clip model name, hipro-tiny-clip, "
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


def cache_features(clip, spec: MultiTaskSpec, *, shots: int | None = 16, seed: int = 0,
                   cache_dir: str | Path | None = None, device: str | None = None, views: int = 0,
                   skip_bad_images: bool = False, progress: bool = True, batch_size: int = 128,
                   num_workers: int | None = None, splits: Sequence[str] = ("train", "val", "test"),
                   log=None) -> TaskFeatures:
    """Encode (or load from the cache) the few-shot training draw and the val/test splits."""

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
            else:
                tag, v = f"{name}/{split}", 0
            if not records:
                continue
            enc = fc.encode(records, tag=tag, views=v, seed=seed)
            status[f"{name}/{split}"] = enc.status
            if enc.skipped:
                skipped[f"{name}/{split}"] = enc.skipped
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
        raise ValueError(f"unknown affinity method {method!r} (methods: {', '.join(aff.METHODS)})")
    config = {k: v for k, v in config.items() if v is not None}
    steps = int(config.get("steps", aff.DEFAULTS[method]["steps"]))
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"affinity ({method})", unit="step", leave=False)
    try:
        matrix = aff.task_affinity(clip, feats.tasks, feats.train_for_fit(), method=method,
                                   progress=(lambda step: bar.update(1)) if bar is not None else None, **config)
    finally:
        if bar is not None:
            bar.close()
    return np.asarray(matrix, dtype=float), list(feats.tasks)


def build_tree(matrix, names: Sequence[str], levels: int | None = None, threshold: float | None = None,
               linkage: str = "average"):
    return TaskTree.from_affinity(matrix, list(names), levels=levels, threshold=threshold, linkage=linkage)


def load_tree(spec: str, names: Sequence[str]):
    """A TaskTree from "flat", a tree.json path, or a JSON/nested-list literal."""

    if spec == "flat":
        return TaskTree.flat(list(names))
    p = Path(spec)
    if p.suffix == ".json" or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"tree file not found: {p}")
        tree = TaskTree.from_json(p)
    else:
        try:
            tree = TaskTree.from_json(spec)
        except json.JSONDecodeError:
            raise ValueError(f"--tree {spec!r}: expected 'flat', 'auto', a tree.json file or a JSON nested list") \
                from None
    tree.check_tasks(list(names))
    return tree


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
                checkpoint_dir: str | Path | None = None, progress: bool = True):
    """Build HiProModel on `tree` and fit it (checkpoints in `checkpoint_dir`);
    returns (model holding the best contexts, FitResult)."""
    model = HiProModel(clip, feats.tasks, tree, n_ctx=n_ctx, combine=combine, ctx_init=ctx_init, seed=seed)
    model = model.to(device)
    overrides = train_config_overrides(getattr(training, "TrainConfig", None),
                                       {**(train_overrides or {}), "seed": seed, "progress": progress,
                                        "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None})
    result = training.fit(model, feats.train_for_fit(), feats.val or None, callback=callback, **overrides)
    return model, result


def evaluate_model(model, data: Split) -> dict[str, float]:
    return {k: float(v) for k, v in training.evaluate(model, data).items()}


def save_model(model, directory: str | Path, extra: Mapping[str, Any] | None = None, result=None) -> Path:
    """Write `model`'s current contexts as the `best` checkpoint of `directory`
    (unless fit already wrote one there); returns the directory."""
    directory = Path(directory)
    if not ckpt.has_checkpoint(directory, "best"):
        hist = list(getattr(result, "history", []) or [])
        epoch = int(getattr(result, "best_epoch", max(0, len(hist) - 1)) or 0)
        ckpt.save_checkpoint(directory, model, None, epoch, hist, kind="best",
                             best_epoch=epoch, best_val=getattr(result, "best_val", None),
                             train_config=getattr(result, "config", None), extra=dict(extra or {}))
    return directory


def _checkpoint_location(path: str | Path) -> tuple[Path, str]:
    """A checkpoint directory (its `best`, else `last`) or a <kind>.json file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_file():
        kind = path.stem
        if path.suffix != ".json" or kind not in ckpt.KINDS:
            raise ValueError(f"{path}: expected a checkpoint directory or its best.json / last.json")
        return path.parent, kind
    for kind in ("best", "last"):
        if ckpt.has_checkpoint(path, kind):
            return path, kind
    raise FileNotFoundError(f"no checkpoint in {path} (best.json / last.json not found)")


def load_model_checkpoint(path: str | Path, clip, device: str = "cpu"):
    """Rebuild the HiProModel a checkpoint was trained as, on `clip`, with its contexts."""
    directory, kind = _checkpoint_location(path)
    record = ckpt.load_checkpoint(directory, None, kind=kind)
    cfg = record.model_config
    tree = TaskTree.from_nested(cfg["tree"])
    counts = {n: int(cfg.get("n_ctx", {}).get(n, 0)) for n in tree.nodes}
    width = getattr(getattr(clip.model, "token_embedding", None), "weight", None)
    if width is not None and "width" in cfg and int(cfg["width"]) != int(width.shape[1]):
        raise ValueError(f"checkpoint {directory} was trained on a text tower of width {cfg['width']}, "
                         f"model {clip.name!r} has width {int(width.shape[1])} (pass the same --model)")
    model = HiProModel(clip, cfg["tasks"], tree, n_ctx=counts, combine=cfg.get("combine", "concat"))
    model = model.to(device)
    ckpt.load_checkpoint(directory, model, kind=kind)  # checks tasks/tree/contexts, loads the contexts
    return model


def check_model_matches(model, tasks: Mapping[str, Sequence[str]], where: str = "the spec") -> None:
    """Raise ValueError naming the first task / class where `tasks` (from a spec)
    differs from what `model` was trained on."""
    for task, classes in tasks.items():
        if task not in model.tasks:
            raise ValueError(f"task {task!r} of {where} is not in the checkpoint (checkpoint tasks: "
                             f"{', '.join(model.tasks)})")
        theirs = list(model.tasks[task])
        if list(classes) != theirs:
            raise ValueError(f"task {task!r}: {where} has classes {list(classes)}, the checkpoint {theirs}")


# ------------------------------------------------------------------ baselines
def run_compare(clip, feats: TaskFeatures, *, methods: Sequence[str] | None = None,
                seeds: Sequence[int] = (0,), tree=None, n_ctx: int | None = None, combine: str = DEFAULT_COMBINE,
                train_overrides: Mapping[str, Any] | None = None, progress: bool = True):
    """baselines.compare on the cached features (train = the few-shot draw)."""
    cfg = training.TrainConfig(**train_config_overrides(training.TrainConfig,
                                                        {**(train_overrides or {}), "progress": progress}))
    kw: dict[str, Any] = {"seeds": list(seeds), "tree": tree, "combine": combine, "train_config": cfg}
    if n_ctx:
        kw["n_ctx"] = n_ctx
    if methods:
        kw["methods"] = list(methods)
    return baselines.compare(clip, feats.tasks, feats.train_for_fit(), feats.test, feats.val or None, **kw)


def table_results(table) -> dict[str, dict[str, float]]:
    """{method: {task: mean test accuracy}} of a ComparisonTable."""
    return {m: {t: float(a) for t, a in r.task_acc.items()} for m, r in table.results.items()}


# ------------------------------------------------------------------ bundled data
def export_bundled(root: str | Path, seed: int = 0) -> Path:
    """Export the bundled benchmark as image folders once (reused when complete)."""

    root = Path(root)
    spec = root / "tasks.toml"
    done = root / ".complete"
    if spec.is_file() and done.is_file():
        return spec
    root.mkdir(parents=True, exist_ok=True)
    out = Path(export_image_folders(root, seed=seed))
    done.write_text("ok\n")
    return out
