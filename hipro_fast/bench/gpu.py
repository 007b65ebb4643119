"""Text-step benchmark on a CUDA device (`hipro bench --device cuda`, or
`python -m hipro_fast.bench.gpu`).

The same step and counting conventions as `hipro_fast.bench.text_step` (forward + backward
of every prompt of every task to the learnable context table; FLOPs from
`bench.step_flops`), timed with CUDA events, interleaved method by method in one
run, in fp32 (IEEE, no TF32) and under bf16 autocast. Methods:

  naive      CoOp-style: one full-length [C, 77] open_clip batch per prompt set
  truncated  all distinct prompts in one batch cut after the longest EOS
  forest     TextTower.encode_forest on the packed prompt forest

Reported per problem and precision: median ms per step, speedup of the forest
over each baseline next to the ideal (token-count) ratio, achieved TFLOP/s, and
the same-precision GEMM rate [T_forest, W] x [W, 4W] measured in the same run.
Correctness: forest vs naive features and context gradients (max abs diff).
`--device cpu` runs the same code on the CPU (a smoke test of this script).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from typing import Callable, Sequence

import torch

from . import text_step as bench
from .naive import BaselineStep, _Batch, _Group
from ..engine.text_tower import TextTower
from ..ops.extension import build_info, fused_available

PRECISIONS = ("fp32", "bf16")
METHODS = ("naive", "truncated", "forest")


def problems(tokenizer, n_ctx: int) -> dict[str, bench.Problem]:
    """bench's (a), (b), (c) and a larger one that fills a GPU better."""
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

    out = bench.main_problems(tokenizer, n_ctx)
    out["L"] = bench.tree_problem("L", "8 tasks x 250 ImageNet, root->2->8, concat", 8, [1, 2, 8],
                                  list(IMAGENET_CLASSNAMES[:250]), n_ctx, "concat")
    return out


def _move_step(step: BaselineStep, device: torch.device) -> None:
    """Move a baseline's prebuilt index/embedding tensors to `device` in place."""
    batches: list[_Batch] = [b for g in step.batches for b in g]
    for graph in getattr(step, "task_graphs", []):
        for _, bs in graph:
            batches.extend(bs)
    for b in batches:
        b.eos = b.eos.to(device)
        b.prompt_ids = b.prompt_ids.to(device)
        b.terms = [(t, local.to(device), cls.to(device)) for t, local, cls in b.terms]
        for g in b.groups:
            for f in fields(_Group):
                setattr(g, f.name, getattr(g, f.name).to(device))


class _Clock:
    """Seconds of one call: CUDA events on a GPU, perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn: Callable[[], object]) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3


def gemm_rate(rows: int, width: int, dtype: torch.dtype, device: torch.device, clock: _Clock,
              repeats: int = 10) -> float:
    """GFLOP/s of torch.mm [rows, W] x [W, 4W] in `dtype` (median)."""
    a = torch.randn(rows, width, device=device, dtype=dtype)
    b = torch.randn(width, 4 * width, device=device, dtype=dtype)
    for _ in range(3):
        torch.mm(a, b)
    times = [clock(lambda: torch.mm(a, b)) for _ in range(repeats)]
    return 2.0 * rows * width * 4 * width / statistics.median(times) / 1e9


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def run_problem(tower, tokenizer, problem: bench.Problem, device: torch.device, precision: str,
                repeats: int, warmup: int, log: Callable[[str], None], profile: bool = False) -> dict:
    clock = _Clock(device)
    r = bench._Runner(tower, tokenizer, problem, bench.BenchConfig(max_graph_gb=60.0), log)
    r.ctx = r.ctx.detach().to(device).requires_grad_(True)
    r.weights = {t: w.to(device) for t, w in r.weights.items()}
    r.forest = r.forest.to(device)
    counts = r.counts()
    steps: dict[str, Callable[[], object]] = {"forest": r.forest_step}
    built: dict[str, BaselineStep] = {}
    for m in METHODS:
        if m != "forest":
            built[m] = r.baseline(m)
            _move_step(built[m], device)
            steps[m] = (lambda s=built[m]: r._run_baseline(s, False))

    amp = _autocast(device, precision)
    res: dict = {"problem": problem.name, "description": problem.description, "precision": precision,
                 "prompts": r.forest.num_prompts, "counts": counts, "methods": {}}
    with amp:
        # correctness first: features and context gradients of forest vs naive
        _, ref = r.forest_collect()
        ref_grad = r.ctx.grad.detach().clone()
        r.ctx.grad = None
        _, col = built["naive"].step(r.ctx, collect=True)
        res["verify_naive"] = {
            "feature_max_abs_diff": max(float((col["task_features"][t].to(device) - f).abs().max())
                                        for t, f in ref["task_features"].items()),
            "ctx_grad_rel_diff": float((r.ctx.grad - ref_grad).abs().max()
                                       / ref_grad.abs().max().clamp_min(1e-30)),
        }
        for fn in steps.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {m: [] for m in steps}
        for i in range(repeats):
            order = list(steps)[i % len(steps):] + list(steps)[:i % len(steps)]
            for m in order:
                times[m].append(clock(steps[m]))
        if profile:
            res["forest_kernels"] = _profile(r.forest_step, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    T, W = counts["forest"]["tokens"], tower.config.width
    res["gemm_gflops"] = gemm_rate(T, W, dtype, device, clock)
    for m, ts in times.items():
        t = statistics.median(ts)
        res["methods"][m] = {"time_ms": t * 1e3, "times_ms": [x * 1e3 for x in ts], "tokens": counts[m]["tokens"],
                             "flops": counts[m]["flops"]["total"],
                             "gflops": counts[m]["flops"]["total"] / t / 1e9}
    f = res["methods"]["forest"]
    res["forest_fraction_of_gemm"] = f["gflops"] / res["gemm_gflops"]
    for m in steps:
        if m == "forest":
            continue
        e = res["methods"][m]
        e["speedup"] = e["time_ms"] / f["time_ms"]
        e["ideal_speedup"] = counts[m]["flops"]["total"] / counts["forest"]["flops"]["total"]
        e["token_ratio"] = counts[m]["tokens"] / counts["forest"]["tokens"]
    return res


def _profile(step: Callable[[], object], device: torch.device, top: int = 15) -> list[dict]:
    """Self device time per kernel/op over 3 forest steps, largest first."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(3):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", 0) if device.type == "cuda" else e.self_cpu_time_total
        if t > 0:
            rows.append({"name": e.key[:90], "self_ms_per_step": t / 3 / 1e3, "calls_per_step": e.count / 3})
    rows.sort(key=lambda d: -d["self_ms_per_step"])
    return rows[:top]


def print_table(results: list[dict], file=sys.stdout) -> None:
    hdr = (f"{'prob':4s} {'prec':4s} {'method':9s} {'tokens':>8s} {'ms/step':>9s} {'TFLOP/s':>8s} "
           f"{'speedup':>8s} {'ideal':>7s} {'% ideal':>7s}")
    print(hdr, file=file)
    for res in results:
        for m, e in res["methods"].items():
            sp = e.get("speedup")
            print(f"{res['problem']:4s} {res['precision']:4s} {m:9s} {e['tokens']:8d} {e['time_ms']:9.2f} "
                  f"{e['gflops'] / 1e3:8.2f} "
                  + (f"{sp:8.2f} {e['ideal_speedup']:7.2f} {100 * sp / e['ideal_speedup']:6.0f}%" if sp else
                     f"{'':8s} {'':7s} {'':7s}"), file=file)
        print(f"{'':4s} {'':4s} GEMM [{res['counts']['forest']['tokens']}, W]x[W, 4W] "
              f"{res['gemm_gflops'] / 1e3:.2f} TFLOP/s; forest at {100 * res['forest_fraction_of_gemm']:.0f}% of it; "
              f"forest vs naive: feature diff {res['verify_naive']['feature_max_abs_diff']:.2e}, "
              f"grad rel diff {res['verify_naive']['ctx_grad_rel_diff']:.2e}", file=file)
        for k in res.get("forest_kernels", []):
            print(f"{'':9s}{k['self_ms_per_step']:8.3f} ms x{k['calls_per_step']:5.0f}  {k['name']}", file=file)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="hipro bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--problems", default="a,b,c,L")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--n-ctx", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="kernel table of the forest step")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    torch.set_float32_matmul_precision("highest")
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"build_info {build_info()}; fused ops on {device.type}: {fused_available(device)}")
    if device.type == "cuda":
        log(f"device {torch.cuda.get_device_name()} torch {torch.__version__}")
    tower = TextTower(bench.load_model(args.model).to(device))
    tok = bench._tokenizer()
    probs = problems(tok, args.n_ctx)
    results = []
    for name in args.problems.split(","):
        for precision in args.precisions.split(","):
            log(f"[{name} {precision}] {probs[name].description}")
            res = run_problem(tower, tok, probs[name], device, precision, args.repeats, args.warmup, log,
                              profile=args.profile and name in ("a", "L"))
            results.append(res)
            print_table([res])
    print("\n== summary")
    print_table(results)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "model": args.model, "results": results,
                       "build_info": build_info(), "torch": torch.__version__}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
