"""Benchmarks of the text-side HiPro training step (`hipro bench`).

One step = encode every prompt of every task through the frozen CLIP text
tower, loss = sum(features * fixed random weights), backward to the learnable
context table only. Methods (see `hipro_fast.bench.naive` for the baselines):

  naive      CoOp-style loop, one full-length [C, 77] batch per prompt set
  padded     all distinct prompts in one [P, 77] batch
  truncated  padded, cut after the longest EOS (exact: causal tower, EOS pooling)
  forest     `TextTower.encode_forest` on the packed prompt forest (built once)

Counting conventions (printed with the results):
  tokens   sequence tokens pushed through the transformer per step.
  FLOPs    model FLOPs, multiply-add = 2. Per token per layer, forward =
           2 * (linear weights of the block) [24 W^2 at mlp_ratio 4: qkv 6, out 2,
           MLP 16] + 4 W * (keys the attention computes for that query); the
           dense masked attention of the baselines computes all seq_len keys,
           the forest exactly the visible keys (from the segment table).
           Backward with frozen weights computes input gradients only: the
           linear layers' dX GEMMs = 1x their forward FLOPs, attention
           dP, dS->dQ, dK, dV = 8 W per key (2x forward). So fwd+bwd =
           48 W^2 per token-layer + 12 W per visible key, plus 4 W E per pooled
           EOS row (projection fwd + dX). Recomputation inside kernels, norms,
           activations and softmax are not counted.
  peak MB  peak resident-set growth during one step over the resident model
           (Linux VmHWM reset through /proc/self/clear_refs after gc and
           malloc_trim, read after the step), i.e. what the step allocates at
           its peak; measured in-process.
  GEMM     fp32 torch.mm [T_forest, W] x [W, 4W] timed interleaved with the forest.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

from .naive import PromptSpec, build_batched, build_naive, enumerate_prompts
from ..engine.prompt_forest import build_prompt_forest, class_suffix_tokens
from .. import ops
from ..engine.text_tower import TextTower
from ..ops.extension import build_info, fused_available
from ..ops.extension import fused_available

OFFICE_HOME_CLASSES = [
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator",
    "Calendar", "Candles", "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp",
    "Drill", "Eraser", "Exit_Sign", "Fan", "File_Cabinet", "Flipflops", "Flowers", "Folder", "Fork",
    "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard", "Knives", "Lamp_Shade", "Laptop", "Marker",
    "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven", "Pan", "Paper_Clip", "Pen", "Pencil",
    "Postit_Notes", "Printer", "Push_Pin", "Radio", "Refrigerator", "Ruler", "Scissors",
    "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda", "Speaker", "Spoon", "TV", "Table",
    "Telephone", "ToothBrush", "Toys", "Trash_Can", "Webcam",
]
OFFICE_HOME_DOMAINS = ["Art", "Clipart", "Product", "Real_World"]

TARGET_FRACTION_OF_IDEAL = 0.6
TARGET_FRACTION_OF_GEMM = 0.5
TARGET_MEMORY_RATIO = 5.0
METHODS = ("naive", "padded", "truncated", "forest")


# --------------------------------------------------------------------------- configuration


@dataclass
class BenchConfig:
    """What `run_bench` runs.

    model: open_clip model name (random weights, `pretrained=None`) or "tiny"
        (a 2-layer width-64 text tower, for smoke tests).
    quick: fewer repeats, no profile; the baselines are extrapolated from one
        micro-batch of about `est_tokens` tokens (per-token time x tokens).
    The full mode measures every baseline step, except sweep points whose
    truncated step exceeds `sweep_measure_max_tokens` tokens: those are
    extrapolated from one micro-batch of `est_tokens_large` tokens (such steps
    run as identical micro-batches anyway, to bound memory).
    """

    model: str = "ViT-B-16"
    quick: bool = False
    configs: Sequence[str] = ("a", "b", "c")
    sweep: bool = True
    sweep_classes: Sequence[int] = (65, 130, 260, 520)
    sweep_depths: Sequence[int] = (1, 2, 3, 4)
    n_ctx: int = 16
    forest_repeats: int | None = None      # default: 10 (full) / 3 (quick)
    forest_warmup: int | None = None       # default: 2 (full) / 1 (quick)
    baseline_repeats: int | None = None    # default: 3 (full) / 1 (quick)
    baseline_budget_s: float | None = None  # stop repeating a baseline past this; default 150 / 0
    sweep_forest_repeats: int | None = None  # default: 3 (full) / 2 (quick)
    sweep_measure_max_tokens: int = 32768
    est_tokens: int = 4096
    est_tokens_large: int = 16384
    max_graph_gb: float | None = None      # default: min(8, 0.5 * MemAvailable)
    gemm_repeats: int = 3
    profile: bool | None = None            # default: True (full) / False (quick)
    seed: int = 0
    json_path: str | None = None
    png_path: str | None = None
    verbose: bool = True

    def __post_init__(self):
        q = self.quick
        if self.forest_repeats is None:
            self.forest_repeats = 3 if q else 10
        if self.baseline_repeats is None:
            self.baseline_repeats = 1 if q else 3
        if self.baseline_budget_s is None:
            self.baseline_budget_s = 0.0 if q else 150.0
        if self.sweep_forest_repeats is None:
            self.sweep_forest_repeats = 2 if q else 3
        if self.forest_warmup is None:
            self.forest_warmup = 1 if q else 2
        if self.profile is None:
            self.profile = not q


@dataclass
class Problem:
    """A HiPro prompt configuration (tasks, tree, classes, combine mode)."""

    name: str
    description: str
    task_paths: dict[str, list[str]]
    task_classes: dict[str, list[str]]
    node_ctx_rows: dict[str, tuple[int, int]]
    combine: str

    @property
    def ctx_rows(self) -> int:
        return sum(c for _, c in self.node_ctx_rows.values())


def tree_problem(name: str, description: str, n_tasks: int, widths: Sequence[int], classes: Sequence[str],
                 n_ctx: int, combine: str, task_names: Sequence[str] | None = None) -> Problem:
    """Tasks over a tree with `widths[l]` nodes at level l; task i uses node i*w//n_tasks per level."""
    task_names = list(task_names or (OFFICE_HOME_DOMAINS if n_tasks == 4 else [f"task{i}" for i in range(n_tasks)]))
    rows: dict[str, tuple[int, int]] = {}
    for level, w in enumerate(widths):
        for j in range(w):
            rows[f"L{level}N{j}"] = (len(rows) * n_ctx, n_ctx)
    paths = {task_names[i]: [f"L{l}N{i * w // n_tasks}" for l, w in enumerate(widths)] for i in range(n_tasks)}
    return Problem(name, description, paths, {t: list(classes) for t in paths}, rows, combine)


def depth_widths(depth: int, n_tasks: int = 4) -> list[int]:
    """Sweep trees: per-task leaves under a shared chain/tree, e.g. 3 -> [1, 2, 4]."""
    widths = [n_tasks]
    while len(widths) < depth:
        widths.insert(0, max(1, widths[0] // 2))
    return widths


def sweep_classnames(tokenizer, n: int) -> list[str]:
    """Office-Home's 65 names, then ImageNet names whose prompt tokens are new."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    names = list(OFFICE_HOME_CLASSES)
    seen = {tuple(class_suffix_tokens(tokenizer, c)) for c in names}
    for c in IMAGENET_CLASSNAMES:
        if len(names) >= n:
            break
        key = tuple(class_suffix_tokens(tokenizer, c))
        if key not in seen:
            seen.add(key)
            names.append(c)
    return names[:n]


def main_problems(tokenizer, n_ctx: int) -> dict[str, Problem]:
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    return {
        "a": tree_problem("a", "4 tasks x 65 Office-Home, root->2->4, concat", 4, [1, 2, 4],
                          OFFICE_HOME_CLASSES, n_ctx, "concat"),
        "b": tree_problem("b", "4 tasks x 65 Office-Home, root->2->4, mean", 4, [1, 2, 4],
                          OFFICE_HOME_CLASSES, n_ctx, "mean"),
        "c": tree_problem("c", "1 task x 250 ImageNet, single node (CoOp)", 1, [1],
                          list(IMAGENET_CLASSNAMES[:250]), n_ctx, "concat", ["imagenet"]),
    }


# --------------------------------------------------------------------------- model


def load_model(name: str, seed: int = 0) -> nn.Module:
    """open_clip model with random weights, eval, frozen; the vision tower dropped."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import open_clip

    torch.manual_seed(seed)
    if name == "tiny":
        from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

        model = CLIP(embed_dim=64,
                     vision_cfg=CLIPVisionCfg(layers=1, width=64, head_width=32, patch_size=16, image_size=32),
                     text_cfg=CLIPTextCfg(context_length=77, vocab_size=49408, width=64, heads=2, layers=2))
    else:
        model = open_clip.create_model(name, pretrained=None)
    model.visual = None  # text side only
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


# --------------------------------------------------------------------------- measurement helpers


def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


_LIBC = _libc()


def _status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) if m else None
    except OSError:
        return None


class PeakRSS:
    """Peak RSS growth (bytes) of the block: VmHWM reset via clear_refs, after gc + malloc_trim."""

    def __init__(self):
        self.peak_bytes: int | None = None

    def __enter__(self):
        gc.collect()
        if _LIBC is not None:
            _LIBC.malloc_trim(0)
        self.base = _status_kb("VmRSS")
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.ok = self.base is not None
        except OSError:
            self.ok = False
        return self

    def __exit__(self, *exc):
        hwm = _status_kb("VmHWM")
        if self.ok and hwm is not None:
            self.peak_bytes = max(0, hwm - self.base) * 1024
        return False


def _timed(fn: Callable[[], object]) -> tuple[float, object]:
    """Wall time of fn() with the cyclic GC paused."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        out = fn()
        return time.perf_counter() - t0, out
    finally:
        if enabled:
            gc.enable()


def gemm_rate(rows: int, width: int, repeats: int = 3) -> float:
    """GFLOP/s of fp32 torch.mm [rows, W] x [W, 4W] (median of `repeats`)."""
    a = torch.randn(rows, width)
    b = torch.randn(width, 4 * width)
    torch.mm(a, b)
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        rates.append(2.0 * rows * width * 4 * width / (time.perf_counter() - t0) / 1e9)
    return statistics.median(rates)


def _max_graph_bytes(cfg: BenchConfig) -> float:
    if cfg.max_graph_gb is not None:
        return cfg.max_graph_gb * 2**30
    avail = _status_meminfo("MemAvailable")
    cap = 8 * 2**30
    return float(min(cap, 0.5 * avail)) if avail else float(cap)


def _status_meminfo(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            m = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.M)
        return int(m.group(1)) * 1024 if m else None
    except OSError:
        return None


# --------------------------------------------------------------------------- counting


def linear_flops_per_token(tower) -> int:
    """Forward FLOPs of one block's linear layers per token (2 * weights)."""
    blk = tower.blocks[0]
    n = blk.attn.in_proj_weight.numel()
    for m in blk.modules():
        if isinstance(m, nn.Linear):
            n += m.weight.numel()
    return 2 * n


def forest_visible_keys(layout) -> int:
    """Sum over packed tokens of the keys each one sees (ancestor segments + own causal prefix)."""
    table = layout.segment_table.tolist()
    anc = [0] * len(table)
    total = 0
    for s, (off, length, parent, _) in enumerate(table):
        if parent >= 0:
            anc[s] = anc[parent] + table[parent][1]
        total += length * anc[s] + length * (length + 1) // 2
    return total


def step_flops(tower, tokens: int, key_tokens: int, pooled: int) -> dict[str, float]:
    cfg = tower.config
    lin = linear_flops_per_token(tower)
    W, E = cfg.width, cfg.embed_dim
    fwd = cfg.layers * (tokens * lin + 4 * W * key_tokens) + pooled * 2 * W * E
    bwd = cfg.layers * (tokens * lin + 8 * W * key_tokens) + pooled * 2 * W * E
    return {"forward": float(fwd), "backward": float(bwd), "total": float(fwd + bwd)}


# --------------------------------------------------------------------------- one configuration


class _Runner:
    """Holds one problem's methods and their measurements."""

    def __init__(self, tower, tokenizer, problem: Problem, cfg: BenchConfig, log: Callable[[str], None]):
        self.tower, self.problem, self.cfg, self.log = tower, problem, cfg, log
        L = tower.config.context_length
        gen = torch.Generator().manual_seed(cfg.seed + 1)
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
        self.max_graph_bytes = _max_graph_bytes(cfg)
        self.results: dict[str, dict] = {}
        self.collected: dict[str, dict] = {}

    # -- steps
    def forest_step(self):
        self.ctx.grad = None
        feats = self.tower.encode_forest(self.forest, self.ctx)
        loss = sum((feats[t] * w).sum() for t, w in self.weights.items())
        loss.backward()
        return float(loss.detach())

    def forest_collect(self):
        self.ctx.grad = None
        pf = self.tower.encode_layout(self.forest.layout, self.forest.eos_index, self.ctx)
        feats = self.forest.gather(pf)
        loss = sum((feats[t] * w).sum() for t, w in self.weights.items())
        loss.backward()
        return float(loss.detach()), {"prompt_features": pf.detach(),
                                      "task_features": {t: f.detach() for t, f in feats.items()}}

    def baseline(self, name: str, max_prompts: int | None = None):
        if name == "naive":
            return build_naive(self.spec, self.tower, self.weights, self.max_graph_bytes)
        return build_batched(self.spec, self.tower, self.weights, truncate=(name == "truncated"),
                             max_graph_bytes=self.max_graph_bytes, max_prompts=max_prompts)

    def _run_baseline(self, step, collect: bool):
        self.ctx.grad = None
        return step.step(self.ctx, collect=collect)

    # -- counts
    def counts(self) -> dict[str, dict]:
        """Tokens, keys computed and pooled rows per step, from the prompt lists (nothing run)."""
        L = self.tower.config.context_length
        spec = self.spec
        naive_rows = sum(len(ids) for _, _, ids in spec.sets)
        P = spec.num_prompts
        lc = max(spec.prompt_length(p) for p in range(P))
        out = {"naive": {"tokens": naive_rows * L, "seq_len": L, "pooled": naive_rows},
               "padded": {"tokens": P * L, "seq_len": L, "pooled": P},
               "truncated": {"tokens": P * lc, "seq_len": lc, "pooled": P}}
        for v in out.values():
            v["key_tokens"] = v["tokens"] * v["seq_len"]
        fl = self.forest.layout
        out["forest"] = {"tokens": fl.num_tokens, "seq_len": None, "key_tokens": forest_visible_keys(fl),
                         "pooled": self.forest.num_prompts, "segments": fl.num_segments}
        for v in out.values():
            v["flops"] = step_flops(self.tower, v["tokens"], v["key_tokens"], v["pooled"])
        return out

    # -- verification
    def verify(self, name: str, collected: dict, grad: torch.Tensor | None, ref: dict,
               ref_grad: torch.Tensor) -> dict:
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


def _loadavg() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:  # pragma: no cover
        return None


def _median(xs):
    return statistics.median(xs) if xs else None


def run_problem(tower, tokenizer, problem: Problem, cfg: BenchConfig, log, methods=METHODS,
                estimate: Sequence[str] = (), forest_repeats: int | None = None,
                profile: bool = False, est_tokens: int | None = None) -> dict:
    """Measure `methods` on one problem. Methods in `estimate` are extrapolated from one
    micro-batch of about est_tokens (default cfg.est_tokens) tokens: per-token time x tokens."""
    load_start = _loadavg()
    r = _Runner(tower, tokenizer, problem, cfg, log)
    counts = r.counts()
    res: dict = {"problem": problem.name, "description": problem.description, "combine": problem.combine,
                 "tasks": len(problem.task_paths), "classes_per_task": len(next(iter(problem.task_classes.values()))),
                 "prompts": r.forest.num_prompts, "forest_build_s": r.forest_build_s,
                 "max_graph_gb": r.max_graph_bytes / 2**30, "counts": counts, "methods": {}, "verify": {}}
    W = tower.config.width
    T_forest = counts["forest"]["tokens"]
    forest_repeats = forest_repeats or cfg.forest_repeats

    # forest: warm-up, then one untimed collect step for memory + reference
    for _ in range(cfg.forest_warmup):
        r.forest_step()
    with PeakRSS() as mem:
        _, ref = r.forest_collect()
    ref_grad = r.ctx.grad.detach().clone()
    forest_times: list[float] = []
    gemm_rates: list[float] = []
    res["methods"]["forest"] = dict(counts["forest"], peak_bytes=mem.peak_bytes, est=False, micro_batches=1)

    def forest_once():
        dt, _ = _timed(r.forest_step)
        forest_times.append(dt)
        gemm_rates.append(gemm_rate(T_forest, W, cfg.gemm_repeats))

    measured = [m for m in methods if m != "forest" and m not in estimate]
    estimated = [m for m in methods if m != "forest" and m in estimate]

    # estimated baselines: one micro-batch of the dense full/truncated computation
    per_seq: dict[str, tuple[float, int, dict]] = {}
    for m in estimated:
        key = "truncated" if m == "truncated" else "padded"  # naive = padded compute per token
        if key not in per_seq:
            seq = counts[key]["seq_len"]
            n = max(1, (est_tokens or cfg.est_tokens) // seq)
            warm = r.baseline(key, max_prompts=max(1, 1024 // seq))
            r._run_baseline(warm, False)  # warm-up at this sequence length
            small = r.baseline(key, max_prompts=n)
            forest_once()
            dt, (_, col) = _timed(lambda: r._run_baseline(small, True))
            per_seq[key] = (dt / small.tokens, small.tokens, col)
        per_tok, sample_tokens, col = per_seq[key]
        t = per_tok * counts[m]["tokens"]
        res["methods"][m] = dict(counts[m], times=[t], time_s=t, reps=1, est=True,
                                 est_sample_tokens=sample_tokens, peak_bytes=None, micro_batches=None)
        res["verify"][m] = r.verify(m, col, None, ref, ref_grad)

    # measured baselines, interleaved with the forest
    steps = {}
    for m in measured:
        steps[m] = r.baseline(m)
        res["methods"][m] = dict(counts[m], times=[], est=False, peak_bytes=None,
                                 micro_batches=steps[m].micro_batches)
    if measured:
        # warm-up each distinct sequence length on a small batch
        for key in sorted({("truncated" if m == "truncated" else "padded") for m in measured}):
            small = r.baseline(key, max_prompts=max(1, 1024 // counts[key]["seq_len"]))
            r._run_baseline(small, False)
    pending = list(measured)
    rnd = 0
    while pending:
        order = pending[rnd % len(pending):] + pending[:rnd % len(pending)]
        for m in order:
            entry = res["methods"][m]
            forest_once()
            first = not entry["times"]
            if first:
                with PeakRSS() as mem:
                    dt, (_, col) = _timed(lambda: r._run_baseline(steps[m], True))
                entry["peak_bytes"] = mem.peak_bytes
                res["verify"][m] = r.verify(m, col, r.ctx.grad.detach().clone(), ref, ref_grad)
            else:
                dt, _ = _timed(lambda: r._run_baseline(steps[m], False))
            entry["times"].append(dt)
            spent = sum(entry["times"])
            n = len(entry["times"])
            log(f"  [{problem.name}] {m:9s} rep {n}: {dt:8.2f} s   (forest {forest_times[-1]:.3f} s)")
            if n >= cfg.baseline_repeats or (spent + spent / n > cfg.baseline_budget_s):
                pending.remove(m)
        rnd += 1
    for m in measured:
        entry = res["methods"][m]
        entry["reps"] = len(entry["times"])
        entry["time_s"] = _median(entry["times"])
    while len(forest_times) < forest_repeats:
        forest_once()
    f = res["methods"]["forest"]
    f.update(times=forest_times, time_s=_median(forest_times), reps=len(forest_times))
    log(f"  [{problem.name}] forest    median {f['time_s']:.3f} s over {f['reps']} reps")
    for m, e in res["methods"].items():
        e["gflops"] = e["flops"]["total"] / e["time_s"] / 1e9 if e.get("time_s") else None
        e["peak_mb"] = e["peak_bytes"] / 2**20 if e.get("peak_bytes") is not None else None
    res["gemm"] = {"shape": [T_forest, W, 4 * W], "gflops_median": _median(gemm_rates), "samples": gemm_rates}
    res["ratios"] = ratios(res)
    res["loadavg_1min"] = {"start": load_start, "end": _loadavg()}
    if profile:
        res["profile"] = profile_forest(r)
        res["kernels"] = kernel_breakdown(r)
    return res


def ratios(res: dict) -> dict:
    """Ideal (token) and measured speedups of the forest over each baseline."""
    ms = res["methods"]
    f = ms["forest"]
    out = {}
    for m in ("naive", "padded", "truncated"):
        if m not in ms or not ms[m].get("time_s"):
            continue
        ideal = ms[m]["tokens"] / f["tokens"]
        meas = ms[m]["time_s"] / f["time_s"]
        out[m] = {"ideal": ideal, "measured": meas, "fraction_of_ideal": meas / ideal,
                  "flop_ratio": ms[m]["flops"]["total"] / f["flops"]["total"], "est": ms[m]["est"]}
        if ms[m].get("peak_bytes") and f.get("peak_bytes"):
            out[m]["memory_ratio"] = ms[m]["peak_bytes"] / f["peak_bytes"]
    g = res.get("gemm", {}).get("gflops_median")
    if g and f.get("gflops"):
        out["forest_fraction_of_gemm"] = f["gflops"] / g
    return out


# --------------------------------------------------------------------------- profiling


# The forward of an op with torch.library.register_autograd is recorded under its
# generated autograd Function's name ("GeneratedBackwardFor_<op>"); the backward
# node itself shows under the same name with ~0 self time.
_CATEGORIES = [
    ("tree_attention fwd", ("hipro_fast::tree_attention", "GeneratedBackwardFor_hipro_fast_tree_attention_default")),
    ("tree_attention bwd", ("hipro_fast::tree_attention_backward",)),
    ("GEMM (mm/addmm/linear)", ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul",
                                "aten::linear", "aten::_mkl_linear", "mkldnn", "aten::mkldnn_linear")),
    ("LayerNorm fwd+bwd", ("aten::native_layer_norm", "aten::native_layer_norm_backward", "aten::layer_norm")),
    ("GELU fwd+bwd", ("aten::gelu", "aten::gelu_backward")),
    ("assemble + pool_eos", ("hipro_fast::assemble_forest", "hipro_fast::assemble_forest_backward",
                             "hipro_fast::pool_eos", "hipro_fast::pool_eos_backward",
                             "GeneratedBackwardFor_hipro_fast_assemble_forest_default",
                             "GeneratedBackwardFor_hipro_fast_pool_eos_default")),
    ("copies (q/k/v contiguous, unbind-backward cat)", ("aten::copy_", "aten::contiguous", "aten::clone",
                                                        "aten::empty_like", "aten::cat", "aten::stack")),
    ("elementwise add/mul/sum", ("aten::add", "aten::add_", "aten::mul", "aten::sum", "aten::div",
                                 "aten::fill_", "aten::zero_", "aten::zeros_like")),
]


def profile_forest(r: _Runner) -> dict:
    """torch.profiler breakdown (self CPU time) of one forest step."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep kineto's start/stop lines off stdout
    from torch.profiler import ProfilerActivity, profile

    r.forest_step()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        r.forest_step()
    wall = time.perf_counter() - t0
    rows = []
    for ev in prof.key_averages():
        rows.append((ev.key, ev.self_cpu_time_total / 1e6, ev.count))
    rows.sort(key=lambda x: -x[1])
    total = sum(t for _, t, _ in rows)
    cats: dict[str, float] = {}
    for key, t, _ in rows:
        cat = "other"
        for name, keys in _CATEGORIES:
            if key in keys or (name.startswith("GEMM") and "mkldnn" in key):
                cat = name
                break
        cats[cat] = cats.get(cat, 0.0) + t
    return {"wall_s": wall, "self_total_s": total,
            "categories": {k: {"s": v, "frac": v / total if total else 0.0}
                           for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": k, "self_s": t, "calls": c} for k, t, c in rows[:15]]}


def kernel_breakdown(r: _Runner, repeats: int = 5) -> dict:
    """Per-layer times at the forest's shapes: tree attention fwd / bwd alone vs the
    block's four linear layers (forward), with their model GFLOP/s."""

    lay = r.forest.layout
    cfg = r.tower.config
    T, H, W = lay.num_tokens, cfg.heads, cfg.width
    D = W // H
    keys = forest_visible_keys(lay)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, H, D, generator=g) for _ in range(3))

    def med(fn):
        fn()
        ts = []
        for _ in range(repeats):
            dt, _ = _timed(fn)
            ts.append(dt)
        return statistics.median(ts)

    out: dict = {"tokens": T, "visible_keys": keys, "threads": torch.get_num_threads()}
    if hasattr(torch.ops, "hipro_fast") and hasattr(torch.ops.hipro_fast, "tree_attention"):
        tab, tseg = lay.segment_table, lay.token_segment
        o, lse = torch.ops.hipro_fast.tree_attention(q, k, v, tab, tseg, D ** -0.5)
        go = torch.randn_like(o)
        t_f = med(lambda: torch.ops.hipro_fast.tree_attention(q, k, v, tab, tseg, D ** -0.5))
        t_b = med(lambda: torch.ops.hipro_fast.tree_attention_backward(go, q, k, v, o, lse, tab, tseg, D ** -0.5))
        out["tree_attention_fwd_ms"] = 1e3 * t_f
        out["tree_attention_bwd_ms"] = 1e3 * t_b
        out["tree_attention_fwd_gflops"] = 4 * W * keys / t_f / 1e9
        out["tree_attention_bwd_gflops"] = 8 * W * keys / t_b / 1e9
    blk = r.tower.blocks[0]
    weights = [blk.attn.in_proj_weight, blk.attn.out_proj.weight] + \
        [m.weight for m in blk.mlp.modules() if isinstance(m, nn.Linear)]
    xs = [torch.randn(T, w.shape[1], generator=g) for w in weights]
    t_lin = med(lambda: [torch.nn.functional.linear(x, w) for x, w in zip(xs, weights)])
    out["linears_fwd_ms"] = 1e3 * t_lin
    out["linears_fwd_gflops"] = 2 * T * sum(w.numel() for w in weights) / t_lin / 1e9
    if "tree_attention_fwd_ms" in out:
        # fwd + dX-only bwd of the linears is ~2x their forward
        att = out["tree_attention_fwd_ms"] + out["tree_attention_bwd_ms"]
        out["attention_share_of_layer_est"] = att / (att + 2 * out["linears_fwd_ms"])
    return out


def profile_only(tower, tokenizer, cfg: BenchConfig, log) -> dict:
    """Forest-only profile of each configuration (no baselines)."""
    out = {}
    problems = main_problems(tokenizer, cfg.n_ctx)
    for name in cfg.configs:
        r = _Runner(tower, tokenizer, problems[name], cfg, log)
        for _ in range(cfg.forest_warmup):
            r.forest_step()
        times = [_timed(r.forest_step)[0] for _ in range(cfg.forest_repeats)]
        c = r.counts()["forest"]
        out[name] = {"forest_tokens": c["tokens"], "forest_time_s": statistics.median(times),
                     "forest_gflops": c["flops"]["total"] / statistics.median(times) / 1e9,
                     "gemm_gflops": gemm_rate(c["tokens"], tower.config.width, 5),
                     "profile": profile_forest(r), "kernels": kernel_breakdown(r)}
        k = out[name]["kernels"]
        log(f"({name}) forest {out[name]['forest_time_s']:.3f} s = {out[name]['forest_gflops']:.1f} GFLOP/s "
            f"(GEMM {out[name]['gemm_gflops']:.1f}); per layer: tree attn fwd {k.get('tree_attention_fwd_ms', 0):.1f} ms "
            f"({k.get('tree_attention_fwd_gflops', 0):.1f} GFLOP/s), bwd {k.get('tree_attention_bwd_ms', 0):.1f} ms "
            f"({k.get('tree_attention_bwd_gflops', 0):.1f} GFLOP/s); 4 linears fwd {k['linears_fwd_ms']:.1f} ms "
            f"({k['linears_fwd_gflops']:.1f} GFLOP/s); attention ~{k.get('attention_share_of_layer_est', 0):.0%} of a layer")
        cats = ", ".join(f"{kk} {v['frac']:.0%}" for kk, v in out[name]["profile"]["categories"].items())
        log(f"    profile: {cats}")
    return out


# --------------------------------------------------------------------------- sweep


def run_sweep(tower, tokenizer, cfg: BenchConfig, log, reuse: dict | None = None) -> dict:
    """forest vs truncated over classes (config-a tree) and depth (65 classes, 4 tasks)."""
    points = []
    for n in cfg.sweep_classes:
        points.append(("classes", n, 3, tree_problem(
            f"classes{n}", f"4 tasks x {n} classes, root->2->4, concat", 4, [1, 2, 4],
            sweep_classnames(tokenizer, n), cfg.n_ctx, "concat")))
    for d in cfg.sweep_depths:
        points.append(("depth", 65, d, tree_problem(
            f"depth{d}", f"4 tasks x 65 Office-Home, widths {depth_widths(d)}, concat", 4, depth_widths(d),
            OFFICE_HOME_CLASSES, cfg.n_ctx, "concat")))
    out = {"classes": [], "depth": []}
    done: dict[tuple, dict] = {}
    for axis, n, d, prob in points:
        key = (n, d)
        if key in done:
            res = done[key]
        elif key == (65, 3) and reuse is not None:
            res = reuse
            log(f"[sweep] {prob.name}: reusing configuration (a)")
        else:
            log(f"[sweep] {prob.name}")
            spec = enumerate_prompts(tokenizer, tower.config.context_length, prob.node_ctx_rows,
                                     prob.task_paths, prob.task_classes, prob.combine)
            trunc_tokens = spec.num_prompts * max(spec.prompt_length(p) for p in range(spec.num_prompts))
            big = trunc_tokens > cfg.sweep_measure_max_tokens
            res = run_problem(tower, tokenizer, prob, cfg, log, methods=("truncated", "forest"),
                              estimate=("truncated",) if (cfg.quick or big) else (),
                              forest_repeats=cfg.sweep_forest_repeats,
                              est_tokens=cfg.est_tokens if cfg.quick else cfg.est_tokens_large)
        done[key] = res
        ms = res["methods"]
        row = {"classes": n, "depth": d, "prompts": res["prompts"],
               "forest_tokens": ms["forest"]["tokens"], "truncated_tokens": ms["truncated"]["tokens"],
               "naive_tokens": res["counts"]["naive"]["tokens"],
               "forest_time_s": ms["forest"]["time_s"], "truncated_time_s": ms["truncated"]["time_s"],
               "truncated_est": ms["truncated"]["est"],
               "forest_gflops": ms["forest"]["gflops"], "truncated_gflops": ms["truncated"]["gflops"]}
        row["ideal_vs_truncated"] = row["truncated_tokens"] / row["forest_tokens"]
        row["ideal_vs_naive"] = row["naive_tokens"] / row["forest_tokens"]
        row["measured_vs_truncated"] = row["truncated_time_s"] / row["forest_time_s"]
        row["fraction_of_ideal"] = row["measured_vs_truncated"] / row["ideal_vs_truncated"]
        out[axis].append(row)
    return out


# --------------------------------------------------------------------------- driver


def _meta(cfg: BenchConfig, tower) -> dict:

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            cpu = m.group(1) if m else cpu
    except OSError:
        pass
    try:
        import open_clip

        oc = open_clip.__version__
    except Exception:  # pragma: no cover
        oc = None
    return {"model": cfg.model, "text_config": asdict(tower.config), "quick": cfg.quick,
            "torch": torch.__version__, "open_clip": oc, "threads": torch.get_num_threads(),
            "cpu": cpu, "nproc": os.cpu_count(), "python": sys.version.split()[0],
            "fused_cpu_ops": fused_available("cpu"), "build_info": build_info(),
            "linear_flops_per_token_layer": linear_flops_per_token(tower),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "config": {k: v for k, v in asdict(cfg).items()},
            "conventions": __doc__.split("Counting conventions (printed with the results):")[1].strip()}


def evaluate_targets(result: dict) -> list[dict]:
    """PASS/MISS per target."""
    out = []
    for name, res in result["configs"].items():
        rt = res["ratios"]
        for base in ("naive", "truncated"):
            if base in rt:
                frac = rt[base]["fraction_of_ideal"]
                out.append({"target": f"({name}) forest >= {TARGET_FRACTION_OF_IDEAL:.0%} of ideal speedup vs {base}",
                            "value": frac, "pass": frac >= TARGET_FRACTION_OF_IDEAL, "est": rt[base]["est"]})
        if "forest_fraction_of_gemm" in rt:
            v = rt["forest_fraction_of_gemm"]
            out.append({"target": f"({name}) forest GFLOP/s >= {TARGET_FRACTION_OF_GEMM:.0%} of GEMM GFLOP/s",
                        "value": v, "pass": v >= TARGET_FRACTION_OF_GEMM, "est": False})
    a = result["configs"].get("a")
    if a is not None:
        mr = a["ratios"].get("naive", {}).get("memory_ratio")
        out.append({"target": f"(a) forest peak memory <= 1/{TARGET_MEMORY_RATIO:g} of naive",
                    "value": mr, "pass": (mr is not None and mr >= TARGET_MEMORY_RATIO) if mr else None,
                    "est": False})
    return out


def run_bench(config: BenchConfig | dict | None = None, *, tower=None, tokenizer=None) -> dict:
    """Run the benchmark; write JSON (config.json_path) and PNG (config.png_path) if given."""
    cfg = config if isinstance(config, BenchConfig) else BenchConfig(**(config or {}))
    log = (lambda s: print(s, flush=True)) if cfg.verbose else (lambda s: None)

    if not fused_available("cpu"):
        log("WARNING: compiled hipro_fast CPU ops unavailable; the forest runs the PyTorch reference ops")
    if tower is None:
        tower = TextTower(load_model(cfg.model, cfg.seed))
    tokenizer = tokenizer or _tokenizer()
    result: dict = {"meta": _meta(cfg, tower), "configs": {}}
    t_start = time.perf_counter()
    problems = main_problems(tokenizer, cfg.n_ctx)
    for name in cfg.configs:
        log(f"[config {name}] {problems[name].description}")
        result["configs"][name] = run_problem(
            tower, tokenizer, problems[name], cfg, log,
            estimate=("naive", "padded", "truncated") if cfg.quick else (), profile=cfg.profile)
    if cfg.sweep:
        result["sweep"] = run_sweep(tower, tokenizer, cfg, log, reuse=result["configs"].get("a"))
    result["targets"] = evaluate_targets(result)
    result["meta"]["elapsed_s"] = time.perf_counter() - t_start
    if cfg.json_path:
        Path(cfg.json_path).parent.mkdir(parents=True, exist_ok=True)
        with open(cfg.json_path, "w") as f:
            json.dump(result, f, indent=1, default=_json_default)
    if cfg.png_path and result.get("sweep"):
        plot_sweep(result["sweep"], cfg.png_path, title=f"{cfg.model} text step, {torch.get_num_threads()} threads")
    return result


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def plot_sweep(sweep: dict, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for col, (axis, xkey, xlabel) in enumerate((("classes", "classes", "classes per task (4 tasks, root->2->4)"),
                                                ("depth", "depth", "tree depth (65 classes, 4 tasks)"))):
        rows = sweep.get(axis) or []
        if not rows:
            continue
        x = [r[xkey] for r in rows]
        ax = axes[0][col]
        ax.plot(x, [r["truncated_time_s"] for r in rows], "o-", label="truncated (dense, cut)")
        ax.plot(x, [r["forest_time_s"] for r in rows], "s-", label="forest")
        est = [r for r in rows if r["truncated_est"]]
        if est:
            ax.plot([r[xkey] for r in est], [r["truncated_time_s"] for r in est], "x", color="k",
                    label="truncated, extrapolated from 1 micro-batch")
        ax.set_yscale("log")
        ax.set_ylabel("fwd+bwd step time [s]")
        ax.set_xlabel(xlabel)
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        ax = axes[1][col]
        ax.plot(x, [r["naive_tokens"] for r in rows], "^-", label="naive (full length)")
        ax.plot(x, [r["truncated_tokens"] for r in rows], "o-", label="truncated")
        ax.plot(x, [r["forest_tokens"] for r in rows], "s-", label="forest")
        ax.set_yscale("log")
        ax.set_ylabel("tokens per step")
        ax.set_xlabel(xlabel)
        ax.legend()
        ax.grid(True, which="both", alpha=0.3)
        for ax in axes[:, col]:
            if axis == "classes":
                ax.set_xscale("log", base=2)
            ax.set_xticks(x)
            ax.set_xticklabels([str(v) for v in x])
            ax.minorticks_off() if axis == "classes" else None
    fig.suptitle(title)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(v, spec=".2f", none="-"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def print_table(result: dict, file=None) -> None:
    """The results as plain-text tables."""
    p = lambda s="": print(s, file=file or sys.stdout)  # noqa: E731
    meta = result["meta"]
    tc = meta["text_config"]
    p(f"hipro bench: {meta['model']} text tower (W={tc['width']}, layers={tc['layers']}, heads={tc['heads']}), "
      f"torch {meta['torch']}, {meta['threads']} threads, {meta['cpu']}; "
      f"{'quick' if meta['quick'] else 'full'} mode; fused CPU ops: {meta['fused_cpu_ops']}")
    p("FLOPs: fwd + dX-only bwd (frozen weights), dense masked attention = seq_len keys/query, "
      "forest = exact visible keys; peak MB = RSS high-water growth during one step; est = extrapolated")
    for name, res in result["configs"].items():
        p()
        p(f"({name}) {res['description']}: {res['prompts']} distinct prompts, "
          f"forest {res['methods']['forest']['tokens']} tokens / {res['methods']['forest'].get('segments')} segments")
        p(f"  {'method':13s} {'tokens':>8s} {'seq':>4s} {'GFLOP':>9s} {'time s':>9s} {'reps':>4s} "
          f"{'GFLOP/s':>8s} {'peak MB':>8s} {'mb':>3s}  verify(max|dfeat|, rel dgrad)")
        for m in METHODS:
            e = res["methods"].get(m)
            if e is None:
                continue
            v = res["verify"].get(m, {})
            ver = "ref" if m == "forest" else (
                f"{_fmt(v.get('prompt_max_abs_diff'), '.1e')}, {_fmt(v.get('ctx_grad_rel_diff'), '.1e')}")
            p(f"  {m + (' est' if e['est'] else ''):13s} {e['tokens']:8d} {_fmt(e['seq_len'], 'd'):>4s} "
              f"{e['flops']['total'] / 1e9:9.1f} {_fmt(e['time_s'], '9.3f'):>9s} {e['reps']:4d} "
              f"{_fmt(e['gflops'], '8.1f'):>8s} {_fmt(e['peak_mb'], '8.0f'):>8s} {_fmt(e['micro_batches'], 'd'):>3s}  {ver}")
        g = res["gemm"]
        rt = res["ratios"]
        p(f"  GEMM fp32 mm {g['shape'][0]}x{g['shape'][1]} @ {g['shape'][1]}x{g['shape'][2]}: "
          f"{g['gflops_median']:.1f} GFLOP/s; forest at {_fmt(rt.get('forest_fraction_of_gemm'), '.0%')} of it")
        for base in ("naive", "padded", "truncated"):
            if base in rt:
                x = rt[base]
                mem = f", memory {x['memory_ratio']:.1f}x less" if x.get("memory_ratio") else ""
                p(f"  forest vs {base:9s}: ideal {x['ideal']:6.1f}x  measured {x['measured']:6.1f}x  "
                  f"= {x['fraction_of_ideal']:5.0%} of ideal{' (est)' if x['est'] else ''}{mem}")
        k = res.get("kernels")
        if k and "tree_attention_fwd_ms" in k:
            p(f"  per layer at T={k['tokens']}: tree attention fwd {k['tree_attention_fwd_ms']:.1f} ms "
              f"({k['tree_attention_fwd_gflops']:.1f} GFLOP/s), bwd {k['tree_attention_bwd_ms']:.1f} ms "
              f"({k['tree_attention_bwd_gflops']:.1f} GFLOP/s); 4 linears fwd {k['linears_fwd_ms']:.1f} ms "
              f"({k['linears_fwd_gflops']:.1f} GFLOP/s) -> attention ~{k['attention_share_of_layer_est']:.0%} of a layer")
        prof = res.get("profile")
        if prof:
            cats = ", ".join(f"{k} {v['frac']:.0%}" for k, v in list(prof["categories"].items())[:6])
            p(f"  forest profile (self CPU, {prof['wall_s']:.2f} s profiled step): {cats}")
    sw = result.get("sweep")
    if sw:
        p()
        p("Sweep (concat, n_ctx 16/node): forest vs truncated")
        p(f"  {'point':14s} {'prompts':>7s} {'naive tok':>9s} {'trunc tok':>9s} {'forest tok':>10s} "
          f"{'trunc s':>9s} {'forest s':>9s} {'ideal':>6s} {'meas':>6s} {'%ideal':>6s}")
        for axis in ("classes", "depth"):
            for r in sw.get(axis, []):
                lab = f"classes={r['classes']}" if axis == "classes" else f"depth={r['depth']}"
                p(f"  {lab:14s} {r['prompts']:7d} {r['naive_tokens']:9d} {r['truncated_tokens']:9d} "
                  f"{r['forest_tokens']:10d} {r['truncated_time_s']:9.2f}{'~' if r['truncated_est'] else ' '}"
                  f"{r['forest_time_s']:9.3f} {r['ideal_vs_truncated']:6.1f} {r['measured_vs_truncated']:6.1f} "
                  f"{r['fraction_of_ideal']:6.0%}")
    p()
    p("Targets:")
    for t in result.get("targets", []):
        status = "n/a" if t["pass"] is None else ("PASS" if t["pass"] else "MISS")
        val = _fmt(t["value"], ".2f")
        p(f"  {status:4s}  {t['target']}: {val}{' (est)' if t.get('est') else ''}")
    p(f"elapsed {result['meta'].get('elapsed_s', 0):.0f} s")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hipro bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="ViT-B-16", help="open_clip model name (random weights) or 'tiny'")
    ap.add_argument("--quick", action="store_true", help="few repeats; extrapolate the big baselines")
    ap.add_argument("--configs", default="a,b,c", help="comma list of a,b,c (empty: none)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-classes", default=None, help="e.g. 65,130,260,520")
    ap.add_argument("--sweep-depths", default=None, help="e.g. 1,2,3,4")
    ap.add_argument("--forest-repeats", type=int, default=None)
    ap.add_argument("--baseline-repeats", type=int, default=None)
    ap.add_argument("--baseline-budget", type=float, default=None, help="seconds per baseline method")
    ap.add_argument("--max-graph-gb", type=float, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.profiler breakdown of one forest step (default: on in full mode)")
    ap.add_argument("--profile-only", action="store_true",
                    help="only the forest step: timing, torch.profiler breakdown and per-layer kernel times")
    ap.add_argument("--out-dir", default="hipro_bench_results")
    ap.add_argument("--tag", default=None, help="file name stem (default text_step[_quick])")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    stem = a.tag or ("text_step_quick" if a.quick else "text_step")
    kw = dict(model=a.model, quick=a.quick, configs=[c for c in a.configs.split(",") if c],
              sweep=not a.no_sweep, forest_repeats=a.forest_repeats, baseline_repeats=a.baseline_repeats,
              baseline_budget_s=a.baseline_budget, max_graph_gb=a.max_graph_gb, profile=a.profile,
              seed=a.seed, json_path=str(Path(a.out_dir) / f"{stem}.json"),
              png_path=str(Path(a.out_dir) / f"{stem}.png"))
    if a.sweep_classes:
        kw["sweep_classes"] = [int(x) for x in a.sweep_classes.split(",")]
    elif a.quick:
        kw["sweep_classes"] = (65, 130)
    if a.sweep_depths:
        kw["sweep_depths"] = [int(x) for x in a.sweep_depths.split(",")]
    if a.profile_only:

        cfg = BenchConfig(**kw)
        tower = TextTower(load_model(cfg.model, cfg.seed))
        out = {"meta": _meta(cfg, tower), "configs": profile_only(tower, _tokenizer(), cfg, print)}
        path = Path(a.out_dir) / f"{a.tag or 'forest_profile'}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, default=_json_default))
        print(f"wrote {path}")
        return 0
    result = run_bench(BenchConfig(**kw))
    print()
    print_table(result)
    print(f"\nwrote {kw['json_path']}" + (f" and {kw['png_path']}" if result.get("sweep") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
