"""The class-sharded training-step benchmark (hipro_fast.bench.distributed) on
the tiny tower in 1 and 2 processes: what its table is made from adds up.
Correctness only, never timings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench(*argv: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hipro_fast.bench.distributed", *argv, "--out", str(out)],
                          capture_output=True, text=True, timeout=240, cwd=REPO,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})


def test_one_and_two_processes_shard_the_classes_and_measure_the_training_peak(tmp_path):
    proc = _bench("--model", "tiny", "--tasks", "2", "--classes", "5", "--nproc", "1,2", "--steps", "2",
                  out=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    meta = json.loads((tmp_path / "distributed_step.json").read_text())
    one, two = meta["runs"]["1"], meta["runs"]["2"]
    assert [r["classes"] for r in one] == [10] and sorted(r["classes"] for r in two) == [5, 5]
    assert sum(r["tokens"] for r in two) > one[0]["tokens"]  # each rank's forest repeats the shared contexts
    for r in one + two:
        assert r["peak_mb"] >= r["before_fit_mb"] > 0, r
        assert len(r["step_s"]) == 2 and r["median_step_s"] > 0
    assert (tmp_path / "distributed_step.md").read_text().count("\n| ") >= 3
    assert not list(tmp_path.glob(".*"))  # no per-launch leftovers


@pytest.mark.parametrize("argv, says", [(["--tasks", "1"], "--tasks must be >= 2"),
                                        (["--nproc", "0,2"], "--nproc takes a comma list"),
                                        (["--steps", "1"], "--steps must be >= 2")])
def test_bad_arguments_are_one_line(tmp_path, argv, says):
    proc = _bench(*argv, out=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr
