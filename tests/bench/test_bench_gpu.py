"""hipro_fast.bench.gpu on the CPU (`--device cpu`, tiny tower): the GPU
benchmark's harness runs end to end, the forest matches the naive CoOp-style
step it is timed against, and the FLOP/speedup bookkeeping is consistent; the
whole-training-step timer runs (eagerly: CUDA graphs are CUDA only); the
target list and the README table come out of a results JSON."""
import copy
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from hipro_fast.bench import gpu as bench_gpu
from hipro_fast.bench.output import README_BEGIN, README_END, STATUS_BEGIN, STATUS_END


def test_bench_gpu_harness_on_cpu(tmp_path, capsys):
    path = tmp_path / "gpu.json"
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert bench_gpu.main(["--device", "cpu", "--model", "tiny", "--problems", "a", "--precisions", "fp32",
                               "--repeats", "1", "--warmup", "0", "--n-ctx", "4", "--json", str(path),
                               "--markdown", str(tmp_path / "gpu.md")]) == 0
    finally:
        torch.set_num_threads(n)
    out = json.loads(path.read_text())
    # provenance: the command as run and when it started
    assert out["command"] == sys.argv and re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", out["time"])
    (res,) = out["results"]
    assert res["verify_naive"]["feature_max_abs_diff"] < 1e-5
    assert res["verify_naive"]["ctx_grad_rel_diff"] < 1e-4
    assert res["verify_naive"]["prompts_compared"] == res["prompts"] > 0
    methods = res["methods"]
    assert set(methods) == {"forest", "naive", "truncated"}
    forest = methods["forest"]
    for name in ("naive", "truncated"):
        e = methods[name]
        assert e["tokens"] > forest["tokens"]
        assert abs(e["speedup"] - e["time_ms"] / forest["time_ms"]) < 1e-9
        # the ideal is the token ratio, as in the CPU benchmark (it was the FLOP ratio: 21.3x vs 21.1x on (a))
        assert abs(e["ideal_speedup"] - e["tokens"] / forest["tokens"]) < 1e-9
        assert e["flop_ratio"] > 1
    assert res["gemm_gflops"] > 0
    # FlexAttention has no CPU backward: the flex row is skipped, saying why.
    assert "flex" not in methods and "FlexAttention has no CPU backward" in res["flex_skipped"]
    ts = res["train_step"]
    assert ts["eager_ms"] > 0 and ts["loss_finite"] and ts["batch_per_task"] == 32
    assert ts["optimizer"] == "AdamW"  # session 6's default, capturable on CUDA (L-BFGS is not)
    assert "forest + logits + CE + backward + AdamW, 32 images/task" in capsys.readouterr().out
    assert ts["graph_skipped"] == "CUDA graphs need a CUDA device"
    status = {(t["target"], t["where"]): t["pass"] for t in out["targets"]}
    assert status[("fp32 features within 1e-5 of naive", "a fp32")] is True
    assert status[("bf16 forest >= 50% of the same-run bf16 GEMM rate", "L bf16")] is None  # not run
    md = (tmp_path / "gpu.md").read_text()
    assert "| (a) | fp32 |" in md and "unmeasured" in md


def _result(problem, precision, forest_ms, naive_ms, ideal, flex_ms=None, frac=0.3, diff=1e-6, train=None):
    methods = {"forest": {"time_ms": forest_ms, "tokens": 10, "flops": 1, "gflops": 1.0},
               "naive": {"time_ms": naive_ms, "tokens": 100, "flops": ideal, "gflops": 1.0,
                         "speedup": naive_ms / forest_ms, "ideal_speedup": ideal}}
    if flex_ms is not None:
        methods["flex"] = {"time_ms": flex_ms, "tokens": 10, "flops": 1, "gflops": 1.0,
                           "speedup": flex_ms / forest_ms, "ideal_speedup": 1.0}
    res = {"problem": problem, "precision": precision, "methods": methods, "forest_fraction_of_gemm": frac,
           "gemm_gflops": 1e5, "verify_naive": {"feature_max_abs_diff": diff}}
    if train is not None:
        res["train_step"] = train
    return res


def test_targets_judge_each_measurement():
    results = [_result("a", "fp32", 10, 90, 10, flex_ms=12), _result("a", "bf16", 10, 70, 10, flex_ms=8,
                                                                       train={"eager_ms": 9, "graph_ms": 4.5}),
               _result("L", "fp32", 10, 200, 20, flex_ms=30, diff=2e-5),
               _result("L", "bf16", 10, 150, 20, flex_ms=11, frac=0.55)]
    got = {(t["target"], t["where"]): (t["value"], t["pass"]) for t in bench_gpu.targets(results)}
    assert got[("bf16 forest >= 50% of the same-run bf16 GEMM rate", "L bf16")] == (0.55, True)
    ratio = "forest vs naive >= 80% of the ideal ratio"
    assert got[(ratio, "a fp32")] == (pytest.approx(0.9), True)
    assert got[(ratio, "a bf16")] == (pytest.approx(0.7), False)
    assert got[(ratio, "L fp32")] == (pytest.approx(1.0), True)
    assert got[(ratio, "L bf16")] == (pytest.approx(0.75), False)
    flex = "forest faster than FlexAttention (flex ms / forest ms > 1)"
    assert got[(flex, "a fp32")][1] is True and got[(flex, "a bf16")][1] is False
    fp32 = "fp32 features within 1e-5 of naive"
    assert got[(fp32, "a fp32")][1] is True and got[(fp32, "L fp32")][1] is False
    stretch = "stretch: whole bf16 training step on (a) < 5 ms (CUDA graph if captured)"
    assert got[(stretch, "a bf16")] == (4.5, True)
    assert got[("bf16 error <= 2x the same-precision reference's error", "tests")] == (None, None)
    # Without a flex row the flex targets are unmeasured, not missed.
    no_flex = copy.deepcopy(results)
    for r in no_flex:
        del r["methods"]["flex"]
    got = {(t["target"], t["where"]): t["pass"] for t in bench_gpu.targets(no_flex)}
    assert got[(flex, "L bf16")] is None


def _render(tmp_path, record: dict, readme_text: str) -> tuple[Path, Path]:
    """Write `record` as a results JSON and `readme_text` as a README, render the
    one into the other; returns (json path, README path)."""
    js, readme = tmp_path / "r.json", tmp_path / "README.md"
    js.write_text(json.dumps(record))
    readme.write_text(readme_text)
    assert bench_gpu.main(["--render", str(js), "--readme", str(readme)]) == 0
    return js, readme


def test_render_puts_the_tables_into_the_readme(tmp_path):
    results = [_result("a", "bf16", 10, 70, 10, flex_ms=12, train={"eager_ms": 9.0, "graph_error": "boom"})]
    js, readme = _render(tmp_path, {"device": "cuda", "device_name": "NVIDIA H200", "results": results},
                         f"intro\n{README_BEGIN}\nold table\n{README_END}\nrest\n")
    text = readme.read_text()
    assert text.startswith("intro\n") and text.endswith(f"{README_END}\nrest\n") and "old table" not in text
    assert "on NVIDIA H200" in text and "| (a) | bf16 | 10.0 | 70.0 | 7.0× (10.0×) |" in text
    assert "| 12.0 | 1.20× |" in text and "9.00 / failed" in text
    assert "**missed**" in text  # (a) bf16 vs naive: 70 % of ideal
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="needs exactly one"):
        bench_gpu.main(["--render", str(js), "--readme", str(readme)])


def test_render_rewrites_the_readmes_status_sentence_too(tmp_path):
    """The sentence saying whether the targets were measured is rewritten with the
    table, so a render leaves no stale "unmeasured" claim beside measured numbers."""
    results = [_result("a", "bf16", 10, 70, 10, flex_ms=12), _result("a", "fp32", 10, 95, 10, flex_ms=12)]
    js, readme = _render(tmp_path, {"device_name": "NVIDIA H200", "time": "2026-12-02 05:00:00", "results": results},
                         f"a\n{STATUS_BEGIN}\n**unmeasured**\n{STATUS_END}\nb\n{README_BEGIN}\nold\n{README_END}\n")
    text = readme.read_text()
    assert "**unmeasured**" not in text and "old" not in text
    tg = bench_gpu.targets(results)
    counts = [sum(t["pass"] is v for t in tg) for v in (True, False, None)]
    assert counts[0] and counts[1] and counts[2]  # the sample has every kind
    assert (f"measured on NVIDIA H200 on 2026-12-02 05:00:00 (`{js}`): {counts[0]} of {len(tg)} met, "
            f"{counts[1]} missed, {counts[2]} unmeasured.") in text
    # a run cut short says so; a README without the status markers gets the table only
    js.write_text(json.dumps({"device_name": "NVIDIA H200", "results": results, "complete": False}))
    assert bench_gpu.main(["--render", str(js), "--readme", str(readme)]) == 0
    assert "The run was cut short" in readme.read_text()
    readme.write_text(f"{README_BEGIN}\nold\n{README_END}\n")
    assert bench_gpu.main(["--render", str(js), "--readme", str(readme)]) == 0
    assert "old" not in readme.read_text() and STATUS_BEGIN not in readme.read_text()
    # a broken status block is refused before the table is rewritten (no half-updated README)
    broken = f"{STATUS_BEGIN}\nx\n{README_BEGIN}\nold\n{README_END}\n"
    readme.write_text(broken)
    with pytest.raises(ValueError, match="needs exactly one"):
        bench_gpu.main(["--render", str(js), "--readme", str(readme)])
    assert readme.read_text() == broken


class _BrokenFlexTower:
    """Stands in for TextTower(attention="flex") whose compile fails (Triton)."""

    def encode_layout(self, *args, **kwargs):
        raise RuntimeError("triton compile failed (planted)")

    encode_forest = encode_layout


def test_a_failing_flex_row_is_dropped_with_its_reason_and_the_problem_still_runs():
    from hipro_fast.bench.model import load_model, load_tokenizer
    from hipro_fast.bench.problems import gpu_problems
    from hipro_fast.engine.text_tower import TextTower

    tok = load_tokenizer()
    problem = gpu_problems(tok, 4)["a"]
    tower = TextTower(load_model("tiny"))
    logged = []
    res = bench_gpu.run_problem(tower, tok, problem, torch.device("cpu"), "fp32", repeats=1, warmup=0,
                                log=logged.append, flex_tower=_BrokenFlexTower(), train_step=False)
    assert res["flex_error"] == "RuntimeError: triton compile failed (planted)"
    assert set(res["methods"]) == {"forest", "naive", "truncated"} and "flex" not in res["counts"]
    assert any("flex row dropped" in line for line in logged)
    text = bench_gpu.gpu_markdown([res], bench_gpu.targets([res]))
    assert "(a) fp32: flex row dropped: `RuntimeError: triton compile failed (planted)`" in text


def test_a_failing_problem_is_recorded_and_the_json_is_written_after_each_problem(tmp_path, monkeypatch):
    """(a) fp32 is measured, (a) bf16 raises: the JSON keeps (a) fp32, names the
    failure, and the exit status says something failed. A timeout after the
    first problem would have left the first problem's JSON (complete: false)."""
    seen_json = []
    real_run, real_write = bench_gpu.run_problem, bench_gpu.write_json

    def run_problem(tower, tok, problem, device, precision, *args, **kwargs):
        if precision == "bf16":
            raise torch.cuda.OutOfMemoryError("planted: out of memory")
        return real_run(tower, tok, problem, device, precision, *args, **kwargs)

    def write_json(path, obj):
        seen_json.append(json.loads(json.dumps(obj, default=str)))
        return real_write(path, obj)

    monkeypatch.setattr(bench_gpu, "run_problem", run_problem)
    monkeypatch.setattr(bench_gpu, "write_json", write_json)
    path = tmp_path / "gpu.json"
    assert bench_gpu.main(["--device", "cpu", "--model", "tiny", "--problems", "a", "--precisions", "fp32,bf16",
                           "--repeats", "1", "--warmup", "0", "--n-ctx", "4", "--no-train-step",
                           "--json", str(path), "--markdown", str(tmp_path / "gpu.md")]) == 1
    first = seen_json[0]
    assert first["complete"] is False and [r["precision"] for r in first["results"]] == ["fp32"]
    out = json.loads(path.read_text())
    assert out["complete"] is True and [r["precision"] for r in out["results"]] == ["fp32"]
    assert out["failed"] == [{"problem": "a", "precision": "bf16", "error": "OutOfMemoryError: planted: out of memory"}]
    assert "(a) bf16 FAILED: `OutOfMemoryError: planted: out of memory`" in (tmp_path / "gpu.md").read_text()


class _Stop(Exception):
    pass


@pytest.mark.parametrize("arg, index", [("cuda", 0), ("cuda:1", 1)])
def test_the_benchmarked_gpu_is_made_current_by_index(monkeypatch, arg, index):
    """`--device cuda` names the current GPU and `cuda:N` makes GPU N current
    (set_device needs an index; events, graphs and synchronisations without a
    device act on the current one). torch.cuda is faked up to the model load."""
    made_current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: made_current.append(torch.device(d)))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "fake")

    def stop():
        raise _Stop

    monkeypatch.setattr(bench_gpu, "load_tokenizer", stop)
    with pytest.raises(_Stop):
        bench_gpu.main(["--device", arg, "--problems", "a"])
    assert made_current == [torch.device("cuda", index)]
    from hipro_fast.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="this machine has 2 GPU"):
        bench_gpu.main(["--device", "cuda:2", "--problems", "a"])


def _tiny_problem():
    from hipro_fast.bench.model import load_model, load_tokenizer
    from hipro_fast.bench.problems import gpu_problems
    from hipro_fast.engine.text_tower import TextTower

    tok = load_tokenizer()
    return TextTower(load_model("tiny")), tok, gpu_problems(tok, 4)["a"]


def test_a_failing_training_step_or_profile_keeps_the_problems_timings(monkeypatch):
    """The whole training step and the kernel profile run after the forest's
    timings: their failure is recorded in the row, not raised (which lost the
    row's measurements with it)."""
    tower, tok, problem = _tiny_problem()

    def broken(*args, **kwargs):
        raise RuntimeError("planted: CUDA error: an illegal memory access")

    monkeypatch.setattr(bench_gpu, "time_train_step", broken)
    monkeypatch.setattr(bench_gpu, "kernel_table", broken)
    logged = []
    res = bench_gpu.run_problem(tower, tok, problem, torch.device("cpu"), "fp32", repeats=1, warmup=0,
                                log=logged.append, profile=True)
    assert set(res["methods"]) == {"forest", "naive", "truncated"} and res["gemm_gflops"] > 0
    assert res["train_step"] == {"error": "RuntimeError: planted: CUDA error: an illegal memory access"}
    assert res["profile_error"] == "RuntimeError: planted: CUDA error: an illegal memory access"
    assert any("training step failed" in line for line in logged)
    text = bench_gpu.gpu_markdown([res], bench_gpu.targets([res]))
    assert "| failed |" in text and "(a) fp32: training step FAILED: `RuntimeError: planted" in text
    assert "(a) fp32: kernel profile failed" in text
    bench_gpu.print_gpu_table([res])  # the text table prints the failure too, without a KeyError


class _InductorError(RuntimeError):
    """Stands in for an exception of torch.compile's stack."""


_InductorError.__module__ = "torch._inductor.exc"


@pytest.mark.parametrize("error, retried", [(_InductorError("triton compile failed (planted)"), False),
                                            (torch.cuda.OutOfMemoryError("planted: out of memory"), True)],
                         ids=["compile", "out-of-memory"])
def test_a_flex_peer_that_failed_to_compile_is_not_compiled_again(tmp_path, monkeypatch, error, retried):
    """A compile failure fails again on every problem: flex is off for the rest.
    Any other failure (out of memory on the big problem, one precision) is the
    row's own: the next problem tries flex again."""
    calls = []

    class Broken(_BrokenFlexTower):
        def encode_layout(self, *args, **kwargs):
            calls.append(1)
            raise error

        encode_forest = encode_layout

    monkeypatch.setattr(bench_gpu, "make_flex_tower", lambda model, device: Broken())
    path = tmp_path / "gpu.json"
    assert bench_gpu.main(["--device", "cpu", "--model", "tiny", "--problems", "a", "--precisions", "fp32,bf16",
                           "--repeats", "1", "--warmup", "0", "--n-ctx", "4", "--no-train-step",
                           "--json", str(path), "--markdown", str(tmp_path / "gpu.md")]) == 0
    first, second = json.loads(path.read_text())["results"]
    assert first["flex_error"] == f"{type(error).__name__}: {error}"
    if retried:
        assert len(calls) == 2 and "flex_skipped" not in second and second["flex_error"] == first["flex_error"]
    else:
        assert second["flex_skipped"].startswith("off after it failed on a fp32: _InductorError: triton")
        assert "flex_error" not in second and len(calls) == 1
        assert "(a) bf16: flex row off after it failed on a fp32" in (tmp_path / "gpu.md").read_text()


def test_a_nan_measurement_reads_nan_not_a_dash():
    res = _result("a", "fp32", 10, 90, 10, diff=float("nan"))
    tgt = bench_gpu.targets([res])
    text = bench_gpu.gpu_markdown([res], tgt)
    assert "| fp32 features within 1e-5 of naive | a fp32 | nan | **missed** |" in text


def test_the_gpu_gemm_reference_times_several_back_to_back_calls(monkeypatch):
    from hipro_fast.bench import timing

    real_mm, seen = torch.mm, []
    monkeypatch.setattr(torch, "mm", lambda a, b: (seen.append(1), real_mm(a, b))[1])
    assert timing.gemm_rate(8, 4, repeats=2, warmup=1, calls=5) > 0
    assert len(seen) == (1 + 2) * 5
    with pytest.raises(ValueError, match="calls must be >= 1, got 0"):
        timing.gemm_rate(8, 4, calls=0)


def test_a_record_from_before_the_token_ratio_renders_its_token_ratio():
    """The H200 record of session 5 holds the FLOP ratio as ideal_speedup (21.34 on
    (a)) and the token ratio apart (21.10): rendered under the token-ratio header,
    the table shows the token ratio, and the target is computed against it."""
    import json
    from pathlib import Path

    from hipro_fast.bench.gpu import targets
    from hipro_fast.bench.output import gpu_markdown, ideal_ratio

    record = json.loads((Path(__file__).resolve().parents[2] / "benchmarks" / "results" /
                         "gpu_h200_text_step.json").read_text())
    row = next(r for r in record["results"] if (r["problem"], r["precision"]) == ("a", "fp32"))
    naive = row["methods"]["naive"]
    assert naive["ideal_speedup"] != naive["token_ratio"] and ideal_ratio(naive) == naive["token_ratio"]
    md = gpu_markdown(record["results"], targets(record["results"]))
    assert f"({naive['token_ratio']:.1f}×)" in md and f"({naive['ideal_speedup']:.1f}×)" not in md
    value = next(t["value"] for t in targets(record["results"])
                 if t["where"] == "a fp32" and "ideal" in t["target"])
    assert value == naive["speedup"] / naive["token_ratio"]
