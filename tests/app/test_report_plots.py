"""app/report.py and app/plots.py: tables and figures from awkward inputs
(NaN, missing tasks, names with '|' or '$', shots out of order, numpy numbers)."""
from __future__ import annotations

import statistics
import types

import numpy as np
import pytest
import torch
from matplotlib.container import ErrorbarContainer

from hipro_fast.app import plots
from hipro_fast.app.report import accuracy_table, percent_scale
from hipro_fast.method.protocol import ProtocolResult


def test_accuracy_table_keeps_its_unit_and_means_only_whole_rows():
    table = accuracy_table({"A": {"t1": 0.8, "t2": float("nan")}, "B|x": {"t1": 0.9, "t2": 0.7}, "C": {"t1": 0.5}})
    assert table.splitlines() == ["| method | t1 | t2 | mean |", "|---|---|---|---|",
                                  "| A | 80.0 | - | - |",        # a NaN does not switch the table to raw values
                                  "| B\\|x | 90.0 | 70.0 | 80.0 |",  # a '|' in a name stays in its cell
                                  "| C | 50.0 | - | - |"]      # no mean over fewer tasks than the others
    assert accuracy_table({}).splitlines() == ["| method | mean |", "|---|---|"]
    assert percent_scale({"A": {"t1": 80.0, "mean": 80.0}}) == 1.0
    assert percent_scale({"A": {"t1": 0.8, "mean": 80.0}}) == 100.0  # "mean" does not decide


def test_figures_take_names_with_dollars_and_numpy_numbers(tmp_path):
    names = ["$5-$10 bills", "cost $_$ range", "plain"]
    m = np.array([[0, 0.9, 0.1], [0.9, 0, 0.2], [0.1, 0.2, 0]])
    assert plots.plot_affinity(m, names, tmp_path / "a.png").stat().st_size > 0
    assert plots.plot_accuracy_bars({"$m$": {n: 0.5 for n in names}}, tmp_path / "b.png").stat().st_size > 0
    history = [{"epoch": np.int64(e), "loss": np.float32(1.0 / (e + 1)), "val_mean": torch.tensor(0.5)}
               for e in range(3)]
    assert plots.plot_curves(history, tmp_path / "c.png", keys=("loss", "val_mean")) is not None
    assert plots.plot_curves([{"epoch": 0, "loss": None}], tmp_path / "none.png") is None


def test_accuracy_vs_shots_draws_the_shots_in_order(tmp_path, monkeypatch):
    drawn = []
    real_plot = plots._plt().Axes.plot

    def spy(self, x, *args, **kw):
        drawn.append(list(x))
        return real_plot(self, x, *args, **kw)

    monkeypatch.setattr(plots._plt().Axes, "plot", spy)
    result = types.SimpleNamespace(shots=[16, 1, 4], seeds=[0, 1], methods=["hipro"],
                                   mean_std=lambda m, k: ({1: 0.5, 4: 0.6, 16: 0.7}[k], 0.01))
    plots.plot_accuracy_vs_shots(result, tmp_path / "s.png")
    assert drawn == [[1, 4, 16]]


def test_a_dendrogram_of_a_tree_cut_by_levels_draws_no_automatic_cut(tmp_path, monkeypatch):
    lines = []
    real = plots._plt().Axes.axhline
    monkeypatch.setattr(plots._plt().Axes, "axhline", lambda self, *a, **k: lines.append(k) or real(self, *a, **k))
    blocks = np.kron(np.eye(2), np.ones((3, 3))) * 0.9 + 0.05
    names = [f"t{i}" for i in range(6)]
    plots.dendrogram_plot(blocks, names, tmp_path / "auto.png")
    assert len(lines) == 1 and "auto cut" in lines[0]["label"]
    plots.dendrogram_plot(blocks, names, tmp_path / "levels.png", auto_cut=False)
    assert len(lines) == 1


def _protocol_result(shots, accuracy):
    """A ProtocolResult of given accuracies: accuracy = {method: [mean task accuracy of each seed]}."""
    seeds = list(range(len(next(iter(accuracy.values())))))
    runs = {(k, s): {m: types.SimpleNamespace(mean=acc[s]) for m, acc in accuracy.items()}
            for k in shots for s in seeds}
    return ProtocolResult(tasks=["t"], shots=list(shots), seeds=seeds, methods=list(accuracy), runs=runs)


def _figure(monkeypatch, result, path):
    """plot_accuracy_vs_shots's figure (closed, but its artists are all there)."""
    figures = []
    real = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, p: figures.append(fig) or real(fig, p))
    plots.plot_accuracy_vs_shots(result, path)
    return figures[0]


def test_accuracy_at_one_shot_count_has_error_bars_of_one_std(tmp_path, monkeypatch):
    """A line and a band over one shot count have no width: the spread over seeds
    was invisible. Each method is an error bar of its mean ± std (%) instead."""
    accuracy = {"hipro": [0.71, 0.74, 0.69], "coop": [0.66, 0.70, 0.67], "zero-shot": [0.6, 0.6, 0.6]}
    ax = _figure(monkeypatch, _protocol_result([16], accuracy), tmp_path / "one.png").axes[0]
    bars = {c.get_label(): c for c in ax.containers if isinstance(c, ErrorbarContainer)}
    assert list(bars) == list(accuracy)
    for method, acc in accuracy.items():
        mean, std = 100 * statistics.mean(acc), 100 * statistics.stdev(acc)
        line, _, (bar,) = bars[method].lines
        assert line.get_ydata() == pytest.approx([mean])
        ((x0, low), (x1, high)), = bar.get_segments()
        assert x0 == x1 and (low, high) == pytest.approx((mean - std, mean + std))
        assert ax.get_xlim()[0] < x0 < ax.get_xlim()[1]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["16"]
    bar_lines = [c.lines[2][0] for c in bars.values()]
    assert all(any(c is b for b in bar_lines) for c in ax.collections)  # no zero-width band


def test_accuracy_at_several_shot_counts_keeps_its_lines_and_bands(tmp_path, monkeypatch):
    accuracy = {"hipro": [0.71, 0.74, 0.69], "coop": [0.66, 0.70, 0.67]}
    ax = _figure(monkeypatch, _protocol_result([4, 1, 16], accuracy), tmp_path / "many.png").axes[0]
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [(line.get_label(), list(line.get_xdata())) for line in ax.lines] == [(m, [1, 4, 16]) for m in accuracy]
    assert len(ax.collections) == len(accuracy)  # one ±std band each
    assert "±std band" in ax.get_title()
