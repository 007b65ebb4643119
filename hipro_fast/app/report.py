"""Run reports: :class:`Report` collects markdown sections (tables, and the
figures of :mod:`hipro_fast.app.plots` linked relatively) and writes
``report.md`` in a run directory, atomically."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..files import atomic_write_text

__all__ = ["Report", "accuracy_table"]


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
        return atomic_write_text(Path(self.run_dir) / name, self.markdown())
