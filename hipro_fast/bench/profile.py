"""Where the forest step's time goes: torch.profiler self times per op (grouped
into categories on the CPU, the top kernels on a GPU) and, on the CPU, the tree
attention and the block's linear layers timed alone at the forest's shapes."""
from __future__ import annotations

import os
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn

from ..ops import attention_knobs
from .counting import forest_visible_keys
from .runner import StepRunner
from .timing import timed

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


def _op_self_times(step: Callable[[], object], device: torch.device,
                   steps: int) -> tuple[float, list[tuple[str, float, int]]]:
    """Profile `steps` calls of `step`: (wall s, [(op, self time in us over all calls, calls)]),
    largest first. Self time is device time for a CUDA device, CPU time otherwise."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # keep kineto's start/stop lines off stdout
    from torch.profiler import ProfilerActivity, profile  # loads kineto; only when profiling

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize(device)
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    if cuda:
        # the kernels themselves: an aten op's row also carries its kernels' device time
        from torch.autograd import DeviceType

        events = [ev for ev in events if getattr(ev, "device_type", None) == DeviceType.CUDA]
    rows = [(ev.key, getattr(ev, "self_device_time_total", 0) if cuda else ev.self_cpu_time_total, ev.count)
            for ev in events]
    rows.sort(key=lambda x: -x[1])
    return wall, rows


def profile_forest(r: StepRunner) -> dict:
    """torch.profiler breakdown (self CPU time) of one forest step, after one untimed step:
    wall_s, self_total_s, `categories` {name: {s, frac}} largest first, the top 15 ops."""
    r.forest_step()
    wall, raw = _op_self_times(r.forest_step, torch.device("cpu"), 1)
    rows = [(key, us / 1e6, count) for key, us, count in raw]
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


def kernel_table(step: Callable[[], object], device: torch.device, top: int = 15) -> list[dict]:
    """Self device time (CPU time on a CPU) per kernel/op over 3 steps, largest first:
    [{name, self_ms_per_step, calls_per_step}] of the `top` ones with time > 0."""
    _, raw = _op_self_times(step, device, 3)
    return [{"name": key[:90], "self_ms_per_step": us / 3 / 1e3, "calls_per_step": count / 3}
            for key, us, count in raw if us > 0][:top]


# The tree attention's decompositions (csrc/attention_blocks.h), each as
# (GEMM-block threshold, grouping): the default split, the per-row kernels alone
# (what the GEMM path replaced), and the default split with grouped blocks.
ATTENTION_PATHS = {"default": (None, "auto"), "per-row kernels only": (10 ** 15, "auto"),
                   "grouped blocks": (None, "always")}


def attention_paths(q, k, v, go, o, lse, table, token_segment, scale, repeats: int) -> dict:
    """Tree attention forward + backward in each ATTENTION_PATHS decomposition, timed
    in turns (round-robin: a noisy machine slows them alike): {path: median ms},
    and each one's time over the default's."""
    def step():
        torch.ops.hipro_fast.tree_attention(q, k, v, table, token_segment, scale)
        torch.ops.hipro_fast.tree_attention_backward(go, q, k, v, o, lse, table, token_segment, scale)

    times: dict[str, list[float]] = {name: [] for name in ATTENTION_PATHS}
    for rep in range(repeats + 1):  # the first round warms each path up (and plans its blocks)
        for name, knobs in ATTENTION_PATHS.items():
            with attention_knobs(*knobs):
                dt = timed(step)[0]
            if rep:
                times[name].append(dt)
    ms = {name: 1e3 * statistics.median(ts) for name, ts in times.items()}
    return {"fwd_bwd_ms": ms, "vs_default": {name: t / ms["default"] for name, t in ms.items()},
            "repeats": repeats}


def kernel_breakdown(r: StepRunner, repeats: int = 5) -> dict:
    """Per-layer times at the forest's shapes: tree attention fwd / bwd alone vs the
    block's four linear layers (forward), with their model GFLOP/s (CPU); and the
    tree attention fwd + bwd in each of its decompositions (attention_paths)."""
    lay = r.forest.layout
    cfg = r.tower.config
    T, H, W = lay.num_tokens, cfg.heads, cfg.width
    D = W // H
    keys = forest_visible_keys(lay)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(T, H, D, generator=g) for _ in range(3))

    def med(fn):
        fn()
        return statistics.median(timed(fn)[0] for _ in range(repeats))

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
        out["tree_attention_paths"] = attention_paths(q, k, v, go, o, lse, tab, tseg, D ** -0.5, repeats)
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
