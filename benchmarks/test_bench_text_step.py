"""pytest-benchmark of the text-side training step (see benchmarks/README.md).

    PYTHONPATH=. .venv/bin/python -m pytest benchmarks/ -q                  # all (ViT-B-16: minutes)
    PYTHONPATH=. .venv/bin/python -m pytest benchmarks/ -q --benchmark-skip # smoke test only

The ViT-B-16 benchmarks time configuration (a) (4 tasks x 65 Office-Home classes,
root -> 2 -> 4, n_ctx 16, concat): the forest step and the truncated dense step.
The smoke test runs the quick benchmark on a tiny random open_clip text tower and
checks correctness properties only (no wall-clock assertions).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402,F401  (load torch before the extension)
import pytest  # noqa: E402

from hipro_fast.bench import text_step as bench  # noqa: E402
from hipro_fast.engine.prompt_forest import class_suffix_tokens  # noqa: E402
from hipro_fast.ops.reference import tree_attention_mask  # noqa: E402
from hipro_fast.engine.text_tower import TextTower  # noqa: E402


@pytest.fixture(scope="module")
def runner_a():
    tower = TextTower(bench.load_model("ViT-B-16", seed=0))
    tok = bench._tokenizer()
    problem = bench.main_problems(tok, 16)["a"]
    return bench._Runner(tower, tok, problem, bench.BenchConfig(quick=True), lambda s: None)


def _info(benchmark, runner, method):
    c = runner.counts()[method]
    benchmark.extra_info.update(tokens=c["tokens"], gflop=c["flops"]["total"] / 1e9,
                                threads=torch.get_num_threads())
    return c


def test_forest_step_config_a(benchmark, runner_a):
    c = _info(benchmark, runner_a, "forest")
    benchmark.pedantic(runner_a.forest_step, rounds=5, iterations=1, warmup_rounds=2)
    benchmark.extra_info["gflops_per_s"] = c["flops"]["total"] / benchmark.stats.stats.median / 1e9


def test_truncated_step_config_a(benchmark, runner_a):
    c = _info(benchmark, runner_a, "truncated")
    step = runner_a.baseline("truncated")
    assert step.tokens == c["tokens"]
    benchmark.pedantic(lambda: runner_a._run_baseline(step, False), rounds=2, iterations=1, warmup_rounds=0)
    benchmark.extra_info["gflops_per_s"] = c["flops"]["total"] / benchmark.stats.stats.median / 1e9


# --------------------------------------------------------------------------- smoke test (tiny model)


def _expected_forest_tokens(tok, problem: bench.Problem) -> int:
    """1 shared SOS + every node's context once + the class suffixes under each distinct leaf."""
    n_ctx = sum(c for _, c in problem.node_ctx_rows.values())
    suffix = {t: sum(len(class_suffix_tokens(tok, n)) for n in names) for t, names in problem.task_classes.items()}
    if problem.combine == "concat":
        leaves = {tuple(p): t for t, p in problem.task_paths.items()}  # distinct paths
        return 1 + n_ctx + sum(suffix[t] for t in leaves.values())
    nodes = {}
    for t, p in problem.task_paths.items():
        for n in p:
            nodes.setdefault(n, t)
    return 1 + n_ctx + sum(suffix[t] for t in nodes.values())


@pytest.fixture
def one_thread():
    """Timing is not under test; one thread keeps the smoke test fast on a loaded machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_smoke_quick_tiny(tmp_path, one_thread):
    cfg = bench.BenchConfig(model="tiny", quick=True, sweep_classes=(65, 130), sweep_depths=(1, 2, 4),
                            forest_repeats=1, sweep_forest_repeats=1, profile=False, verbose=False,
                            est_tokens=1024, json_path=str(tmp_path / "bench.json"),
                            png_path=str(tmp_path / "bench.png"))
    result = bench.run_bench(cfg)
    assert (tmp_path / "bench.json").is_file() and (tmp_path / "bench.png").is_file()
    tok = bench._tokenizer()
    problems = bench.main_problems(tok, 16)
    L = result["meta"]["text_config"]["context_length"]
    for name, res in result["configs"].items():
        prob = problems[name]
        ms = res["methods"]
        assert set(ms) == {"naive", "padded", "truncated", "forest"}
        # features (and, where a full step ran, context gradients) agree across methods
        for m, v in res["verify"].items():
            assert v["prompts_compared"] > 0, (name, m)
            assert v["prompt_max_abs_diff"] < 1e-5, (name, m, v)
            if v.get("task_max_abs_diff") is not None:
                assert v["task_max_abs_diff"] < 1e-5, (name, m, v)
            if v.get("ctx_grad_rel_diff") is not None:
                assert v["ctx_grad_rel_diff"] < 1e-4, (name, m, v)
        # token counts follow the formulas
        C = len(next(iter(prob.task_classes.values())))
        n_sets = sum(len(p) if prob.combine == "mean" else 1 for p in prob.task_paths.values())
        P = res["prompts"]
        n_ctx_path = {t: 16 * len(p) if prob.combine == "concat" else 16 for t, p in prob.task_paths.items()}
        lc = max(1 + n_ctx_path[t] + len(class_suffix_tokens(tok, c))
                 for t, names in prob.task_classes.items() for c in names)
        assert ms["naive"]["tokens"] == n_sets * C * L
        assert ms["padded"]["tokens"] == P * L
        assert ms["truncated"]["tokens"] == P * lc and ms["truncated"]["seq_len"] == lc
        assert ms["forest"]["tokens"] == _expected_forest_tokens(tok, prob)
        expected_p = {"a": 4 * C, "b": 7 * C, "c": C}[name]
        assert P == expected_p
        # ideal ratio = token ratio; FLOPs use 24 W^2 per token-layer forward (mlp_ratio 4)
        for base in ("naive", "padded", "truncated"):
            assert res["ratios"][base]["ideal"] == pytest.approx(ms[base]["tokens"] / ms["forest"]["tokens"])
        W = result["meta"]["text_config"]["width"]
        assert result["meta"]["linear_flops_per_token_layer"] == 24 * W * W
    # visible-key count of the forest = the dense tree mask's count
    r = bench._Runner(TextTower(bench.load_model("tiny")), tok, problems["a"], cfg, lambda s: None)
    lay = r.forest.layout
    assert bench.forest_visible_keys(lay) == int(tree_attention_mask(lay.segment_table, lay.token_segment).sum())
    # sweep rows
    sw = result["sweep"]
    assert [row["classes"] for row in sw["classes"]] == [65, 130]
    assert [row["depth"] for row in sw["depth"]] == [1, 2, 4]
    for row in sw["classes"] + sw["depth"]:
        assert row["ideal_vs_truncated"] == pytest.approx(row["truncated_tokens"] / row["forest_tokens"])
        assert row["naive_tokens"] == 4 * row["classes"] * L
    targets = bench.evaluate_targets(result)
    assert len(targets) == 3 * 3 + 1


@pytest.mark.parametrize("name", ["a", "b"])
def test_measured_baselines_agree_split_graphs(name, one_thread):
    """Full (measured) steps with a tiny graph budget, so every baseline is split into
    several backward calls: features and context gradients still match the forest."""
    tok = bench._tokenizer()
    tower = TextTower(bench.load_model("tiny"))
    cfg = bench.BenchConfig(model="tiny", baseline_repeats=1, forest_repeats=1, forest_warmup=1,
                            max_graph_gb=0.02, profile=False, verbose=False)
    res = bench.run_problem(tower, tok, bench.main_problems(tok, 16)[name], cfg, lambda s: None)
    for m in ("naive", "padded", "truncated"):
        assert res["methods"][m]["micro_batches"] > 1, m
        v = res["verify"][m]
        assert v["prompts_compared"] == res["prompts"]
        assert v["prompt_max_abs_diff"] < 1e-5 and v["task_max_abs_diff"] < 1e-5, (m, v)
        assert v["ctx_grad_rel_diff"] < 1e-4, (m, v)
