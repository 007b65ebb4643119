"""How `hipro bench` reaches the benchmarks (nothing is benchmarked here): the
--device dispatch, the flags -> BenchConfig mapping, the default results
folder and `python -m hipro_fast.bench`."""
import ast
import os
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
    # nor are the partial runs' default names (test_the_default_name_says_what_ran)
    assert ignored("text_step_a_nosweep.json") and ignored("text_step_tiny.png")
    assert ignored("forest_profile_tiny_a.json") and not ignored("text_step.png")


def test_python_m_hipro_fast_bench_help():
    out = subprocess.run([sys.executable, "-m", "hipro_fast.bench", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: hipro bench") and "--out-dir" in out.stdout


@pytest.mark.parametrize("argv", [
    ["--forest-repeats", "-3"], ["--forest-repeats", "0"], ["--baseline-repeats", "0"],
    ["--baseline-budget", "-5"], ["--baseline-budget", "nan"], ["--max-graph-gb", "0"], ["--max-graph-gb", "inf"],
    ["--threads", "0"], ["--threads", "-1"], ["--seed", "-1"],
    ["--sweep-classes", "0"], ["--sweep-depths", "0,-2"], ["--sweep-depths", "1,,2"], ["--sweep-classes", "65,65"],
    ["--sweep-classes", ""],
])
def test_bad_numbers_are_usage_errors_before_anything_runs(configs, capsys, argv):
    """README: every numeric option is checked before any model is loaded. `--threads 0`
    was ignored, `--threads -1` a bare RuntimeError, `--sweep-classes 0` failed after the
    model loaded, `--sweep-depths 0,-2` ran depth 1 twice labelled 0 and -2."""
    threads = torch.get_num_threads()
    assert cli.main(["bench", *argv]) == 2
    assert f"argument {argv[0]}:" in _usage_error_line(capsys)
    assert configs == [] and torch.get_num_threads() == threads  # nothing ran, nothing was set


@pytest.mark.parametrize("argv", [["--warmup", "-1"], ["--repeats", "0"], ["--n-ctx", "0"]])
def test_bad_numbers_of_the_gpu_benchmark_are_usage_errors(monkeypatch, capsys, argv):
    def stop(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(gpu, "load_tokenizer", stop)
    monkeypatch.setattr(gpu, "load_model", stop)
    with pytest.raises(SystemExit) as e:
        gpu.main(["--device", "cpu", "--model", "tiny", *argv])
    assert e.value.code == 2
    assert f"argument {argv[0]}:" in _usage_error_line(capsys)


@pytest.mark.parametrize("tag", ["../../escaped", "sub/t", "/tmp/t", "..", ".", "", "sub\\t"])
def test_a_tag_with_a_folder_part_is_refused(configs, capsys, monkeypatch, tmp_path, tag):
    """--tag ../../escaped wrote outside --out-dir."""
    monkeypatch.setattr(cpu, "load_model", lambda *args: (_ for _ in ()).throw(_Stop()))  # --profile-only's
    for extra in ([], ["--profile-only"]):
        assert cli.main(["bench", "--out-dir", str(tmp_path), "--tag", tag, *extra]) == 2
        assert "argument --tag: expected a plain file name stem" in _usage_error_line(capsys)
    assert configs == []
    with pytest.raises(_Stop):
        cpu.main(["--out-dir", str(tmp_path), "--tag", "run.2-b"])
    assert configs[-1].json_path == str(tmp_path / "run.2-b.json")


@pytest.mark.parametrize("argv, stem", [
    ([], "text_step"),  # the record: all configurations, the default sweep, ViT-B-16
    (["--sweep-classes", "65,130,260,520", "--sweep-depths", "1,2,3,4"], "text_step"),
    (["--quick"], "text_step_quick"),
    (["--quick", "--sweep-classes", "65,130"], "text_step_quick"),
    (["--configs", "a", "--no-sweep"], "text_step_a_nosweep"),
    (["--model", "tiny"], "text_step_tiny"),
    (["--configs", "c,a"], "text_step_ac"),
    (["--configs", ""], "text_step_noconfigs"),
    (["--sweep-depths", "1,4"], "text_step_depths1-4"),
    (["--quick", "--sweep-classes", "65"], "text_step_classes65_quick"),
    (["--quick", "--configs", "a", "--model", "hf-hub:org/m"], "text_step_hf-hub-org-m_a_quick"),
    # timing options off their defaults are not the record either (they wrote text_step.json)
    (["--threads", str(len(os.sched_getaffinity(0)))], "text_step"),  # every core: the record's setting
    (["--threads", str(len(os.sched_getaffinity(0)) + 1)], f"text_step_threads{len(os.sched_getaffinity(0)) + 1}"),
    (["--baseline-budget", "0"], "text_step_custom"), (["--forest-repeats", "1"], "text_step_custom"),
    (["--no-profile"], "text_step_custom"), (["--seed", "7"], "text_step_custom"),
    (["--max-graph-gb", "1"], "text_step_custom"),
])
def test_the_default_name_says_what_ran(configs, tmp_path, argv, stem):
    """Only the full default run may rewrite the tracked text_step.{json,png}: any
    other run's default name says how it differs (`--configs a --no-sweep` and
    `--model tiny` overwrote the record)."""
    threads = torch.get_num_threads()
    try:
        with pytest.raises(_Stop):
            cpu.main(["--out-dir", str(tmp_path), *argv])
    finally:
        torch.set_num_threads(threads)  # --threads sets them process-wide
    cfg = configs[-1]
    assert (cfg.json_path, cfg.png_path) == (str(tmp_path / f"{stem}.json"), str(tmp_path / f"{stem}.png"))


def test_the_default_profile_name_says_what_ran(monkeypatch, tmp_path):
    """--profile-only's forest_profile.json is a record too."""
    monkeypatch.setattr(cpu, "profile_only", lambda tower, tok, cfg, log: {"configs_run": list(cfg.configs)})
    assert cpu.main(["--profile-only", "--model", "tiny", "--configs", "a", "--out-dir", str(tmp_path)]) == 0
    assert [p.name for p in tmp_path.iterdir()] == ["forest_profile_tiny_a.json"]
    threads, before = len(os.sched_getaffinity(0)) + 1, torch.get_num_threads()
    try:
        assert cpu.main(["--profile-only", "--model", "tiny", "--configs", "a", "--threads", str(threads),
                         "--out-dir", str(tmp_path / "t")]) == 0
    finally:
        torch.set_num_threads(before)
    assert [p.name for p in (tmp_path / "t").iterdir()] == [f"forest_profile_tiny_threads{threads}_a.json"]


def test_a_run_without_a_sweep_leaves_no_earlier_png_beside_its_json(tmp_path):
    """`--no-sweep` left the previous run's PNG under the new JSON's name; an interrupted
    run's partial JSON did the same."""
    png, js = tmp_path / "t.png", tmp_path / "t.json"
    cfg = cpu.BenchConfig(model="tiny", configs=(), sweep=False, verbose=False,
                          json_path=str(js), png_path=str(png))
    png.write_bytes(b"an earlier run's plot")
    cpu._write_partial(cfg, {"meta": {}, "configs": {}}, 0.0)
    assert js.is_file() and not png.exists()
    png.write_bytes(b"an earlier run's plot")
    result = cpu.run_bench(cfg)
    assert js.is_file() and not png.exists()
    # provenance: the command as run and the precision
    assert result["meta"]["command"] == sys.argv and result["meta"]["precision"] == "fp32"


def test_the_pytest_benchmarks_warm_up_before_timing():
    """A median over rounds with no warm-up round times the cold first step."""
    path = REPO / "benchmarks" / "test_bench_text_step.py"
    calls = [node for node in ast.walk(ast.parse(path.read_text()))
             if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "pedantic"]
    assert len(calls) == 2
    for call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        assert isinstance(kw.get("warmup_rounds"), ast.Constant) and kw["warmup_rounds"].value >= 1, \
            f"line {call.lineno}: benchmark.pedantic without a warm-up round"
