#!/usr/bin/env python
"""`hipro train --select per-task` on the bundled benchmark, through the CLI as a
user runs it, over shots x seeds; each candidate's checkpoint is also evaluated
alone (`hipro eval --checkpoint <run>/checkpoints/<candidate>`), so the table
shows the product's model beside HiPro's tree alone (which is what `hipro train`
without --select trains: the HiPro candidate is that model) and CoOp per task.
Test accuracy is only reported, never chosen on: the choice is made on the
spec's val split inside `hipro train`.

    python scripts/train_select_bundled.py --spec <bundled>/tasks.toml --shots 1,4,16 --seeds 0,1,2 \\
        --work /tmp/tsb --out benchmarks/results/train_select_bundled.json

(export the bundled benchmark first: python -c "from pathlib import Path;
from hipro_fast.app import pipeline; pipeline.export_bundled(Path('<bundled>'))")
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

CANDIDATES = ("hipro", "two-level", "coop-per-task")
ROWS = {"selected": "hipro train --select per-task", "hipro": "HiPro's tree alone (hipro train)",
        "two-level": "two-level", "coop-per-task": "CoOp per task"}


def hipro(*argv: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "hipro_fast.cli", *argv, "--no-progress"], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"hipro {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")


def mean_acc(path: Path) -> float:
    acc = json.loads(path.read_text())
    return 100 * sum(acc.values()) / len(acc)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spec", required=True)
    ap.add_argument("--shots", default="1,4,16")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--n-ctx", default="4")
    ap.add_argument("--affinity-steps", default="30")
    ap.add_argument("--work", required=True, help="folder for the runs and the feature cache")
    ap.add_argument("--out", required=True, help="JSON to write")
    a = ap.parse_args()
    work = Path(a.work)
    common = ["--spec", a.spec, "--cache-dir", str(work / "cache")]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for shots in a.shots.split(","):
        for seed in a.seeds.split(","):
            run = work / f"shots{shots}-seed{seed}"
            if not (run / "test_accuracy.json").exists():
                hipro("train", *common, "--shots", shots, "--seed", seed, "--n-ctx", a.n_ctx,
                      "--affinity-steps", a.affinity_steps, "--select", "per-task", "--run-dir", str(run),
                      "--overwrite")
            cell = {"selected": mean_acc(run / "test_accuracy.json")}
            for cand in CANDIDATES:
                ev = work / f"eval-shots{shots}-seed{seed}-{cand}"
                if not (ev / "test_accuracy.json").exists():
                    hipro("eval", *common, "--shots", shots, "--seed", seed, "--checkpoint",
                          str(run / "checkpoints" / cand), "--run-dir", str(ev), "--overwrite")
                cell[cand] = mean_acc(ev / "test_accuracy.json")
            cell["choices"] = json.loads((run / "checkpoints" / "selection.json").read_text())["choices"]
            results.setdefault(shots, {})[seed] = cell
            print(f"shots {shots} seed {seed}: " + ", ".join(f"{k} {v:.2f}" for k, v in cell.items()
                                                                 if k != "choices"), flush=True)
    summary = {}
    for shots, by_seed in results.items():
        row = {}
        for key in ROWS:
            vals = [c[key] for c in by_seed.values()]
            row[key] = {"mean": statistics.mean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None}
        for base in ("hipro", "coop-per-task"):
            diffs = [c["selected"] - c[base] for c in by_seed.values()]
            row[f"selected - {base}"] = {"mean": statistics.mean(diffs),
                                         "std": statistics.stdev(diffs) if len(diffs) > 1 else None,
                                         "wins": sum(d > 0 for d in diffs), "n": len(diffs)}
        summary[shots] = row
    out = {"command": " ".join(sys.argv), "rows": ROWS, "runs": results, "summary": summary}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    head = "| model | " + " | ".join(f"{s} shots" for s in summary) + " |"
    lines = [head, "|---|" + "---:|" * len(summary)]
    for key, label in ROWS.items():
        lines.append(f"| {label} | " + " | ".join(
            f"{summary[s][key]['mean']:.2f} ± {summary[s][key]['std']:.2f}" for s in summary) + " |")
    for base in ("hipro", "coop-per-task"):
        lines.append(f"| selected − {ROWS[base]}, paired | " + " | ".join(
            f"{summary[s][f'selected - {base}']['mean']:+.2f} ({summary[s][f'selected - {base}']['wins']}/"
            f"{summary[s][f'selected - {base}']['n']})" for s in summary) + " |")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
