"""Every matplotlib figure of the package (Agg backend, one PNG per call,
returning its path): affinity heatmap, dendrogram, task tree, accuracy bars,
training curves and the accuracy-vs-shots figure."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from scipy.cluster.hierarchy import dendrogram

from ..method.grouping import affinity_to_distance, cut_info, linkage_matrix, validate_affinity_matrix
from ..method.tree import ROOT, TaskTree, leaf_id
from ..errors import InvalidInputError
from .report import percent_scale

__all__ = ["plot_affinity", "dendrogram_plot", "plot_tree", "plot_affinity_heatmap", "plot_dendrogram",
           "plot_accuracy_bars", "plot_curves", "plot_accuracy_vs_shots"]


def _save(fig, path: str | Path) -> Path:
    """Lay out, write as a 120-dpi PNG (creating the folder) and close `fig`."""
    plt = _plt()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _label(name: str) -> str:
    """A task or method name as matplotlib text: a "$" would start math mode
    (garbled, or a parse error at layout that names no task)."""
    return str(name).replace("$", r"\$")


def _labels(names: Sequence[str]) -> list[str]:
    return [_label(n) for n in names]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt




def plot_affinity(matrix, names: Sequence[str], path: str | Path, title: str = "task affinity") -> Path:
    """Heatmap PNG of the affinity matrix (matplotlib Agg), values annotated when small."""
    plt = _plt()

    m = np.asarray(matrix, dtype=float)
    names = list(names)
    if m.shape != (len(names), len(names)):
        raise InvalidInputError(f"matrix {m.shape} does not match {len(names)} names")
    n = len(names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n, 0.8 + 0.5 * n))
    off = m[~np.eye(n, dtype=bool)] if n > 1 else m.ravel()
    lim = float(np.max(np.abs(off))) if off.size else 1.0
    im = ax.imshow(m, cmap="RdBu_r", vmin=-lim or -1, vmax=lim or 1)
    ax.set_xticks(range(n), _labels(names), rotation=60, ha="right")
    ax.set_yticks(range(n), _labels(names))
    if n <= 16:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{m[i, j]:.2g}", ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)
    ax.set_title(title)
    return _save(fig, path)


def dendrogram_plot(matrix, names: Sequence[str], path: str | Path, linkage: str = "average",
                    title: str = "task dendrogram", auto_cut: bool = True) -> Path:
    """PNG of the average-linkage dendrogram over the normalised distance, with the
    automatic cut drawn when it keeps one and `auto_cut` (False: the tree was cut
    another way, by levels or a threshold, which the figure should not contradict)."""
    plt = _plt()

    m, names = validate_affinity_matrix(matrix, names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(1.5 + 0.5 * len(names), 3.5))
    d = affinity_to_distance(m)
    if d is None or len(names) < 2:
        ax.text(0.5, 0.5, "no structure (constant affinity or < 2 tasks):\nflat tree",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks(range(len(names)), _labels(names), rotation=60, ha="right")
    else:
        Z = linkage_matrix(d, linkage)
        dendrogram(Z, labels=_labels(names), ax=ax, leaf_rotation=60, color_threshold=0)
        info = cut_info(m, names, linkage)
        if auto_cut and not info["flat"]:
            merges = len(names) - info["clusters"]
            y = (Z[merges - 1, 2] + Z[merges, 2]) / 2
            ax.axhline(y, color="tab:red", ls="--", lw=1,
                       label=f"auto cut: {info['clusters']} groups (silhouette {info['silhouette']:.2f}, "
                             f"correlation {info['correlation']:.2f}, separation {info['separation']:.2f})")
            # below the axes: inside, the long label ran off a narrow figure and hid the top merge
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.35), fontsize=7, frameon=False)
        ax.set_ylabel("distance\n(1 - scaled affinity)")
    ax.set_title(title)
    return _save(fig, path)


def plot_tree(tree: TaskTree, path: str | Path, title: str = "task tree") -> Path:
    """Dendrogram-style drawing of a task tree, saved as a PNG."""
    plt = _plt()

    tasks = tree.tasks
    ypos = {leaf_id(t): i for i, t in enumerate(tasks)}
    depth_of = {}
    for n in tree.dfs():
        parent = tree.nodes[n].parent
        depth_of[n] = 0 if parent is None else depth_of[parent] + 1
    max_depth = max(depth_of.values())

    def place(n: str) -> float:
        node = tree.nodes[n]
        if node.task is not None:
            return ypos[n]
        ys = [place(c) for c in node.children]
        ypos[n] = sum(ys) / len(ys)
        return ypos[n]

    place(ROOT)
    fig, ax = plt.subplots(figsize=(6, 0.45 * len(tasks) + 1.5))
    for n, node in tree.nodes.items():
        x = max_depth if node.task is not None else depth_of[n]
        for c in node.children:
            cx = max_depth if tree.nodes[c].task is not None else depth_of[c]
            ax.plot([x, x, cx], [ypos[n], ypos[c], ypos[c]], color="tab:blue")
    ax.set_yticks(range(len(tasks)), _labels(tasks))
    ax.set_xticks(range(max_depth + 1))
    ax.set_xlabel("tree level (0 = root)")
    ax.set_title(title)
    return _save(fig, path)



def plot_affinity_heatmap(matrix, names: Sequence[str], path: str | Path,
                          title: str = "task affinity") -> Path:
    """Heatmap of a [T, T] task-affinity matrix."""
    return Path(plot_affinity(matrix, list(names), path, title=title))




def plot_dendrogram(tree, path: str | Path, title: str = "task tree", matrix=None,
                    names: Sequence[str] | None = None, linkage: str = "average", auto_cut: bool = True) -> Path:
    """The task tree as a dendrogram: the affinity dendrogram
    (dendrogram_plot) when a matrix is given, else plot_tree."""
    path = Path(path)
    if matrix is not None and names is not None:
        return Path(dendrogram_plot(matrix, list(names), path, linkage=linkage, auto_cut=auto_cut))
    return Path(plot_tree(tree, path, title=title))




def plot_accuracy_bars(results: Mapping[str, Mapping[str, float]], path: str | Path,
                       title: str = "test accuracy per task") -> Path:
    """Grouped bars: results = {method: {task: accuracy in [0, 1] or %}}."""
    plt = _plt()
    methods = list(results)
    tasks: list[str] = []
    for m in methods:
        tasks += [t for t in results[m] if t not in tasks and t != "mean"]
    scale = percent_scale(results)
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 1.2 * len(tasks) + 2)), 4.2))
    x = np.arange(len(tasks))
    for k, m in enumerate(methods):
        vals = [results[m].get(t, np.nan) * scale for t in tasks]
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, vals, width, label=_label(m))
    ax.set_xticks(x, _labels(tasks), rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(methods) > 1:
        ax.legend(fontsize=8, ncols=min(4, len(methods)))
    return _save(fig, path)




def _is_number(v) -> bool:
    """A real number: Python, numpy or a one-element tensor (not a bool)."""
    if isinstance(v, bool) or v is None:
        return False
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def plot_curves(history: Sequence[Mapping[str, float]], path: str | Path, keys: Sequence[str] = ("loss",),
                x: str = "epoch", title: str = "training") -> Path | None:
    """Line plot of metric records (e.g. the loss per epoch); None when nothing to draw."""
    rows = [r for r in history if _is_number(r.get(x)) and any(_is_number(r.get(k)) for k in keys)]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        pts = [(float(r[x]), float(r[k])) for r in rows if _is_number(r.get(k))]
        if pts:
            ax.plot(*zip(*pts), label=k)
    ax.set_xlabel(x)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    return _save(fig, path)




def _dodged(k: float, i: int, n: int) -> float:
    """Where the i-th of n methods is drawn at shot count k alone: spread over half an
    octave, so that the error bars of close means do not hide one another."""
    return k * 2 ** ((i - (n - 1) / 2) * min(0.12, 0.5 / n))


def plot_accuracy_vs_shots(result, path: str | Path, title: str = "accuracy vs shots") -> Path:
    """CoOp's main figure: mean test accuracy (%) over tasks against the number of
    shots, one line per method, with a ±std band over seeds when there are
    several. With one shot count, a line and a band have no width: each method
    is a marker with ±std error bars instead. `result` is a
    hipro_fast.method.protocol.ProtocolResult."""
    plt = _plt()
    shots = sorted(result.shots)  # as given they may be out of order: a line would zigzag back
    single = len(shots) == 1
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, method in enumerate(result.methods):
        stats = [result.mean_std(method, k) for k in shots]
        mean = np.array([100 * m for m, _ in stats])
        std = np.array([100 * s for _, s in stats]) if all(s is not None for _, s in stats) else None
        style = dict(lw=2.4, marker="o") if method == "hipro" else dict(lw=1.4, marker=".")
        if single:  # a lone "." marker is hard to find: every method gets an "o"
            x = [_dodged(shots[0], i, len(result.methods))]
            ax.errorbar(x, mean, yerr=std, label=_label(method), ls="none", capsize=4, **style | {"marker": "o"})
            continue
        (line,) = ax.plot(shots, mean, label=_label(method), **style)
        if std is not None:
            ax.fill_between(shots, mean - std, mean + std, color=line.get_color(), alpha=0.15, lw=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    if single:  # else the limits hug the dodged markers, or are arbitrary around one
        ax.set_xlim(shots[0] / 2, shots[0] * 2)
    ax.set_xlabel("shots per class")
    ax.set_ylabel("mean test accuracy over tasks (%)")
    spread = "±std bars" if single else "±std band"
    seeds = f"{len(result.seeds)} seeds, {spread}" if len(result.seeds) > 1 else "one seed"
    ax.set_title(f"{title} ({seeds})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)
