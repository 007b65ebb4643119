"""Ablation of HiPro's hierarchy options on the bundled and the planted benchmark.

bundled: CoOp's protocol (hipro_fast.method.protocol) on the bundled benchmark
  with hipro-tiny-clip, scored on a DEV split: a quarter of every class's
  training images, held out before any draw (seed 1234), so that choosing the
  defaults never looks at the test split. One run per variant:

    python scripts/ablation_hipro.py bundled --variant base      # + the baselines
    python scripts/ablation_hipro.py bundled --variant pw75      # learned path weights, leaf 0.75
    python scripts/ablation_hipro.py bundled --variant pw90
    python scripts/ablation_hipro.py bundled --variant pw50
    python scripts/ablation_hipro.py bundled --variant prior1    # init from parent + parent prior 1.0
    python scripts/ablation_hipro.py bundled --variant pw75prior # learned weights + parent prior 1.0
    python scripts/ablation_hipro.py bundled --variant pw75sel   # learned weights + per-task selection on val
    python scripts/ablation_hipro.py bundled --variant concat    # combine concat (two-level + hipro)
    python scripts/ablation_hipro.py bundled --variant pw90sel --recipe adamw-full --affinity-steps 30  # session 5
    python scripts/ablation_hipro.py bundled --variant pw75priorsel --recipe adamw-1600 --affinity-steps 30  # session 6
    python scripts/ablation_hipro.py bundled --variant pw75sel --recipe default --affinity-steps 30  # session 7

planted: hipro_fast.data.synth problems (3 groups x 2 tasks, 1/2/4 shots and
  conflicting labels at 2 shots, seeds 0-2), HiPro on the affinity tree with
  uniform / learned (0.75, 0.9) path weights against CoOp per task and shared:

    python scripts/ablation_hipro.py planted --budget ablation   # 50 epochs, min_steps 0 (tests/method/test_planted.py)
    python scripts/ablation_hipro.py planted --budget default    # 50 epochs, min_steps 200 (the session-3 default)
    python scripts/ablation_hipro.py planted --budget default --planted-variants pw75prior,pw75sel
    python scripts/ablation_hipro.py planted --budget adamw-full --min-steps 800 --planted-variants pw75,pw75sel
    python scripts/ablation_hipro.py planted --budget lbfgs --min-steps 800 --planted-variants pw75,pw75sel  # session 7
    (since session 13 every planted run also scores coop-best-of-3, the control for per-task selection)

budget: the training-budget check on the bundled DEV split: every trained
  method (default HiPro options) at learning rate --lr and --scale times the
  default budget (epochs and min_steps multiplied), so that a rule can be
  chosen whose doubled budget moves no method's mean by more than 0.5 points:

    python scripts/ablation_hipro.py budget --lr 0.002 --scale 1 --shots 1,4,16
    python scripts/ablation_hipro.py budget --lr 0.002 --scale 2 --shots 1,4,16
    python scripts/ablation_hipro.py budget --optimizer adamw --full-batch --min-steps 800 --scale 1 --shots 1,4,16
    python scripts/ablation_hipro.py budget --optimizer adamw --full-batch --min-steps 800 --lr 0.01 --scale 2 --shots 1,4,16
    python scripts/ablation_hipro.py budget --optimizer lbfgs --full-batch --min-steps 800 --scale 1 --shots 1,4,16

Results: benchmarks/results/ablation_hipro.md. One thread per run (--threads).
bundled and budget run the protocol's draws in parallel under torchrun (one
draw per process at a time; the results equal one process's):

    python -m torch.distributed.run --standalone --nproc-per-node 2 scripts/ablation_hipro.py budget ...
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import hipro_fast as hf  # noqa: E402
from hipro_fast.app import pipeline  # noqa: E402
from hipro_fast.distributed import group as dist_group  # noqa: E402
from hipro_fast.data.synth import make_planted_problem, planted_clip  # noqa: E402
from hipro_fast.data.tasks_spec import load_spec  # noqa: E402
from hipro_fast.method.affinity import task_affinity  # noqa: E402
from hipro_fast.method.baselines import (COOP_BEST_OF, DEFAULT_SELECT_BY, SELECT_CRITERIA, choose_per_task,  # noqa: E402
                                        compare)
from hipro_fast.method.protocol import run_protocol  # noqa: E402
from hipro_fast.method.training import TrainConfig  # noqa: E402
from hipro_fast.method.tree import tree_from_affinity  # noqa: E402

BUNDLED_VARIANTS = {
    "base": ("mean", ["coop-per-task", "coop-shared", "two-level", "hipro"], {"path_weights": "uniform"}),
    "pw75": ("mean", ["hipro"], {"path_weights": "learned", "leaf_weight": 0.75}),
    "pw90": ("mean", ["hipro"], {"path_weights": "learned", "leaf_weight": 0.9}),
    "pw50": ("mean", ["hipro"], {"path_weights": "learned", "leaf_weight": 0.5}),
    "prior1": ("mean", ["hipro"], {"path_weights": "uniform", "init_from_parent": True, "parent_prior": 1.0}),
    "pw75prior": ("mean", ["hipro"], {"path_weights": "learned", "leaf_weight": 0.75, "parent_prior": 1.0}),
    "pw75sel": ("mean", ["coop-per-task", "two-level", "hipro"],
                {"path_weights": "learned", "leaf_weight": 0.75, "select": "per-task"}),
    "pw90sel": ("mean", ["coop-per-task", "two-level", "hipro"],
                {"path_weights": "learned", "leaf_weight": 0.9, "select": "per-task"}),
    "pw75priorsel": ("mean", ["coop-per-task", "two-level", "hipro"],
                     {"path_weights": "learned", "leaf_weight": 0.75, "parent_prior": 1.0, "select": "per-task"}),
    "concat": ("concat", ["two-level", "hipro"], {}),
}
# bundled: the training recipe. coop-sgd: CoOp's SGD at batch 32 and >= 200 steps (the default
# until session 5; every session-3/4 table); adamw-full: the session-5 default (800 steps);
# adamw-1600: the session-6 default (the session-6 and session-7 AdamW tables, run then as
# "--recipe default"); default: TrainConfig(), whatever it is now (session 7: full-batch L-BFGS).
RECIPES = {"coop-sgd": TrainConfig(optimizer="sgd", batch_size=32, epochs=50, min_steps=200, lr=0.002),
           "adamw-full": TrainConfig(optimizer="adamw", batch_size="full", epochs=50, min_steps=800, lr=0.002),
           "adamw-1600": TrainConfig(optimizer="adamw", batch_size="full", epochs=50, min_steps=1600, lr=0.002),
           "default": TrainConfig()}
PLANTED_VARIANTS = {"uniform": {"path_weights": "uniform"},
                    "pw75": {"path_weights": "learned", "leaf_weight": 0.75},
                    "pw90": {"path_weights": "learned", "leaf_weight": 0.9},
                    "pw75prior": {"path_weights": "learned", "leaf_weight": 0.75, "parent_prior": 1.0},
                    "pw75sel": {"path_weights": "learned", "leaf_weight": 0.75, "select": "per-task"},
                    "pw90sel": {"path_weights": "learned", "leaf_weight": 0.9, "select": "per-task"},
                    "pw75priorsel": {"path_weights": "learned", "leaf_weight": 0.75, "parent_prior": 1.0,
                                     "select": "per-task"}}


def say(msg: str) -> None:
    """print on rank 0 only (every rank of a torchrun launch holds every result)."""
    if dist_group.is_main():
        print(msg, flush=True)


def dev_split(pool, seed: int = 1234):
    """(pool without the dev images, dev): a quarter of every class's images."""
    g = torch.Generator().manual_seed(seed)
    rest, dev = {}, {}
    for t, (x, y) in pool.items():
        keep, hold = [], []
        for c in range(int(y.max()) + 1):
            rows = (y == c).nonzero().flatten()
            rows = rows[torch.randperm(rows.numel(), generator=g)]
            n = rows.numel() // 4
            hold.append(rows[:n])
            keep.append(rows[n:])
        keep, hold = torch.cat(keep).sort().values, torch.cat(hold).sort().values
        rest[t], dev[t] = (x[keep], y[keep]), (x[hold], y[hold])
    return rest, dev


def load_bundled(work: str):
    """(clip, cached bundled features, training pool without the dev split, dev split)."""
    clip = hf.load_clip("hipro-tiny-clip")
    root = Path(work) / "bundled"
    # rank 0 alone exports (under torchrun every rank ran it into the same folder at once, and a rank
    # could list a half-written export: its image indices then overran rank 0's)
    spec_path = dist_group.main_first(
        lambda: root / "tasks.toml" if (root / "tasks.toml").exists() else pipeline.export_bundled(root, seed=0),
        " exporting the bundled images")
    feats = pipeline.cache_features(clip, load_spec(spec_path), shots=None, seed=0, cache_dir=Path(work) / "cache",
                                    progress=False, splits=("train", "test"))
    pool, dev = dev_split(feats.train)
    return clip, feats, pool, dev


def selection_means(table) -> dict[str, list[float]]:
    """criterion -> per seed, the mean task accuracy that per-task selection
    under that criterion gives, recomputed from the candidates' recorded
    validation and test scores of one compare() table (paired: same runs)."""
    out = {}
    for by in SELECT_CRITERIA:
        out[by] = []
        for cands in table["hipro"].candidates:
            chosen = choose_per_task(cands, by)
            out[by].append(float(np.mean([cands[m]["test"][t] for t, m in chosen.items()])))
    return out


def selection_report(res) -> dict:
    """Every selection criterion, per shot count: mean over seeds and the paired
    difference to CoOp per task (all from the same trained runs)."""
    report = {}
    for k in res.shots:
        tables = [res.runs[(k, s)] for s in res.seeds]
        per = [selection_means(t) for t in tables]
        coop = [t["coop-per-task"].mean for t in tables]
        report[str(k)] = {by: {"seed_means": [p[by][0] for p in per],
                               "minus_coop_per_task": [p[by][0] - c for p, c in zip(per, coop)]}
                          for by in SELECT_CRITERIA}
        say(f"{k} shots: " + ", ".join(
            f"{by} {100 * np.mean(r['seed_means']):.2f} ({100 * np.mean(r['minus_coop_per_task']):+.2f} "
            f"vs CoOp per task, {sum(d > 0 for d in r['minus_coop_per_task'])}/{len(tables)} wins)"
            for by, r in report[str(k)].items()))
    return report


def bundled(a) -> dict:
    combine, methods, options = BUNDLED_VARIANTS[a.variant]
    clip, feats, pool, dev = load_bundled(a.work)
    res = run_protocol(clip, feats.tasks, pool, dev, shots=a.shots, seeds=a.seeds, methods=methods, n_ctx=4,
                       combine=combine, train_config=RECIPES[a.recipe],
                       affinity_config=affinity_config(a, a.affinity_steps), on_run=draw_printer(show_tree=True),
                       **options)
    say(res.summary_markdown().replace("test accuracy", "DEV accuracy"))
    out = res.to_dict()
    if options.get("select"):
        out["select_criteria"] = selection_report(res)
    return out


def draw_printer(show_tree: bool = False):
    """run_protocol's on_run: one line per draw (each method's mean, the tree, the elapsed time)."""
    t0 = time.time()

    def on_run(k, s, table):
        tree = f"  tree {table.tree}" if show_tree else ""
        say(f"  {k} shots, seed {s}: " + ", ".join(f"{m} {100 * r.mean:.1f}" for m, r in table.results.items())
            + f"{tree}  [{time.time() - t0:.0f} s]")

    return on_run


def affinity_config(a, steps: int) -> dict:
    """The affinity options of a run: `steps` optimiser steps, and --levels
    (None = the automatic tree rule) for the tree."""
    return {"steps": steps} if a.levels is None else {"steps": steps, "levels": a.levels}


def budget(a) -> dict:
    """Every trained method on the bundled dev split at lr a.lr and a.scale x
    (50 epochs, min_steps 200)."""
    clip, feats, pool, dev = load_bundled(a.work)
    batch = "full" if a.full_batch else 32
    config = TrainConfig(epochs=int(50 * a.scale), min_steps=int(a.min_steps * a.scale), lr=a.lr,
                         optimizer=a.optimizer, batch_size=batch, weight_decay=a.weight_decay)
    res = run_protocol(clip, feats.tasks, pool, dev, shots=a.shots, seeds=a.seeds, methods=a.methods, n_ctx=4,
                       train_config=config, affinity_config=affinity_config(a, 30), on_run=draw_printer(),
                       select_by=a.select_by)
    say(res.summary_markdown().replace("test accuracy", "DEV accuracy"))
    return {"lr": a.lr, "weight_decay": a.weight_decay, "scale": a.scale, "optimizer": a.optimizer, "batch_size": batch,
            "min_steps": int(a.min_steps * a.scale), **res.to_dict()}


def planted(a) -> dict:
    clip = planted_clip()
    if a.budget == "adamw-full":
        train = dataclasses.replace(RECIPES["adamw-full"], min_steps=a.min_steps)
    elif a.budget == "lbfgs":
        train = TrainConfig(optimizer="lbfgs", batch_size="full", epochs=50, min_steps=a.min_steps)
    else:
        train = dataclasses.replace(RECIPES["coop-sgd"], min_steps=0 if a.budget == "ablation" else 200)
    out = {}
    for conflict, shots in [(False, 1), (False, 2), (False, 4), (True, 2)]:
        for seed in a.seeds:
            p = make_planted_problem(clip, shots=shots, seed=seed, conflict=conflict)
            tree = tree_from_affinity(task_affinity(clip, p.tasks, p.train), list(p.tasks))
            baselines = ["coop-per-task", "coop-shared", COOP_BEST_OF]  # the control: best of 3 CoOp (session 13)
            t = compare(clip, p.tasks, p.train, p.test, val=p.val, methods=baselines,
                        seeds=(seed,), n_ctx=4, combine="mean", train_config=train)
            row = {m: t[m].mean for m in baselines}
            for name in a.planted_variants:
                options = PLANTED_VARIANTS[name]
                # per-task selection picks among hipro, the flat two-level tree and CoOp per task
                methods = ["coop-per-task", "two-level", "hipro"] if options.get("select") else ["hipro"]
                t = compare(clip, p.tasks, p.train, p.test, val=p.val, methods=methods, seeds=(seed,), tree=tree,
                            n_ctx=4, combine="mean", train_config=train, **options)
                row[name] = t["hipro"].mean
                if options.get("select"):  # the other selection criteria, from the same runs
                    for by, (acc,) in selection_means(t).items():
                        row[f"{name}[{by}]"] = acc
            out[f"conflict={conflict} shots={shots} seed={seed}"] = row
            print(conflict, shots, seed, {k: round(100 * v, 1) for k, v in row.items()}, flush=True)
    for k in next(iter(out.values())):
        print(f"{k}: {100 * np.mean([r[k] for r in out.values()]):.2f}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("benchmark", choices=["bundled", "planted", "budget"])
    ap.add_argument("--variant", choices=list(BUNDLED_VARIANTS), default="base")
    ap.add_argument("--budget", choices=["ablation", "default", "adamw-full", "lbfgs"], default="default",
                    help="planted: SGD at batch 32 with min_steps 0 (ablation) or 200 (default, the session-3 "
                         "default), or AdamW / L-BFGS on the full batch with --min-steps steps")
    ap.add_argument("--planted-variants", type=lambda s: s.split(","), default=["uniform", "pw75", "pw90"],
                    help=f"planted: comma list of {list(PLANTED_VARIANTS)}")
    ap.add_argument("--shots", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--recipe", choices=list(RECIPES), default="coop-sgd", help="bundled: the training recipe")
    ap.add_argument("--affinity-steps", type=int, default=100, help="bundled: affinity optimiser steps")
    ap.add_argument("--lr", type=float, default=0.002, help="budget: learning rate")
    ap.add_argument("--weight-decay", type=float, default=5e-4, help="budget: weight decay")
    ap.add_argument("--scale", type=float, default=1.0, help="budget: multiple of the budget (epochs 50, --min-steps)")
    ap.add_argument("--min-steps", type=int, default=200, help="budget: optimiser steps at scale 1")
    ap.add_argument("--optimizer", choices=["sgd", "adamw", "lbfgs"], default="sgd", help="budget: the optimiser")
    ap.add_argument("--full-batch", action="store_true", help="budget: every training sample in every step")
    ap.add_argument("--methods", type=lambda s: s.split(","), default=["coop-per-task", "coop-shared", "two-level", "hipro"],
                    help="budget: the methods run")
    ap.add_argument("--select-by", choices=list(SELECT_CRITERIA), default=DEFAULT_SELECT_BY,
                    help="budget: HiPro's per-task selection criterion (the budget tables before session 7's "
                         "switch used accuracy)")
    ap.add_argument("--levels", type=int, default=None,
                    help="tree levels below the root for hipro's affinity tree (default: the automatic rule)")
    ap.add_argument("--work", default=os.environ.get("HIPRO_ABLATION_DIR", "/tmp/hipro-ablation"),
                    help="where the bundled images and feature cache go")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(a.threads)
    if dist_group.launched():
        if a.benchmark == "planted":
            raise SystemExit("planted runs in one process (its problems are not protocol draws)")
        dist_group.init_from_env("cpu")
    try:
        result = {"bundled": bundled, "planted": planted, "budget": budget}[a.benchmark](a)
        if a.json and dist_group.is_main():
            Path(a.json).write_text(json.dumps(result, indent=1))
    finally:
        dist_group.shutdown()


if __name__ == "__main__":
    main()
