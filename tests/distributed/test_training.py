"""Item 4 of issue 11: 2 processes (torchrun, gloo on localhost) train like 1.

One torchrun launch runs every scenario of tests/distributed/scenarios.py
(combine mean with learned path weights and a parent prior, combine concat, L-BFGS,
compare() over all baselines, an interrupted run and its resume); this
process runs the same scenarios alone and compares. Bound: after 20 optimiser
steps, every learned tensor's max |difference| is <= 1e-5 of its max |value|
(observed ~1e-6: fp32 summation order of the gathered features and the summed
gradients); accuracies and the validation curve are equal."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import scenarios as S
from tests.distributed.launch import torchrun

pytestmark = pytest.mark.usefixtures("one_thread")
REL_BOUND = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    work = tmp_path_factory.mktemp("dist-train")
    out = work / "out.safetensors"
    torchrun(["tests/distributed/scenarios.py", str(out), str(work)], nproc=2, timeout=240)
    return load_file(str(out)), work


def _check(prefix: str, one: dict, two: dict) -> None:
    finals = [k for k in one if k.startswith(f"{prefix}/final/")]
    assert finals
    for k in finals:
        assert _rel(one[k], two[k]) <= REL_BOUND, (k, _rel(one[k], two[k]))
    assert torch.equal(one[f"{prefix}/test_acc"], two[f"{prefix}/test_acc"])
    assert torch.equal(one[f"{prefix}/val_mean"], two[f"{prefix}/val_mean"])
    assert _rel(one[f"{prefix}/loss"], two[f"{prefix}/loss"]) <= REL_BOUND


def test_two_ranks_hold_the_same_contexts(two_ranks):
    two, _ = two_ranks
    assert two["world_size"].item() == 2 and two["ranks_agree"].item() == 1.0


@pytest.mark.parametrize("scenario", ["mean", "concat", "lbfgs"])
def test_two_processes_train_like_one(two_ranks, scenario):
    two, _ = two_ranks
    one = {"mean": S.scenario_mean, "concat": S.scenario_concat, "lbfgs": S.scenario_lbfgs}[scenario]()
    _check(scenario, one, two)


def test_after_fit_the_model_is_a_one_process_model_again(two_ranks):
    """Rank 0 alone computed text features and exported a classifier after a
    two-rank fit() and evaluate() (they were collectives while the model stayed
    sharded); the features equal the one-process model's."""
    two, work = two_ranks
    one = S.scenario_mean_model()
    # Rank 0's contexts are what two ranks trained: one process's up to the order the gradients
    # were summed in (test_two_processes_train_like_one bounds that). Given those contexts, the
    # one-process model computes rank 0's features: the model is whole again.
    one.load_context_state({n[len("alone/ctx/"):]: v for n, v in two.items() if n.startswith("alone/ctx/")})
    with torch.no_grad():
        want = one.text_features()
    for task, f in want.items():
        assert _rel(f, two[f"alone/{task}"]) <= 1e-6, (task, _rel(f, two[f"alone/{task}"]))
    trained = S.scenario_mean_model().context_state()
    for n, v in trained.items():
        assert _rel(v, two[f"alone/ctx/{n}"]) <= REL_BOUND, n
    assert (work / "alone.safetensors").is_file()


def test_evaluate_given_each_ranks_own_data_is_refused_on_every_rank(two_ranks):
    two, _ = two_ranks
    told = [bytes(two[f"alone/own_data/{r}"].tolist()).decode() for r in (0, 1)]
    for text in told:
        assert text.startswith("RankMismatchError: ranks disagree on evaluate(): 'data' differs between rank 0 "
                               "and rank 1"), text


def test_baselines_compare_equal_accuracies(two_ranks):
    two, _ = two_ranks
    one = S.scenario_baselines()
    assert set(one) == {k for k in two if k.startswith("compare/")} and len(one) == 6  # METHODS (with the control)
    for k in one:
        assert torch.equal(one[k], two[k]), k


def test_protocol_draws_split_over_ranks_equal_one_process(two_ranks):
    """parallel="draws": each rank trains whole draws alone, so every draw's
    accuracies equal the one-process run's exactly, every rank gets every draw,
    on_run sees them in the one-process order, and each draw's checkpoints are
    written (by the rank that trained it)."""
    two, work = two_ranks
    one = S.scenario_protocol()
    keys = {k for k in two if k.startswith("protocol/")}  # not protocol-classes/
    assert set(one) == keys and len(keys) == 2 + 6 * 3
    for k in keys - {"protocol/trained"}:
        assert torch.equal(one[k], two[k]), k
    # rank 0 trained draws 0, 2, 4 and rank 1 draws 1, 3, 5 (seeds 0 2 1 / 1 0 2), each as a world of one
    assert two["protocol/trained"].tolist() == [[0, 0, 1], [0, 2, 1], [0, 1, 1], [1, 1, 1], [1, 0, 1], [1, 2, 1]]
    assert two["protocol/on_run"].tolist() == [[1, 0], [1, 1], [1, 2], [2, 0], [2, 1], [2, 2]]
    for k, s in [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2)]:
        assert (work / "protocol" / f"shots{k}-seed{s}" / f"hipro-seed{s}").is_dir(), (k, s)


def test_protocol_with_the_forest_sharded_by_class_equals_one_process(two_ranks):
    """parallel="classes": both ranks work on every draw (sharded forest, in the
    process group); the accuracies equal the one-process run's."""
    two, _ = two_ranks
    one = S.scenario_protocol(parallel="classes")
    keys = {k for k in two if k.startswith("protocol-classes/")}
    assert set(one) == keys and len(keys) == 2 + 6 * 3
    for k in keys - {"protocol-classes/trained"}:
        assert torch.equal(one[k], two[k]), k
    seeds = [0, 1, 2, 0, 1, 2]
    assert two["protocol-classes/trained"].tolist() == [[r, s, 0] for r in (0, 1) for s in seeds]


def test_a_draw_failing_on_one_rank_is_named_on_every_rank(two_ranks):
    two, _ = two_ranks
    told = [bytes(two[f"protocol_failure/{r}"].tolist()).decode() for r in (0, 1)]
    assert told == ["told: rank 1 failed on the draw of 1 shots, seed 1: RuntimeError: boom", "own: boom"]


def test_a_draw_longer_than_the_collective_timeout_is_waited_for(tmp_path):
    """The round's gather waits for the slowest draw without the --dist-timeout
    bound (5 s here; the other rank's draw takes 12 s more)."""
    out = tmp_path / "slow.safetensors"
    torchrun(["tests/distributed/scenarios.py", "--slow-draw", str(out)], nproc=2, timeout=120)
    assert sorted(load_file(str(out))) == ["0", "1"]


def test_resume_with_another_number_of_ranks(two_ranks, tmp_path):
    """Interrupted with 2 ranks after epoch 1; resumed with 2 (in the launch) and
    with 1 (here) from the same checkpoint: both equal the uninterrupted run."""
    two, work = two_ranks
    ck = tmp_path / "ckpt"
    shutil.copytree(work / "ckpt2-for-1", ck)
    one = S.resumed(str(ck))
    _check("resumed", one, two)
    uninterrupted = S.scenario_mean()
    for k in [k for k in one if k.startswith("resumed/final/")]:
        assert _rel(uninterrupted["mean" + k[len("resumed"):]], one[k]) <= REL_BOUND, k
