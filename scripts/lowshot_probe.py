"""Low-shot probe on the bundled DEV split (the dev split of
scripts/ablation_hipro.py; the test split is never read): train a set of
variants on each (shots, seed) draw and keep their per-image logits on the
validation and the dev split, so that single models, per-task selection and
ensembles can be compared offline on the same trained runs (paired). One file
per (draw, variant); a finished file is not trained again.

    python scripts/lowshot_probe.py train --shots 1 --seeds 0,2,4,6,8,10 --out DIR &   # one process per core
    python scripts/lowshot_probe.py train --shots 1 --seeds 1,3,5,7,9,11 --out DIR
    python scripts/lowshot_probe.py train --shots 2,4 --seeds 0,2,4,6 --variants coop,coop_b,coop_c,two,hipro --out DIR &
    python scripts/lowshot_probe.py train --shots 2,4 --seeds 1,3,5,7 --variants coop,coop_b,coop_c,two,hipro --out DIR
    python scripts/lowshot_probe.py rules --out DIR --json benchmarks/results/lowshot_probe_dev.json

Session 13's numbers: benchmarks/results/ablation_hipro.md, "Session 13".
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from scipy.special import log_softmax, softmax

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # hipro_fast
sys.path.insert(0, str(Path(__file__).resolve().parent))  # ablation_hipro, for its dev split
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ablation_hipro import load_bundled  # noqa: E402
from hipro_fast.method.affinity import task_affinity  # noqa: E402
from hipro_fast.method.baselines import build_method, choose_per_task  # noqa: E402
from hipro_fast.method.tree import TaskTree  # noqa: E402
from hipro_fast.method.protocol import draw_few_shot  # noqa: E402
from hipro_fast.method.training import TrainConfig, fit  # noqa: E402

# name -> (method, seed offset, hipro options); "levels" picks the tree (None: the automatic rule)
VARIANTS = {
    "coop": ("coop-per-task", 0, {}),
    "coop_b": ("coop-per-task", 1000, {}),
    "coop_c": ("coop-per-task", 2000, {}),
    "two": ("two-level", 0, {}),
    "hipro": ("hipro", 0, {}),
    "hipro_b": ("hipro", 1000, {}),
    "hipro_l1": ("hipro", 0, {"levels": 1}),  # on the affinity's forced one-level cut
    "hipro_l1_pw50": ("hipro", 0, {"levels": 1, "leaf_weight": 0.5}),
    "hipro_l1_pw90": ("hipro", 0, {"levels": 1, "leaf_weight": 0.9}),
    "hipro_l1_uniform": ("hipro", 0, {"levels": 1, "path_weights": "uniform"}),
    "hipro_l1_prior": ("hipro", 0, {"levels": 1, "parent_prior": 1.0}),
    "hipro_pw50": ("hipro", 0, {"leaf_weight": 0.5}),
    "hipro_leaf2": ("hipro", 0, {"leaf_ctx": 2}),  # 2 context tokens per leaf, 4 per shared node
    "hipro_l1_leaf2": ("hipro", 0, {"levels": 1, "leaf_ctx": 2}),
    "coop2": ("coop-per-task", 0, {"n_ctx": 2}),  # CoOp per task with 2 context tokens
    "hipro_shared8": ("hipro", 0, {"n_ctx": 8, "leaf_ctx": 4}),  # 8 tokens per shared node, 4 per leaf
    "hipro_l1_shared8": ("hipro", 0, {"levels": 1, "n_ctx": 8, "leaf_ctx": 4}),
}


@torch.no_grad()
def logits_of(model, data) -> dict[str, np.ndarray]:
    model.eval()
    feats = model.text_features()
    return {t: model.logits(t, x, feats).float().numpy() for t, (x, _) in data.items()}


def train(a) -> None:
    clip, feats, pool, dev = load_bundled(a.work)
    tasks = feats.tasks
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    for k, s in itertools.product(a.shots, a.seeds):
        t0 = time.time()
        d = draw_few_shot(tasks, pool, k, s)
        affinity = task_affinity(clip, tasks, d.train, steps=30)
        trees = {None: TaskTree.from_affinity(affinity, list(tasks)),
                 1: TaskTree.from_affinity(affinity, list(tasks), levels=1)}
        for name in a.variants:
            path = out / f"shots{k}_seed{s}_{name}.npz"
            if path.exists():
                continue
            method, offset, options = VARIANTS[name]
            options = dict(options)
            tree = trees[options.pop("levels", None)]
            arrays = {"tree": np.array(json.dumps(tree.to_nested()))}
            for t in tasks:
                arrays[f"label/val/{t}"] = d.val[t][1].numpy()
                arrays[f"label/dev/{t}"] = dev[t][1].numpy()
            n_ctx = options.pop("n_ctx", 4)
            if "leaf_ctx" in options:  # per node: the leaves get leaf_ctx tokens, the shared nodes n_ctx
                leaf_ctx = options.pop("leaf_ctx")
                n_ctx = {node: leaf_ctx if tree.nodes[node].task is not None else n_ctx for node in tree.nodes}
            model = build_method(method, clip, tasks, tree, n_ctx=n_ctx, seed=s + offset, **options)
            fit(model, d.train, d.val, TrainConfig(), seed=s + offset)
            for split, data in (("val", d.val), ("dev", dev)):
                for t, z in logits_of(model, data).items():
                    arrays[f"{name}/{split}/{t}"] = z
            tmp = path.with_suffix(".tmp.npz")
            np.savez_compressed(tmp, **arrays)
            os.replace(tmp, path)
        print(f"{k} shots seed {s}: {time.time() - t0:.0f} s  trees {trees[None].to_nested()} / "
              f"{trees[1].to_nested()}", flush=True)


# rule name -> (kind, variants): "alone" scores one model; "select" takes, task by
# task, the variant of lowest validation cross-entropy (ties to the earlier one,
# as compare's per-task selection); "ensemble" averages the variants' class
# probabilities.
RULES = {
    **{v: ("alone", [v]) for v in VARIANTS},
    "select(hipro,two,coop): the protocol's hipro": ("select", ["hipro", "two", "coop"]),
    "select(coop,coop_b,coop_c): best of 3 CoOp": ("select", ["coop", "coop_b", "coop_c"]),
    "select(hipro,coop)": ("select", ["hipro", "coop"]),
    "select(coop,coop_b)": ("select", ["coop", "coop_b"]),
    "select(hipro_l1,two,coop)": ("select", ["hipro_l1", "two", "coop"]),
    "select(hipro_leaf2,two,coop)": ("select", ["hipro_leaf2", "two", "coop"]),
    "ensemble(hipro,two,coop)": ("ensemble", ["hipro", "two", "coop"]),
    "ensemble(hipro,coop)": ("ensemble", ["hipro", "coop"]),
    "ensemble(coop,coop_b)": ("ensemble", ["coop", "coop_b"]),
}


def load_draws(out: Path) -> dict[tuple[int, int], dict[str, np.ndarray]]:
    """(shots, seed) -> every array its variant files hold."""
    draws: dict[tuple[int, int], dict[str, np.ndarray]] = {}
    for f in sorted(out.glob("shots*_seed*_*.npz")):
        k, s = (int(x) for x in re.match(r"shots(\d+)_seed(\d+)_", f.name).groups())
        with np.load(f) as z:
            draws.setdefault((k, s), {}).update({name: z[name] for name in z.files})
    return draws


def rule_score(arrays: dict[str, np.ndarray], kind: str, variants: list[str]) -> float | None:
    """Mean dev accuracy over the tasks of one draw under one rule (None: a variant is missing)."""
    tasks = sorted(k.split("/")[2] for k in arrays if k.startswith("label/dev/"))
    if any(f"{v}/dev/{tasks[0]}" not in arrays for v in variants):
        return None
    chosen = {t: variants[0] for t in tasks}  # "alone"
    if kind == "select":  # the protocol's own rule (choose_per_task), on each task's validation cross-entropy
        scores = {v: {"val": dict.fromkeys(tasks, 0.0), "val_loss": {t: _val_loss(arrays, v, t) for t in tasks}}
                  for v in variants}  # choose_per_task reads the task list from "val"
        chosen = choose_per_task(scores, "loss")
    accs = []
    for t in tasks:
        if kind == "ensemble":
            p = sum(softmax(arrays[f"{v}/dev/{t}"], axis=1) for v in variants)
        else:
            p = arrays[f"{chosen[t]}/dev/{t}"]
        accs.append(float((p.argmax(1) == arrays[f"label/dev/{t}"]).mean()))
    return float(np.mean(accs))


def _val_loss(arrays: dict[str, np.ndarray], variant: str, task: str) -> float:
    """Mean cross-entropy of `variant` on `task`'s validation images."""
    lp, y = log_softmax(arrays[f"{variant}/val/{task}"], axis=1), arrays[f"label/val/{task}"]
    return float(-lp[np.arange(len(y)), y].mean())


def rules(a) -> None:
    draws = load_draws(Path(a.out))
    report = {}
    for k in sorted({k for k, _ in draws}):
        seeds = sorted(s for kk, s in draws if kk == k)
        print(f"\n{k} shot{'s' if k > 1 else ''}, seeds {seeds} (dev accuracy %, mean ± std over seeds; "
              "minus coop: paired, mean ± std, draws won)")
        print("| rule | dev accuracy | minus coop, paired |\n|---|---:|---:|")
        report[str(k)] = {}
        coop = np.array([rule_score(draws[(k, s)], "alone", ["coop"]) for s in seeds])
        for name, (kind, variants) in RULES.items():
            scores = [rule_score(draws[(k, s)], kind, variants) for s in seeds]
            if any(x is None for x in scores):
                continue
            acc, diff = np.array(scores), np.array(scores) - coop
            report[str(k)][name] = {"seeds": seeds, "seed_means": acc.tolist()}
            print(f"| {name} | {100 * acc.mean():.2f} ± {100 * acc.std(ddof=1):.2f} | "
                  f"{100 * diff.mean():+.2f} ± {100 * diff.std(ddof=1):.2f} ({int((diff > 0).sum())}/{len(seeds)}) |")
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("mode", choices=["train", "rules"])
    ap.add_argument("--shots", type=lambda s: [int(x) for x in s.split(",")], default=[1])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    ap.add_argument("--work", default=os.environ.get("HIPRO_ABLATION_DIR", "/tmp/hipro-ablation"))
    ap.add_argument("--out", required=True, help="the folder of the per-draw logits")
    ap.add_argument("--json", default=None, help="rules: write the per-seed scores here")
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    {"train": train, "rules": rules}[a.mode](a)


if __name__ == "__main__":
    main()
