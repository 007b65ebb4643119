"""Benchmark of the class-sharded text forest (issue 11): one HiPro training
step (fit(): forest forward, logits, cross-entropy, backward, gradient
all-reduce, SGD) on a large label space, with 1 and with N processes.

    python -m hipro_fast.bench.distributed --nproc 1,2 --tasks 8 --classes 1000
        [--model ViT-B-16] [--n-ctx 16] [--steps 3] [--device cpu|cuda] [--out DIR]

For each process count it launches torchrun (--standalone) on this module's
worker, which builds the problem, trains `--steps` steps (the first is a warm-up
and not timed) and reports, per rank: the median step time, peak memory (CPU:
the process's peak resident set, which includes the frozen text tower and
torch itself, and that peak minus the resident set just before fit(); CUDA:
torch.cuda.max_memory_allocated) and the packed tokens of its forest. Scaling
efficiency = t(1 process) / (N * t(N processes)).

The problem: `--tasks` tasks under a root -> 2 -> tasks tree, `--classes`
synthetic class names per task (two-word names, distinct across tasks, so no
prompt is shared), combine concat, n_ctx per node, the open_clip text tower
with random weights (pretrained=None), 32 random unit image features per task
per step. Writes DIR/distributed_step.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..distributed import group as dist_group
from ..files import atomic_write_text
from ..method.model import HiProModel
from ..method.training import fit
from ..usage import OneLineUsageParser
from .machine import PeakRSS
from .model import load_model, load_tokenizer

_ADJ = ["red", "small", "old", "wild", "dark", "bright", "wooden", "metal", "round", "tall", "soft", "sharp",
        "frozen", "golden", "silent", "rapid", "hidden", "paper", "glass", "stone"]
_NOUN = ["fox", "lamp", "river", "chair", "tower", "boat", "flower", "stone", "bird", "cloud", "bottle", "bridge",
         "garden", "horse", "candle", "mirror", "forest", "engine", "castle", "shell", "rope", "kettle", "drum",
         "mask", "wheel"]


def class_names(task: int, n: int) -> list[str]:
    """n distinct two- or three-word names for task `task` (distinct across tasks)."""
    out = []
    i = task * n
    while len(out) < n:
        a, rest = _ADJ[i % len(_ADJ)], i // len(_ADJ)
        b, rest = _NOUN[rest % len(_NOUN)], rest // len(_NOUN)
        out.append(f"{a} {b}" + (f" {_ADJ[rest % len(_ADJ)]}" if rest else ""))
        i += 1
    return out


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_memory_mb(device: str, before_mb: float, growth_bytes: int | None) -> float:
    """Peak memory during fit(): CUDA's peak allocation since its reset; on the CPU
    the RSS before plus the high-water growth (the process's lifetime peak where
    the high-water mark cannot be reset)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    if growth_bytes is not None:
        return before_mb + growth_bytes / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def worker(a: argparse.Namespace) -> None:
    torch.set_num_threads(a.threads)
    info = dist_group.init_from_env(a.device, timeout_s=3600)
    device = info.device if info is not None else ("cuda" if a.device.startswith("cuda") else "cpu")
    clip = load_model(a.model, seed=0).to(device)
    tok = load_tokenizer()
    tasks = {f"task{t}": class_names(t, a.classes) for t in range(a.tasks)}
    tree = [[f"task{t}" for t in range(a.tasks) if t < a.tasks // 2],
            [f"task{t}" for t in range(a.tasks) if t >= a.tasks // 2]]
    model = HiProModel(clip, tasks, tree, n_ctx=a.n_ctx, combine="concat", tokenizer=tok, seed=0)
    g = torch.Generator().manual_seed(0)
    dim = model.embed_dim
    train = {t: (F.normalize(torch.randn(64, dim, generator=g), dim=-1),
                 torch.randint(len(c), (64,), generator=g)) for t, c in tasks.items()}
    stamps: list[float] = []

    def tick(_info):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        stamps.append(time.perf_counter())

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _current_rss_mb()
    t0 = time.perf_counter()
    # the high-water mark from here: the process peak includes loading the whole CLIP (its image tower
    # is dropped), ~300 MB on ViT-B-16 that would hide how the training peak scales with the ranks
    with PeakRSS() as rss:
        fit(model, train, None, optimizer="sgd", epochs=1, warmup_epochs=0, steps_per_epoch=a.steps, batch_size=32,
            min_steps=0, callback=tick, device=device)
    steps = [b - a_ for a_, b in zip([t0] + stamps[:-1], stamps)]
    rank, world = (info.rank, info.world_size) if info is not None else (0, 1)
    model.shard_text(rank, world)  # fit() returned to the whole forest; the shard it trained on is cached
    enc = model.encoder
    rec = {"rank": rank, "world_size": world, "step_s": steps, "median_step_s": statistics.median(steps[1:]),
           "peak_mb": _peak_memory_mb(device, before, rss.peak_bytes), "before_fit_mb": before, "tokens": enc.num_tokens,
           "classes": (enc.counts[rank] if hasattr(enc, "counts") else sum(len(c) for c in tasks.values())),
           "backend": info.backend if info is not None else None}
    everyone = dist_group.all_gather_object(rec)
    if rank == 0:
        Path(a.result).write_text(json.dumps(everyone))
    dist_group.shutdown()


def _launch(a: argparse.Namespace, nproc: int, result: Path) -> list[dict]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), "-m",
            "hipro_fast.bench.distributed", "--worker", "--result", str(result), "--model", a.model,
            "--tasks", str(a.tasks), "--classes", str(a.classes), "--n-ctx", str(a.n_ctx), "--steps", str(a.steps),
            "--device", a.device, "--threads", str(a.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    subprocess.run(argv, check=True, env=env)
    return json.loads(result.read_text())


def _table(runs: dict[int, list[dict]]) -> str:
    base = max(r["median_step_s"] for r in runs[min(runs)]) if runs else None
    lines = ["| processes | step time (s, median; slowest rank) | peak memory per rank (MiB) | of which "
             "training (peak - before fit) | packed tokens per rank | classes per rank | scaling efficiency |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, recs in sorted(runs.items()):
        t = max(r["median_step_s"] for r in recs)
        eff = base / (n * t) * min(runs) if base else float("nan")
        mem = " / ".join(f"{r['peak_mb']:.0f}" for r in recs)
        train = " / ".join(f"{r['peak_mb'] - r['before_fit_mb']:.0f}" for r in recs)
        tokens = " / ".join(str(r["tokens"]) for r in recs)
        classes = " / ".join(str(r["classes"]) for r in recs)
        lines.append(f"| {n} | {t:.2f} | {mem} | {train} | {tokens} | {classes} | {eff:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = OneLineUsageParser(prog="python -m hipro_fast.bench.distributed", description=__doc__.split("\n\n")[0])
    p.add_argument("--nproc", default="1,2", help="comma list of process counts")
    p.add_argument("--model", default="ViT-B-16")
    p.add_argument("--tasks", type=int, default=8)
    p.add_argument("--classes", type=int, default=1000, help="classes per task")
    p.add_argument("--n-ctx", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="optimiser steps; the first is a warm-up")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="intra-op threads per process")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.steps < 2:
        p.error("--steps must be >= 2 (the first step is a warm-up)")
    if a.tasks < 2 or a.classes < 1 or a.n_ctx < 0 or a.threads < 1:
        p.error(f"--tasks must be >= 2 (two groups of tasks), --classes and --threads >= 1, --n-ctx >= 0; got "
                f"--tasks {a.tasks} --classes {a.classes} --threads {a.threads} --n-ctx {a.n_ctx}")
    try:
        counts = [int(v) for v in a.nproc.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        p.error(f"--nproc takes a comma list of process counts >= 1, got {a.nproc!r}")
    if a.worker:
        worker(a)
        return 0
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[int, list[dict]] = {}
    load: dict[int, list[float]] = {}
    for n in counts:
        t0 = time.time()
        before = list(os.getloadavg())
        runs[n] = _launch(a, n, out / f".distributed_step_{n}.json")
        load[n] = before + list(os.getloadavg())
        (out / f".distributed_step_{n}.json").unlink()
        print(f"{n} process(es): {max(r['median_step_s'] for r in runs[n]):.2f} s/step "
              f"(launch total {time.time() - t0:.0f} s)", flush=True)
    table = _table(runs)
    command = "python -m hipro_fast.bench.distributed " + " ".join(argv if argv is not None else sys.argv[1:])
    meta = {"command": command, "model": a.model, "tasks": a.tasks, "classes_per_task": a.classes,
            "n_ctx": a.n_ctx, "steps": a.steps, "device": a.device, "threads_per_process": a.threads,
            "cpu_count": os.cpu_count(), "torch": torch.__version__, "runs": runs,
            "loadavg_1_5_15_before_and_after": load}
    atomic_write_text(out / "distributed_step.json", json.dumps(meta, indent=1))
    md = (f"# Class-sharded training step\n\n`{command}`\n\n{a.tasks} tasks x {a.classes} classes, n_ctx {a.n_ctx}, "
          f"{a.model} text tower (random weights), combine concat, batch 32 per task, device {a.device}, "
          f"{a.threads} thread(s) per process, {os.cpu_count()} CPU cores; median of {a.steps - 1} steps after "
          f"a warm-up. Load average (1 min) before / after each launch: "
          + ", ".join(f"{n} proc: {v[0]:.1f} / {v[3]:.1f}" for n, v in load.items())
          + f".\n\n{table}\n")
    atomic_write_text(out / "distributed_step.md", md)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
