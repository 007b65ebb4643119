"""Where and how results leave the benchmark: the default results folder, the
JSON file, the sweep plot, and the console tables of the CPU and GPU runs."""
from __future__ import annotations

import io
import json
import math
import sys
from pathlib import Path

import torch

from ..files import atomic_write_bytes, atomic_write_text
from ..errors import InvalidInputError

CPU_METHODS = ("naive", "padded", "truncated", "forest")
_REPO = Path(__file__).resolve().parents[2]


def default_out_dir() -> Path:
    """`benchmarks/results` of the checkout the package runs from (an editable or
    in-place install); `./benchmarks/results` when the package is installed elsewhere."""
    if (_REPO / "benchmarks").is_dir() and (_REPO / "pyproject.toml").is_file():
        return _REPO / "benchmarks" / "results"
    return Path("benchmarks") / "results"


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def write_json(path: str | Path, obj) -> Path:
    """`obj` as indented JSON (tensors as lists), written atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=1, default=_json_default))


def plot_sweep(sweep: dict, path: str | Path, title: str = "") -> None:
    """PNG of the sweep: step time (top) and tokens per step (bottom) over classes and depth,
    written atomically.

    Here rather than in app/plots.py because bench sits beside app and may not import it.
    """
    import matplotlib  # optional dependency, loaded only to plot

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
    buf = io.BytesIO()  # rendered whole first: a failed or interrupted plot leaves the old PNG, never a torn one
    try:
        fig.savefig(buf, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _fmt(v, spec=".2f", none="-"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return none
    return format(v, spec)


def _fmt_diff(v) -> str:
    """A verification difference: '-' when not compared, 'nan' when non-finite."""
    return "-" if v is None else format(v, ".1e")


def print_table(result: dict, file=None) -> None:
    """The CPU benchmark's results (`cpu.run_bench`) as plain-text tables."""
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
        for m in CPU_METHODS:
            e = res["methods"].get(m)
            if e is None:
                continue
            v = res["verify"].get(m, {})
            ver = "ref" if m == "forest" else (  # NaN here is a failed comparison, not a missing one
                f"{_fmt_diff(v.get('prompt_max_abs_diff'))}, {_fmt_diff(v.get('ctx_grad_rel_diff'))}")
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
            paths = k.get("tree_attention_paths")
            if paths:
                p("  tree attention fwd+bwd by decomposition (median, in turns): " + ", ".join(
                    f"{name} {paths['fwd_bwd_ms'][name]:.1f} ms ({paths['vs_default'][name]:.2f}x)"
                    for name in paths["fwd_bwd_ms"]))
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
        val = _fmt_diff(t["value"]) if "features within" in t["target"] else _fmt(t["value"], ".2f")
        p(f"  {status:4s}  {t['target']}: {val}{' (est)' if t.get('est') else ''}")
    p(f"elapsed {result['meta'].get('elapsed_s', 0):.0f} s")


def print_gpu_table(results: list[dict], file=None) -> None:
    """The GPU benchmark's per-(problem, precision) results (`gpu.run_problem`) as one table."""
    file = file or sys.stdout
    hdr = (f"{'prob':4s} {'prec':4s} {'method':9s} {'tokens':>8s} {'ms/step':>9s} {'TFLOP/s':>8s} "
           f"{'speedup':>8s} {'ideal':>7s} {'% ideal':>7s}")
    print(hdr, file=file)
    for res in results:
        for m, e in res["methods"].items():
            sp = e.get("speedup")
            print(f"{res['problem']:4s} {res['precision']:4s} {m:9s} {e['tokens']:8d} {e['time_ms']:9.2f} "
                  f"{e['gflops'] / 1e3:8.2f} "
                  + (f"{sp:8.2f} {ideal_ratio(e):7.2f} {100 * sp / ideal_ratio(e):6.0f}%" if sp else
                     f"{'':8s} {'':7s} {'':7s}"), file=file)
        v = res["verify_naive"]
        print(f"{'':4s} {'':4s} GEMM [{res['counts']['forest']['tokens']}, W]x[W, 4W] "
              f"{res['gemm_gflops'] / 1e3:.2f} TFLOP/s; forest at {100 * res['forest_fraction_of_gemm']:.0f}% of it; "
              f"forest vs naive: feature diff {_fmt(v['feature_max_abs_diff'], '.2e')}, "
              f"grad rel diff {v['ctx_grad_rel_diff']:.2e}"
              + (f" (only {v['prompts_compared']} of {res['prompts']} prompts finite)"
                 if v.get("prompts_compared", res["prompts"]) < res["prompts"] else ""), file=file)
        fv = res.get("verify_flex")
        if fv:
            print(f"{'':4s} {'':4s} flex vs forest: feature diff {_fmt(fv['feature_max_abs_diff'], '.2e')}, "
                  f"grad rel diff {_fmt(fv['ctx_grad_rel_diff'], '.2e')}", file=file)
        elif res.get("flex_skipped"):
            print(f"{'':4s} {'':4s} flex: skipped ({res['flex_skipped']})", file=file)
        ts = res.get("train_step")
        if ts and "error" in ts:
            print(f"{'':4s} {'':4s} whole training step FAILED: {ts['error']}", file=file)
        elif ts:
            graph = (f"CUDA graph {ts['graph_ms']:.2f} ms" if "graph_ms" in ts else
                     f"CUDA graph failed: {ts['graph_error']}" if "graph_error" in ts else
                     f"CUDA graph skipped ({ts.get('graph_skipped')})")
            print(f"{'':4s} {'':4s} whole training step (forest + logits + CE + backward + "
                  f"{ts.get('optimizer', 'optimiser')}, "
                  f"{ts['batch_per_task']} images/task): eager {ts['eager_ms']:.2f} ms; {graph}", file=file)
        for k in res.get("forest_kernels", []):
            print(f"{'':9s}{k['self_ms_per_step']:8.3f} ms x{k['calls_per_step']:5.0f}  {k['name']}", file=file)


def print_targets(targets: list[dict], file=None) -> None:
    """The GPU benchmark's target list (`gpu.targets`): MET / MISSED / unmeasured per target."""
    file = file or sys.stdout
    print("\n== targets (issue 10)", file=file)
    for t in targets:
        status = "unmeasured" if t["pass"] is None else ("MET" if t["pass"] else "MISSED")
        val = "" if t["value"] is None else f": {_fmt(t['value'], '.3g', none='nan')}"
        note = f" ({t['note']})" if t.get("note") else ""
        print(f"  {status:10s} [{t['where']}] {t['target']}{val}{note}", file=file)


def ideal_ratio(entry: dict) -> float:
    """A GPU result row's ideal speedup, the token ratio: records written before
    session 11 hold the FLOP ratio as `ideal_speedup` and the token ratio as `token_ratio`."""
    return entry.get("token_ratio", entry["ideal_speedup"])


def gpu_markdown(results: list[dict], targets: list[dict], device: str = "",
                 failed: list[dict] | None = None, complete: bool = True) -> str:
    """The GPU results as the README's markdown tables: per (problem, precision) the
    forest, naive, truncated and flex times with speedups (ideal) and the forest's
    share of the same-run GEMM rate; the whole training step; the targets; then
    the (problem, precision) runs that failed and the flex rows that were dropped,
    with their errors, and a note when the run was cut short."""
    lines = [f"GPU text step{' on ' + device if device else ''} (`hipro bench --device cuda`):", "",
             "Ideal: the token ratio (baseline tokens / forest tokens), as in the CPU benchmark.", "",
             "| problem | precision | forest ms | naive ms | speedup (ideal) | truncated ms | speedup (ideal) "
             "| flex ms | forest vs flex | forest vs same-run GEMM | train step eager / graph ms |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def cell(e):
        return (f"{e['time_ms']:.1f}", f"{e['speedup']:.1f}× ({ideal_ratio(e):.1f}×)") if e else ("–", "–")

    for r in results:
        m = r["methods"]
        naive, trunc = cell(m.get("naive")), cell(m.get("truncated"))
        flex = m.get("flex")
        ts = r.get("train_step") or {}
        graph = (f"{ts['graph_ms']:.2f}" if "graph_ms" in ts else "failed" if "graph_error" in ts else "–")
        train = "failed" if "error" in ts else f"{ts['eager_ms']:.2f} / {graph}" if ts else "–"
        fx = (f"{flex['time_ms']:.1f}", f"{flex['speedup']:.2f}×") if flex else ("–", "–")
        gemm = f"{100 * r['forest_fraction_of_gemm']:.0f} % of {r['gemm_gflops'] / 1e3:.1f} TFLOP/s"
        lines.append(f"| ({r['problem']}) | {r['precision']} | {m['forest']['time_ms']:.1f} | {naive[0]} "
                     f"| {naive[1]} | {trunc[0]} | {trunc[1]} | {fx[0]} | {fx[1]} | {gemm} | {train} |")
    lines += ["", "| target | where | measured | status |", "| --- | --- | ---: | --- |"]
    for t in targets:
        status = "unmeasured" if t["pass"] is None else ("**met**" if t["pass"] else "**missed**")
        val = "–" if t["value"] is None else _fmt(t["value"], ".3g", none="nan")
        lines.append(f"| {t['target']} | {t['where']} | {val} | {status} |")
    notes = [f"* ({f['problem']}) {f['precision']} FAILED: `{_one_line(f['error'])}`" for f in failed or []]
    notes += [f"* ({r['problem']}) {r['precision']}: flex row dropped: `{_one_line(r['flex_error'])}`"
              for r in results if r.get("flex_error")]
    notes += [f"* ({r['problem']}) {r['precision']}: flex row {_one_line(r['flex_skipped'])}"
              for r in results if r.get("flex_skipped") and r["flex_skipped"].startswith("off after")]
    notes += [f"* ({r['problem']}) {r['precision']}: training step FAILED: `{_one_line(r['train_step']['error'])}`"
              for r in results if "error" in (r.get("train_step") or {})]
    notes += [f"* ({r['problem']}) {r['precision']}: kernel profile failed: `{_one_line(r['profile_error'])}`"
              for r in results if r.get("profile_error")]
    if not complete:
        notes.append("* the run was cut short: only the rows above were measured")
    if notes:
        lines += [""] + notes
    return "\n".join(lines) + "\n"


def _one_line(text: str, limit: int = 300) -> str:
    line = " ".join(str(text).split()).replace("`", "'")
    return line if len(line) <= limit else line[:limit] + " …"


README_BEGIN = "<!-- gpu-table:begin (python -m hipro_fast.bench.gpu --render JSON --readme README.md) -->"
README_END = "<!-- gpu-table:end -->"
STATUS_BEGIN = "<!-- gpu-status:begin (python -m hipro_fast.bench.gpu --render JSON --readme README.md) -->"
STATUS_END = "<!-- gpu-status:end -->"


def gpu_status_markdown(out: dict, source: str | None = None) -> str:
    """The README's one-paragraph status of the GPU targets, from a results dict:
    where and when they were measured and how many are met, missed or unmeasured
    (the prose around the table, so that a render leaves no stale claim)."""
    results = out.get("results") or []
    if not results:
        return ("**The GPU targets are unmeasured: the results hold no measured problem.** None of them "
                "is claimed.\n")
    tg = out.get("targets") or []
    met = sum(t["pass"] is True for t in tg)
    missed = sum(t["pass"] is False for t in tg)
    unmeasured = sum(t["pass"] is None for t in tg)
    device = out.get("device_name", out.get("device", "a GPU"))
    when = f" on {out['time']}" if out.get("time") else ""
    cut = " The run was cut short: only the rows of the table were measured." if out.get("complete") is False else ""
    src = f" (`{source}`)" if source else ""
    return (f"**The GPU targets were measured on {device}{when}{src}: {met} of {len(tg)} met, {missed} "
            f"missed, {unmeasured} unmeasured.** The table below says which, with every time it is "
            f"computed from.{cut}\n")


def replace_readme_block(readme: str | Path, text: str, begin: str = README_BEGIN, end: str = README_END) -> None:
    """Replace the lines between `begin` and `end` (the GPU table's markers by default) of `readme` with `text`."""
    path = Path(readme)
    src = path.read_text()
    if src.count(begin) != 1 or src.count(end) != 1:
        raise InvalidInputError(f"{path}: needs exactly one '{begin}' and one '{end}' line")
    head, rest = src.split(begin, 1)
    _, tail = rest.split(end, 1)
    atomic_write_text(path, f"{head}{begin}\n{text}{end}{tail}")
