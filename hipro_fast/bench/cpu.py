"""Benchmarks of the text-side HiPro training step on the CPU (`hipro bench`).

One step = encode every prompt of every task through the frozen CLIP text
tower, loss = sum(features * fixed random weights), backward to the learnable
context table only. Methods (see `hipro_fast.bench.naive` for the baselines):

  naive      CoOp-style loop, one full-length [C, 77] batch per prompt set
  padded     all distinct prompts in one [P, 77] batch
  truncated  padded, cut after the longest EOS (exact: causal tower, EOS pooling)
  forest     `TextTower.encode_forest` on the packed prompt forest (built once)

Every baseline's features and context gradients are compared with the forest's
before its timings are kept. Counting conventions: `counting.CONVENTIONS`
(written into the results). Problems: `problems`; output: `output`.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..engine.prompt_forest import build_prompt_forest
from ..engine.text_tower import TextTower
from ..errors import ForestError, InvalidInputError
from ..ops.extension import build_info, fused_available
from ..usage import OneLineUsageParser, file_stem, float_above, int_at_least, int_list
from .counting import CONVENTIONS, linear_flops_per_token
from .machine import PeakRSS, available_cpus, cpu_name, graph_budget_bytes, loadavg
from .model import load_model, load_tokenizer
from .naive import enumerate_prompts
from .output import CPU_METHODS, default_out_dir, plot_sweep, print_table, write_json
from .problems import Problem, main_problems, sweep_points
from .profile import kernel_breakdown, profile_forest
from .runner import StepRunner
from .timing import gemm_rate, median, timed

TARGET_FRACTION_OF_IDEAL = 0.6
TARGET_FRACTION_OF_GEMM = 0.5
TARGET_MEMORY_RATIO = 5.0
# fp32 exactness gate of every timed baseline against the forest (observed ~2e-7 / ~1.5e-6): a
# speedup over a baseline that computes something else is no speedup
VERIFY_FEATURE_TOL = 1e-5
VERIFY_GRAD_REL_TOL = 1e-4
METHODS = CPU_METHODS


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


def make_runner(tower, tokenizer, problem: Problem, cfg: BenchConfig) -> StepRunner:
    """The problem's steps, seeded by cfg.seed, baselines under cfg's graph budget."""
    return StepRunner(tower, tokenizer, problem, seed=cfg.seed, max_graph_bytes=graph_budget_bytes(cfg.max_graph_gb))


def _dense_kind(method: str) -> str:
    """The dense computation a baseline's per-token time is measured on (naive = padded per token)."""
    return "truncated" if method == "truncated" else "padded"


def run_problem(tower, tokenizer, problem: Problem, cfg: BenchConfig, log, methods=METHODS,
                estimate: Sequence[str] = (), forest_repeats: int | None = None,
                profile: bool = False, est_tokens: int | None = None) -> dict:
    """Measure `methods` on one problem. Methods in `estimate` are extrapolated from one
    micro-batch of about est_tokens (default cfg.est_tokens) tokens: per-token time x tokens."""
    load_start = loadavg()
    r = make_runner(tower, tokenizer, problem, cfg)
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
        dt, _ = timed(r.forest_step)
        forest_times.append(dt)
        gemm_rates.append(gemm_rate(T_forest, W, cfg.gemm_repeats))

    measured = [m for m in methods if m != "forest" and m not in estimate]
    estimated = [m for m in methods if m != "forest" and m in estimate]

    # estimated baselines: one micro-batch of the dense full/truncated computation
    per_seq: dict[str, tuple[float, int, dict]] = {}
    for m in estimated:
        key = _dense_kind(m)
        if key not in per_seq:
            seq = counts[key]["seq_len"]
            n = max(1, (est_tokens or cfg.est_tokens) // seq)
            warm = r.baseline(key, max_prompts=max(1, 1024 // seq))
            r.run_baseline(warm, False)  # warm-up at this sequence length
            small = r.baseline(key, max_prompts=n)
            forest_once()
            dt, (_, col) = timed(lambda: r.run_baseline(small, True))
            per_seq[key] = (dt / small.tokens, small.tokens, col)
        per_tok, sample_tokens, col = per_seq[key]
        t = per_tok * counts[m]["tokens"]
        res["methods"][m] = dict(counts[m], times=[t], time_s=t, reps=1, est=True,
                                 est_sample_tokens=sample_tokens, peak_bytes=None, micro_batches=None)
        res["verify"][m] = r.verify(col, None, ref, ref_grad)

    # measured baselines, interleaved with the forest
    steps = {}
    for m in measured:
        steps[m] = r.baseline(m)
        res["methods"][m] = dict(counts[m], times=[], est=False, peak_bytes=None,
                                 micro_batches=steps[m].micro_batches)
    if measured:
        # warm-up each distinct sequence length on a small batch
        for key in sorted({_dense_kind(m) for m in measured}):
            small = r.baseline(key, max_prompts=max(1, 1024 // counts[key]["seq_len"]))
            r.run_baseline(small, False)
    # The first full step of each baseline collects its features and memory peak,
    # after gc + malloc_trim: cold (slowest in 9 of 9 recorded series), it is kept
    # as collect_s and timed only when the budget leaves no warm repetition.
    pending = list(measured)
    rnd = 0
    while pending:
        order = pending[rnd % len(pending):] + pending[:rnd % len(pending)]
        for m in order:
            entry = res["methods"][m]
            forest_once()
            if "collect_s" not in entry:
                with PeakRSS() as mem:
                    dt, (_, col) = timed(lambda: r.run_baseline(steps[m], True))
                entry["peak_bytes"] = mem.peak_bytes
                entry["collect_s"] = dt
                res["verify"][m] = r.verify(col, r.ctx.grad.detach().clone(), ref, ref_grad)
                label = "collect"
            else:
                dt, _ = timed(lambda: r.run_baseline(steps[m], False))
                entry["times"].append(dt)
                label = f"rep {len(entry['times'])}"
            spent = entry["collect_s"] + sum(entry["times"])
            n = 1 + len(entry["times"])
            log(f"  [{problem.name}] {m:9s} {label:7s}: {dt:8.2f} s   (forest {forest_times[-1]:.3f} s)")
            if len(entry["times"]) >= cfg.baseline_repeats or (spent + spent / n > cfg.baseline_budget_s):
                pending.remove(m)
        rnd += 1
    for m in measured:
        entry = res["methods"][m]
        entry["cold_only"] = not entry["times"]  # the budget allowed the collect step alone
        if entry["cold_only"]:
            entry["times"] = [entry["collect_s"]]
        entry["reps"] = len(entry["times"])
        entry["time_s"] = median(entry["times"])
    while len(forest_times) < forest_repeats:
        forest_once()
    f = res["methods"]["forest"]
    f.update(times=forest_times, time_s=median(forest_times), reps=len(forest_times))
    log(f"  [{problem.name}] forest    median {f['time_s']:.3f} s over {f['reps']} reps")
    for m, e in res["methods"].items():
        e["gflops"] = e["flops"]["total"] / e["time_s"] / 1e9 if e.get("time_s") else None
        e["peak_mb"] = e["peak_bytes"] / 2**20 if e.get("peak_bytes") is not None else None
    res["gemm"] = {"shape": [T_forest, W, 4 * W], "gflops_median": median(gemm_rates), "samples": gemm_rates}
    res["ratios"] = ratios(res)
    res["loadavg_1min"] = {"start": load_start, "end": loadavg()}
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


def profile_only(tower, tokenizer, cfg: BenchConfig, log) -> dict:
    """Forest-only profile of each configuration (no baselines)."""
    out = {}
    problems = main_problems(tokenizer, cfg.n_ctx)
    for name in cfg.configs:
        r = make_runner(tower, tokenizer, problems[name], cfg)
        for _ in range(cfg.forest_warmup):
            r.forest_step()
        t = median([timed(r.forest_step)[0] for _ in range(cfg.forest_repeats)])
        c = r.counts()["forest"]
        out[name] = {"forest_tokens": c["tokens"], "forest_time_s": t,
                     "forest_gflops": c["flops"]["total"] / t / 1e9,
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
        paths = k.get("tree_attention_paths")
        if paths:
            log("    tree attention fwd+bwd: " + ", ".join(
                f"{p} {paths['fwd_bwd_ms'][p]:.1f} ms ({paths['vs_default'][p]:.2f}x)" for p in paths["fwd_bwd_ms"]))
    return out


def run_sweep(tower, tokenizer, cfg: BenchConfig, log, reuse: dict | None = None) -> dict:
    """forest vs truncated over classes (config-a tree) and depth (65 classes, 4 tasks)."""
    out = {"classes": [], "depth": []}
    done: dict[tuple, dict] = {}
    for axis, n, d, prob in sweep_points(tokenizer, cfg.sweep_classes, cfg.sweep_depths, cfg.n_ctx):
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


def _worst(values: list) -> float | None:
    """The largest of the measured values (None = not compared); NaN when any is NaN."""
    got = [float(v) for v in values if v is not None]
    if any(math.isnan(v) for v in got):
        return math.nan
    return max(got) if got else None


def evaluate_targets(result: dict) -> list[dict]:
    """PASS/MISS per target; the first of each configuration is exactness."""
    out = []
    for name, res in result["configs"].items():
        checks = list(res.get("verify", {}).values())
        feat = _worst([v.get("prompt_max_abs_diff") for v in checks])
        grad = _worst([v.get("ctx_grad_rel_diff") for v in checks])
        ok = None if feat is None else (feat <= VERIFY_FEATURE_TOL and (grad is None or grad <= VERIFY_GRAD_REL_TOL))
        out.append({"target": f"({name}) every baseline's prompt features within {VERIFY_FEATURE_TOL:g} of the "
                              f"forest's, context gradient within {VERIFY_GRAD_REL_TOL:g} relative",
                    "value": feat, "pass": ok, "est": False})
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


def _precision(tower) -> str:
    """The dtype the tower computes in, as the GPU benchmark names it (no autocast here)."""
    param = next(tower.parameters(), None)
    dtype = param.dtype if param is not None else torch.get_default_dtype()
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def _meta(cfg: BenchConfig, tower) -> dict:
    """How the results were made: the command as run, versions, machine, configuration."""
    try:
        import open_clip  # only for its version string

        oc = open_clip.__version__
    except Exception:  # pragma: no cover
        oc = None
    return {"command": list(sys.argv), "model": cfg.model, "text_config": asdict(tower.config),
            "quick": cfg.quick, "precision": _precision(tower),
            "torch": torch.__version__, "open_clip": oc, "threads": torch.get_num_threads(),
            "cpu": cpu_name(), "nproc": os.cpu_count(), "python": sys.version.split()[0],
            "fused_cpu_ops": fused_available("cpu"), "build_info": build_info(),
            "linear_flops_per_token_layer": linear_flops_per_token(tower),
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
            "config": {k: v for k, v in asdict(cfg).items()},
            "conventions": CONVENTIONS}


def _write_partial(cfg: BenchConfig, result: dict, t_start: float) -> None:
    """The results so far, marked incomplete (meta.complete False), to the JSON path."""
    if cfg.json_path:
        partial = {**result, "meta": {**result["meta"], "complete": False,
                                      "elapsed_s": time.perf_counter() - t_start}}
        partial["targets"] = evaluate_targets(partial)
        write_json(cfg.json_path, partial)
        _remove_stale_png(cfg)  # an earlier run's sweep plot must not pass for this run's


def _remove_stale_png(cfg: BenchConfig) -> None:
    """Remove the PNG at cfg.png_path: it is an earlier run's, beside this run's JSON."""
    if cfg.png_path:
        Path(cfg.png_path).unlink(missing_ok=True)


def check_sweep_points(tower, tokenizer, cfg: BenchConfig) -> None:
    """Build every sweep point's prompt forest, so that a point that cannot run (more
    classes than there are distinct names, a tree too deep for the context) fails
    before anything is measured, not after the configurations' hours."""
    L = tower.config.context_length
    for axis, _, _, prob in sweep_points(tokenizer, cfg.sweep_classes, cfg.sweep_depths, cfg.n_ctx):
        try:
            build_prompt_forest(tokenizer, L, prob.node_ctx_rows, prob.task_paths, prob.task_classes, prob.combine)
        except ForestError as e:
            flag = "--sweep-classes" if axis == "classes" else "--sweep-depths"
            raise InvalidInputError(f"sweep point {prob.name} ({flag}) cannot run: {e}") from e


def run_bench(config: BenchConfig | dict | None = None, *, tower=None, tokenizer=None) -> dict:
    """Run the benchmark; write JSON (config.json_path) and PNG (config.png_path) if given
    (a run without a sweep removes an earlier PNG there: it would not be this run's)."""
    cfg = config if isinstance(config, BenchConfig) else BenchConfig(**(config or {}))
    log: Callable[[str], None] = (lambda s: print(s, flush=True)) if cfg.verbose else (lambda s: None)

    if not fused_available("cpu"):
        log("WARNING: compiled hipro_fast CPU ops unavailable; the forest runs the PyTorch reference ops")
    if tower is None:
        tower = TextTower(load_model(cfg.model, cfg.seed))
    tokenizer = tokenizer or load_tokenizer()
    if cfg.sweep:
        check_sweep_points(tower, tokenizer, cfg)
    result: dict = {"meta": _meta(cfg, tower), "configs": {}}
    t_start = time.perf_counter()
    problems = main_problems(tokenizer, cfg.n_ctx)
    for name in cfg.configs:
        log(f"[config {name}] {problems[name].description}")
        result["configs"][name] = run_problem(
            tower, tokenizer, problems[name], cfg, log,
            estimate=("naive", "padded", "truncated") if cfg.quick else (), profile=cfg.profile)
        _write_partial(cfg, result, t_start)  # an interrupted run keeps what it measured
    if cfg.sweep:
        result["sweep"] = run_sweep(tower, tokenizer, cfg, log, reuse=result["configs"].get("a"))
    result["targets"] = evaluate_targets(result)
    result["meta"]["elapsed_s"] = time.perf_counter() - t_start
    result["meta"]["complete"] = True
    if cfg.json_path:
        write_json(cfg.json_path, result)
    if cfg.png_path and result.get("sweep"):
        plot_sweep(result["sweep"], cfg.png_path, title=f"{cfg.model} text step, {torch.get_num_threads()} threads")
    else:
        _remove_stale_png(cfg)
    return result


RECORD_MODEL = "ViT-B-16"   # the model of the tracked records (benchmarks/results/text_step.json)
ALL_CONFIGS = ("a", "b", "c")
QUICK_SWEEP_CLASSES = (65, 130)
_POSITIVE = int_at_least(1)


def _slug(text: str) -> str:
    """`text` as a file-name part: runs of anything but letters, digits, '.', '+', '-' become '-'."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip(".-") or "model"


def default_stem(base: str, *, model: str = RECORD_MODEL, configs: Sequence[str] = ALL_CONFIGS,
                 quick: bool = False, sweep: bool | None = None, sweep_classes: Sequence[int] | None = None,
                 sweep_depths: Sequence[int] | None = None, threads: int | None = None,
                 custom: bool = False) -> str:
    """The results' default file stem: `base` alone only for the record run (the record
    model, configurations a,b,c and, with `sweep` given, the default sweep points), else
    `base` and what differs, so that a partial run never overwrites the tracked record:
    e.g. text_step_tiny, text_step_a_nosweep, text_step_depths1-4, text_step_a_quick.
    `sweep_classes`/`sweep_depths`: the points asked for (None: the mode's default).
    `threads`: asked for (None, or every core of this machine: the record's setting;
    else _threadsN). `custom`: a timing option off its default (repeats, budget,
    graph budget, seed, profile): _custom."""
    parts = [base]
    if model != RECORD_MODEL:
        parts.append(_slug(model))
    if threads is not None and threads != available_cpus():  # the record runs use them all
        parts.append(f"threads{threads}")
    if sorted(configs) != list(ALL_CONFIGS):
        parts.append("".join(sorted(configs)) or "noconfigs")
    if sweep is False:
        parts.append("nosweep")
    elif sweep:
        default_classes = QUICK_SWEEP_CLASSES if quick else BenchConfig.sweep_classes
        for axis, given, default in (("classes", sweep_classes, default_classes),
                                     ("depths", sweep_depths, BenchConfig.sweep_depths)):
            if given is not None and list(given) != list(default):
                parts.append(axis + "-".join(map(str, given)))
    if custom:
        parts.append("custom")
    if quick:
        parts.append("quick")  # last: benchmarks/results/.gitignore ignores *_quick.*
    return "_".join(parts)


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineUsageParser(prog="hipro bench", description=__doc__.split("\n\n")[0],
                            epilog="On a GPU: `hipro bench --device cuda --help` (hipro_fast.bench.gpu).")
    ap.add_argument("--model", default=RECORD_MODEL, help="open_clip model name (random weights) or 'tiny'")
    ap.add_argument("--quick", action="store_true", help="few repeats; extrapolate the big baselines")
    ap.add_argument("--configs", default="a,b,c", help="comma list of a,b,c (empty: none)")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--sweep-classes", type=int_list(1, "65,130,260,520"), default=None,
                    help="classes per task of the sweep points, e.g. 65,130,260,520")
    ap.add_argument("--sweep-depths", type=int_list(1, "1,2,3,4"), default=None,
                    help="tree depths of the sweep points, e.g. 1,2,3,4")
    ap.add_argument("--forest-repeats", type=_POSITIVE, default=None)
    ap.add_argument("--baseline-repeats", type=_POSITIVE, default=None)
    ap.add_argument("--baseline-budget", type=float_above(0, inclusive=True), default=None,
                    help="seconds per baseline method (0: one repeat)")
    ap.add_argument("--max-graph-gb", type=float_above(0), default=None)
    ap.add_argument("--threads", type=_POSITIVE, default=None)
    ap.add_argument("--profile", action=argparse.BooleanOptionalAction, default=None,
                    help="torch.profiler breakdown of one forest step (default: on in full mode)")
    ap.add_argument("--profile-only", action="store_true",
                    help="only the forest step: timing, torch.profiler breakdown and per-layer kernel times")
    ap.add_argument("--out-dir", default=None,
                    help=f"folder for <tag>.json and <tag>.png (default: {default_out_dir()}, where the full "
                         "default run's files are tracked records)")
    ap.add_argument("--tag", type=file_stem, default=None,
                    help="file name stem, without a folder part (default: text_step, or forest_profile with "
                         "--profile-only, for the full default run only; any other run adds what differs, "
                         f"so it never overwrites the record: _MODEL unless {RECORD_MODEL}, the configurations "
                         "unless a,b,c (e.g. _ab), _nosweep or _classesN-N / _depthsN-N for other sweep points, "
                         "then _quick). A run without a sweep removes an earlier <tag>.png: the PNG beside the "
                         "JSON is always the same run's")
    ap.add_argument("--seed", type=int_at_least(0, 2**32 - 1), default=0)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    ap = build_parser()
    a = ap.parse_args(argv)
    configs = [c for c in a.configs.split(",") if c]
    unknown = sorted(set(configs) - set(ALL_CONFIGS))
    if unknown:
        ap.error(f"--configs: unknown configuration(s) {','.join(unknown)} (choose from a,b,c)")
    if len(set(configs)) != len(configs):  # it would run twice and keep one
        ap.error(f"--configs: a configuration is repeated in {a.configs!r}")
    if a.threads:
        torch.set_num_threads(a.threads)
    out_dir = Path(a.out_dir) if a.out_dir else default_out_dir()
    custom = any(v is not None for v in (a.forest_repeats, a.baseline_repeats, a.baseline_budget, a.max_graph_gb,
                                         a.profile)) or a.seed != 0
    stem = a.tag or default_stem("text_step", model=a.model, configs=configs, quick=a.quick, sweep=not a.no_sweep,
                                 threads=a.threads, custom=custom,
                                 sweep_classes=a.sweep_classes, sweep_depths=a.sweep_depths)
    kw = dict(model=a.model, quick=a.quick, configs=configs,
              sweep=not a.no_sweep, forest_repeats=a.forest_repeats, baseline_repeats=a.baseline_repeats,
              baseline_budget_s=a.baseline_budget, max_graph_gb=a.max_graph_gb, profile=a.profile,
              seed=a.seed, json_path=str(out_dir / f"{stem}.json"),
              png_path=str(out_dir / f"{stem}.png"))
    if a.sweep_classes:
        kw["sweep_classes"] = a.sweep_classes
    elif a.quick:
        kw["sweep_classes"] = QUICK_SWEEP_CLASSES
    if a.sweep_depths:
        kw["sweep_depths"] = a.sweep_depths
    if a.profile_only:
        cfg = BenchConfig(**kw)
        tower = TextTower(load_model(cfg.model, cfg.seed))
        out = {"meta": _meta(cfg, tower), "configs": profile_only(tower, load_tokenizer(), cfg, print)}
        stem = a.tag or default_stem("forest_profile", model=a.model, configs=configs, quick=a.quick,
                                     threads=a.threads, custom=custom)
        path = write_json(out_dir / f"{stem}.json", out)
        print(f"wrote {path}")
        return 0
    result = run_bench(BenchConfig(**kw))
    print()
    print_table(result)
    print(f"\nwrote {kw['json_path']}" + (f" and {kw['png_path']}" if result.get("sweep") else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
