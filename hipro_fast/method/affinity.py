"""Inter-task affinity of prompt learning on one frozen CLIP.

`task_affinity(clip, tasks, train, method=...)` returns a symmetric [T, T]
matrix (rows/columns in the order of `tasks`); higher = the two tasks help
each other more. Every estimator returns (Z + Z^T) / 2 of its Z below; the
diagonal (self-affinity) is ignored by the tree builder (hipro_fast.method.grouping).

* ``"transfer"`` (the default): every task trains its own prompt briefly
  (all T prompts in one forest pass per step, from one shared
  initialisation; Adam, 60 steps), then each task's prompt is scored on every
  other task's training data in ONE forest pass over T x T pseudo-tasks
  ``"i|task_j"``. With s[i, j] = -log L_j(ctx_i) (L_j: task j's mean training
  cross-entropy; ``score="accuracy"``: its accuracy),

      normalize="zscore" (default): Z[:, j] = s[:, j] standardised over the
          other tasks' prompts i != j (how much better task i's prompt serves
          task j than the other tasks' prompts do, in units of their spread);
      normalize="own": Z[i, j] = s[i, j] - s[j, j] (log-loss relative to the
          task's own prompt; for accuracy the ratio).

  Standardising per target task removes what every trained prompt does for
  task j (on a random tower, any trained prompt mostly undoes the initial
  context's confident mistakes), which otherwise swamps the group signal.
* ``"lookahead"`` (TAG, Fifty et al. 2021): one prompt shared by all tasks
  (a root context only) is warmed up jointly with SGD; every `every` steps,
  for each task i one plain SGD step of size `lookahead_lr` (default: lr) on
  task i's loss alone, and every task j's loss on the same batch before and
  after: Z[i, j] = 1 - L_j(after_i) / L_j(before), averaged over the
  measurements. The T look-ahead contexts are T nodes ``"copy/i"`` of one
  ForestEncoder over pseudo-tasks ``"i|task"``: the T x T losses cost one
  forest pass.
* ``"gradcos"``: cosine similarity of the per-task gradients of the shared
  context, averaged over the same measurement steps.
  lookahead and gradcos take normalize="none" (default) or "zscore" (the
  column standardisation above).

The default ("transfer") is the estimator that recovered the planted groups
most often (hipro_fast.data.synth; scripts/ablation_planted.py, results in
benchmarks/results/ablation_planted.md). Why the gradient estimators fall
behind with few shots: a few-shot gradient of one shared prompt is dominated
by sampling noise and by what all tasks want from it (the look-ahead is, to
first order, an unnormalised gradient dot product, so the tasks with the
largest gradients look close to everyone).
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.clip_loading import clip_parts
from ..engine.encoder import ForestEncoder
from .model import CTX_INIT_STD, validate_tasks
from .seeding import keyed_generator
from .task_data import validate_task_data
from ..engine.text_tower import TextTower
from ..files import atomic_write_text
from ..errors import InvalidInputError, InvalidTypeError, NonFiniteAffinityError

METHODS = ("transfer", "lookahead", "gradcos")
DEFAULT_METHOD = "transfer"

# Defaults of every method's options (task_affinity(**config) overrides them).
DEFAULTS: dict[str, dict[str, Any]] = {
    "transfer": dict(n_ctx=16, steps=60, lr=0.002, optimizer="adam", momentum=0.9, batch_size=32,
                     score="loss", normalize="zscore", seed=0),
    "lookahead": dict(n_ctx=16, steps=60, lr=0.002, optimizer="sgd", momentum=0.9, batch_size=32, every=5,
                      lookahead_lr=None, normalize="none", seed=0),
    "gradcos": dict(n_ctx=16, steps=60, lr=0.002, optimizer="sgd", momentum=0.9, batch_size=32, every=5,
                    normalize="none", seed=0),
}


# ------------------------------------------------------------------ inputs
def _check_data(tasks: dict[str, list[str]], train, embed_dim: int, device):
    data = validate_task_data(tasks, train, embed_dim, role="train", require_all=True)
    return {t: (F.normalize(x, dim=-1).to(device), y.to(device)) for t, (x, y) in data.items()}


class _Sampler:
    """Per-task batches: consecutive slices of seeded permutations (full batch when small)."""

    def __init__(self, data, batch_size: int, seed: int):
        self.data, self.bs = data, int(batch_size)
        # each task its own stream: the affinity must not depend on the order of the tasks
        self.gens = {t: keyed_generator(seed, f"affinity/{t}") for t in data}
        self.queue = {t: torch.empty(0, dtype=torch.long) for t in data}

    def __call__(self):
        out = {}
        for t, (x, y) in self.data.items():
            n = y.shape[0]
            if n <= self.bs:
                out[t] = (x, y)
                continue
            while self.queue[t].numel() < self.bs:
                self.queue[t] = torch.cat([self.queue[t], torch.randperm(n, generator=self.gens[t])])
            idx, self.queue[t] = self.queue[t][:self.bs], self.queue[t][self.bs:]
            idx = idx.to(x.device)
            out[t] = (x[idx], y[idx])
        return out


def _loss(scale, x, y, feats) -> torch.Tensor:
    return F.cross_entropy(scale * x @ feats.t(), y)


def _init_ctx(n_ctx: int, width: int, seed: int, device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(int(seed))
    return (torch.randn(n_ctx, width, generator=gen) * CTX_INIT_STD).to(device)


def _optimizer(params, cfg):
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=float(cfg["lr"]))
    if cfg["optimizer"] == "sgd":
        return torch.optim.SGD(params, lr=float(cfg["lr"]), momentum=float(cfg["momentum"]))
    raise InvalidInputError(f"optimizer must be 'sgd' or 'adam', got {cfg['optimizer']!r}")


# ------------------------------------------------------------------ estimators
def _shared_prompt_affinity(tower, tokenizer, tasks, data, scale, method, cfg, progress=None):
    """lookahead / gradcos on one prompt shared by all tasks (root context only)."""
    names = list(tasks)
    T = len(names)
    device = tower.token_embedding.device
    n_ctx = int(cfg["n_ctx"])
    shared = ForestEncoder(tower, tokenizer, {"root": n_ctx}, {t: ["root"] for t in names}, tasks).to(device)
    look = None
    if method == "lookahead":
        pseudo = {f"{i}|{t}": tasks[t] for i in range(T) for t in names}
        look = ForestEncoder(tower, tokenizer, {f"copy/{i}": n_ctx for i in range(T)},
                             {f"{i}|{t}": [f"copy/{i}"] for i in range(T) for t in names}, pseudo).to(device)
    ctx = torch.nn.Parameter(_init_ctx(n_ctx, tower.config.width, cfg["seed"], device))
    opt = _optimizer([ctx], cfg)
    look_lr = float(cfg.get("lookahead_lr") or cfg["lr"])
    sample = _Sampler(data, cfg["batch_size"], cfg["seed"])
    every = max(1, int(cfg["every"]))
    total = np.zeros((T, T))
    count = 0
    for step in range(int(cfg["steps"])):
        batch = sample()
        feats = shared({"root": ctx})
        losses = [_loss(scale, *batch[t], feats[t]) for t in names]
        measure = step % every == 0
        if measure:
            grads = [torch.autograd.grad(losses[i], ctx, retain_graph=True)[0] for i in range(T)]
            if method == "gradcos":
                g = F.normalize(torch.stack([gr.flatten() for gr in grads]), dim=1)
                total += (g @ g.t()).cpu().double().numpy()
            else:
                before = torch.stack([v.detach() for v in losses])
                with torch.no_grad():
                    copies = {f"copy/{i}": ctx.detach() - look_lr * grads[i] for i in range(T)}
                    f = look(copies)
                    after = torch.stack([torch.stack([_loss(scale, *batch[t], f[f"{i}|{t}"]) for t in names])
                                         for i in range(T)])
                total += (1.0 - after / before[None, :]).cpu().double().numpy()
            count += 1
            ctx.grad = torch.stack(grads).mean(0)
        else:
            opt.zero_grad(set_to_none=True)
            torch.stack(losses).mean().backward()
        opt.step()
        if progress is not None:
            progress(step)
    return total / max(count, 1)


def _transfer_affinity(tower, tokenizer, tasks, data, scale, cfg, progress=None):
    names = list(tasks)
    T = len(names)
    device = tower.token_embedding.device
    n_ctx = int(cfg["n_ctx"])
    score, normalize = cfg["score"], cfg["normalize"]
    if score not in ("loss", "accuracy"):
        raise InvalidInputError(f"score must be 'loss' or 'accuracy', got {score!r}")
    if normalize not in ("zscore", "own"):
        raise InvalidInputError(f"normalize must be 'zscore' or 'own', got {normalize!r}")
    own = ForestEncoder(tower, tokenizer, {f"task/{t}": n_ctx for t in names},
                        {t: [f"task/{t}"] for t in names}, tasks).to(device)
    init = _init_ctx(n_ctx, tower.config.width, cfg["seed"], device)
    ctx = {f"task/{t}": torch.nn.Parameter(init.clone()) for t in names}
    opt = _optimizer(list(ctx.values()), cfg)
    sample = _Sampler(data, cfg["batch_size"], cfg["seed"])
    steps = int(cfg["steps"])
    for step in range(steps):
        for group in opt.param_groups:  # cosine schedule
            group["lr"] = 0.5 * float(cfg["lr"]) * (1 + math.cos(math.pi * step / steps))
        batch = sample()
        feats = own(ctx)
        # Sum (not mean) over tasks: each prompt gets its own task's full gradient.
        loss = sum(_loss(scale, *batch[t], feats[t]) for t in names)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if progress is not None:
            progress(step)
    # Every task's prompt on every task's classes: one pass over T x T pseudo-tasks.
    pseudo = {f"{i}|{t}": tasks[t] for i in range(T) for t in names}
    cross = ForestEncoder(tower, tokenizer, {f"copy/{i}": n_ctx for i in range(T)},
                          {f"{i}|{t}": [f"copy/{i}"] for i in range(T) for t in names}, pseudo).to(device)
    s = np.zeros((T, T))  # s[i, j]: task i's prompt on task j's training data, higher = better
    with torch.no_grad():
        f = cross({f"copy/{i}": ctx[f"task/{t}"].detach() for i, t in enumerate(names)})
        for i in range(T):
            for j, t in enumerate(names):
                x, y = data[t]
                logits = scale * x @ f[f"{i}|{t}"].t()
                if score == "loss":
                    s[i, j] = -math.log(max(float(F.cross_entropy(logits, y)), 1e-12))
                else:
                    s[i, j] = float((logits.argmax(1) == y).float().mean())
    if normalize == "own":  # relative to the task's own prompt
        if score == "loss":
            return s - np.diag(s)[None, :]
        return s / np.maximum(np.diag(s), 1e-6)[None, :]
    return zscore_columns(s)


def zscore_columns(s: np.ndarray) -> np.ndarray:
    """Standardise each column j over its off-diagonal rows (the other tasks'
    effect on task j); the diagonal is standardised with the same mean/std."""
    s = np.asarray(s, dtype=np.float64)
    T = s.shape[0]
    z = np.zeros_like(s)
    off = ~np.eye(T, dtype=bool)
    for j in range(T):
        col = s[off[:, j], j]
        mu, sd = col.mean(), col.std()
        z[:, j] = (s[:, j] - mu) / (sd if sd > 1e-12 else 1.0)
    return z


def task_affinity(clip, tasks: Mapping[str, Sequence[str]], train, method: str = DEFAULT_METHOD,
                  tokenizer=None, progress=None, **config) -> np.ndarray:
    """Symmetric [T, T] task affinity, rows/columns in the order of `tasks`.

    Args:
        clip: a LoadedClip, (open_clip model, tokenizer) or an open_clip model with tokenizer=.
        tasks: task -> class names.
        train: task -> (image features [N, E], labels [N]).
        method: "transfer" (default), "lookahead" or "gradcos" (module docstring).
        tokenizer: overrides the clip's tokenizer.
        progress: optional callable(step) after every optimiser step.
        **config: options of the method (DEFAULTS[method]): n_ctx, steps, lr,
            optimizer ("adam"|"sgd"), momentum (sgd), batch_size (per task),
            seed, normalize; lookahead/gradcos: every, lookahead_lr (default
            lr); transfer: score ("loss"|"accuracy"). Unknown options raise
            TypeError.
    Returns:
        np.ndarray [T, T] float64, (Z + Z^T) / 2.
    """
    if method not in METHODS:
        raise InvalidInputError(f"unknown affinity method {method!r} (methods: {METHODS})")
    unknown = [k for k in config if k not in DEFAULTS[method]]
    if unknown:
        raise InvalidTypeError(f"affinity method {method!r} has no option {unknown[0]!r} "
                        f"(options: {sorted(DEFAULTS[method])})")
    cfg = {**DEFAULTS[method], **config}
    if int(cfg["n_ctx"]) < 1 or int(cfg["steps"]) < 1 or int(cfg["batch_size"]) < 1:
        raise InvalidInputError("n_ctx, steps and batch_size must be >= 1")
    tasks = validate_tasks(tasks)
    model, tokenizer = clip_parts(clip, tokenizer)
    tower = TextTower(model)
    device = tower.token_embedding.device  # computed where the model is
    data = _check_data(tasks, train, tower.config.embed_dim, device)
    T = len(tasks)
    if T == 1:
        return np.ones((1, 1))
    scale = float(model.logit_scale.detach().exp())
    with torch.enable_grad():
        if method == "transfer":
            z = _transfer_affinity(tower, tokenizer, tasks, data, scale, cfg, progress)
        else:
            if cfg["normalize"] not in ("none", "zscore"):
                raise InvalidInputError(f"normalize must be 'none' or 'zscore' for {method!r}, got {cfg['normalize']!r}")
            z = _shared_prompt_affinity(tower, tokenizer, tasks, data, scale, method, cfg, progress)
            if cfg["normalize"] == "zscore":
                z = zscore_columns(z)
    z = np.asarray(z, dtype=np.float64)
    if not np.all(np.isfinite(z)):
        raise NonFiniteAffinityError(f"affinity ({method}) is not finite; lower the lr")
    return (z + z.T) / 2


# ------------------------------------------------------------------ output
def save_affinity_json(matrix, names: Sequence[str], path: str | Path, method: str | None = None,
                       config: Mapping[str, Any] | None = None) -> Path:
    """Write {"method", "tasks", "matrix", "config"} as JSON atomically (temp file + rename)."""
    m = np.asarray(matrix, dtype=float)
    names = list(names)
    if m.shape != (len(names), len(names)):
        raise InvalidInputError(f"matrix {m.shape} does not match {len(names)} names")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"method": method, "tasks": names, "matrix": m.tolist(),
               "config": {k: v for k, v in (config or {}).items()}}
    return atomic_write_text(path, json.dumps(payload, indent=2, default=str))


def load_affinity_json(path: str | Path) -> tuple[np.ndarray, list[str], dict[str, Any]]:
    """(matrix, task names, the whole record) of a save_affinity_json file."""
    data = json.loads(Path(path).read_text())
    return np.asarray(data["matrix"], dtype=float), list(data["tasks"]), data
