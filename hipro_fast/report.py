"""Run reports: matplotlib PNGs and a report.md that links them.

Every figure function writes one PNG and returns its path; :class:`Report`
collects markdown sections and writes ``report.md`` in a run directory.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

__all__ = ["Report", "plot_affinity_heatmap", "plot_dendrogram", "plot_accuracy_bars", "plot_curves",
           "accuracy_table"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_affinity_heatmap(matrix, names: Sequence[str], path: str | Path,
                          title: str = "task affinity") -> Path:
    """Heatmap of a [T, T] task-affinity matrix (hipro_fast.affinity.plot_affinity)."""
    from .affinity import plot_affinity

    return Path(plot_affinity(matrix, list(names), path, title=title))


def plot_dendrogram(tree, path: str | Path, title: str = "task tree", matrix=None,
                    names: Sequence[str] | None = None, linkage: str = "average") -> Path:
    """The task tree as a dendrogram: the affinity dendrogram
    (hipro_fast.grouping.dendrogram_plot) when a matrix is given, else TaskTree.plot."""
    path = Path(path)
    if matrix is not None and names is not None:
        from .grouping import dendrogram_plot

        return Path(dendrogram_plot(matrix, list(names), path, linkage=linkage))
    return Path(tree.plot(path, title=title))


def plot_accuracy_bars(results: Mapping[str, Mapping[str, float]], path: str | Path,
                       title: str = "test accuracy per task") -> Path:
    """Grouped bars: results = {method: {task: accuracy in [0, 1] or %}}."""
    plt = _plt()
    methods = list(results)
    tasks: list[str] = []
    for m in methods:
        tasks += [t for t in results[m] if t not in tasks and t != "mean"]
    scale = 100.0 if all(0 <= v <= 1.0 for m in methods for v in results[m].values()) else 1.0
    width = 0.8 / max(1, len(methods))
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 1.2 * len(tasks) + 2)), 4.2))
    x = np.arange(len(tasks))
    for k, m in enumerate(methods):
        vals = [results[m].get(t, np.nan) * scale for t in tasks]
        ax.bar(x + (k - (len(methods) - 1) / 2) * width, vals, width, label=m)
    ax.set_xticks(x, tasks, rotation=30, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    if len(methods) > 1:
        ax.legend(fontsize=8, ncols=min(4, len(methods)))
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(history: Sequence[Mapping[str, float]], path: str | Path, keys: Sequence[str] = ("loss",),
                x: str = "epoch", title: str = "training") -> Path | None:
    """Line plot of metric records (e.g. the loss per epoch); None when empty."""
    rows = [r for r in history if x in r and any(k in r for k in keys)]
    if not rows:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for k in keys:
        pts = [(r[x], r[k]) for r in rows if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)]
        if pts:
            ax.plot(*zip(*pts), label=k)
    ax.set_xlabel(x)
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def accuracy_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table, one row per method, one column per task plus the mean (in %)."""
    methods = list(results)
    tasks: list[str] = []
    for m in methods:
        tasks += [t for t in results[m] if t not in tasks and t != "mean"]
    scale = 100.0 if all(0 <= v <= 1.0 for m in methods for v in results[m].values()) else 1.0
    head = "| method | " + " | ".join(tasks) + " | mean |"
    sep = "|---" * (len(tasks) + 2) + "|"
    rows = [head, sep]
    for m in methods:
        vals = [results[m].get(t) for t in tasks]
        ok = [v for v in vals if v is not None]
        mean = sum(ok) / len(ok) if ok else None
        cells = [f"{v * scale:.1f}" if v is not None else "-" for v in vals]
        rows.append(f"| {m} | " + " | ".join(cells) + f" | {mean * scale:.1f} |" if mean is not None
                    else f"| {m} | " + " | ".join(cells) + " | - |")
    return "\n".join(rows)


@dataclass
class Report:
    """Markdown sections written as run_dir/report.md (figures are linked relatively)."""

    run_dir: Path
    title: str = "hipro run"
    sections: list[tuple[str, str]] = field(default_factory=list)

    def add(self, heading: str, body: str) -> None:
        self.sections.append((heading, body.rstrip() + "\n"))

    def add_figure(self, heading: str, png: str | Path | None, caption: str = "") -> None:
        if png is None:
            return
        rel = Path(png).resolve().relative_to(Path(self.run_dir).resolve()) \
            if Path(png).resolve().is_relative_to(Path(self.run_dir).resolve()) else Path(png)
        body = f"![{heading}]({rel.as_posix()})\n"
        if caption:
            body += f"\n{caption}\n"
        self.add(heading, body)

    def markdown(self) -> str:
        out = [f"# {self.title}\n"]
        for heading, body in self.sections:
            out.append(f"## {heading}\n\n{body}")
        return "\n".join(out)

    def write(self, name: str = "report.md") -> Path:
        path = Path(self.run_dir) / name
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(self.markdown())
        tmp.replace(path)
        return path
