"""One problem, ready to step: its context table, loss weights, packed forest and
prompt list, the forest step and the baseline steps, their counts, and the
comparison of a baseline's features and gradients with the forest's.

Loss of every method = sum over tasks of features * fixed random weights
[C, E]; the backward reaches the [ctx_rows, W] context table only.
"""
from __future__ import annotations

import time

import torch

from ..engine.prompt_forest import build_prompt_forest
from .counting import step_counts
from .naive import BaselineStep, PromptSpec, build_batched, build_naive, enumerate_prompts
from .problems import Problem


class StepRunner:
    """The steps of one problem on `tower` (which sits on the device the steps run on).

    ctx: [ctx_rows, W] leaf tensor (0.02 * N(0, 1), from `seed` + 1), the only
    thing that gets a gradient. weights: task -> [C, E] loss weights.
    max_graph_bytes: autograd-graph budget of one baseline backward (larger
    steps run as micro-batches, see `naive`).
    """

    def __init__(self, tower, tokenizer, problem: Problem, *, seed: int = 0,
                 max_graph_bytes: float = float("inf")):
        self.tower, self.problem = tower, problem
        L = tower.config.context_length
        gen = torch.Generator().manual_seed(seed + 1)
        W, E = tower.config.width, tower.config.embed_dim
        self.ctx = (0.02 * torch.randn(problem.ctx_rows, W, generator=gen)).requires_grad_(True)
        self.weights = {t: torch.randn(len(c), E, generator=gen) for t, c in problem.task_classes.items()}
        t0 = time.perf_counter()
        self.forest = build_prompt_forest(tokenizer, L, problem.node_ctx_rows, problem.task_paths,
                                          problem.task_classes, problem.combine)
        self.forest_build_s = time.perf_counter() - t0
        self.spec: PromptSpec = enumerate_prompts(tokenizer, L, problem.node_ctx_rows, problem.task_paths,
                                                  problem.task_classes, problem.combine)
        for t, ids in self.spec.task_prompts.items():
            if not torch.equal(ids, self.forest.task_prompts[t]):
                raise AssertionError(f"prompt numbering differs from build_prompt_forest for task {t}")
        self.max_graph_bytes = max_graph_bytes

    def to(self, device: torch.device) -> "StepRunner":
        """Move the context table, loss weights and forest to `device` (baselines built later follow)."""
        self.ctx = self.ctx.detach().to(device).requires_grad_(True)
        self.weights = {t: w.to(device) for t, w in self.weights.items()}
        self.forest = self.forest.to(device)
        return self

    # -- steps
    def forest_step(self, tower=None) -> float:
        """Forward + backward of the forest pass on `tower` (default: the runner's)."""
        self.ctx.grad = None
        feats = (tower or self.tower).encode_forest(self.forest, self.ctx)
        loss = sum((feats[t] * w).sum() for t, w in self.weights.items())
        loss.backward()
        return float(loss.detach())

    def forest_collect(self, tower=None) -> tuple[float, dict]:
        """A forest step that also returns per-prompt [P, E] and per-task [C, E] features."""
        self.ctx.grad = None
        pf = (tower or self.tower).encode_layout(self.forest.layout, self.forest.eos_index, self.ctx)
        feats = self.forest.gather(pf)
        loss = sum((feats[t] * w).sum() for t, w in self.weights.items())
        loss.backward()
        return float(loss.detach()), {"prompt_features": pf.detach(),
                                      "task_features": {t: f.detach() for t, f in feats.items()}}

    def baseline(self, name: str, max_prompts: int | None = None) -> BaselineStep:
        """Build baseline `name` (naive, padded, truncated) on the context table's device.

        max_prompts: padded/truncated over the first prompts only (extrapolated timings).
        """
        if name == "naive":
            step = build_naive(self.spec, self.tower, self.weights, self.max_graph_bytes)
        else:
            step = build_batched(self.spec, self.tower, self.weights, truncate=(name == "truncated"),
                                 max_graph_bytes=self.max_graph_bytes, max_prompts=max_prompts)
        return step.to(self.ctx.device)

    def run_baseline(self, step: BaselineStep, collect: bool):
        self.ctx.grad = None
        return step.step(self.ctx, collect=collect)

    def counts(self) -> dict[str, dict]:
        """Tokens, keys computed, pooled rows and FLOPs per step and method (nothing run)."""
        return step_counts(self.tower, self.spec, self.forest)

    # -- verification
    @staticmethod
    def verify(collected: dict, grad: torch.Tensor | None, ref: dict, ref_grad: torch.Tensor) -> dict:
        """A baseline's collected features (and context gradient, from a full step)
        against the forest's. Rows a partial step did not compute are NaN and skipped;
        `prompts_compared` says how many prompts were compared."""
        pf, rpf = collected["prompt_features"], ref["prompt_features"]
        have = ~torch.isnan(pf).any(1)
        out = {"prompts_compared": int(have.sum()),
               "prompt_max_abs_diff": float((pf[have] - rpf[have]).abs().max()) if have.any() else None}
        diffs = []
        for t, f in (collected.get("task_features") or {}).items():
            ok = ~torch.isnan(f).any(1)
            if ok.any():
                diffs.append(float((f[ok] - ref["task_features"][t][ok]).abs().max()))
        out["task_max_abs_diff"] = max(diffs) if diffs else None
        if grad is not None:
            out["ctx_grad_max_abs_diff"] = float((grad - ref_grad).abs().max())
            out["ctx_grad_rel_diff"] = float((grad - ref_grad).abs().max() / ref_grad.abs().max().clamp_min(1e-30))
        return out
