"""Run reports: :class:`Report` collects markdown sections (tables, and the
figures of :mod:`hipro_fast.app.plots` linked relatively) and writes
``report.md`` in a run directory, atomically."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..files import atomic_write_text

__all__ = ["Report", "accuracy_table", "percent_scale"]


def percent_scale(results: Mapping[str, Mapping[str, float]]) -> float:
    """100 when the per-task values are fractions (every finite one in [0, 1]),
    else 1 (already %). The "mean" entries and NaNs do not decide."""
    vals = [float(v) for m in results.values() for t, v in m.items() if t != "mean" and v is not None]
    finite = [v for v in vals if math.isfinite(v)]
    return 100.0 if all(0.0 <= v <= 1.0 for v in finite) else 1.0


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")  # a "|" in a name would split the column


def accuracy_table(results: Mapping[str, Mapping[str, float]]) -> str:
    """Markdown table, one row per method, one column per task plus the mean (in %).
    The mean is over every task of the table, so "-" when a method lacks one or
    has a non-finite value (a mean over fewer tasks would not compare)."""
    methods = list(results)
    tasks: list[str] = []
    for m in methods:
        tasks += [t for t in results[m] if t not in tasks and t != "mean"]
    scale = percent_scale(results)
    rows = ["| " + " | ".join(["method", *map(_cell, tasks), "mean"]) + " |",
            "|" + "---|" * (len(tasks) + 2)]
    for m in methods:
        vals = [results[m].get(t) for t in tasks]
        finite = [v is not None and math.isfinite(float(v)) for v in vals]
        cells = [f"{float(v) * scale:.1f}" if ok else "-" for v, ok in zip(vals, finite)]
        mean = f"{scale * sum(float(v) for v in vals) / len(vals):.1f}" if tasks and all(finite) else "-"
        rows.append("| " + " | ".join([_cell(m), *cells, mean]) + " |")
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
        return atomic_write_text(Path(self.run_dir) / name, self.markdown())
