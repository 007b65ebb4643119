"""The whole HiPro training step on a benchmark problem, eager and as one CUDA graph.

The step `method.training.fit` runs, on fixed inputs: the forest pass for
every task's class features, per task the scaled cosine logits of a batch of
L2-normalised image features (cached features, as in training) and their
cross-entropy, the mean over tasks, backward to the context table, and the
optimiser step of AdamW (lr 0.002, weight decay 5e-4: session 6's training
default; `optimizer="sgd"`: CoOp's SGD with momentum 0.9). TrainConfig's
default since session 7, full-batch L-BFGS, runs a data-dependent number of
evaluations per step (its line search), which a fixed CUDA graph cannot
capture; its per-evaluation cost is this step without the optimiser update. Under bf16 the forward runs
under autocast, as `fit(amp="bf16")` does. On CUDA AdamW is built with
capturable=True (its step count lives on the device), which a CUDA graph of
the step needs.

Small problems are launch-bound (bench (a) packs ~1,000 tokens; a step is a
few hundred kernel launches), so on CUDA the step is also captured into one
CUDA graph (torch.cuda.graph, after eager warm-up on a side stream: the
fused ops' block plan is cached then, so the captured calls neither copy nor
synchronise) and replayed. A capture failure is reported, not raised.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from ..errors import InvalidInputError

LOGIT_SCALE = 100.0  # exp of CLIP's trained logit_scale


class TrainStep:
    """One problem's training step on `runner`'s tower and forest (see module doc).

    Works on its own copy of the runner's context table, so the other steps'
    inputs stay as they are.
    """

    def __init__(self, runner, *, batch_size: int = 32, precision: str = "fp32", seed: int = 0,
                 optimizer: str = "adamw", lr: float = 0.002, momentum: float = 0.9, weight_decay: float = 5e-4):
        self.tower, self.forest = runner.tower, runner.forest
        device = runner.ctx.device
        self.device = device
        self.ctx = runner.ctx.detach().clone().requires_grad_(True)
        gen = torch.Generator().manual_seed(seed + 2)
        E = self.tower.config.embed_dim
        self.images, self.labels = {}, {}
        for t, w in runner.weights.items():
            classes = w.shape[0]
            self.images[t] = F.normalize(torch.randn(batch_size, E, generator=gen), dim=-1).to(device)
            self.labels[t] = torch.randint(classes, (batch_size,), generator=gen).to(device)
        self.precision = precision
        if optimizer == "adamw":
            self.optimizer = torch.optim.AdamW([self.ctx], lr=lr, weight_decay=weight_decay,
                                               capturable=device.type == "cuda")
            self.optimizer_name = "AdamW" + (" (capturable)" if device.type == "cuda" else "")
        elif optimizer == "sgd":
            self.optimizer = torch.optim.SGD([self.ctx], lr=lr, momentum=momentum, weight_decay=weight_decay)
            self.optimizer_name = "SGD(momentum 0.9)"
        else:
            raise InvalidInputError(f"optimizer must be 'adamw' or 'sgd', got {optimizer!r}")
        self.graph = None
        self.static_loss = None

    def _autocast(self):
        if self.precision != "bf16":
            return nullcontext()
        # No autocast weight cache: a CUDA graph must not capture cast copies
        # that the cache would hand back outside the graph.
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def _forward_backward_step(self) -> torch.Tensor:
        with self._autocast():
            feats = self.tower.encode_forest(self.forest, self.ctx)
            losses = [F.cross_entropy((LOGIT_SCALE * self.images[t].float() @ feats[t].t()).float(),
                                      self.labels[t]) for t in self.images]
        loss = torch.stack(losses).mean()
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def eager_step(self) -> torch.Tensor:
        """One step; returns the loss (a device tensor, not synchronised)."""
        self.optimizer.zero_grad(set_to_none=True)
        return self._forward_backward_step()

    def capture(self, warmup: int = 3) -> None:
        """Capture one step into a CUDA graph (after `warmup` eager steps on a side
        stream, which also creates the optimiser state the captured step updates)."""
        if self.device.type != "cuda":
            raise InvalidInputError("CUDA graphs need a CUDA device")
        with torch.cuda.device(self.device):  # streams and the capture on the step's device
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(max(1, warmup)):
                    self.eager_step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            self.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                self.static_loss = self._forward_backward_step()
        self.graph = graph

    def graph_step(self) -> torch.Tensor:
        """Replay the captured step (capture() first); returns the static loss tensor."""
        self.graph.replay()
        return self.static_loss


def time_train_step(runner, precision: str, repeats: int, warmup: int,
                    timed: Callable, median: Callable, graphs: bool) -> dict:
    """{"eager_ms", "loss_finite", and on CUDA "graph_ms" or "graph_error"} for one problem."""
    step = TrainStep(runner, precision=precision)
    for _ in range(max(1, warmup)):
        step.eager_step()
    eager = [timed(step.eager_step, step.device)[0] for _ in range(repeats)]
    out = {"eager_ms": 1e3 * median(eager), "eager_times_ms": [1e3 * t for t in eager],
           "batch_per_task": next(iter(step.images.values())).shape[0], "optimizer": step.optimizer_name}
    loss = step.eager_step()
    out["loss_finite"] = bool(torch.isfinite(loss).item())
    if not graphs or step.device.type != "cuda":
        out["graph_skipped"] = "CUDA graphs need a CUDA device" if graphs else "not asked"
        return out
    try:
        step.capture(warmup)
        for _ in range(max(1, warmup)):
            step.graph_step()
        replay = [timed(step.graph_step, step.device)[0] for _ in range(repeats)]
        out["graph_ms"] = 1e3 * median(replay)
        out["graph_times_ms"] = [1e3 * t for t in replay]
        out["graph_loss_finite"] = bool(torch.isfinite(step.graph_step()).item())
    except Exception as e:  # reported in the results: the capture is what is being measured
        out["graph_error"] = f"{type(e).__name__}: {e}"[:2000]
        torch.cuda.synchronize(step.device)
    return out
