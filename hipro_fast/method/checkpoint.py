"""Checkpoints of HiPro training: contexts only, written atomically.

A checkpoint directory holds two checkpoints, `last` (for resuming) and `best`
(the best-validation contexts). Each is a pair

    <kind>.json                   tree, model config, epoch, history, train config, ...
    <kind>-e<epoch>.safetensors   "ctx/<node>" contexts, "opt/<key>/<node>" optimiser
                                  state (SGD momentum_buffer; AdamW step, exp_avg,
                                  exp_avg_sq; L-BFGS's global state under its first
                                  context), "best/<node>" best-so-far contexts
                                  (`last` only)

The frozen CLIP is never stored. Both files are written atomically (a temp file
in the same directory, fsync, os.replace, directory fsync); the tensor file
carries the epoch in its name and is written FIRST, the JSON (which names the
tensor file and its sha256) is the commit point, and superseded tensor files are
removed only after it. A process killed at any moment therefore leaves the
previous checkpoint loadable (plus, at most, a stray temp or tensor file that
the next save removes).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import CheckpointError, InvalidInputError, MissingFileError, TaskSpecError, TreeError
from ..files import atomic_write_bytes, atomic_write_text
from .model import HiProModel
from .tree import TaskTree

FORMAT = "hipro_fast.checkpoint"  # on-disk tag; kept from before the package split
VERSION = 1
KINDS = ("last", "best")


# ------------------------------------------------------- optimizer state
# TrainConfig fields (hipro_fast.method.training) that change the trajectory: a resume must match them.
TRAJECTORY_FIELDS = ("optimizer", "lr", "momentum", "weight_decay", "epochs", "min_steps", "warmup_epochs", "warmup_lr",
                     "batch_size", "steps_per_epoch", "amp", "seed", "eval_every")


# the per-parameter state each supported optimiser keeps (TrainConfig.optimizer; AdamW without amsgrad)
_STATE_KEYS = {torch.optim.SGD: {"momentum_buffer"}, torch.optim.AdamW: {"step", "exp_avg", "exp_avg_sq"}}
# L-BFGS keeps one global state, under its first parameter; which keys exist depends on how far it got.
# Python numbers are kept as float64 scalars (exact for its step length, loss and counters), the
# curvature pairs as stacked [m, P] tensors; "al" is scratch space rewritten every iteration.
_LBFGS_NUMBERS = ("func_evals", "n_iter", "t", "prev_loss")
_LBFGS_INTS = ("func_evals", "n_iter")
_LBFGS_TENSORS = ("d", "prev_flat_grad", "H_diag")
_LBFGS_LISTS = ("old_dirs", "old_stps", "ro")
_LBFGS_KEYS = set(_LBFGS_NUMBERS + _LBFGS_TENSORS + _LBFGS_LISTS)


def _stored_dtype(t: Any) -> torch.dtype:
    """The dtype a tensor is kept in: float64 stays float64 (a float64 model
    resumes bit for bit), anything else is kept as float32 (exact for fp32, bf16
    and fp16)."""
    return torch.float64 if torch.is_tensor(t) and t.dtype == torch.float64 else torch.float32


def _lbfgs_tensors(state: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    size = int(state["d"].numel()) if "d" in state else 0  # the flat parameter count
    for key, value in state.items():
        if key in _LBFGS_NUMBERS:
            out[key] = torch.tensor(float(value), dtype=torch.float64)
        elif key in _LBFGS_TENSORS:  # H_diag is the int 1 until the first curvature pair
            out[key] = torch.as_tensor(value, dtype=_stored_dtype(value)).detach().clone()
        elif key in _LBFGS_LISTS:
            shape = (0,) if key == "ro" else (0, size)
            out[key] = torch.stack([torch.as_tensor(v).detach() for v in value]).to(_stored_dtype(value[0])) \
                if value else torch.zeros(shape, dtype=_stored_dtype(state.get("d")))
    return out


def _lbfgs_state(tensors: Mapping[str, torch.Tensor], p: torch.Tensor) -> dict[str, Any]:
    state: dict[str, Any] = {}
    for key, value in tensors.items():
        if key in _LBFGS_INTS:
            state[key] = int(value.item())
        elif key in _LBFGS_NUMBERS:
            state[key] = float(value.item())
        elif key in _LBFGS_TENSORS:  # torch's L-BFGS keeps them in the parameters' dtype
            state[key] = value.to(p.device, p.dtype).clone()
        else:
            state[key] = [row.to(p.device, p.dtype).clone() for row in value]
    return state


def collect_optimizer_state(optimizer: torch.optim.Optimizer, model: HiProModel) -> dict[str, dict[str, torch.Tensor]]:
    """{node: {state key: tensor}} of the contexts the optimiser holds state for
    (SGD: momentum_buffer; AdamW: step, exp_avg, exp_avg_sq; L-BFGS: its global
    state, under its first context)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for node, p in model.learnable().items():
        state = optimizer.state.get(p, {})
        if isinstance(optimizer, torch.optim.LBFGS):
            tensors = _lbfgs_tensors(state)
        else:
            tensors = {k: (v if torch.is_tensor(v) else torch.tensor(float(v))).detach().clone()
                       for k, v in state.items() if v is not None}
        if tensors:
            out[node] = tensors
    return out


def restore_optimizer_state(optimizer: torch.optim.Optimizer, model: HiProModel,
                            state: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """Restore collect_optimizer_state(): every tensor on its context's device; AdamW's
    step count stays a CPU fp32 scalar, as torch keeps it."""
    learnable = model.learnable()
    expected = _STATE_KEYS.get(type(optimizer))
    for node, tensors in state.items():
        if node not in learnable:
            raise TaskSpecError(f"checkpoint has optimiser state for unknown node {node!r}")
        if expected is not None and set(tensors) != expected:
            raise CheckpointError(f"cannot resume: the checkpoint holds optimiser state {sorted(tensors)} for node "
                                  f"{node!r}, but this run's {type(optimizer).__name__} keeps {sorted(expected)}")
        p = learnable[node]
        if isinstance(optimizer, torch.optim.LBFGS):
            unknown = set(tensors) - _LBFGS_KEYS
            if unknown:
                raise CheckpointError(f"cannot resume: the checkpoint holds optimiser state {sorted(unknown)} "
                                      f"for node {node!r}, which L-BFGS does not keep")
            optimizer.state[p] = _lbfgs_state(tensors, p)
            continue
        restored = {}
        for key, value in tensors.items():
            restored[key] = value.clone() if key == "step" else value.to(p.device, p.dtype).clone()
        optimizer.state[p] = restored


# ---------------------------------------------------------------- records
@dataclass
class Checkpoint:
    """A loaded checkpoint. contexts / best_contexts: node -> tensor (CPU);
    optimizer_state: node -> {state key -> tensor} (CPU)."""

    kind: str
    epoch: int
    history: list[dict[str, Any]]
    contexts: dict[str, torch.Tensor]
    optimizer_state: dict[str, dict[str, torch.Tensor]]
    best_epoch: int | None
    best_val: float | None
    best_contexts: dict[str, torch.Tensor] | None
    model_config: dict[str, Any]
    train_config: dict[str, Any] | None
    extra: dict[str, Any]
    path: Path


FIT_EXTRA_KEYS = ("train_sizes", "scaler")  # what fit keeps in a checkpoint's extra, and resume reads


def _json_path(directory: Path, kind: str) -> Path:
    if kind not in KINDS:
        raise InvalidInputError(f"checkpoint kind must be one of {KINDS}, got {kind!r}")
    return directory / f"{kind}.json"


def has_checkpoint(directory: str | Path, kind: str = "last") -> bool:
    return _json_path(Path(directory), kind).exists()


def epochs_trained(directory: str | Path) -> tuple[int, int] | None:
    """(epochs its newest checkpoint had trained, epochs the run was to train),
    from `last`'s record alone; None when that is not recorded or not readable.
    Fewer than planned: an interrupted run (fit runs every epoch it is given)."""
    path = _json_path(Path(directory), "last")
    try:
        record = _read_record(path)
        planned = (record.get("train_config") or {}).get("epochs")
        return int(record["epoch"]) + 1, int(planned)
    except (OSError, CheckpointError, KeyError, TypeError, ValueError):
        return None


def clear_checkpoints(directory: str | Path) -> None:
    """Remove every kind's checkpoint from `directory` (a run that starts over in
    it): the JSON records first (a crash in between leaves no record naming a
    missing file), then their tensor files. Other files are left alone."""
    directory = Path(directory)
    if not directory.is_dir():
        return
    for kind in KINDS:
        _json_path(directory, kind).unlink(missing_ok=True)
    for f in directory.iterdir():
        tensors = f.name.startswith(tuple(f"{k}-e" for k in KINDS)) and f.name.endswith(".safetensors")
        leftover_tmp = f.name.startswith(tuple(f".{k}" for k in KINDS)) and f.name.endswith(".tmp")
        if tensors or leftover_tmp:
            f.unlink(missing_ok=True)


def _config_dict(train_config: Any) -> dict[str, Any] | None:
    if train_config is None:
        return None
    if dataclasses.is_dataclass(train_config):
        return dataclasses.asdict(train_config)
    return dict(train_config)


def save_checkpoint(directory: str | Path, model: HiProModel,
                    optimizer_state: Mapping[str, Mapping[str, torch.Tensor]] | torch.optim.Optimizer | None,
                    epoch: int, history: list[dict[str, Any]], *, kind: str = "last",
                    best_epoch: int | None = None, best_val: float | None = None,
                    best_state: Mapping[str, torch.Tensor] | None = None,
                    train_config: Any = None, extra: Mapping[str, Any] | None = None) -> Path:
    """Atomically write the `kind` checkpoint of `model` after `epoch`.

    Args:
        directory: the checkpoint directory (created if needed).
        model: the HiProModel whose contexts are saved.
        optimizer_state: node -> {state key -> tensor} (see collect_optimizer_state), a
            torch optimizer over the model's contexts, or None.
        epoch: the last completed epoch (0-based).
        history: per-epoch records so far (JSON-able).
        best_epoch / best_val / best_state: best-so-far selection (best_state is
            stored as "best/<node>" tensors).
        train_config: the TrainConfig (stored for resume checks).
        extra: more JSON-able state (e.g. GradScaler state, train sizes).
    Returns:
        the path of the JSON file.
    """
    directory = Path(directory)
    json_path = _json_path(directory, kind)
    if isinstance(optimizer_state, torch.optim.Optimizer):
        optimizer_state = collect_optimizer_state(optimizer_state, model)
    tensors: dict[str, torch.Tensor] = {}
    for node, p in model.learnable().items():
        tensors[f"ctx/{node}"] = p.detach().to(_stored_dtype(p)).cpu().contiguous()
    for node, state in (optimizer_state or {}).items():
        for key, value in state.items():
            # the round trip is exact: fp32 state stays fp32, float64 state (L-BFGS's numbers, a float64 model's) float64
            tensors[f"opt/{key}/{node}"] = value.detach().to(_stored_dtype(value)).cpu().contiguous()
    for node, value in (best_state or {}).items():
        tensors[f"best/{node}"] = value.detach().to(_stored_dtype(value)).cpu().contiguous()
    from safetensors.torch import save

    blob = save(tensors, metadata={"format": FORMAT, "kind": kind, "epoch": str(int(epoch))})
    tensor_name = f"{kind}-e{int(epoch):05d}.safetensors"
    record = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind,
        "epoch": int(epoch),
        "tensors": tensor_name,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "model": model.config(),
        "train_config": _config_dict(train_config),
        "history": list(history),
        "best_epoch": None if best_epoch is None else int(best_epoch),
        "best_val": best_val,
        "extra": dict(extra or {}),
    }
    text = json.dumps(record, indent=1, allow_nan=False)
    atomic_write_bytes(directory / tensor_name, blob)   # 1. the tensors, under a new name
    atomic_write_text(json_path, text)                   # 2. the commit point
    for stale in directory.iterdir():                    # 3. superseded files
        name = stale.name
        superseded = name.startswith(f"{kind}-e") and name.endswith(".safetensors") and name != tensor_name
        leftover_tmp = name.startswith((f".{kind}-e", f".{kind}.json.")) and name.endswith(".tmp")
        if superseded or leftover_tmp:
            try:
                stale.unlink()
            except FileNotFoundError:
                pass
    return json_path


def annotate_checkpoint(directory: str | Path, kind: str, extra: Mapping[str, Any]) -> Path:
    """Add `extra`'s keys to the `kind` checkpoint's JSON-able `extra` (e.g. the
    CLI's provenance on the `best` checkpoint fit wrote), rewriting its record
    atomically; the tensors and their sha256 stay as they are. Returns the JSON
    path. `extra`'s values replace earlier ones under the same keys (a resumed
    run re-annotates), so keep clear of the keys fit writes (`train_sizes`,
    `scaler`: resume reads them); those are refused."""
    json_path = _json_path(Path(directory), kind)
    if not json_path.exists():
        raise MissingFileError(f"no {kind} checkpoint in {directory} ({json_path.name} not found)")
    record = _read_record(json_path)
    have = dict(record.get("extra") or {})
    try:
        new = json.loads(json.dumps(dict(extra), allow_nan=False))  # JSON-able now, as the file will hold it
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"checkpoint extra for {json_path}: not JSON-able ({e})") from None
    reserved = sorted(set(new) & set(FIT_EXTRA_KEYS))
    if reserved:
        raise InvalidInputError(f"checkpoint extra for {json_path}: {reserved} are fit's own (resume reads them)")
    record["extra"] = {**have, **new}
    atomic_write_text(json_path, json.dumps(record, indent=1, allow_nan=False))
    return json_path


# ---------------------------------------------------------------- compatibility
def check_model_config(saved: Mapping[str, Any], model: HiProModel) -> None:
    """Raise TaskSpecError / TreeError / CheckpointError naming the first item where
    the checkpoint's tasks, classes, tree, contexts or tower differ from the model's."""
    mine = model.config()
    saved_tasks: Mapping[str, list[str]] = saved.get("tasks", {})
    for task in saved_tasks:
        if task not in mine["tasks"]:
            raise TaskSpecError(f"checkpoint task {task!r} is not a task of the model "
                                f"(model tasks: {list(mine['tasks'])})")
    for task in mine["tasks"]:
        if task not in saved_tasks:
            raise TaskSpecError(f"model task {task!r} is not in the checkpoint "
                                f"(checkpoint tasks: {list(saved_tasks)})")
    for task, classes in mine["tasks"].items():
        theirs = list(saved_tasks[task])
        if theirs != list(classes):
            if len(theirs) != len(classes):
                raise TaskSpecError(f"task {task!r}: checkpoint has {len(theirs)} classes, "
                                    f"the model {len(classes)}")
            i = next(i for i, (a, b) in enumerate(zip(theirs, classes)) if a != b)
            raise TaskSpecError(f"task {task!r}: class {i} is {theirs[i]!r} in the checkpoint "
                                f"but {classes[i]!r} in the model")
    if saved.get("tree") != mine["tree"]:
        try:
            theirs_tree = TaskTree.from_nested(saved.get("tree"))
        except (TreeError, TypeError) as e:
            raise TreeError(f"checkpoint tree {saved.get('tree')!r} is invalid: {e}") from None
        for task in model.tasks:
            a, b = theirs_tree.path(task), model.tree.path(task)
            if a != b:
                raise TreeError(f"task {task!r} sits at {' > '.join(a)} in the checkpoint tree but at "
                                f"{' > '.join(b)} in the model tree (checkpoint tree {saved.get('tree')!r}, "
                                f"model tree {mine['tree']!r})")
        raise TreeError(f"checkpoint tree {saved.get('tree')!r} differs from the model tree {mine['tree']!r}")
    saved_ctx: Mapping[str, int] = saved.get("n_ctx", {})
    for node, n in mine["n_ctx"].items():
        if node not in saved_ctx:
            raise TreeError(f"node {node!r} has a context in the model but not in the checkpoint")
        if int(saved_ctx[node]) != n:
            raise TreeError(f"node {node!r}: checkpoint n_ctx {saved_ctx[node]} vs model {n}")
    for node in saved_ctx:
        if node not in mine["n_ctx"]:
            raise TreeError(f"node {node!r} has a context in the checkpoint but not in the model")
    for key in ("combine", "width", "embed_dim", "path_weights"):
        if key in saved and saved[key] != mine[key]:
            raise CheckpointError(f"checkpoint {key} {saved[key]!r} differs from the model's {mine[key]!r}")
    if "text_tower" in saved and saved["text_tower"] != mine["text_tower"]:  # older checkpoints lack it
        dtypes = {saved.get("text_tower_dtype"), mine["text_tower_dtype"]}
        if "torch.float16" in dtypes and len(dtypes) > 1:
            # fp16 rounds the weights apart from the other dtypes' bf16-rounded digest: not comparable
            warnings.warn(f"cannot check that the checkpoint's CLIP is this one: it was trained on a "
                          f"{saved.get('text_tower_dtype')} text tower, this one is {mine['text_tower_dtype']}",
                          stacklevel=3)
        else:
            raise CheckpointError(
                f"the checkpoint was trained on another CLIP: its text weights digest {saved['text_tower']}, this "
                f"model's {mine['text_tower']} (load it on the CLIP it was trained on: the same --model, "
                "--pretrained and --model-config; contexts on another CLIP score garbage)")


# HiProModel options that shape the starting point (ctx_init, leaf_weight,
# init_from_parent) or the objective (parent_prior): a checkpoint loads into a
# model built with other values (its path logits are loaded too), but a
# resumed run would not be the run it claims to continue.
MODEL_TRAJECTORY_KEYS = ("ctx_init", "leaf_weight", "init_from_parent", "parent_prior")


def check_resume_model(saved: Mapping[str, Any], model: HiProModel) -> None:
    """Raise CheckpointError naming the first MODEL_TRAJECTORY_KEYS option that
    differs between a checkpoint's model and `model` (keys a checkpoint lacks are
    not compared)."""
    mine = model.config()
    for key in MODEL_TRAJECTORY_KEYS:
        if key in saved and saved[key] != mine[key]:
            raise CheckpointError(f"cannot resume: the checkpoint's model was built with {key}={saved[key]!r}, "
                                  f"this model has {key}={mine[key]!r}")


def check_train_config(saved: Mapping[str, Any] | None, config: Any) -> None:
    """Raise CheckpointError naming the first trajectory-changing training option
    (lr, epochs, seed, ...) that differs between a checkpoint and `config`."""
    if saved is None:
        return
    current = _config_dict(config) or {}
    # checkpoints written before the optimiser became an option were all SGD
    saved = {"optimizer": "sgd", **saved}
    for key in TRAJECTORY_FIELDS:
        if key in saved and saved[key] != current.get(key):
            raise CheckpointError(f"cannot resume: the checkpoint was trained with {key}={saved[key]!r}, "
                                  f"this run has {key}={current.get(key)!r}")


# ---------------------------------------------------------------- loading
def _split(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _optimizer_tensors(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{node: {key: tensor}} from "opt/<key>/<node>" tensors (node names may hold
    "/"), and the "momentum/<node>" SGD buffers of checkpoints written before
    the optimiser became an option."""
    out: dict[str, dict[str, torch.Tensor]] = {node: {"momentum_buffer": v}
                                               for node, v in _split(tensors, "momentum/").items()}
    for name, value in _split(tensors, "opt/").items():
        key, node = name.split("/", 1)
        out.setdefault(node, {})[key] = value
    return out


# what a record must hold, and of which JSON type (a hand-edited file gets an error naming the key)
_RECORD_TYPES = {"tensors": str, "sha256": str, "model": dict, "epoch": int}


def _read_record(json_path: Path) -> dict[str, Any]:
    """A checkpoint's JSON record, checked: CheckpointError naming the file and
    what is wrong with it otherwise."""
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{json_path}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise CheckpointError(f"{json_path}: not a hipro_fast checkpoint")
    if record.get("version") != VERSION:
        raise CheckpointError(f"{json_path}: checkpoint version {record.get('version')!r}, expected {VERSION}")
    for key, typ in _RECORD_TYPES.items():
        value = record.get(key)
        if not isinstance(value, typ) or isinstance(value, bool):
            raise CheckpointError(f"{json_path}: {key!r} must be a JSON {typ.__name__}, got {value!r}"[:300])
    if record["tensors"] in ("", ".", "..") or Path(record["tensors"]).name != record["tensors"]:
        raise CheckpointError(f"{json_path}: 'tensors' must name a file beside it, got {record['tensors']!r}")
    return record


def load_checkpoint(directory: str | Path, model: HiProModel | None = None, kind: str = "last",
                    load_contexts: bool = True) -> Checkpoint:
    """Read the `kind` checkpoint of `directory`.

    With a model, the checkpoint's tasks, classes, tree and contexts must match
    it (TaskSpecError / TreeError naming the item otherwise) and, unless
    load_contexts=False, its contexts are loaded into the model.
    """
    directory = Path(directory)
    json_path = _json_path(directory, kind)
    if not json_path.exists():
        raise MissingFileError(f"no {kind!r} checkpoint in {directory} ({json_path.name} not found)")
    record = _read_record(json_path)
    tensor_path = directory / record["tensors"]
    if not tensor_path.exists():
        raise CheckpointError(f"{json_path} names {tensor_path.name}, which is missing")
    blob = tensor_path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != record["sha256"]:
        raise CheckpointError(f"{tensor_path}: sha256 does not match {json_path.name} (corrupt file)")
    from safetensors.torch import load

    tensors = load(blob)
    contexts = _split(tensors, "ctx/")
    best = _split(tensors, "best/")
    if model is not None:
        check_model_config(record["model"], model)
        if load_contexts:
            model.load_context_state(contexts)
    return Checkpoint(kind=kind, epoch=int(record["epoch"]), history=record.get("history", []),
                      contexts=contexts, optimizer_state=_optimizer_tensors(tensors),
                      best_epoch=record.get("best_epoch"), best_val=record.get("best_val"),
                      best_contexts=best or None, model_config=record["model"],
                      train_config=record.get("train_config"), extra=record.get("extra") or {},
                      path=json_path)
