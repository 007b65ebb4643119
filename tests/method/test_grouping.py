"""Task tree from an affinity matrix: rules, trivial cases, errors (no training)."""
import json

import numpy as np
import pytest

from hipro_fast.app.plots import dendrogram_plot
from hipro_fast.data.synth import adjusted_rand_index, tree_group_labels
from hipro_fast.errors import AffinityMatrixError, TreeError
from hipro_fast.method.grouping import affinity_to_distance, cut_info, point_biserial, separation, silhouette
from hipro_fast.method.tree import TaskTree, tree_from_affinity

NAMES = ["a", "b", "c", "d", "e", "f"]
GROUPS = [0, 1, 2, 0, 1, 2]  # a,d | b,e | c,f (interleaved on purpose)


def block(groups, within=1.0, between=0.0, noise=0.0, seed=0):
    g = np.asarray(groups)
    m = np.where(g[:, None] == g[None, :], within, between).astype(float)
    if noise:
        r = np.random.default_rng(seed).normal(0, noise, m.shape)
        m = m + (r + r.T) / 2
    return m


def nested_sets(tree):
    """Tree as a set of frozensets of task sets (order-free comparison)."""
    def walk(spec):
        if isinstance(spec, str):
            return spec
        return frozenset(walk(s) for s in spec)
    return walk(tree.to_nested())


def test_block_structure_gives_its_groups():
    tree = tree_from_affinity(block(GROUPS), NAMES)
    assert nested_sets(tree) == nested_sets(TaskTree.from_nested([["a", "d"], ["b", "e"], ["c", "f"]]))
    assert tree.depth() == 3
    assert tree_from_affinity(block(GROUPS), NAMES, levels=1) == tree


def test_noisy_blocks_and_affine_invariance():
    m = block(GROUPS, noise=0.05, seed=3)
    tree = tree_from_affinity(m, NAMES)
    assert adjusted_rand_index(tree_group_labels(tree, NAMES), GROUPS) == 1.0
    # increasing affine maps of the affinity change nothing (the distance is rescaled to [0, 1])
    assert tree_from_affinity(1e-3 * m - 7.0, NAMES) == tree


def test_asymmetric_matrix_is_symmetrised():
    m = block(GROUPS)
    m[0, 3], m[3, 0] = 1.6, 0.4  # mean 1.0
    assert tree_from_affinity(m, NAMES) == tree_from_affinity(block(GROUPS), NAMES)


def test_two_levels_nest_the_closest_groups():
    m = block(GROUPS)
    for i in range(6):
        for j in range(6):
            if {GROUPS[i], GROUPS[j]} == {0, 1}:
                m[i, j] = 0.5  # groups 0 and 1 are closer to each other than to group 2
    t1 = tree_from_affinity(m, NAMES, levels=1)
    t2 = tree_from_affinity(m, NAMES, levels=2)
    assert nested_sets(t1) == nested_sets(TaskTree.from_nested([["a", "d"], ["b", "e"], ["c", "f"]]))
    assert nested_sets(t2) == nested_sets(TaskTree.from_nested([[["a", "d"], ["b", "e"]], ["c", "f"]]))
    assert t2.depth() == 4
    # no cut can add a third level: asking for more gives the same tree
    assert tree_from_affinity(m, NAMES, levels=5) == t2
    assert tree_from_affinity(m, NAMES, levels=0) == TaskTree.flat(NAMES)


def test_threshold_cut():
    m = block(GROUPS)
    for i in range(6):
        for j in range(6):
            if {GROUPS[i], GROUPS[j]} == {0, 1}:
                m[i, j] = 0.5
    # distances: within 0, groups 0-1 at 0.5, to group 2 at 1.0
    fine = tree_from_affinity(m, NAMES, threshold=0.25)
    coarse = tree_from_affinity(m, NAMES, threshold=0.75)
    assert nested_sets(fine) == nested_sets(TaskTree.from_nested([["a", "d"], ["b", "e"], ["c", "f"]]))
    assert nested_sets(coarse) == nested_sets(TaskTree.from_nested([["a", "d", "b", "e"], ["c", "f"]]))
    assert tree_from_affinity(m, NAMES, threshold=-1.0) == TaskTree.flat(NAMES)   # nothing merges
    assert tree_from_affinity(m, NAMES, threshold=2.0) == TaskTree.flat(NAMES)    # everything merges


@pytest.mark.parametrize("n", [1, 2])
def test_one_or_two_tasks_are_flat(n):
    names = NAMES[:n]
    m = np.eye(n) + 0.3
    tree = tree_from_affinity(m, names)
    assert tree == TaskTree.flat(names)
    assert tree_from_affinity(m, names, levels=2) == TaskTree.flat(names)


def test_identical_tasks_constant_affinity_is_flat(tmp_path):
    m = np.full((6, 6), 0.7)
    assert tree_from_affinity(m, NAMES) == TaskTree.flat(NAMES)
    assert tree_from_affinity(m, NAMES, levels=2) == TaskTree.flat(NAMES)
    np.fill_diagonal(m, 5.0)  # the diagonal is ignored
    assert tree_from_affinity(m, NAMES) == TaskTree.flat(NAMES)
    assert affinity_to_distance(m) is None
    assert cut_info(m, NAMES)["flat"]
    assert dendrogram_plot(m, NAMES, tmp_path / "d.png").stat().st_size > 0


@pytest.mark.parametrize("shape", ["chain", "ring"])
def test_graded_structure_is_flat_in_auto_mode_but_not_with_levels(shape):
    if shape == "chain":  # tasks on a line: every task about as close to its neighbours
        x = np.arange(6.0)
        m = -np.abs(x[:, None] - x[None, :])
    else:
        th = np.arange(6) * 2 * np.pi / 6
        p = np.stack([np.cos(th), np.sin(th)], 1)
        m = -np.linalg.norm(p[:, None] - p[None], axis=-1)
    info = cut_info(m, NAMES)
    assert info["correlation"] < 0.6 and info["flat"]
    assert tree_from_affinity(m, NAMES) == TaskTree.flat(NAMES)
    assert tree_from_affinity(m, NAMES, levels=1).depth() == 3
    assert tree_from_affinity(m, NAMES, min_correlation=0.0, min_separation=-1.0).depth() == 3


def test_silhouette_correlation_and_distance():
    d = affinity_to_distance(block(GROUPS))
    assert d.min() == 0.0 and d.max() == 1.0 and np.allclose(d, d.T) and np.all(np.diag(d) == 0)
    assert silhouette(d, GROUPS) == pytest.approx(1.0)
    assert point_biserial(d, GROUPS) == pytest.approx(1.0)
    for trivial in ([0] * 6, list(range(6))):
        assert silhouette(d, trivial) == 0.0 and point_biserial(d, trivial) == 0.0
    assert point_biserial(3 * d + 1, [0, 0, 1, 1, 2, 2]) == pytest.approx(point_biserial(d, [0, 0, 1, 1, 2, 2]))
    assert separation(d, GROUPS) == 1.0 and separation(d, [0] * 6) == 0.0
    assert separation(d, [0, 0, 1, 1, 2, 2]) == pytest.approx(-1.0)  # every within pair is the farther one


def test_a_cut_that_does_not_separate_is_not_kept():
    # three clear pairs, but one within-pair distance exceeds a between-pair distance
    m = block(GROUPS)
    m[0, 3] = m[3, 0] = 0.3
    m[1, 2] = m[2, 1] = 0.4
    info = cut_info(m, NAMES)
    assert info["correlation"] > 0.6 and info["separation"] < 1.0 and info["flat"]
    assert tree_from_affinity(m, NAMES) == TaskTree.flat(NAMES)
    assert tree_from_affinity(m, NAMES, min_separation=0.5).depth() == 3


@pytest.mark.parametrize("linkage", ["average", "complete", "single", "weighted"])
def test_linkages(linkage):
    tree = tree_from_affinity(block(GROUPS, noise=0.02), NAMES, linkage=linkage)
    assert adjusted_rand_index(tree_group_labels(tree, NAMES), GROUPS) == 1.0


def test_tree_from_affinity_is_reachable_from_tasktree():
    m = block(GROUPS)
    assert TaskTree.from_affinity(m, NAMES) == tree_from_affinity(m, NAMES)
    json.loads(TaskTree.from_affinity(m, NAMES).to_json())


@pytest.mark.parametrize("matrix, names, match", [
    (np.ones((3, 4)), ["a", "b", "c"], "square"),
    (np.ones(3), ["a", "b", "c"], "square"),
    (np.ones((3, 3)), ["a", "b"], "2 names"),
    (np.array([[1, np.nan], [np.nan, 1]]), ["a", "b"], "non-finite"),
    (np.array([[1, np.inf], [0, 1]]), ["a", "b"], "non-finite"),
    (np.ones((2, 2)), ["a", "a"], "twice"),
    (np.ones((2, 2)), ["a", ""], "non-empty"),
    (np.zeros((0, 0)), [], "empty"),
    ([["x", "y"], ["z", "w"]], ["a", "b"], "numeric"),
])
def test_bad_matrices(matrix, names, match):
    with pytest.raises(AffinityMatrixError, match=match):
        tree_from_affinity(matrix, names)
    assert issubclass(AffinityMatrixError, TreeError)


def test_bad_options():
    m = block(GROUPS)
    with pytest.raises(ValueError, match="not both"):
        tree_from_affinity(m, NAMES, levels=1, threshold=0.5)
    with pytest.raises(ValueError, match="levels"):
        tree_from_affinity(m, NAMES, levels=-1)
    with pytest.raises(ValueError, match="levels"):
        tree_from_affinity(m, NAMES, levels=1.5)
    with pytest.raises(ValueError, match="linkage"):
        tree_from_affinity(m, NAMES, linkage="ward-ish")
    with pytest.raises(ValueError, match="threshold"):
        tree_from_affinity(m, NAMES, threshold=float("nan"))


def test_dendrogram_plot(tmp_path):
    p = dendrogram_plot(block(GROUPS, noise=0.05), NAMES, tmp_path / "sub" / "dendro.png")
    assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adjusted_rand_index():
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 7, 7]) == 1.0
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    assert adjusted_rand_index([0, 0, 0, 0], [0, 0, 0, 0]) == 1.0
    # against the textbook value (sklearn.metrics.adjusted_rand_score gives 0.24242...)
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.242424, abs=1e-6)
    with pytest.raises(ValueError):
        adjusted_rand_index([0, 1], [0, 1, 2])
