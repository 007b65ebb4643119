"""Text-step benchmark on a CUDA device (`hipro bench --device cuda`, or
`python -m hipro_fast.bench.gpu`).

The same step, problems and counting conventions as the CPU benchmark
(`hipro_fast.bench.cpu`; forward + backward of every prompt of every task to the
learnable context table), timed with CUDA events, interleaved method by method
in one run, in fp32 (IEEE, no TF32) and under bf16 autocast. Methods:

  naive      CoOp-style: one full-length [C, 77] open_clip batch per prompt set
  truncated  all distinct prompts in one batch cut after the longest EOS
  flex       the same forest pass with PyTorch FlexAttention (tree mask_mod +
             block mask, torch.compile'd; TextTower(attention="flex")): the
             peer a user would write. CUDA only (no CPU backward in torch).
  forest     TextTower.encode_forest on the packed prompt forest (fused ops)

Reported per problem and precision: median ms per step, speedup of the forest
over each baseline next to the ideal (token) ratio, as on the CPU (flex encodes
the forest's own tokens: ideal 1; the FLOP ratio is recorded too), achieved
TFLOP/s, and the same-precision GEMM rate
[T_forest, W] x [W, 4W] measured in the same run. Then the whole HiPro
training step (forest + logits + loss + backward + AdamW step; bench/train_step.py),
eager and replayed as one CUDA graph. Correctness, checked before timing:
forest vs naive features and context gradients, flex vs forest features.
Last, the issue-10 targets, each with its measured value and whether it is met
(`targets`).
`--device cpu` runs the same code on the CPU (a smoke test of this module).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from contextlib import nullcontext
from typing import Callable, Sequence

import torch

from ..engine.text_tower import TextTower
from ..errors import InvalidInputError
from ..files import atomic_write_text
from ..ops.extension import build_info, fused_available
from ..usage import OneLineUsageParser, int_at_least
from .model import load_model, load_tokenizer
from .output import (README_BEGIN, README_END, STATUS_BEGIN, STATUS_END, gpu_markdown, gpu_status_markdown,
                     ideal_ratio, print_gpu_table, print_targets,
                     replace_readme_block, write_json)
from .problems import Problem, gpu_problems
from .profile import kernel_table
from .runner import StepRunner
from .timing import gemm_rate, median, timed
from .train_step import time_train_step

PRECISIONS = ("fp32", "bf16")
METHODS = ("naive", "truncated", "forest")
FLEX_SKIP_CPU = "FlexAttention has no CPU backward in this torch; the flex row runs on CUDA only"
GRAPH_BUDGET_BYTES = 60.0 * 2**30  # device memory for one baseline backward before it is split
# mms per timed GEMM-reference run on a GPU: one small mm is a few microseconds, mostly launch and events
GEMM_CALLS = 50


def _autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def _is_compile_error(e: BaseException) -> bool:
    """An error of torch.compile's stack (Dynamo, Inductor, Triton): it fails again
    for every problem, unlike an out-of-memory or a precision-specific failure."""
    for err in (e, e.__cause__):
        module = type(err).__module__ if err is not None else ""
        if module.startswith(("torch._dynamo", "torch._inductor", "triton")):
            return True
    return False


def run_problem(tower, tokenizer, problem: Problem, device: torch.device, precision: str,
                repeats: int, warmup: int, log: Callable[[str], None], profile: bool = False,
                flex_tower=None, train_step: bool = True, graphs: bool = True) -> dict:
    """Check forest vs naive (and flex vs forest), then time every method `repeats`
    times in rotating order (after `warmup` untimed steps each) under `precision`,
    then the same-dtype GEMM rate and the whole training step."""
    r = StepRunner(tower, tokenizer, problem, seed=0, max_graph_bytes=GRAPH_BUDGET_BYTES).to(device)
    counts = r.counts()
    steps: dict[str, Callable[[], object]] = {"forest": r.forest_step}
    built = {m: r.baseline(m) for m in METHODS if m != "forest"}
    for m, step in built.items():
        steps[m] = (lambda s=step: r.run_baseline(s, False))
    if flex_tower is not None:
        steps["flex"] = lambda: r.forest_step(flex_tower)
        counts["flex"] = counts["forest"]  # the same packed forest, the same FLOPs

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
        if flex_tower is not None:
            # The peer's compile (Triton) can fail on an image where ours runs: the
            # row is dropped with the reason, the rest of the problem still runs.
            try:
                _, fcol = r.forest_collect(flex_tower)
                fv = r.verify(fcol, r.ctx.grad, ref, ref_grad)
                res["verify_flex"] = {"feature_max_abs_diff": fv["task_max_abs_diff"],
                                      "ctx_grad_rel_diff": fv["ctx_grad_rel_diff"]}
            except Exception as e:  # noqa: BLE001 - recorded in the results, not lost
                res["flex_error"] = f"{type(e).__name__}: {e}"[:2000]
                res["flex_error_kind"] = "compile" if _is_compile_error(e) else "run"
                log(f"[{problem.name} {precision}] flex row dropped: {res['flex_error'][:300]}")
                steps.pop("flex")
                counts.pop("flex")
        elif device.type != "cuda":
            res["flex_skipped"] = FLEX_SKIP_CPU
        for fn in steps.values():
            for _ in range(warmup):
                fn()
        times: dict[str, list[float]] = {m: [] for m in steps}
        for i in range(repeats):
            order = list(steps)[i % len(steps):] + list(steps)[:i % len(steps)]
            for m in order:
                times[m].append(timed(steps[m], device)[0])
        if profile:
            try:  # the profiler is a diagnostic: its failure must not lose the timings above
                res["forest_kernels"] = kernel_table(r.forest_step, device)
            except Exception as e:  # noqa: BLE001 - recorded in the results
                res["profile_error"] = f"{type(e).__name__}: {e}"[:2000]
                log(f"[{problem.name} {precision}] kernel profile failed: {res['profile_error'][:300]}")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    T, W = counts["forest"]["tokens"], tower.config.width
    res["gemm_calls_per_timing"] = GEMM_CALLS if device.type == "cuda" else 1
    res["gemm_gflops"] = gemm_rate(T, W, 10, dtype=dtype, device=device, warmup=3,
                                   calls=res["gemm_calls_per_timing"])
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
        # the CPU benchmark's (and issue 10's) ideal: the token ratio; the FLOP ratio beside it
        e["ideal_speedup"] = counts[m]["tokens"] / counts["forest"]["tokens"]
        e["flop_ratio"] = counts[m]["flops"]["total"] / counts["forest"]["flops"]["total"]
    if train_step:
        log(f"[{problem.name} {precision}] whole training step")
        try:  # the step's own failure is a result; the forest's timings above stay
            res["train_step"] = time_train_step(r, precision, repeats, warmup, timed, median, graphs)
        except Exception as e:  # noqa: BLE001 - recorded in the results
            res["train_step"] = {"error": f"{type(e).__name__}: {e}"[:2000]}
            log(f"[{problem.name} {precision}] training step failed: {res['train_step']['error'][:300]}")
    return res


# Issue 10's targets (H200, ratios within one run).
TARGET_GEMM_FRACTION_BF16_L = 0.5     # bf16 forest >= 50 % of the same-run bf16 GEMM rate on (L)
TARGET_FRACTION_OF_IDEAL = 0.8        # forest vs naive >= 80 % of the ideal ratio, (a) and (L)
TARGET_FP32_FEATURE_DIFF = 1e-5       # fp32 features within 1e-5 of naive
TARGET_BF16_TRAIN_STEP_A_MS = 5.0     # stretch: whole bf16 training step on (a) under 5 ms


def targets(results: list[dict]) -> list[dict]:
    """Each target of issue 10 with its measured value and `pass` (True, False, or None
    when this run did not measure it)."""
    by = {(r["problem"], r["precision"]): r for r in results}
    out = []

    def add(target, value, ok, where):
        out.append({"target": target, "where": where, "value": value,
                    "pass": None if value is None else bool(ok)})

    res = by.get(("L", "bf16"))
    frac = res["forest_fraction_of_gemm"] if res else None
    add("bf16 forest >= 50% of the same-run bf16 GEMM rate", frac,
        frac is not None and frac >= TARGET_GEMM_FRACTION_BF16_L, "L bf16")
    for prob in ("a", "L"):
        for prec in ("fp32", "bf16"):
            res = by.get((prob, prec))
            naive = res["methods"].get("naive") if res else None
            value = naive["speedup"] / ideal_ratio(naive) if naive else None
            add("forest vs naive >= 80% of the ideal ratio", value,
                value is not None and value >= TARGET_FRACTION_OF_IDEAL, f"{prob} {prec}")
    for prob in ("a", "L"):
        for prec in ("fp32", "bf16"):
            res = by.get((prob, prec))
            flex = res["methods"].get("flex") if res else None
            value = flex["speedup"] if flex else None  # flex ms / forest ms
            add("forest faster than FlexAttention (flex ms / forest ms > 1)", value,
                value is not None and value > 1.0, f"{prob} {prec}")
    for prob in ("a", "L"):
        res = by.get((prob, "fp32"))
        value = res["verify_naive"]["feature_max_abs_diff"] if res else None
        add("fp32 features within 1e-5 of naive", value,
            value is not None and value <= TARGET_FP32_FEATURE_DIFF, f"{prob} fp32")
    res = by.get(("a", "bf16"))
    ts = (res or {}).get("train_step") or {}
    value = ts.get("graph_ms", ts.get("eager_ms"))
    add("stretch: whole bf16 training step on (a) < 5 ms (CUDA graph if captured)", value,
        value is not None and value < TARGET_BF16_TRAIN_STEP_A_MS, "a bf16")
    out.append({"target": "bf16 error <= 2x the same-precision reference's error", "where": "tests",
                "value": None, "pass": None,
                "note": "checked by tests/ops/test_cuda_ops.py (gpu_tests.log), not by the benchmark"})
    return out


def make_flex_tower(model, device: torch.device):
    """The FlexAttention peer's tower, or None off CUDA (FlexAttention has no CPU backward)."""
    return TextTower(model, attention="flex") if device.type == "cuda" else None


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineUsageParser(prog="hipro bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--problems", default="a,b,c,L")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--n-ctx", type=int_at_least(1), default=16)
    ap.add_argument("--repeats", type=int_at_least(1), default=10)
    ap.add_argument("--warmup", type=int_at_least(0), default=3)
    ap.add_argument("--profile", action="store_true", help="kernel table of the forest step")
    ap.add_argument("--no-flex", action="store_true", help="skip the FlexAttention row")
    ap.add_argument("--no-train-step", action="store_true", help="skip the whole-training-step timing")
    ap.add_argument("--no-graphs", action="store_true", help="time the training step eagerly only")
    ap.add_argument("--json", default=None, help="write the results here (default: not written)")
    ap.add_argument("--markdown", default=None, help="write the results as markdown tables here")
    ap.add_argument("--readme", default=None,
                    help="replace the GPU table block of this README (between the "
                         f"'{README_BEGIN}' and '{README_END}' lines) with the results")
    ap.add_argument("--render", default=None, metavar="JSON",
                    help="run nothing: render a results JSON of an earlier run (--markdown / --readme)")
    return ap


def publish(out: dict, markdown: str | None, readme: str | None, source: str | None = None) -> None:
    """Write the markdown tables of a results dict and/or put them into a README:
    the table block, and the status block when the README has one (the sentence
    that says whether and where the targets were measured). `source`: the
    results file, named in the status."""
    out = {**out, "targets": out.get("targets") or targets(out["results"])}
    text = gpu_markdown(out["results"], out["targets"], out.get("device_name", out.get("device", "")),
                        failed=out.get("failed"), complete=out.get("complete", True))
    if markdown:
        atomic_write_text(markdown, text)
    if readme:
        src = Path(readme).read_text()
        with_status = STATUS_BEGIN in src or STATUS_END in src
        if with_status and (src.count(STATUS_BEGIN) != 1 or src.count(STATUS_END) != 1):  # before any write
            raise InvalidInputError(f"{readme}: needs exactly one '{STATUS_BEGIN}' and one '{STATUS_END}' line")
        replace_readme_block(readme, text)
        if with_status:
            replace_readme_block(readme, gpu_status_markdown(out, source), STATUS_BEGIN, STATUS_END)


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.render:
        out = json.loads(Path(args.render).read_text())
        if not (args.markdown or args.readme):
            ap.error("--render needs --markdown and/or --readme")
        publish(out, args.markdown, args.readme, source=args.render)
        return 0
    names = args.problems.split(",")
    precisions = args.precisions.split(",")
    bad = [p for p in precisions if p not in PRECISIONS]
    if bad:
        ap.error(f"--precisions: unknown {','.join(bad)} (choose from {','.join(PRECISIONS)})")

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"--device {args.device}: CUDA is not available on this machine")
    if device.type == "cuda":
        if device.index is None:  # "cuda": the current GPU, named, so that every call below names the same one
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise InvalidInputError(f"--device {args.device}: this machine has {torch.cuda.device_count()} GPU(s)")
        # the current device: streams, graphs and synchronisations without an explicit device act on it
        torch.cuda.set_device(device)
    torch.set_float32_matmul_precision("highest")
    log = lambda s: print(s, flush=True)  # noqa: E731
    log(f"build_info {build_info()}; fused ops on {device.type}: {fused_available(device)}")
    if device.type == "cuda":
        log(f"device {torch.cuda.get_device_name(device)} torch {torch.__version__}")
    tok = load_tokenizer()
    probs = gpu_problems(tok, args.n_ctx)
    unknown = [n for n in names if n not in probs]
    if unknown:
        ap.error(f"--problems: unknown {','.join(unknown)} (choose from {','.join(probs)})")
    model = load_model(args.model).to(device)
    tower = TextTower(model)
    flex_tower = make_flex_tower(model, device) if not args.no_flex else None
    flex_dropped: str | None = None  # why the flex row stopped, once it has
    results: list[dict] = []
    failed: list[dict] = []
    # provenance, as the CPU benchmark's meta: the command as run and when it started
    out = {"command": list(sys.argv), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
           "device": str(device), "model": args.model, "results": results, "failed": failed,
           "build_info": build_info(), "torch": torch.__version__,
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    for name in names:
        for precision in precisions:
            log(f"[{name} {precision}] {probs[name].description}")
            try:
                res = run_problem(tower, tok, probs[name], device, precision, args.repeats, args.warmup, log,
                                  profile=args.profile and name in ("a", "L"), flex_tower=flex_tower,
                                  train_step=not args.no_train_step, graphs=not args.no_graphs)
            except Exception as e:  # noqa: BLE001 - one problem's failure must not lose the others'
                failed.append({"problem": name, "precision": precision, "error": f"{type(e).__name__}: {e}"[:4000]})
                log(f"[{name} {precision}] FAILED: {failed[-1]['error'][:1000]}")
            else:
                if flex_dropped is not None:
                    res["flex_skipped"] = flex_dropped
                results.append(res)
                print_gpu_table([res])
                if flex_tower is not None and res.get("flex_error_kind") == "compile":
                    # a peer that failed to compile fails again: do not pay its compile on every problem
                    flex_tower = None
                    flex_dropped = f"off after it failed on {name} {precision}: {res['flex_error'][:300]}"
                    log(f"flex row {flex_dropped}")
            if args.json:  # after every problem: a run cut short by a timeout keeps what it measured
                write_json(args.json, {**out, "complete": False, "targets": targets(results)})
    print("\n== summary")
    print_gpu_table(results)
    tgt = targets(results)
    print_targets(tgt)
    out.update(targets=tgt, complete=True)
    if args.json:
        write_json(args.json, out)
    publish(out, args.markdown, args.readme, source=args.json)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
