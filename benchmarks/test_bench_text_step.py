"""pytest-benchmark of the text-side training step on ViT-B-16 (see benchmarks/README.md).

    PYTHONPATH=. .venv/bin/python -m pytest benchmarks/ -q   # minutes

Times configuration (a) (4 tasks x 65 Office-Home classes, root -> 2 -> 4,
n_ctx 16, concat): the forest step and the truncated dense step. Timing only;
the benchmark's correctness tests run in `make test` (tests/bench/).
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402  (load torch before the extension)
import pytest  # noqa: E402

from hipro_fast.bench.cpu import BenchConfig, make_runner  # noqa: E402
from hipro_fast.bench.model import load_model, load_tokenizer  # noqa: E402
from hipro_fast.bench.problems import main_problems  # noqa: E402
from hipro_fast.engine.text_tower import TextTower  # noqa: E402


@pytest.fixture(scope="module")
def runner_a():
    tower = TextTower(load_model("ViT-B-16", seed=0))
    tok = load_tokenizer()
    return make_runner(tower, tok, main_problems(tok, 16)["a"], BenchConfig(quick=True))


def _info(benchmark, runner, method):
    c = runner.counts()[method]
    benchmark.extra_info.update(tokens=c["tokens"], gflop=c["flops"]["total"] / 1e9,
                                threads=torch.get_num_threads())
    return c


def _rate(benchmark, counts):
    if benchmark.stats is not None:  # None under --benchmark-disable (each step ran once, untimed)
        benchmark.extra_info["gflops_per_s"] = counts["flops"]["total"] / benchmark.stats.stats.median / 1e9


def test_forest_step_config_a(benchmark, runner_a):
    c = _info(benchmark, runner_a, "forest")
    benchmark.pedantic(runner_a.forest_step, rounds=5, iterations=1, warmup_rounds=2)
    _rate(benchmark, c)


def test_truncated_step_config_a(benchmark, runner_a):
    c = _info(benchmark, runner_a, "truncated")
    step = runner_a.baseline("truncated")
    assert step.tokens == c["tokens"]
    # one warm-up round, as the forest's: a cold first round (allocator, caches) in the
    # median of two would time the warm-up, not the step
    benchmark.pedantic(lambda: runner_a.run_baseline(step, False), rounds=2, iterations=1, warmup_rounds=1)
    _rate(benchmark, c)
