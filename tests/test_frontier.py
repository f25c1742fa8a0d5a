"""Pareto fronts and hypervolumes on point sets small enough to check by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from matplotlib.figure import Figure

from orchestrator import frontier

# (tokens, accuracy): c is dominated by b (more tokens, less accuracy); d duplicates b.
POINTS = pd.DataFrame(
    {
        "label": ["a", "b", "c", "e", "d", "nan"],
        "mean_tokens": [100.0, 200.0, 300.0, 400.0, 200.0, 50.0],
        "accuracy": [0.5, 0.7, 0.6, 0.8, 0.7, np.nan],
        "cost": [1.0, 2.0, 3.0, 4.0, 2.0, 0.1],
        "method": ["x", "x", "y", "y", "x", "y"],
    }
)
MAX, MIN = ["accuracy"], ["mean_tokens"]


def test_pareto_mask_ties_and_nan():
    mask = frontier.pareto_mask(POINTS, MAX, MIN)
    assert mask.tolist() == [True, True, False, True, True, False]
    # Depends on values only, not on row order.
    shuffled = POINTS.iloc[::-1]
    assert frontier.pareto_mask(shuffled, MAX, MIN).tolist() == mask[::-1].tolist()
    # Arrow tables work the same.
    assert frontier.pareto_mask(pa.Table.from_pandas(POINTS), MAX, MIN).tolist() == mask.tolist()


def test_pareto_front_sorted_by_first_minimized():
    front = frontier.pareto_front(POINTS.iloc[::-1], MAX, MIN)
    assert front["label"].tolist() == ["a", "d", "b", "e"]


def test_three_objectives():
    # c stays dominated (b is cheaper too); a slow but very cheap point joins the front.
    pts = pd.concat(
        [
            POINTS,
            pd.DataFrame(
                {
                    "label": ["cheap"],
                    "mean_tokens": [900.0],
                    "accuracy": [0.1],
                    "cost": [0.01],
                    "method": ["y"],
                }
            ),
        ]
    )
    mask = frontier.pareto_mask(pts, MAX, ["mean_tokens", "cost"])
    assert pts["label"][mask].tolist() == ["a", "b", "e", "d", "cheap"]


def test_hypervolume_2d_by_hand():
    # Union of [tokens, 500] x [0, accuracy]: 100..200 at 0.5, 200..400 at 0.7, 400..500 at 0.8.
    hv = frontier.hypervolume(POINTS, MAX, MIN, reference={"accuracy": 0.0, "mean_tokens": 500.0})
    assert hv == pytest.approx(100 * 0.5 + 200 * 0.7 + 100 * 0.8)
    # Points outside the reference box add nothing (e at 400 tokens is cut by a 300 reference).
    hv = frontier.hypervolume(POINTS, MAX, MIN, reference={"accuracy": 0.0, "mean_tokens": 300.0})
    assert hv == pytest.approx(100 * 0.5 + 100 * 0.7)
    assert frontier.hypervolume(POINTS, MAX, MIN, reference={"accuracy": 0.9, "mean_tokens": 500.0}) == 0.0


def test_hypervolume_3d_by_hand():
    pts = pd.DataFrame({"accuracy": [0.5, 0.8], "mean_tokens": [100.0, 300.0], "cost": [1.0, 2.0]})
    ref = {"accuracy": 0.0, "mean_tokens": 500.0, "cost": 5.0}
    # A: 0.5*400*4 = 800, B: 0.8*200*3 = 480, overlap: 0.5*200*3 = 300.
    assert frontier.hypervolume(pts, MAX, ["mean_tokens", "cost"], ref) == pytest.approx(980.0)


def test_bad_arguments():
    with pytest.raises(ValueError):
        frontier.pareto_mask(POINTS, [], [])
    with pytest.raises(KeyError, match="nope"):
        frontier.pareto_mask(POINTS, ["nope"], MIN)
    with pytest.raises(ValueError, match="mean_tokens"):
        frontier.hypervolume(POINTS, MAX, MIN, reference={"accuracy": 0.0})


def test_frontier_table_and_groups():
    table = frontier.frontier_table(POINTS)
    assert isinstance(table, pa.Table)
    assert table.column("on_front").to_pylist() == [True, True, False, True, True, False]
    grouped = frontier.frontier_table(POINTS, group="method").column("on_front").to_pylist()
    # Within "y", c (300, 0.6) is no longer dominated by b.
    assert grouped == [True, True, True, True, True, False]


def test_plot_frontier_saves_png(tmp_path):
    fig = frontier.plot_frontier(POINTS, title="elastic")
    assert isinstance(fig, Figure)
    fig.savefig(tmp_path / "front.png")
    assert (tmp_path / "front.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    texts = {t.get_text() for t in fig.axes[0].texts}
    assert texts == {"a", "b", "d", "e"}  # labels on front points only
    fig = frontier.plot_frontier(pa.Table.from_pandas(POINTS), group="method", label=None, logx=True)
    fig.savefig(tmp_path / "grouped.png")
    assert not fig.axes[0].texts
