"""Text-step benchmark on a CUDA device (`hipro bench --device cuda`, or
`python -m hipro_fast.bench.gpu`).

The same step, problems and counting conventions as the CPU benchmark
(`hipro_fast.bench.cpu`; forward + backward of every prompt of every task to the
learnable context table), timed with CUDA events, interleaved method by method
in one run, in fp32 (IEEE, no TF32) and under bf16 autocast. Methods:

  naive      CoOp-style: one full-length [C, 77] open_clip batch per prompt set
  truncated  all distinct prompts in one batch cut after the longest EOS
  forest     TextTower.encode_forest on the packed prompt forest

Reported per problem and precision: median ms per step, speedup of the forest
over each baseline next to the ideal (FLOP) ratio, achieved TFLOP/s, and
the same-precision GEMM rate [T_forest, W] x [W, 4W] measured in the same run.
Correctness, checked before timing: forest vs naive features and context gradients.
`--device cpu` runs the same code on the CPU (a smoke test of this module).
"""
from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from ..engine.text_tower import TextTower
from ..ops.extension import build_info, fused_available
from .model import load_model, load_tokenizer
from .output import print_gpu_table, write_json
from .problems import Problem, gpu_problems
from .profile import kernel_table
from .runner import StepRunner
from .timing import gemm_rate, median, timed

PRECISIONS = ("fp32", "bf16")
METHODS = ("naive", "truncated", "forest")
GRAPH_BUDGET_BYTES = 60.0 * 2**30  # device memory for one baseline backward before it is split


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def run_problem(tower, tokenizer, problem: Problem, device: torch.device, precision: str,
                repeats: int, warmup: int, log: Callable[[str], None], profile: bool = False) -> dict:
    """Check forest vs naive, then time every method `repeats` times in rotating order
    (after `warmup` untimed steps each) under `precision`, then the same-dtype GEMM rate."""
    r = StepRunner(tower, tokenizer, problem, seed=0, max_graph_bytes=GRAPH_BUDGET_BYTES).to(device)
    counts = r.counts()
    steps: dict[str, Callable[[], object]] = {"forest": r.forest_step}
    built = {m: r.baseline(m) for m in METHODS if m != "forest"}
    for m, step in built.items():
        steps[m] = (lambda s=step: r.run_baseline(s, False))

    res: dict = {"problem": problem.name, "description": problem.description, "precision": precision,
                 "prompts": r.forest.num_prompts, "counts": counts, "methods": {}}
    with _autocast(device, precision):
        # correctness first: features and context gradients of forest vs naive
        _, ref = r.forest_collect()
        ref_grad = r.ctx.grad.detach().clone()
        _, col = r.run_baseline(built["naive"], True)
        v = r.verify(col, r.ctx.grad, ref, ref_grad)
        res["verify_naive"] = {"feature_max_abs_diff": v["task_max_abs_diff"],
                               "ctx_grad_rel_diff": v["ctx_grad_rel_diff"],
                               "prompts_compared": v["prompts_compared"]}
        for fn in steps.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {m: [] for m in steps}
        for i in range(repeats):
            order = list(steps)[i % len(steps):] + list(steps)[:i % len(steps)]
            for m in order:
                times[m].append(timed(steps[m], device)[0])
        if profile:
            res["forest_kernels"] = kernel_table(r.forest_step, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    T, W = counts["forest"]["tokens"], tower.config.width
    res["gemm_gflops"] = gemm_rate(T, W, 10, dtype=dtype, device=device, warmup=3)
    for m, ts in times.items():
        t = median(ts)
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


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hipro bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--problems", default="a,b,c,L")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--n-ctx", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="kernel table of the forest step")
    ap.add_argument("--json", default=None, help="write the results here (default: not written)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    names = args.problems.split(",")
    precisions = args.precisions.split(",")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        ap.error(f"--precisions: unknown {','.join(bad)} (choose from {','.join(PRECISIONS)})")
    if args.repeats < 1:
        ap.error(f"--repeats must be at least 1, got {args.repeats}")

    device = torch.device(args.device)
    torch.set_float32_matmul_precision("highest")
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"build_info {build_info()}; fused ops on {device.type}: {fused_available(device)}")
    if device.type == "cuda":
        log(f"device {torch.cuda.get_device_name()} torch {torch.__version__}")
    tok = load_tokenizer()
    probs = gpu_problems(tok, args.n_ctx)
    unknown = [n for n in names if n not in probs]
    if unknown:
        ap.error(f"--problems: unknown {','.join(unknown)} (choose from {','.join(probs)})")
    tower = TextTower(load_model(args.model).to(device))
    results = []
    for name in names:
        for precision in precisions:
            log(f"[{name} {precision}] {probs[name].description}")
            res = run_problem(tower, tok, probs[name], device, precision, args.repeats, args.warmup, log,
                              profile=args.profile and name in ("a", "L"))
            results.append(res)
            print_gpu_table([res])
    print("\n== summary")
    print_gpu_table(results)
    if args.json:
        write_json(args.json, {"device": str(device), "model": args.model, "results": results,
                               "build_info": build_info(), "torch": torch.__version__})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
