"""Task tree from a task-affinity matrix (agglomerative clustering).

Rules (hipro_fast's own choices; the HiPro paper does not publish its rule):

Distance. Symmetrise A <- (A + A^T) / 2, ignore the diagonal, and map the
off-diagonal affinities linearly onto [0, 1]:

    D[i, j] = (a_max - A[i, j]) / (a_max - a_min),   D[i, i] = 0,

a_max / a_min the largest / smallest off-diagonal affinity. The estimators
have different units (a lookahead loss ratio ~1e-3, a z-scored transfer, a
cosine in [-1, 1]); linkage merge orders are unchanged by an increasing affine
map of the distances, so this changes no tree, and it puts `threshold` and the
merge heights in the same units for every estimator (0 = the most affine pair,
1 = the least). When every off-diagonal affinity is equal (range <= 1e-9 of
their magnitude) there is no structure: flat tree.

Dendrogram. scipy.cluster.hierarchy.linkage on the condensed D (average
linkage by default: a group's distance is the mean pairwise distance, which
neither chains like single linkage nor lets one outlier pair veto a merge like
complete linkage). Cutting it after m of its T - 1 merges gives T - m clusters;
the candidate cuts are those with 2 .. T - 1 clusters, each scored by the mean
silhouette of its partition on D (singletons score 0).

Which cuts:
  * automatic (levels=None, threshold=None): the cut of highest silhouette,
    kept when the structure is clear: the cut separates the tasks (Baker &
    Hubert's gamma = 1: every within-group distance is below every
    between-group one) and explains the distances (point-biserial
    correlation between a pair's distance and "the cut splits the pair"
    >= MIN_CORRELATION = 0.6); otherwise a flat tree. One internal level:
    root -> groups -> leaves.
    Why these scores: the silhouette picks the number of groups (the largest
    gap in merge heights picks the coarsest split whenever one group sits
    between two others), but it depends on where D puts its zero, which the
    rescaling fixes arbitrarily (a graded chain of tasks scores 1.0); gamma
    and the correlation are unchanged by affine maps of D, so they decide
    whether the cut is kept (a chain or a ring of tasks is not). With few
    tasks random affinities can pass, so judge an estimate's noise by
    repeating it with another seed; with many tasks and a noisy affinity
    gamma = 1 is strict: ask for levels=1 to force the best cut. How often
    each rule recovers planted groups: benchmarks/results/ablation_planted.md.
  * levels=L: cuts in decreasing silhouette, each kept only when it adds an
    internal level to the tree (a finer cut that only splits pairs into
    leaves adds none), until L levels or no cut is left; no correlation bar.
    levels=0 is the flat tree.
  * threshold=t: one cut: groups = the clusters of the merges at height <= t
    (t in the [0, 1] units of D).

Trivial cases: 1 or 2 tasks give a flat tree (nothing to group). Clusters of
one task are leaves of their parent (TaskTree.from_nested collapses
single-member groups). Errors (AffinityMatrixError, a TreeError): a matrix
that is not square, does not match the names, holds NaN/inf, or duplicate or
empty names.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import AffinityMatrixError, InvalidInputError, TreeError

LINKAGES = ("average", "complete", "single", "weighted")
MIN_CORRELATION = 0.6
MIN_SEPARATION = 1.0


def validate_affinity_matrix(matrix, names: Sequence[str]) -> tuple[np.ndarray, list[str]]:
    names = list(names)
    try:
        m = np.asarray(matrix, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise AffinityMatrixError(f"affinity matrix is not numeric: {e}") from None
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise AffinityMatrixError(f"affinity matrix must be square, got shape {m.shape}")
    if m.shape[0] != len(names):
        raise AffinityMatrixError(f"affinity matrix is {m.shape[0]}x{m.shape[0]} but {len(names)} names were given")
    if len(names) == 0:
        raise AffinityMatrixError("affinity matrix is empty (no tasks)")
    for n in names:
        if not isinstance(n, str) or not n:
            raise AffinityMatrixError(f"task names must be non-empty strings, got {n!r}")
    seen = set()
    for n in names:
        if n in seen:
            raise AffinityMatrixError(f"task name {n!r} appears twice")
        seen.add(n)
    if not np.all(np.isfinite(m)):
        i, j = np.argwhere(~np.isfinite(m))[0]
        raise AffinityMatrixError(f"affinity matrix has a non-finite entry at ({names[i]!r}, {names[j]!r}): {m[i, j]}")
    return m, names


def affinity_to_distance(matrix) -> np.ndarray | None:
    """D in [0, 1] (module docstring), or None when the off-diagonal affinity is constant."""
    m = np.asarray(matrix, dtype=np.float64)
    m = (m + m.T) / 2
    n = m.shape[0]
    off = m[~np.eye(n, dtype=bool)]
    if off.size == 0:
        return None
    hi, lo = float(off.max()), float(off.min())
    if hi - lo <= 1e-9 * max(1.0, abs(hi), abs(lo)):
        return None
    d = (hi - m) / (hi - lo)
    np.fill_diagonal(d, 0.0)
    return d


def silhouette(distance: np.ndarray, labels: Sequence[int]) -> float:
    """Mean silhouette of a partition on a distance matrix (singletons score 0)."""
    d = np.asarray(distance, dtype=np.float64)
    labels = np.asarray(labels)
    ks = np.unique(labels)
    if len(ks) < 2 or len(ks) == len(labels):
        return 0.0
    s = np.zeros(len(labels))
    for i in range(len(labels)):
        own = labels == labels[i]
        if own.sum() == 1:
            continue
        a = d[i, own].sum() / (own.sum() - 1)
        b = min(d[i, labels == k].mean() for k in ks if k != labels[i])
        s[i] = 0.0 if max(a, b) == 0 else (b - a) / max(a, b)
    return float(s.mean())


def point_biserial(distance: np.ndarray, labels: Sequence[int]) -> float:
    """Correlation, over task pairs, between the distance and "in different groups"
    (Milligan's point-biserial index; 0 for a partition with one group or all singletons).
    Unchanged by increasing affine maps of the distance."""
    d = np.asarray(distance, dtype=np.float64)
    labels = np.asarray(labels)
    iu = np.triu_indices(len(labels), 1)
    diff = (labels[:, None] != labels[None, :])[iu].astype(np.float64)
    x = d[iu]
    if diff.std() == 0 or x.std() == 0:
        return 0.0
    return float(np.corrcoef(x, diff)[0, 1])


def separation(distance: np.ndarray, labels: Sequence[int]) -> float:
    """Baker & Hubert's gamma between "same group" and distance: over every (within-group
    pair, between-group pair) couple, (concordant - discordant) / (both), where
    concordant = the within pair is the closer one. 1.0: every within-group distance
    is below every between-group distance. 0 when one side is empty."""
    d = np.asarray(distance, dtype=np.float64)
    labels = np.asarray(labels)
    iu = np.triu_indices(len(labels), 1)
    same = (labels[:, None] == labels[None, :])[iu]
    w, b = d[iu][same], d[iu][~same]
    if w.size == 0 or b.size == 0:
        return 0.0
    conc = int((w[:, None] < b[None, :]).sum())
    disc = int((w[:, None] > b[None, :]).sum())
    return 0.0 if conc + disc == 0 else (conc - disc) / (conc + disc)


def linkage_matrix(d: np.ndarray, method: str) -> np.ndarray:
    from scipy.cluster.hierarchy import linkage as scipy_linkage
    from scipy.spatial.distance import squareform

    if method not in LINKAGES:
        raise InvalidInputError(f"linkage must be one of {LINKAGES}, got {method!r}")
    return scipy_linkage(squareform(d, checks=False), method=method)


def _clusters_at(Z: np.ndarray, n: int, merges: int) -> np.ndarray:
    """Cluster label of each task after the first `merges` merges of the linkage."""
    parent = list(range(n))

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    cluster_rep = {i: i for i in range(n)}  # linkage cluster id -> a member task
    for k in range(merges):
        a, b = int(Z[k, 0]), int(Z[k, 1])
        ra, rb = find(cluster_rep[a]), find(cluster_rep[b])
        parent[rb] = ra
        cluster_rep[n + k] = ra
    roots = [find(i) for i in range(n)]
    _, labels = np.unique(roots, return_inverse=True)
    return labels


def _nested(names: list[str], partitions: list[np.ndarray]) -> list[Any]:
    """Nested spec from coarse-to-fine partitions (each refines the previous)."""

    def build(members: list[int], level: int) -> list[Any]:
        if level == len(partitions):
            return [names[i] for i in members]
        labels = partitions[level]
        groups: dict[int, list[int]] = {}
        for i in members:
            groups.setdefault(int(labels[i]), []).append(i)
        if len(groups) == 1:
            return build(members, level + 1)
        out = []
        for g in sorted(groups, key=lambda g: min(groups[g])):
            sub = build(groups[g], level + 1)
            out.append(sub[0] if len(sub) == 1 else sub)
        return out

    return build(list(range(len(names))), 0)


def cut_scores(d: np.ndarray, Z: np.ndarray) -> list[tuple[int, int, float, float]]:
    """(merges, clusters, silhouette, point-biserial) of every dendrogram cut with 2 .. T-1 clusters."""
    n = d.shape[0]
    out = []
    for merges in range(1, n - 1):
        labels = _clusters_at(Z, n, merges)
        out.append((merges, n - merges, silhouette(d, labels), point_biserial(d, labels)))
    return out


def _ranked_cuts(d: np.ndarray, Z: np.ndarray) -> list[tuple[int, int, float, float]]:
    """Cuts by decreasing silhouette (ties: fewer clusters first)."""
    return sorted(cut_scores(d, Z), key=lambda c: (-c[2], c[1]))


def cut_info(matrix, names: Sequence[str], linkage: str = "average",
             min_correlation: float = MIN_CORRELATION, min_separation: float = MIN_SEPARATION) -> dict[str, Any]:
    """Diagnostics of the automatic rule: merge heights, every cut's scores, the choice."""
    m, names = validate_affinity_matrix(matrix, names)
    d = affinity_to_distance(m)
    if d is None or len(names) < 3:
        return {"heights": [], "cuts": [], "clusters": 1, "labels": [0] * len(names),
                "silhouette": 0.0, "correlation": 0.0, "separation": 0.0, "flat": True}
    Z = linkage_matrix(d, linkage)
    ranked = _ranked_cuts(d, Z)
    merges, clusters, sil, corr = ranked[0]
    labels = _clusters_at(Z, len(names), merges)
    sep = separation(d, labels)
    flat = not _clear(corr, sep, min_correlation, min_separation)
    return {"heights": Z[:, 2].tolist(),
            "cuts": [{"clusters": c, "silhouette": s, "correlation": r}
                     for _, c, s, r in sorted(ranked, key=lambda c: c[1])],
            "clusters": 1 if flat else clusters,
            "labels": [0] * len(names) if flat else labels.tolist(),
            "silhouette": sil, "correlation": corr, "separation": sep, "flat": flat}


def _clear(corr: float, sep: float, min_correlation: float, min_separation: float) -> bool:
    return corr >= min_correlation and sep >= min_separation - 1e-12


def nested_from_affinity(matrix, names: Sequence[str], levels: int | None = None,
                         threshold: float | None = None, linkage: str = "average",
                         min_correlation: float = MIN_CORRELATION,
                         min_separation: float = MIN_SEPARATION) -> list[Any]:
    """The nested task-group spec (``TaskTree.from_nested`` input) of an affinity
    matrix, by the rules in the module docstring; a flat list means no groups.

    Args:
        matrix: [T, T] affinity (higher = more related); symmetrised here.
        names: the T task names (unique), in the matrix's order.
        levels: number of internal levels between the root and the leaves
            (0 = flat); None with threshold None = automatic.
        threshold: merge-height cut in the normalised distance units [0, 1]
            (exclusive with levels).
        linkage: scipy linkage method ("average", "complete", "single", "weighted").
        min_correlation, min_separation: automatic mode's bars (point-biserial
            correlation and Baker-Hubert separation of the chosen cut) for
            keeping it rather than a flat tree.
    """
    m, names = validate_affinity_matrix(matrix, names)
    if levels is not None and threshold is not None:
        raise InvalidInputError("give levels or threshold, not both")
    if levels is not None and (isinstance(levels, bool) or int(levels) != levels or levels < 0):
        raise InvalidInputError(f"levels must be an integer >= 0, got {levels!r}")
    if threshold is not None and not np.isfinite(threshold):
        raise InvalidInputError(f"threshold must be finite, got {threshold!r}")
    if linkage not in LINKAGES:
        raise InvalidInputError(f"linkage must be one of {LINKAGES}, got {linkage!r}")
    n = len(names)
    d = affinity_to_distance(m)
    if n < 3 or d is None or levels == 0:
        return list(names)
    Z = linkage_matrix(d, linkage)
    if threshold is not None:
        merges = int(np.sum(Z[:, 2] <= threshold))
        cuts = [merges] if 0 < merges < n - 1 else []
    else:
        ranked = _ranked_cuts(d, Z)
        if levels is None:
            merges, _, _, corr = ranked[0]
            sep = separation(d, _clusters_at(Z, n, merges))
            cuts = [merges] if _clear(corr, sep, min_correlation, min_separation) else []
        else:
            cuts, depth = [], spec_depth(list(names))
            for merges, *_ in ranked:
                if len(cuts) == int(levels):
                    break
                trial = _spec(names, Z, cuts + [merges])
                if spec_depth(trial) > depth:  # the cut adds an internal level
                    cuts.append(merges)
                    depth = spec_depth(trial)
    return _spec(names, Z, cuts)


def _spec(names: list[str], Z: np.ndarray, cuts: list[int]) -> list[Any]:
    if not cuts:
        return list(names)
    partitions = [_clusters_at(Z, len(names), merges) for merges in sorted(cuts, reverse=True)]
    return _nested(names, partitions)


def spec_depth(spec: Any) -> int:
    """Levels of a nested spec counted as TaskTree.depth counts them (a
    single-member group collapses into its member; a task is one level)."""
    while isinstance(spec, (list, tuple)) and len(spec) == 1:
        spec = spec[0]
    if isinstance(spec, str):
        return 1
    return 1 + max(spec_depth(item) for item in spec)
