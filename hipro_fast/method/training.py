"""Training HiPro contexts: all tasks' prompts in one forest pass per step.

Every optimisation step draws a batch of `batch_size` samples from EVERY task,
computes the class text features of all tasks with one `model.text_features()`
call (one packed prompt-forest pass), and minimises the mean over tasks of each
task's cross-entropy over its OWN classes (separate logits per task).

Optimiser and schedule: CoOp's SGD (lr 0.002, momentum 0.9, weight decay 5e-4)
or AdamW (TrainConfig.optimizer), a cosine schedule over the epochs, preceded
by warm-up epochs at the constant lr 1e-5 (Dassl's ConstantWarmupScheduler),
or full-batch L-BFGS (torch.optim.LBFGS with the strong-Wolfe line search; no
lr, schedule or weight decay: the line search sets every step; one step()
call per epoch runs that epoch's iterations, each of one or more loss
evaluations). SGD / AdamW schedule:

    lr(e) = warmup_lr                                     for e < warmup_epochs
    lr(e) = lr * (1 + cos(pi * (e - warmup_epochs) / epochs)) / 2   otherwise

Sampling: with the full batch (batch_size "full") every step uses every
training sample of every task. Otherwise, within an epoch each task is drawn
without replacement from a random permutation of its samples (reshuffled when
exhausted, so a task smaller than steps_per_epoch * batch_size is cycled
through several permutations). The
permutations of epoch e of task t come from a generator seeded with
(seed, e, crc32(t)), so an epoch can be replayed exactly after a resume: with
the contexts and the optimiser state (SGD momentum buffers, AdamW moments and
step counts, L-BFGS's curvature pairs and step length) restored from the end
of epoch e-1 and the lr computed in closed form, a resumed run is bitwise
identical on CPU.

Several processes (torchrun; hipro_fast.distributed): when a process group of
more than one rank is up, fit() and evaluate() shard the model's text side by
class (HiProModel.shard_text), every rank takes its slice of each task's
global batch (the same draw as one process), the gradients of the replicated
contexts are summed over the ranks, and evaluation sums correct counts (or
losses) over the ranks' shares of the features. L-BFGS's line search compares
the global objective, the same on every rank; its curvature pairs magnify the
ranks' different fp32 summation order faster than SGD does. Only rank 0
writes checkpoints; every rank reads them on resume, with any number of ranks.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
import os
import time
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from . import checkpoint as ckpt
from ..devices import check_device
from ..distributed import group as dist_group
from ..distributed.data_parallel import all_reduce_grads, local_part, local_range
from ..engine.fingerprint import tensors_digest
from .model import HiProModel, TaskSpecError
from .task_data import validate_task_data
from ..errors import InvalidInputError, InvalidTypeError, NonFiniteLossError

AMP_MODES = (None, "bf16", "fp16")
OPTIMIZERS = ("sgd", "adamw", "lbfgs")
LBFGS_HISTORY = 100           # torch's default number of curvature pairs
LBFGS_MAX_EVALS_PER_ITER = 10  # a line search that needs more has failed; the epoch then ends early
FULL_BATCH = "full"  # TrainConfig.batch_size: every training sample of every task in every step
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

Data = Mapping[str, tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TrainConfig:
    """Training hyper-parameters.

    Defaults (issue 9, session 7): full-batch L-BFGS, 50 epochs of at most 16
    iterations (800 in all; an epoch ends early once L-BFGS has converged:
    torch's tolerance_grad / tolerance_change), each epoch ending in a
    validation. On the bundled benchmark's dev split, doubling this budget
    (100 epochs of 16 iterations) moves no method's mean by more than 0.41
    points at 1, 4 or 16 shots (a second doubling moves only HiPro and
    two-level at 16 shots, by +1.02 and +0.51), where AdamW on the full batch
    still gained about a point per doubling at 16 shots up to 12,800 steps.
    Against that recipe's 1,600-step default it scores +1.0 to +3.0 points
    higher for every method at 16 shots and between -0.84 and +1.64 at 1 and
    4 shots (benchmarks/results/ablation_hipro.md). The previous default,
    TrainConfig(optimizer="adamw", min_steps=1600), and CoOp's recipe,
    TrainConfig(optimizer="sgd", batch_size=32, min_steps=200), stay available;
    mini-batches need one of them.

    optimizer: "sgd" (CoOp's: momentum, weight_decay), "adamw" (betas 0.9 /
    0.999, decoupled weight_decay; momentum unused) or "lbfgs" (full batch
    only; a step is one quasi-Newton iteration whose line search evaluates the
    loss one or more times; steps_per_epoch is a ceiling, reached unless it
    converges; lr, momentum, weight_decay and the warm-up are unused; its
    checkpoints hold up to 2 x 100 curvature vectors of all contexts, and a
    non-finite loss at a line-search trial point stops the run like any other).
    lr: the peak learning rate.
    epochs: number of epochs, with a cosine lr schedule over them.
    warmup_epochs / warmup_lr: constant-lr warm-up epochs (counted within
    `epochs`). batch_size: samples PER TASK per step, or "full" for the full
    batch (every training sample of every task in every step: the image
    features are cached, so a step costs one text-forest pass whatever the
    batch, and the full batch removes the sampling noise).
    steps_per_epoch: None = the budget rule: ceil(largest task's train size /
    batch_size) (1 with the full batch), raised so that the run takes at least
    `min_steps` optimiser steps in all (ceil(min_steps / epochs) per epoch).
    Counting epochs alone starves small few-shot tasks (2 shots x 12 classes
    at batch 32 is one step per epoch); a floor in steps gives every task size
    the same number of steps (a floor, not a convergence guarantee: with
    AdamW, on the bundled benchmark at 16 shots, doubling 6,400 steps still
    moves the accuracy by about a point; README).
    amp: None, "bf16" or "fp16" (torch.autocast on the model's device type;
    contexts stay fp32; fp16 on CUDA uses a GradScaler). seed: sampling seed.
    device: None = where the model is. checkpoint_dir: None = no checkpoints,
    else a `last` and a `best` checkpoint are kept there, written every epoch.
    resume: continue from checkpoint_dir's `last` checkpoint when there is one;
    without it (or without a `last`), the run starts over and first removes the
    folder's best/last checkpoints of any earlier run.
    progress: tqdm bar. eval_every: validate every this many epochs (and after
    the last). eval_batch_size: image features per chunk in evaluation.
    """

    optimizer: str = "lbfgs"
    lr: float = 0.002
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 50
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5
    batch_size: int | str = FULL_BATCH
    steps_per_epoch: int | None = None
    min_steps: int = 800
    amp: str | None = None
    seed: int = 0
    device: str | None = None
    checkpoint_dir: str | None = None
    resume: bool = False
    progress: bool = False
    eval_every: int = 1
    eval_batch_size: int = 4096

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise InvalidInputError(f"TrainConfig: {msg}")

        def integer(value) -> bool:  # numpy integers and 2.0 count; bools and 2.5 do not (range() would fail)
            if isinstance(value, bool):
                return False
            return isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())

        for name in ("epochs", "warmup_epochs", "min_steps", "seed", "eval_every", "eval_batch_size"):
            need(integer(getattr(self, name)), f"{name} must be an integer, got {getattr(self, name)!r}")
        need(self.steps_per_epoch is None or integer(self.steps_per_epoch),
             f"steps_per_epoch must be an integer or None, got {self.steps_per_epoch!r}")
        for name in ("lr", "momentum", "weight_decay", "warmup_lr"):
            value = getattr(self, name)
            need(isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value),
                 f"{name} must be a finite number, got {value!r}")
        need(self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr}")
        need(0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}")
        need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        need(int(self.epochs) >= 1, f"epochs must be >= 1, got {self.epochs}")
        need(0 <= int(self.warmup_epochs), f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        need(self.warmup_lr > 0, f"warmup_lr must be > 0, got {self.warmup_lr}")
        need(self.batch_size == FULL_BATCH or (isinstance(self.batch_size, numbers.Integral)
                                                and not isinstance(self.batch_size, bool) and self.batch_size >= 1),
             f"batch_size must be an integer >= 1 or {FULL_BATCH!r}, got {self.batch_size!r}")
        need(self.steps_per_epoch is None or int(self.steps_per_epoch) >= 1,
             f"steps_per_epoch must be >= 1 or None, got {self.steps_per_epoch}")
        need(int(self.min_steps) >= 0, f"min_steps must be >= 0, got {self.min_steps}")
        need(self.amp in AMP_MODES, f"amp must be one of {AMP_MODES}, got {self.amp!r}")
        need(self.optimizer != "lbfgs" or self.batch_size == FULL_BATCH,
             f"optimizer 'lbfgs' needs batch_size {FULL_BATCH!r} (its line search compares losses of one "
             f"fixed objective), got {self.batch_size!r}; mini-batches need optimizer 'adamw' or 'sgd'")
        need(self.optimizer != "lbfgs" or self.amp != "fp16",
             "optimizer 'lbfgs' does not run under amp 'fp16' (no loss scaling in its line search); use 'bf16'")
        need(int(self.seed) >= 0, f"seed must be >= 0, got {self.seed}")
        need(int(self.eval_every) >= 1, f"eval_every must be >= 1, got {self.eval_every}")
        need(int(self.eval_batch_size) >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        """The recipe in words (for logs and reports): its optimiser, batch and budget."""
        batch = "the full batch" if self.batch_size == FULL_BATCH else f"batch {self.batch_size}"
        if self.optimizer == "lbfgs":
            return (f"L-BFGS (strong-Wolfe line search) on {batch}, up to {self.min_steps} iterations "
                    f"over {self.epochs} epochs")
        return (f"{'AdamW' if self.optimizer == 'adamw' else 'SGD'} lr {self.lr:g} (cosine) on {batch}, at least "
                f"{self.min_steps} steps over {self.epochs} epochs")


@dataclass
class FitResult:
    """history: one dict per epoch (epoch, lr, loss, task_loss, val_acc, val_mean,
    seconds). best_epoch: the epoch of best_state (highest mean val accuracy,
    earliest on ties; the last epoch without val). best_state / final_state:
    context states (node -> tensor) at the best and at the last epoch."""

    history: list[dict[str, Any]]
    best_epoch: int
    best_state: dict[str, torch.Tensor]
    final_state: dict[str, torch.Tensor]
    best_val: float | None = None
    seconds: float = 0.0
    config: TrainConfig = field(default_factory=TrainConfig)


# ---------------------------------------------------------------- schedule / sampling
def lr_at(config: TrainConfig, epoch: int) -> float:
    """CoOp's lr of `epoch` (0-based): constant warm-up, then cosine over
    `epochs`; 1 for L-BFGS, whose line search chooses each step's length."""
    if config.optimizer == "lbfgs":
        return 1.0
    if epoch < config.warmup_epochs:
        return float(config.warmup_lr)
    t = epoch - config.warmup_epochs
    return float(0.5 * config.lr * (1.0 + math.cos(math.pi * t / config.epochs)))


def _epoch_seed(seed: int, epoch: int, task: str) -> int:
    words = np.random.SeedSequence([int(seed), int(epoch), zlib.crc32(task.encode("utf-8"))]) \
        .generate_state(2, dtype=np.uint32)
    return int(words[0]) << 32 | int(words[1])


def batch_indices(n: int, steps: int, batch_size: int | str, seed: int, epoch: int, task: str) -> torch.Tensor:
    """[steps, batch_size] sample indices of one task for one epoch.

    Consecutive slices of random permutations of range(n) (without replacement
    until the task is exhausted, then a fresh permutation); a function of
    (seed, epoch, task) only. batch_size "full": [steps, n], every row
    range(n).
    """
    if batch_size == FULL_BATCH:
        return torch.arange(n).expand(steps, n)
    g = torch.Generator().manual_seed(_epoch_seed(seed, epoch, task))
    need = steps * batch_size
    perms, total = [], 0
    while total < need:
        perms.append(torch.randperm(n, generator=g))
        total += n
    return torch.cat(perms)[:need].view(steps, batch_size)


def default_steps_per_epoch(train: Data, batch_size: int | str, epochs: int = 1, min_steps: int = 0) -> int:
    """The budget rule (see TrainConfig): one pass over the largest task per
    epoch (one step with the full batch), and at least
    `min_steps` steps over `epochs` epochs."""
    one_pass = 1 if batch_size == FULL_BATCH else max(math.ceil(int(y.shape[0]) / batch_size) for _, y in train.values())
    return max(one_pass, math.ceil(int(min_steps) / int(epochs)))


# ---------------------------------------------------------------- validation
def _warn_classes_without_samples(model: HiProModel, train: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """A class no training sample has is never a target: its prompts only learn to
    lose (the CLI refuses such a spec; from Python it may be meant, so it is said)."""
    for task, (_, y) in train.items():
        classes = model.tasks[task]
        counts = torch.bincount(y.cpu(), minlength=len(classes))
        empty = [c for c, n in zip(classes, counts.tolist()) if n == 0]
        if empty:
            warnings.warn(f"task {task!r}: class(es) {empty[:5]}{' ...' if len(empty) > 5 else ''} have no training "
                          f"samples ({len(empty)} of {len(classes)}): they are never a target", stacklevel=4)


def validate_data(model: HiProModel, data: Data, role: str = "train",
                  require_all: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """validate_task_data against the model's tasks and embed_dim."""
    return validate_task_data(model.tasks, data, model.embed_dim, role=role, require_all=require_all)


def _resolve_config(config: TrainConfig | None, overrides: Mapping[str, Any]) -> TrainConfig:
    config = config if config is not None else TrainConfig()
    if not isinstance(config, TrainConfig):
        raise InvalidTypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = [k for k in overrides if k not in names]
    if unknown:
        raise InvalidTypeError(f"unknown training option {unknown[0]!r} (TrainConfig fields: {sorted(names)})")
    config = dataclasses.replace(config, **overrides)
    config.validate()
    # plain Python numbers from here on (a numpy integer would fail the checkpoint's JSON after an epoch)
    ints = {f: int(getattr(config, f)) for f in ("epochs", "warmup_epochs", "min_steps", "seed", "eval_every",
                                                  "eval_batch_size")}
    if config.steps_per_epoch is not None:
        ints["steps_per_epoch"] = int(config.steps_per_epoch)
    if config.batch_size != FULL_BATCH:
        ints["batch_size"] = int(config.batch_size)
    floats = {f: float(getattr(config, f)) for f in ("lr", "momentum", "weight_decay", "warmup_lr")}
    # a Path or torch.device as a string (the checkpoint's record of the config is JSON)
    strings = {}
    if config.checkpoint_dir is not None:
        if not isinstance(config.checkpoint_dir, (str, bytes, os.PathLike)):
            raise InvalidTypeError(f"checkpoint_dir must be a path, got {type(config.checkpoint_dir).__name__}")
        strings["checkpoint_dir"] = os.fsdecode(config.checkpoint_dir)
    if config.device is not None:
        dev = check_device(config.device, "TrainConfig")
        strings["device"] = str(dev) if isinstance(config.device, int) else str(config.device)
    return dataclasses.replace(config, **ints, **floats, **strings)


def _model_device(model: HiProModel) -> torch.device:
    return model.tower.token_embedding.device


# ---------------------------------------------------------------- evaluation
def _shard_for_group(model: HiProModel) -> tuple[int, int]:
    """(rank, world_size) of the current process group; shards the model's text
    side over it (one process: the whole forest)."""
    info = dist_group.current()
    rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
    model.shard_text(rank, world)
    return rank, world


EVAL_METRICS = ("accuracy", "loss")


@torch.no_grad()
def _task_scores(model: HiProModel, data: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
                 batch_size: int, metric: str) -> dict[str, float]:
    """Per-task accuracy or mean cross-entropy; with several ranks each scores its
    contiguous share of every task's features and the sums are reduced over the ranks."""
    device = _model_device(model)
    rank, world = _shard_for_group(model)
    feats = model.text_features()
    sums = []
    for task, (x, y) in data.items():
        start, end = local_range(x.shape[0], rank, world)
        total = 0.0
        for i in range(start, end, batch_size):
            j = min(i + batch_size, end)
            logits = model.logits(task, x[i:j].to(device), feats)
            labels = y[i:j].to(logits.device)
            if metric == "accuracy":
                total += int((logits.argmax(dim=1) == labels).sum())
            else:
                total += float(task_loss(logits, labels, reduction="sum"))
        sums.append(total)
    reduced = dist_group.all_reduce_sum(torch.tensor(sums, dtype=torch.float64, device=device)).tolist()
    return {task: s / x.shape[0] for (task, (x, _)), s in zip(data.items(), reduced)}


def _check_model(model: Any, what: str) -> None:
    if not isinstance(model, HiProModel):
        raise InvalidTypeError(f"{what}: model must be a HiProModel, got {type(model).__name__}")


def evaluate(model: HiProModel, data: Data, batch_size: int = 4096, metric: str = "accuracy") -> dict[str, float]:
    """Per-task score of `data` (task -> (features, labels), any subset of the
    model's tasks): top-1 accuracy (a fraction in [0, 1]) or, with metric="loss",
    the mean cross-entropy over the task's own classes. Text features are computed once.
    Under several ranks every rank must pass the same data, bit for bit (each
    scores its share of it): a rank given other data is refused on every rank.
    A SelectedModel is scored by its own evaluate (each task by its chosen candidate)."""
    own = getattr(model, "evaluate", None)
    if not isinstance(model, HiProModel) and callable(own):  # a SelectedModel (selection builds on this module)
        return own(data, batch_size=batch_size, metric=metric)
    _check_model(model, "evaluate")
    if metric not in EVAL_METRICS:
        raise InvalidInputError(f"metric must be one of {EVAL_METRICS}, got {metric!r}")
    if not (isinstance(batch_size, numbers.Integral) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise InvalidInputError(f"evaluate: batch_size must be an integer >= 1, got {batch_size!r}")
    checked = validate_data(model, data, role="eval", require_all=False)
    info = dist_group.current()
    if info is not None and info.world_size > 1:
        # Each rank scores its share of the data it was given, so the ranks must be given the same data
        # (a rank holding its own shard, as under DDP, would be scored on a slice of it).
        # equal on two ranks exactly when they hold the same data (shapes, dtypes, bytes)
        digests = {t: tensors_digest({"x": x, "y": y}) for t, (x, y) in checked.items()}
        dist_group.check_agreement({"metric": metric, "data": digests}, "evaluate()")
    was_training = model.training
    model.eval()
    try:
        return _task_scores(model, checked, batch_size, metric)
    finally:
        model.train(was_training)
        model.shard_text(0, 1)  # a one-process model again (see HiProModel.shard_text)


# ---------------------------------------------------------------- training
def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def make_optimizer(config: TrainConfig, params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """config.optimizer over `params` at the schedule's first lr. "lbfgs":
    torch.optim.LBFGS with the strong-Wolfe line search (so lr 1, the unit
    quasi-Newton step it starts from), running up to config.steps_per_epoch
    iterations per step() call (one call per epoch; fewer once converged)."""
    if config.optimizer == "lbfgs":
        iters = int(config.steps_per_epoch or 1)
        # max_eval bounds the line-search evaluations, so that it is the iteration count that ends an epoch
        return torch.optim.LBFGS(params, lr=1.0, max_iter=iters, max_eval=LBFGS_MAX_EVALS_PER_ITER * iters,
                                 history_size=LBFGS_HISTORY, line_search_fn="strong_wolfe")
    lr = lr_at(config, 0)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)


def task_loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of one task's logits over its own classes (in fp32, or float64
    for a float64 model); reduction "sum" gives a rank's share of a global-batch
    mean (see fit)."""
    return F.cross_entropy(logits.to(_loss_dtype(logits)), labels, reduction=reduction)


def _loss_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)  # half types -> fp32; fp32, float64 kept


def fit(model: HiProModel, train: Data, val: Data | None = None, config: TrainConfig | None = None,
        callback: Callable[[dict[str, Any]], None] | None = None, **overrides: Any) -> FitResult:
    """Train the model's contexts on all tasks jointly.

    Args:
        model: a HiProModel (its current contexts are the initialisation).
        train: task -> (features [N, D] L2-normalised image features, labels [N]
            int64); every model task must be present.
        val: same format (any subset of tasks) for best-epoch selection, or None.
        config: a TrainConfig; `overrides` replace its fields (fit(m, d, epochs=5)).
        callback: called after every optimiser step (on every rank, with the same
            global values) with a dict
            (epoch, step, lr, loss, task_loss). With L-BFGS it is called at
            every loss evaluation instead (line-search trial points included,
            before the step is accepted), `step` counting the epoch's
            evaluations; the history's per-epoch loss is then the mean over
            those evaluations.
    Returns:
        FitResult; the model is left holding the BEST state.
    Raises:
        TaskSpecError for bad data, NonFiniteLossError when a loss goes NaN/inf
        (the model is then left holding the best state so far, else the state
        it came with, not the NaN contexts of the failed step).
    """
    _check_model(model, "fit")
    if torch.is_inference_mode_enabled():
        raise InvalidInputError("fit: called under torch.inference_mode(), where nothing can be trained "
                                "(autograd is off and the tensors made there cannot be saved for backward); "
                                "call it outside inference mode")
    before = model.context_state()
    try:
        return _fit(model, train, val, config, callback, **overrides)
    except NonFiniteLossError as e:
        model.load_context_state(getattr(e, "best_state", None) or before)
        raise
    finally:
        model.shard_text(0, 1)  # a one-process model again (see HiProModel.shard_text)
        # the gradients of some step, not of the state the model holds now: a later
        # backward() must not add to them
        for p in model.learnable().values():
            p.grad = None


def _fit(model: HiProModel, train: Data, val: Data | None, config: TrainConfig | None,
         callback: Callable[[dict[str, Any]], None] | None, **overrides: Any) -> FitResult:
    config = _resolve_config(config, overrides)
    if config.optimizer != "lbfgs" and config.warmup_epochs >= config.epochs:
        warnings.warn(f"fit: warmup_epochs {config.warmup_epochs} >= epochs {config.epochs}: every step runs at "
                      f"warmup_lr {config.warmup_lr:g}, never at lr {config.lr:g} (train for more epochs than the "
                      f"warm-up: --epochs {config.warmup_epochs + 1} or more)", stacklevel=3)
    if callback is not None and not callable(callback):
        raise InvalidTypeError(f"fit: callback must be callable (called with a dict after every step), got "
                               f"{type(callback).__name__}")
    if config.checkpoint_dir is not None and Path(config.checkpoint_dir).exists() \
            and not Path(config.checkpoint_dir).is_dir():
        raise InvalidInputError(f"fit: checkpoint_dir {config.checkpoint_dir} is a file, not a folder")
    if config.resume and config.checkpoint_dir is None:
        warnings.warn("fit: resume=True without checkpoint_dir has nothing to resume from: training from the "
                      "start", stacklevel=3)
    train_data = validate_data(model, train, role="train", require_all=True)
    _warn_classes_without_samples(model, train_data)
    val_data = validate_data(model, val, role="val", require_all=False) if val is not None else None
    # the validation set chooses the best epoch: a resume must choose on the same one. Its tasks, sizes
    # and labels (not its features: features encoded again may differ in their last bits)
    # (only a checkpointed run records it)
    val_key = None if val_data is None or config.checkpoint_dir is None else tensors_digest(
        {t: y for t, (_, y) in val_data.items()})
    params = [(n, p) for n, p in model.learnable().items() if p.requires_grad]
    if not params:
        raise InvalidInputError("the model has no trainable contexts (every node has n_ctx 0 or is frozen)")
    low = sorted({str(p.dtype) for _, p in params if p.dtype in (torch.float16, torch.bfloat16)})
    if low:  # model.half(): AdamW's eps and moments underflow there, the loss turns NaN a step later
        raise InvalidInputError(f"fit trains fp32 (or fp64) contexts; this model's are {low[0]} (after "
                                "model.half() or .to(dtype)?): build the HiProModel on the half-precision CLIP "
                                "instead (its contexts stay fp32), and pass amp='fp16' or 'bf16' for a "
                                "half-precision forward")
    if config.device is not None:
        model.to(config.device)
    device = _model_device(model)
    steps = int(config.steps_per_epoch or default_steps_per_epoch(train_data, config.batch_size, config.epochs,
                                                                  config.min_steps))
    config = dataclasses.replace(config, steps_per_epoch=steps)
    tasks = list(train_data)
    xs = {t: train_data[t][0].to(device) for t in tasks}
    ys = {t: train_data[t][1].to(device) for t in tasks}
    sizes = {t: int(ys[t].shape[0]) for t in tasks}
    rank, world = _shard_for_group(model)
    main = rank == 0
    full = config.batch_size == FULL_BATCH
    # the full batch: every step takes this rank's contiguous share of each task (views, no gather)
    shares = {}
    if full:
        for t in tasks:
            part = slice(*local_range(sizes[t], rank, world))
            shares[t] = (xs[t][part], ys[t][part])
    if world > 1:
        # Ranks that disagree would run different collectives and hang: check first.
        dist_group.check_agreement(
            {"train config": {k: getattr(config, k) for k in ckpt.TRAJECTORY_FIELDS},
             "model": model.config(), "train sizes": sizes,
             "val sizes": {t: int(v[1].shape[0]) for t, v in (val_data or {}).items()},
             "initial contexts": {n: float(p.detach().double().sum()) for n, p in params}}, "fit()")

    optimizer = make_optimizer(config, [p for _, p in params])
    quasi_newton = config.optimizer == "lbfgs"
    amp_dtype = _AMP_DTYPES.get(config.amp)
    scaler = None
    if config.amp == "fp16" and device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")

    history: list[dict[str, Any]] = []
    best_epoch: int | None = None
    best_val: float | None = None
    best_state: dict[str, torch.Tensor] | None = None
    start = 0
    ckdir = Path(config.checkpoint_dir) if config.checkpoint_dir is not None else None
    if ckdir is not None and config.resume and ckpt.has_checkpoint(ckdir, "last"):
        # Every check before the model is touched: a refused resume leaves the caller's contexts as they were.
        state = ckpt.load_checkpoint(ckdir, model, kind="last", load_contexts=False)
        ckpt.check_resume_model(state.model_config, model)
        ckpt.check_train_config(state.train_config, config)
        saved_sizes = (state.extra or {}).get("train_sizes")
        if saved_sizes is not None and saved_sizes != sizes:
            diff = [t for t in sizes if saved_sizes.get(t) != sizes[t]]
            t = diff[0] if diff else next(iter(sizes))
            raise TaskSpecError(f"cannot resume: task {t!r} has {sizes[t]} train samples, the checkpoint "
                                f"was trained on {saved_sizes.get(t)}")
        if "val_key" in (state.extra or {}) and state.extra["val_key"] != val_key:  # recorded since session 11
            def which(key):
                return "no validation set" if key is None else "a validation set"
            other = "another one" if state.extra["val_key"] is not None and val_key is not None else which(val_key)
            raise TaskSpecError(f"cannot resume: the checkpoint's run chose its best epoch on "
                                f"{which(state.extra['val_key'])}, this call passes {other} (pass the same val)")
        ckpt.restore_optimizer_state(optimizer, model, state.optimizer_state)  # may still refuse: contexts last
        model.load_context_state(state.contexts)
        if scaler is not None and (state.extra or {}).get("scaler"):
            scaler.load_state_dict(state.extra["scaler"])
        history = list(state.history)
        best_epoch, best_val = state.best_epoch, state.best_val
        best_state = state.best_contexts
        start = state.epoch + 1
    elif ckdir is not None and main:
        # A run that starts over: another run's best/last in the folder must not
        # outlive it (a later resume would pick up the other run's files).
        ckpt.clear_checkpoints(ckdir)

    if world > 1:
        # Every rank read the same checkpoint (rank 0 writes only after this point).
        dist_group.check_agreement({"resume epoch": start}, "the checkpoint to resume")
    bar = None
    if config.progress and main and start < config.epochs:
        from tqdm.auto import tqdm

        # L-BFGS's evaluations per epoch vary with its line search: count them without a total
        bar = tqdm(total=None if quasi_newton else (config.epochs - start) * steps, desc="fit",
                   unit="eval" if quasi_newton else "step")
    t_fit = time.perf_counter()
    model.train()
    for epoch in range(start, config.epochs):
        t0 = time.perf_counter()
        lr = lr_at(config, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = {} if full else {t: batch_indices(sizes[t], steps, config.batch_size, config.seed, epoch, t)
                                  .to(device) for t in tasks}
        loss_sum = 0.0
        task_sums = dict.fromkeys(tasks, 0.0)

        def loss_and_grads(step: int) -> tuple[float, list[float]]:
            """One evaluation at the current contexts: every task's loss (global:
            summed over the ranks' pieces) and the gradients (summed over the
            ranks) of their mean plus the hierarchy prior. Returns (that global
            objective, the task losses)."""
            with _autocast(device, amp_dtype):
                feats = model.text_features()
                losses = []
                for t in tasks:
                    if full:
                        (x, y), global_size = shares[t], sizes[t]
                    else:
                        b = idx[t][step]
                        global_size = b.numel()
                        b = local_part(b, rank, world)
                        x, y = xs[t][b], ys[t][b]
                    if world == 1:
                        losses.append(task_loss(model.logits(t, x, feats), y))
                    else:  # this rank's piece: its CE sum over the global batch size (module docstring)
                        losses.append(task_loss(model.logits(t, x, feats), y, reduction="sum") / global_size)
            stacked = torch.stack(losses)
            prior = model.regularization() if main else None  # replicated: counted once, on rank 0
            # one collective for the tasks' losses and the prior (rank 0's; the line search needs it everywhere)
            prior_part = (prior.detach().to(stacked.dtype) if prior is not None else stacked.new_zeros(())).reshape(1)
            reduced = dist_group.all_reduce_sum(torch.cat([stacked.detach(), prior_part])).cpu()
            values, prior_value = reduced[:-1].tolist(), float(reduced[-1])
            bad = {t: v for t, v in zip(tasks, values) if not math.isfinite(v)}
            if bad or not math.isfinite(prior_value):
                if bar is not None:
                    bar.close()
                error = NonFiniteLossError(epoch, step, bad, prior=prior_value)
                error.best_state = best_state  # what fit() leaves the model holding
                raise error
            loss = stacked.mean()
            if prior is not None:
                loss = loss + prior.to(_loss_dtype(prior))
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
            else:
                loss.backward()
            all_reduce_grads([p for _, p in params])  # a no-op in one process
            return sum(values) / len(values) + prior_value, values

        evaluations = 0

        def report(values: list[float]) -> None:
            nonlocal loss_sum, evaluations
            step_loss = float(sum(values) / len(values))
            loss_sum += step_loss
            for t, v in zip(tasks, values):
                task_sums[t] += v
            if bar is not None:
                bar.set_postfix(epoch=epoch, loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                bar.update(1)
            if callback is not None:
                callback({"epoch": epoch, "step": evaluations, "lr": lr, "loss": step_loss,
                          "task_loss": dict(zip(tasks, values))})
            evaluations += 1

        if quasi_newton:
            # One L-BFGS step runs the epoch's `steps` iterations; every evaluation
            # (line-search trials included) is reported like an optimiser step.
            def closure() -> torch.Tensor:
                objective, values = loss_and_grads(evaluations)
                report(values)
                return torch.tensor(objective, dtype=torch.float64)

            optimizer.step(closure)
        else:
            for step in range(steps):
                _, values = loss_and_grads(step)
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                report(values)
        record: dict[str, Any] = {
            "epoch": epoch, "lr": lr, "loss": loss_sum / evaluations,
            "task_loss": {t: task_sums[t] / evaluations for t in tasks},
            "val_acc": None, "val_mean": None,
        }
        last = epoch == config.epochs - 1
        new_best = False
        if val_data is not None and ((epoch + 1) % config.eval_every == 0 or last):
            model.eval()
            acc = _task_scores(model, val_data, config.eval_batch_size, "accuracy")
            model.train()
            mean = float(sum(acc.values()) / len(acc))
            record["val_acc"], record["val_mean"] = acc, mean
            if best_val is None or mean > best_val:
                new_best = True
                best_val = mean
        elif val_data is None:
            new_best = True
        if new_best:
            best_epoch = epoch
            best_state = model.context_state()
        record["seconds"] = time.perf_counter() - t0
        history.append(record)
        if ckdir is not None and main:  # written once, by rank 0; every rank reads it on resume
            extra = {"train_sizes": sizes, "val_key": val_key,
                     "scaler": scaler.state_dict() if scaler is not None else None}
            if new_best:
                ckpt.save_checkpoint(ckdir, model, None, epoch, history, kind="best", best_epoch=best_epoch,
                                     best_val=best_val, train_config=config, extra=extra)
            ckpt.save_checkpoint(ckdir, model, ckpt.collect_optimizer_state(optimizer, model), epoch, history,
                                 kind="last", best_epoch=best_epoch, best_val=best_val,
                                 best_state=best_state, train_config=config, extra=extra)
    if bar is not None:
        bar.close()
    dist_group.barrier()  # rank 0's last checkpoint is on disk before any rank goes on
    model.eval()
    final_state = model.context_state()
    if best_state is None:  # resumed from a finished run without val: best = last
        best_state, best_epoch = final_state, config.epochs - 1
    model.load_context_state(best_state)
    return FitResult(history=history, best_epoch=int(best_epoch), best_state={k: v.clone() for k, v in best_state.items()},
                     final_state=final_state, best_val=best_val, seconds=time.perf_counter() - t_fit,
                     config=config)
