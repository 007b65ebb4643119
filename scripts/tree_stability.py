"""How stable HiPro's affinity tree is on the bundled benchmark's few-shot draws.

For shots 1, 2, 4 and seeds 0-2 (draws from the training pool minus the dev
split of scripts/ablation_hipro.py, as the ablation's draws), the transfer
affinity (--steps optimiser steps, the demo's 30 by default) and two trees:
the automatic rule (a cut kept only when it clearly separates the tasks, else
flat) and a forced one-level cut. Each is scored by the adjusted Rand index
against the benchmark's designed groups (digits, shifted digits, animals; the
two photo tasks as singletons):

    python scripts/tree_stability.py --steps 30

Results: benchmarks/results/ablation_hipro.md. One thread.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ablation_hipro import load_bundled  # noqa: E402
from hipro_fast.data.synth import adjusted_rand_index  # noqa: E402
from hipro_fast.method.affinity import task_affinity  # noqa: E402
from hipro_fast.method.grouping import nested_from_affinity  # noqa: E402
from hipro_fast.method.protocol import draw_few_shot  # noqa: E402

DESIGNED_GROUPS = {"mnist_digits": 0, "small_digits": 0, "mnist_shifted": 1, "small_digits_shifted": 1,
                   "animals_wild": 2, "animals_farm": 2, "textile_defects": 3, "face_detection": 4}


def group_labels(spec, names) -> list[int]:
    """Top-level group index of each task in a nested tree spec."""
    of = {}
    for i, g in enumerate(spec):
        for t in (g if isinstance(g, list) else [g]):
            of[t] = i
    return [of[t] for t in names]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--work", default=os.environ.get("HIPRO_ABLATION_DIR", "/tmp/hipro-ablation"))
    a = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    clip, feats, pool, _ = load_bundled(a.work)
    names = list(feats.tasks)
    truth = [DESIGNED_GROUPS[t] for t in names]
    print("| shots | seed | automatic rule | ARI | forced one-level cut | ARI |\n|---:|---:|---|---:|---|---:|")
    for k in (1, 2, 4):
        for s in (0, 1, 2):
            m = task_affinity(clip, feats.tasks, draw_few_shot(feats.tasks, pool, k, s).train, steps=a.steps)
            auto, forced = nested_from_affinity(m, names), nested_from_affinity(m, names, levels=1)
            flat = all(isinstance(x, str) for x in auto)
            print(f"| {k} | {s} | {'flat' if flat else '`' + json.dumps(auto) + '`'} | "
                  f"{adjusted_rand_index(group_labels(auto, names), truth):.2f} | `{json.dumps(forced)}` | "
                  f"{adjusted_rand_index(group_labels(forced, names), truth):.2f} |", flush=True)


if __name__ == "__main__":
    main()
