"""The planted-hierarchy benchmark: its construction, and the end-to-end claims
on it (affinity + tree recover the planted groups; HiPro beats CoOp per task and
CoOp shared at 1, 2 and 4 shots; with conflicting groups CoOp shared loses).

The training settings are pinned here (not taken from TrainConfig's defaults) so
that the claims test the method, not a default that may move. The settings
(combine "mean", n_ctx 4, 50 epochs) are the ones scripts/ablation_planted.py
supports; see benchmarks/results/ablation_planted.md.
"""
import numpy as np
import pytest
import torch

from hipro_fast.method.affinity import task_affinity
from hipro_fast.method.baselines import compare
from hipro_fast.method.tree import TaskTree, tree_from_affinity
from hipro_fast.data.synth import (adjusted_rand_index, class_name_pool, group_ari, make_planted_problem,
                              planted_clip, tree_group_labels)
from hipro_fast.engine.text_tower import TextTower
from hipro_fast.engine.encoder import ForestEncoder
from hipro_fast.method.training import TrainConfig

SEEDS = (0, 1, 2)
SHOTS = (1, 2, 4)
METHODS = ("coop-per-task", "coop-shared", "hipro")
TRAIN = TrainConfig(optimizer="sgd", epochs=50, lr=0.002, momentum=0.9, weight_decay=5e-4, warmup_epochs=1, warmup_lr=1e-5,
                    batch_size=32, steps_per_epoch=None, min_steps=0, amp=None)  # the ablation's budget
N_CTX, COMBINE = 4, "mean"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def clip():
    return planted_clip()


# ------------------------------------------------------------------ construction
def test_problem_structure(clip):
    p = make_planted_problem(clip, seed=3)
    assert len(p.tasks) == 6 and len(p.groups) == 3
    assert sorted(t for ts in p.groups.values() for t in ts) == sorted(p.tasks)
    assert [sorted(g) for g in TaskTree.from_nested(p.tree_spec).groups(1).values()] == [sorted(g) for g in p.groups.values()]
    # a group's tasks are not adjacent in the task order
    assert p.group_labels() != sorted(p.group_labels())
    for t, classes in p.tasks.items():
        assert len(classes) == 6
        for split, per_class in ((p.train, 2), (p.val, 2), (p.test, 20)):
            x, y = split[t]
            assert x.shape == (6 * per_class, 24) and y.shape == (6 * per_class,)
            assert torch.allclose(x.norm(dim=1), torch.ones(len(y)), atol=1e-5)
            assert torch.equal(torch.bincount(y, minlength=6), torch.full((6,), per_class))
    # plain: a group's tasks share their class names, different groups' names are disjoint
    names = {g: {frozenset(p.tasks[t]) for t in ts} for g, ts in p.groups.items()}
    assert all(len(v) == 1 for v in names.values())
    sets = [next(iter(v)) for v in names.values()]
    assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1:])
    # conflict: every task has the same class names
    c = make_planted_problem(clip, seed=3, conflict=True)
    assert len({frozenset(v) for v in c.tasks.values()}) == 1
    for name in next(iter(c.tasks.values())):
        assert name in class_name_pool(clip.tokenizer)


def test_problem_is_deterministic_and_seeded(clip):
    a = make_planted_problem(clip, seed=5, shots=1)
    b = make_planted_problem(clip, seed=5, shots=1)
    c = make_planted_problem(clip, seed=6, shots=1)
    assert a.tasks == b.tasks and a.groups == b.groups
    for t in a.tasks:
        assert torch.equal(a.train[t][0], b.train[t][0]) and torch.equal(a.test[t][1], b.test[t][1])
    assert a.tasks != c.tasks
    assert TaskTree.from_nested(make_planted_problem(clip, seed=5, shots=4, n_groups=2, tasks_per_group=3).tree_spec).depth() == 3


def test_teacher_contexts_make_the_problem_learnable_and_grouped(clip):
    """Classifying with the teacher's own prompts is near perfect; with another group's
    prompt (same class names, conflict=True) it is much worse: the groups are real."""
    p = make_planted_problem(clip, seed=0, conflict=True)
    tower = TextTower(clip.model)
    of = p.group_of()
    names = list(p.tasks)
    node_ctx = {n: v.shape[0] for n, v in p.teacher.items()}
    paths = {f"{i}|{tj}": [f"group/{of[ti]}", f"task/{ti}"] for i, ti in enumerate(names) for tj in names}
    classes = {f"{i}|{tj}": p.tasks[tj] for i, _ in enumerate(names) for tj in names}
    with torch.no_grad():
        f = ForestEncoder(tower, clip.tokenizer, node_ctx, paths, classes)(p.teacher)
    acc = np.zeros((6, 6))
    for i in range(6):
        for j, tj in enumerate(names):
            x, y = p.test[tj]
            acc[i, j] = float(((x @ f[f"{i}|{tj}"].t()).argmax(1) == y).float().mean())
    same = np.array([[of[a] == of[b] for b in names] for a in names])
    assert acc.diagonal().mean() > 0.9
    assert acc[same].mean() > acc[~same].mean() + 0.3


def test_problem_errors(clip):
    with pytest.raises(ValueError, match="shots"):
        make_planted_problem(clip, shots=0)
    with pytest.raises(ValueError, match="not enough class names"):
        make_planted_problem(clip, n_groups=40, classes_per_task=50)


def test_group_ari_helpers(clip):
    p = make_planted_problem(clip, seed=1)
    assert group_ari(TaskTree.from_nested(p.tree_spec), p) == 1.0
    order = list(p.tasks)
    assert adjusted_rand_index(tree_group_labels(TaskTree.from_nested(p.tree_spec), order), p.group_labels(order)) == 1.0


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def runs(clip):
    """Per (conflict, shots, seed): ARI of the affinity tree and test accuracy per method.

    Plain problems at 1/2/4 shots and conflicting ones at 2 shots (the default), all
    on seeds 0, 1, 2; HiPro uses the tree built from the (default, transfer) affinity.
    """
    out = {}
    settings = [(False, s) for s in SHOTS] + [(True, 2)]
    for conflict, shots in settings:
        for seed in SEEDS:
            p = make_planted_problem(clip, shots=shots, seed=seed, conflict=conflict)
            names = list(p.tasks)
            tree = tree_from_affinity(task_affinity(clip, p.tasks, p.train), names)
            table = compare(clip, p.tasks, p.train, p.test, methods=METHODS, seeds=(seed,), tree=tree,
                            n_ctx=N_CTX, combine=COMBINE, train_config=TRAIN)
            out[(conflict, shots, seed)] = {"ari": group_ari(tree, p), "tree": tree,
                                            **{m: table[m].mean for m in METHODS}}
    return out


@pytest.mark.parametrize("shots", SHOTS)
def test_affinity_tree_recovers_the_planted_groups(runs, shots):
    for seed in SEEDS:
        r = runs[(False, shots, seed)]
        assert r["ari"] == 1.0, f"seed {seed}, {shots} shots: tree {r['tree']}"


def test_affinity_tree_recovers_conflicting_groups(runs):
    for seed in SEEDS:
        assert runs[(True, 2, seed)]["ari"] == 1.0


@pytest.mark.parametrize("shots", SHOTS)
def test_hipro_beats_coop_per_task_and_coop_shared(runs, shots):
    mean = {m: np.mean([runs[(False, shots, s)][m] for s in SEEDS]) for m in METHODS}
    detail = {m: [round(100 * runs[(False, shots, s)][m], 1) for s in SEEDS] for m in METHODS}
    assert mean["hipro"] > mean["coop-per-task"], detail
    assert mean["hipro"] > mean["coop-shared"], detail


def test_conflicting_groups_hurt_coop_shared(runs):
    for seed in SEEDS:
        r = runs[(True, 2, seed)]
        assert r["hipro"] > r["coop-shared"], (seed, r)
    mean = {m: np.mean([runs[(True, 2, s)][m] for s in SEEDS]) for m in METHODS}
    assert mean["hipro"] > mean["coop-per-task"] > mean["coop-shared"], mean


# ------------------------------------------------------------------ ablation claims (README)
def test_mean_combination_beats_concat(runs, clip):
    """README: `mean` beats `concat` (the default follows it). Paired on the plain
    2-shot problems: the same affinity tree, problem and training seed."""
    diffs = []
    for seed in SEEDS:
        r = runs[(False, 2, seed)]
        p = make_planted_problem(clip, shots=2, seed=seed)
        concat = compare(clip, p.tasks, p.train, p.test, methods=["hipro"], seeds=(seed,), tree=r["tree"],
                         n_ctx=N_CTX, combine="concat", train_config=TRAIN)["hipro"].mean
        diffs.append(100 * (r["hipro"] - concat))
    assert min(diffs) > 0 and np.mean(diffs) > 8, diffs  # measured +16 to +18 points per seed


def test_zscore_is_what_makes_transfer_recover_the_groups(clip):
    """README: the z-scored transfer affinity recovers the planted groups; the same
    scores normalised by each task's own prompt instead (normalize="own") do not
    reliably. Plain 1-shot problems, seeds 0-4: measured z-score 5/5, own 2/5."""
    ari = {"zscore": [], "own": []}
    for seed in range(5):
        p = make_planted_problem(clip, shots=1, seed=seed)
        for normalize in ari:
            a = task_affinity(clip, p.tasks, p.train, normalize=normalize)
            ari[normalize].append(group_ari(tree_from_affinity(a, list(p.tasks)), p))
    assert all(v == 1.0 for v in ari["zscore"]), ari
    assert sum(v == 1.0 for v in ari["own"]) <= 3, ari


# ------------------------------------------------------------------ structure, not only depth
STRUCTURE_PROBLEM = dict(n_groups=4, tasks_per_group=4, shots=1)
STRUCTURE_SEEDS = (0, 1, 2, 3, 4)


def mixed_tree(problem) -> list[list[str]]:
    """The planted shape with every group mixed: group g takes member k of planted
    group g + k, so each group node is shared by one task of every planted group."""
    groups = list(problem.groups.values())
    n = len(groups)
    return [[groups[(g + k) % n][k] for k in range(len(groups[g]))] for g in range(n)]


def test_hipro_needs_the_right_tree_not_only_its_shape(clip):
    """HiPro trained on the planted tree beats HiPro trained on a wrong tree of the
    SAME shape (root -> 4 group nodes -> 4 leaves each, but every group node shared
    by one task of each planted group), paired: same problem, same training seed,
    5 problem seeds.

    What it shows: on this problem (4 groups x 4 tasks, 1 shot per class, a
    group's tasks share their label space, groups' label spaces are disjoint) a
    group node pools the shots of four tasks that want the same group prompt,
    which only the right grouping gives it; so the accuracy depends on the tree
    being right, not only on its depth. (On the default 3 x 2 problem the README's
    ablation finds a wrong tree almost as good: there the gain is path depth.)
    Measured with these settings on seeds 0-9 and HiProModel's defaults (learned
    path weights; session 12's initialisation, each node's context seeded by its
    tasks, so both trees start every leaf alike): +1.70 points on average, 9/10
    seeds won (seeds 0-4: -0.05 to +3.70, mean +1.79); with fixed equal path
    weights +2.93, 9/10 (seeds 0-4: +4.42, 5/5); measured by running this test's
    loop over seeds 0-9. Before session 12 one generator drawn node by node gave
    +3.4 / +6.3.)"""
    diffs = []
    for seed in STRUCTURE_SEEDS:
        p = make_planted_problem(clip, seed=seed, **STRUCTURE_PROBLEM)
        wrong = mixed_tree(p)
        assert TaskTree.from_nested(wrong).depth() == TaskTree.from_nested(p.tree_spec).depth()
        assert sorted(map(len, wrong)) == sorted(map(len, p.tree_spec))
        assert group_ari(TaskTree.from_nested(wrong), p) < 0  # no pair of the wrong groups is a planted pair
        acc = {}
        for name, tree in (("right", p.tree_spec), ("wrong", wrong)):
            table = compare(clip, p.tasks, p.train, p.test, methods=["hipro"], seeds=(seed,), tree=tree,
                            n_ctx=N_CTX, combine=COMBINE, train_config=TRAIN)
            acc[name] = table["hipro"].mean
        diffs.append(round(100 * (acc["right"] - acc["wrong"]), 2))
    assert sum(d > 0 for d in diffs) >= 4 and np.mean(diffs) > 1.0, diffs
