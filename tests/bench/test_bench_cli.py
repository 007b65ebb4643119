"""How `hipro bench` reaches the benchmarks (nothing is benchmarked here): the
--device dispatch, the flags -> BenchConfig mapping, the default results
folder and `python -m hipro_fast.bench`."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hipro_fast import cli
from hipro_fast.bench import cpu, gpu
from hipro_fast.bench.output import default_out_dir

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def calls(monkeypatch):
    """Replaces both benchmarks' main with recorders: [(which, argv)]."""
    seen = []
    monkeypatch.setattr(cpu, "main", lambda argv: seen.append(("cpu", list(argv))) or 0)
    monkeypatch.setattr(gpu, "main", lambda argv: seen.append(("gpu", list(argv))) or 0)
    return seen


def test_an_unknown_device_is_refused_not_run_on_the_cpu(capsys):
    assert cli.main(["bench", "--device", "mps", "--quick"]) == 1
    assert "--device mps: hipro bench runs on cpu or cuda[:N]" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_benchmark_without_cuda_is_one_line(capsys):
    assert cli.main(["bench", "--device", "cuda", "--problems", "a"]) == 1
    err = capsys.readouterr().err
    assert err.strip() == "hipro: error: --device cuda: CUDA is not available on this machine", err


@pytest.mark.parametrize("argv, expected", [
    (["--quick"], ("cpu", ["--quick"])),
    (["--device", "cpu", "--quick"], ("cpu", ["--quick"])),
    (["--quick", "--device=cpu"], ("cpu", ["--quick"])),
    (["--device", "cuda", "--repeats", "2"], ("gpu", ["--device", "cuda", "--repeats", "2"])),
    (["--device=cuda:1"], ("gpu", ["--device=cuda:1"])),
])
def test_device_dispatch(calls, argv, expected):
    assert cli.main(["bench", *argv]) == 0
    assert calls == [expected]


def test_device_cpu_help_is_the_cpu_benchmark(capsys):
    assert cli.main(["bench", "--device", "cpu", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--profile-only" in out and "--precisions" not in out
    assert cli.main(["bench", "--device", "cuda", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--precisions" in out and "--profile-only" not in out


def _usage_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("hipro: error: "), err  # no usage block above it
    assert err.rstrip().endswith("(see hipro bench --help)"), err
    return err


def test_bad_flags_are_one_line_usage_errors(capsys):
    assert cli.main(["bench", "--configs", "a,z"]) == 2
    assert "unknown configuration(s) z" in _usage_error_line(capsys)
    assert cli.main(["bench", "--sweep-classes", "65,many"]) == 2
    assert "--sweep-classes" in _usage_error_line(capsys)
    assert cli.main(["bench", "--device", "cuda", "--precisions", "fp8"]) == 2
    assert "--precisions: unknown fp8" in _usage_error_line(capsys)
    for argv in (["--bogus"], ["--device", "cuda", "--bogus"], ["--forest-repeats", "x"]):
        assert cli.main(["bench", *argv]) == 2
        assert "--bogus" in _usage_error_line(capsys) or argv[0] == "--forest-repeats"


class _Stop(Exception):
    pass


@pytest.fixture
def configs(monkeypatch):
    """cpu.run_bench replaced by a recorder that stops before anything runs."""
    seen = []

    def record(cfg):
        seen.append(cfg)
        raise _Stop

    monkeypatch.setattr(cpu, "run_bench", record)
    return seen


def test_default_results_folder_is_the_checkouts(configs):
    assert default_out_dir() == REPO / "benchmarks" / "results"
    with pytest.raises(_Stop):
        cpu.main(["--quick"])
    cfg = configs[-1]
    assert cfg.json_path == str(REPO / "benchmarks" / "results" / "text_step_quick.json")
    assert cfg.png_path == str(REPO / "benchmarks" / "results" / "text_step_quick.png")


def test_flags_reach_the_config(configs, tmp_path):
    with pytest.raises(_Stop):
        cpu.main(["--out-dir", str(tmp_path), "--tag", "t", "--configs", "b", "--no-sweep", "--model", "tiny",
                  "--forest-repeats", "4", "--baseline-repeats", "2", "--baseline-budget", "9",
                  "--max-graph-gb", "1.5", "--no-profile", "--seed", "3", "--sweep-depths", "1,4"])
    cfg = configs[-1]
    assert (cfg.json_path, cfg.png_path) == (str(tmp_path / "t.json"), str(tmp_path / "t.png"))
    assert (cfg.configs, cfg.sweep, cfg.model, cfg.quick) == (["b"], False, "tiny", False)
    assert (cfg.forest_repeats, cfg.baseline_repeats, cfg.baseline_budget_s) == (4, 2, 9.0)
    assert (cfg.max_graph_gb, cfg.profile, cfg.seed, list(cfg.sweep_depths)) == (1.5, False, 3, [1, 4])
    with pytest.raises(_Stop):
        cpu.main(["--quick"])
    assert list(configs[-1].sweep_classes) == [65, 130]  # --quick shortens the classes sweep
    assert configs[-1].profile is False


def test_quick_results_do_not_show_in_git_status():
    """Full runs rewrite the tracked records in benchmarks/results; quick runs are
    not records and are ignored there."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    def ignored(name):
        rc = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", f"benchmarks/results/{name}"]).returncode
        assert rc in (0, 1), f"git check-ignore failed on {name}"
        return rc == 0

    assert ignored("text_step_quick.json") and ignored("text_step_quick.png")
    assert not ignored("text_step.json") and not ignored("forest_profile.json")


def test_python_m_hipro_fast_bench_help():
    out = subprocess.run([sys.executable, "-m", "hipro_fast.bench", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: hipro bench") and "--out-dir" in out.stdout
