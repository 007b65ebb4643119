#!/usr/bin/env python
"""Ablations on the planted-hierarchy benchmark (hipro_fast.data.synth).

Prints markdown tables:
  1. how often each affinity estimator (+ the automatic tree rule) recovers
     the planted groups (adjusted Rand index 1.0 at the top level);
  2. test accuracy of the baselines and of HiPro with the affinity tree, per
     combine mode (concat / mean) and tree depth (flat two-level, 1 or 2
     internal levels), at 1/2/4 shots, with and without conflicting groups.

    PYTHONPATH=. .venv/bin/python scripts/ablation_planted.py                    # n_ctx 4, ~10 min
    PYTHONPATH=. .venv/bin/python scripts/ablation_planted.py --n-ctx 16 --skip-recovery

Their output, with a summary of the defaults it supports, is
benchmarks/results/ablation_planted.md.

Everything runs on a tiny random CLIP text tower (hipro_fast.data.synth.planted_clip)
on CPU; --seeds / --shots / --epochs trade time for precision.
"""
from __future__ import annotations

import argparse
import inspect
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hipro_fast.method.affinity import task_affinity  # noqa: E402
from hipro_fast.method.baselines import build_method  # noqa: E402
from hipro_fast.data.synth import group_ari, make_planted_problem, planted_clip  # noqa: E402
from hipro_fast.method.training import TrainConfig, evaluate, fit  # noqa: E402
from hipro_fast.method.tree import TaskTree, tree_from_affinity  # noqa: E402

ESTIMATORS = {
    "transfer (loss, z-score) [default]": ("transfer", {}),
    "transfer (loss, vs own)": ("transfer", {"normalize": "own"}),
    "transfer (accuracy, z-score)": ("transfer", {"score": "accuracy"}),
    "gradcos": ("gradcos", {}),
    "gradcos (z-score)": ("gradcos", {"normalize": "zscore"}),
    "lookahead (TAG)": ("lookahead", {}),
    "lookahead (TAG, z-score)": ("lookahead", {"normalize": "zscore"}),
}


def wrong_tree(problem) -> TaskTree:
    """A tree of the planted shape whose groups mix planted groups (the k-th task of
    group g goes with the k-th task of group g + k): the control for "any grouping helps"."""
    groups = list(problem.groups.values())
    n = len(groups)
    size = len(groups[0])
    mixed = [[groups[(g + k) % n][k] for k in range(size)] for g in range(n)]
    return TaskTree.from_nested(mixed)


def mean_acc(model, data) -> float:
    acc = evaluate(model, data)
    return float(np.mean(list(acc.values())))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="problem seeds 0..N-1 (training seed = problem seed)")
    ap.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--n-ctx", type=int, default=4, help="context tokens per tree node (every method)")
    ap.add_argument("--skip-recovery", action="store_true", help="only the transfer affinity (for the trees)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None, help="also write the per-seed numbers here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    clip = planted_clip()
    # CoOp's optimiser settings, pinned (the same as tests/test_planted.py).
    train = TrainConfig(optimizer="sgd", epochs=args.epochs, lr=0.002, momentum=0.9, weight_decay=5e-4, warmup_epochs=1,
                        warmup_lr=1e-5, batch_size=32, min_steps=0)  # the budget its recorded results used
    seeds = list(range(args.seeds))
    settings = [(c, s) for c in (False, True) for s in args.shots]

    recovered = {name: {} for name in ESTIMATORS}
    acc: dict[tuple, dict[str, list[float]]] = {}
    for conflict, shots in settings:
        acc[(conflict, shots)] = {}
        for seed in seeds:
            P = make_planted_problem(clip, shots=shots, seed=seed, conflict=conflict)
            names = list(P.tasks)
            trees = {}
            estimators = {k: v for k, v in ESTIMATORS.items() if not args.skip_recovery or "[default]" in k}
            for est, (method, kw) in estimators.items():
                A = task_affinity(clip, P.tasks, P.train, method=method, **kw)
                tree = tree_from_affinity(A, names)
                recovered[est].setdefault((conflict, shots), []).append(group_ari(tree, P) > 1 - 1e-9)
                if method == "transfer" and not kw:
                    trees["auto"] = tree
                    trees["L1"] = tree_from_affinity(A, names, levels=1)
                    trees["L2"] = tree_from_affinity(A, names, levels=2)

            def run(key, method, tree=None, combine="concat"):
                model = build_method(method, clip, P.tasks, tree, args.n_ctx, combine, seed=seed)
                if method != "zero-shot":
                    fit(model, P.train, config=train, seed=seed)
                acc[(conflict, shots)].setdefault(key, []).append(mean_acc(model, P.test))

            run("zero-shot", "zero-shot")
            run("CoOp per task", "coop-per-task")
            run("CoOp shared", "coop-shared")
            for combine in ("concat", "mean"):
                run(f"two-level (flat tree), {combine}", "two-level", combine=combine)
                run(f"HiPro, affinity tree 1 level, {combine}", "hipro", trees["L1"], combine)
                run(f"HiPro, affinity tree 2 levels, {combine}", "hipro", trees["L2"], combine)
                run(f"HiPro, planted tree, {combine}", "hipro", P.tree_spec, combine)
                run(f"HiPro, wrong tree (planted shape, mixed groups), {combine}", "hipro", wrong_tree(P), combine)
            print(f"<!-- conflict={conflict} shots={shots} seed={seed} done at "
                  f"{time.perf_counter() - t_start:.0f}s -->", file=sys.stderr, flush=True)

    n = len(seeds)
    head = [f"{'conflict' if c else 'plain'} {s}-shot" for c, s in settings]
    print(f"## Planted-hierarchy ablation (n_ctx {args.n_ctx})\n")
    defaults = {k: v.default for k, v in inspect.signature(make_planted_problem).parameters.items()}
    print("Tiny random CLIP text tower (hipro_fast.data.synth.planted_clip: width 64, 2 layers, embed 24, "
          f"logit scale 100); make_planted_problem defaults: {defaults['n_groups']} groups x "
          f"{defaults['tasks_per_group']} tasks, {defaults['classes_per_task']} classes per task, noise "
          f"{defaults['noise']}, teacher contexts {defaults['group_ctx']} group + {defaults['task_ctx']} task "
          f"tokens; problem seeds 0..{n - 1} (training seed = problem seed); training: "
          f"hipro_fast.method.training.fit, SGD lr 0.002 momentum 0.9, {args.epochs} epochs (1 warm-up), batch 32 "
          f"per task; n_ctx {args.n_ctx} per tree node for every method. \"plain\": a group's tasks share "
          "class names, groups' names are disjoint; \"conflict\": every task has the same class names. "
          "Trees come from the default (transfer) affinity; \"planted tree\" is the true one.\n")
    if not args.skip_recovery:
        print_recovery(recovered, settings, head, n)
    print_accuracy(acc, settings, head, args.epochs)
    print_paired(acc, settings, head)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "settings": settings,
                       "recovered": {e: {f"{c}/{s}": v for (c, s), v in r.items()} for e, r in recovered.items()},
                       "acc": {f"{c}/{s}": v for (c, s), v in acc.items()}}, f, indent=1)
    print(f"\nwall time {time.perf_counter() - t_start:.0f} s on {args.threads} CPU thread(s)")
    return 0


def print_recovery(recovered, settings, head, n):
    print("### Group recovery (affinity + automatic tree rule): runs with ARI = 1.0\n")
    print("| estimator | " + " | ".join(head) + " | total |")
    print("|---|" + "---:|" * (len(head) + 1))
    for est in ESTIMATORS:
        cells = [f"{sum(recovered[est][k])}/{n}" for k in settings]
        total = sum(sum(recovered[est][k]) for k in settings)
        print(f"| {est} | " + " | ".join(cells) + f" | {total}/{n * len(settings)} |")


def print_accuracy(acc, settings, head, epochs):
    print("\n### Test accuracy (%), mean ± std over problem seeds\n")
    print("| method | " + " | ".join(head) + " | mean |")
    print("|---|" + "---:|" * (len(head) + 1))
    for key in acc[settings[0]]:
        vals = [100 * np.asarray(acc[k][key]) for k in settings]
        cells = [f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f}" for v in vals]
        print(f"| {key} | " + " | ".join(cells) + f" | {np.mean([v.mean() for v in vals]):.1f} |")


PAIRS = [
    ("HiPro, affinity tree 1 level, mean", "CoOp per task"),
    ("HiPro, affinity tree 1 level, mean", "CoOp shared"),
    ("HiPro, affinity tree 1 level, mean", "two-level (flat tree), mean"),
    ("HiPro, affinity tree 1 level, mean", "HiPro, affinity tree 1 level, concat"),
    ("HiPro, affinity tree 2 levels, mean", "HiPro, affinity tree 1 level, mean"),
    ("HiPro, planted tree, mean", "HiPro, affinity tree 1 level, mean"),
    ("HiPro, affinity tree 1 level, mean", "HiPro, wrong tree (planted shape, mixed groups), mean"),
    ("HiPro, wrong tree (planted shape, mixed groups), mean", "two-level (flat tree), mean"),
    ("two-level (flat tree), mean", "two-level (flat tree), concat"),
    ("HiPro, affinity tree 1 level, concat", "CoOp per task"),
]


def print_paired(acc, settings, head):
    print("\n### Paired differences (accuracy points, same problem and training seed): mean ± std, wins\n")
    print("| A − B | " + " | ".join(head) + " | all |")
    print("|---|" + "---:|" * (len(head) + 1))
    for a, b in PAIRS:
        if a not in acc[settings[0]] or b not in acc[settings[0]]:
            continue
        diffs = [100 * (np.asarray(acc[k][a]) - np.asarray(acc[k][b])) for k in settings]
        cells = [f"{d.mean():+.1f} ± {d.std(ddof=1) if len(d) > 1 else 0:.1f} ({(d > 0).sum()}/{len(d)})" for d in diffs]
        allv = np.concatenate(diffs)
        print(f"| {a} − {b} | " + " | ".join(cells) + f" | {allv.mean():+.1f} ({(allv > 0).sum()}/{len(allv)}) |")


if __name__ == "__main__":
    raise SystemExit(main())
