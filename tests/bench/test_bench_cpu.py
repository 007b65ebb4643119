"""The CPU text-step benchmark (hipro_fast.bench.cpu) on a tiny random open_clip
text tower: every baseline gives the forest's features and context gradients,
the token and FLOP counts follow their formulas, and the result has every
field the tables and the README are made from. Correctness only, never timings."""
import copy
import io

import pytest
import torch

from hipro_fast.bench import cpu
from hipro_fast.bench.counting import forest_visible_keys
from hipro_fast.bench.model import load_model, load_tokenizer
from hipro_fast.bench.output import print_table
from hipro_fast.bench.problems import Problem, main_problems
from hipro_fast.engine.prompt_forest import class_suffix_tokens
from hipro_fast.engine.text_tower import TextTower
from hipro_fast.ops.reference import tree_attention_mask

pytestmark = pytest.mark.usefixtures("one_thread")


def _expected_forest_tokens(tok, problem: Problem) -> int:
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


def test_smoke_quick_tiny(tmp_path):
    cfg = cpu.BenchConfig(model="tiny", quick=True, sweep_classes=(65, 130), sweep_depths=(1, 2, 4),
                          forest_repeats=1, sweep_forest_repeats=1, profile=False, verbose=False,
                          est_tokens=1024, json_path=str(tmp_path / "bench.json"),
                          png_path=str(tmp_path / "bench.png"))
    result = cpu.run_bench(cfg)
    assert (tmp_path / "bench.json").is_file() and (tmp_path / "bench.png").is_file()
    tok = load_tokenizer()
    problems = main_problems(tok, 16)
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
    r = cpu.make_runner(TextTower(load_model("tiny")), tok, problems["a"], cfg)
    lay = r.forest.layout
    assert forest_visible_keys(lay) == int(tree_attention_mask(lay.segment_table, lay.token_segment).sum())
    # sweep rows
    sw = result["sweep"]
    assert [row["classes"] for row in sw["classes"]] == [65, 130]
    assert [row["depth"] for row in sw["depth"]] == [1, 2, 4]
    for row in sw["classes"] + sw["depth"]:
        assert row["ideal_vs_truncated"] == pytest.approx(row["truncated_tokens"] / row["forest_tokens"])
        assert row["naive_tokens"] == 4 * row["classes"] * L
    targets = cpu.evaluate_targets(result)
    assert len(targets) == 3 * 4 + 1
    exact = [t for t in targets if "features within" in t["target"]]
    assert len(exact) == 3 and all(t["pass"] is True for t in exact), exact
    # a baseline that disagrees, or a NaN anywhere in a comparison, fails exactness (NaN printed as nan, not "-")
    for bad in (1e-3, float("nan")):
        broken = copy.deepcopy(result)
        broken["configs"]["a"]["verify"]["padded"]["prompt_max_abs_diff"] = bad
        (a_exact,) = [t for t in cpu.evaluate_targets(broken) if t["target"].startswith("(a) every baseline")]
        assert a_exact["pass"] is False, a_exact
        broken["targets"] = cpu.evaluate_targets(broken)
        text = io.StringIO()
        print_table(broken, file=text)
        line = next(ln for ln in text.getvalue().splitlines() if "(a) every baseline" in ln)
        assert line.strip().startswith("MISS") and line.rstrip().endswith("nan" if bad != bad else "1.0e-03"), line


@pytest.mark.parametrize("name", ["a", "b"])
def test_measured_baselines_agree_split_graphs(name):
    """Full (measured) steps with a tiny graph budget, so every baseline is split into
    several backward calls: features and context gradients still match the forest."""
    tok = load_tokenizer()
    tower = TextTower(load_model("tiny"))
    cfg = cpu.BenchConfig(model="tiny", baseline_repeats=1, forest_repeats=1, forest_warmup=1,
                          max_graph_gb=0.02, profile=False, verbose=False)
    res = cpu.run_problem(tower, tok, main_problems(tok, 16)[name], cfg, lambda s: None)
    for m in ("naive", "padded", "truncated"):
        e = res["methods"][m]
        assert e["micro_batches"] > 1, m
        # the cold collect step (features, memory peak) is kept apart from the timed warm repetitions
        assert not e["cold_only"] and e["reps"] == len(e["times"]) == 1 and e["time_s"] == e["times"][0], (m, e)
        assert e["collect_s"] > 0
        v = res["verify"][m]
        assert v["prompts_compared"] == res["prompts"]
        assert v["prompt_max_abs_diff"] < 1e-5 and v["task_max_abs_diff"] < 1e-5, (m, v)
        assert v["ctx_grad_rel_diff"] < 1e-4, (m, v)


def test_a_baseline_the_budget_allows_once_is_timed_by_its_collect_step():
    tok = load_tokenizer()
    tower = TextTower(load_model("tiny"))
    cfg = cpu.BenchConfig(model="tiny", baseline_repeats=3, baseline_budget_s=0.0, forest_repeats=1,
                          forest_warmup=1, profile=False, verbose=False)
    res = cpu.run_problem(tower, tok, main_problems(tok, 16)["a"], cfg, lambda s: None,
                          methods=("naive", "forest"))
    e = res["methods"]["naive"]
    assert e["cold_only"] and e["times"] == [e["collect_s"]] and e["reps"] == 1


def _tensors(obj, path="step"):
    """(path, tensor) of every tensor reachable through dataclass fields, lists, tuples, dicts."""
    if isinstance(obj, torch.Tensor):
        yield path, obj
    elif isinstance(obj, (list, tuple)):
        for i, x in enumerate(obj):
            yield from _tensors(x, f"{path}[{i}]")
    elif isinstance(obj, dict):
        for k, x in obj.items():
            yield from _tensors(x, f"{path}[{k!r}]")
    elif hasattr(obj, "__dataclass_fields__"):
        for k in obj.__dataclass_fields__:
            yield from _tensors(getattr(obj, k), f"{path}.{k}")


@pytest.mark.parametrize("method", ["naive", "truncated"])
def test_baseline_steps_move_every_tensor(method):
    """What the GPU runner relies on: `to(device)` moves every tensor a baseline step
    owns (the shared prompt list and the tower stay where they are)."""
    tok = load_tokenizer()
    r = cpu.make_runner(TextTower(load_model("tiny")), tok, main_problems(tok, 4)["b"],
                        cpu.BenchConfig(model="tiny", max_graph_gb=0.002))
    step = r.baseline(method)
    assert step.micro_batches > 1  # several graphs, so every kind of container is walked

    def owned():
        return {k: getattr(step, k) for k in step.__dataclass_fields__ if k not in ("tower", "spec")}

    before = list(_tensors(owned()))
    assert len(before) > 10 and all(t.device.type == "cpu" for _, t in before)
    step.to("meta")
    after = list(_tensors(owned()))
    assert [p for p, _ in after] == [p for p, _ in before]
    assert [p for p, t in after if t.device.type != "meta"] == []


def test_a_sweep_point_beyond_the_distinct_class_names_is_refused():
    from hipro_fast.bench.problems import sweep_classnames
    from hipro_fast.errors import InvalidInputError

    tok = load_tokenizer()
    names = sweep_classnames(tok, 130)
    assert len(names) == len(set(names)) == 130
    with pytest.raises(InvalidInputError, match=r"distinct class names .* not 100000"):
        sweep_classnames(tok, 100000)


@pytest.mark.skipif(not hasattr(torch.ops.hipro_fast, "tree_attention"), reason="needs the compiled extension")
def test_kernel_breakdown_times_each_attention_decomposition_and_restores_the_knobs():
    """The README's "GEMM path N x faster" comes from this record: each
    decomposition timed in turns, relative to the default; the process-wide
    knobs are back as they were afterwards."""
    from hipro_fast import ops
    from hipro_fast.bench.profile import ATTENTION_PATHS, kernel_breakdown

    tok = load_tokenizer()
    tower = TextTower(load_model("tiny"))
    cfg = cpu.BenchConfig(model="tiny", profile=False, verbose=False)
    r = cpu.make_runner(tower, tok, main_problems(tok, 16)["a"], cfg)
    before = ops.attention_block_min_pairs(), ops.attention_block_grouping()
    paths = kernel_breakdown(r, repeats=2)["tree_attention_paths"]
    assert (ops.attention_block_min_pairs(), ops.attention_block_grouping()) == before
    assert set(paths["fwd_bwd_ms"]) == set(ATTENTION_PATHS) and paths["repeats"] == 2
    assert paths["vs_default"]["default"] == 1.0
    for name, ms in paths["fwd_bwd_ms"].items():
        assert ms > 0 and abs(paths["vs_default"][name] - ms / paths["fwd_bwd_ms"]["default"]) < 1e-12


def _sweep_rows() -> dict:
    row = {"truncated_time_s": 2.0, "forest_time_s": 0.5, "truncated_est": False,
           "naive_tokens": 1000, "truncated_tokens": 400, "forest_tokens": 100}
    return {"classes": [dict(row, classes=n, depth=3) for n in (65, 130)],
            "depth": [dict(row, classes=65, depth=d) for d in (1, 2)]}


def test_the_sweep_plot_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """savefig wrote straight to the PNG: a failure or an interruption mid-write left a
    torn file under the record's name."""
    import matplotlib.figure

    from hipro_fast.bench.output import plot_sweep

    path = tmp_path / "sweep.png"
    path.write_bytes(b"the previous run's plot")
    real = matplotlib.figure.Figure.savefig

    def torn(self, fname, **kwargs):
        if hasattr(fname, "write"):
            fname.write(b"\x89PNG half")
        else:
            with open(fname, "wb") as f:
                f.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", torn)
    with pytest.raises(KeyboardInterrupt):
        plot_sweep(_sweep_rows(), path)
    assert path.read_bytes() == b"the previous run's plot"
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", real)
    plot_sweep(_sweep_rows(), path, title="t")
    assert path.read_bytes().startswith(b"\x89PNG\r\n") and [p.name for p in tmp_path.iterdir()] == ["sweep.png"]


@pytest.mark.parametrize("points, flag", [({"sweep_depths": (1, 5)}, "--sweep-depths"),
                                          ({"sweep_classes": (65, 100000)}, "--sweep-classes")])
def test_a_sweep_point_that_cannot_run_fails_before_anything_is_measured(monkeypatch, tmp_path, points, flag):
    """A depth-5 tree (85 tokens > 77) or more classes than distinct names failed in the
    sweep, after the configurations' measurements."""
    from hipro_fast.errors import InvalidInputError

    def measured(*args, **kwargs):
        raise AssertionError("a configuration was measured before the sweep points were checked")

    monkeypatch.setattr(cpu, "run_problem", measured)
    cfg = cpu.BenchConfig(model="tiny", configs=("a",), verbose=False, json_path=str(tmp_path / "t.json"), **points)
    with pytest.raises(InvalidInputError, match=flag):
        cpu.run_bench(cfg)
    assert list(tmp_path.iterdir()) == []
