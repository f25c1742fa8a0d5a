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


# One model's eval table over a budget grid (model_hypervolume: the sweep's "how elastic" objective).
EVAL = [
    {"budget_label": "8x4", "accuracy": 0.25, "mean_tokens": 10.0, "mean_thinking_tokens": 6.0},
    {"budget_label": "16x8", "accuracy": 0.5, "mean_tokens": 20.0, "mean_thinking_tokens": 14.0},
    {"budget_label": "32x8", "accuracy": 0.5, "mean_tokens": 30.0, "mean_thinking_tokens": 25.0},  # dominated
    {"budget_label": "unconstrained", "accuracy": 0.75, "mean_tokens": 40.0, "mean_thinking_tokens": 33.0},
]
REF = {"accuracy": 0.0, "tokens": 50.0}


def test_model_hypervolume_staircase_by_hand():
    # Steps: 10..20 at 0.25, 20..40 at 0.5, 40..50 at 0.75; 32x8 (more tokens, same accuracy as 16x8) adds nothing.
    assert frontier.model_hypervolume(EVAL, REF) == pytest.approx(10 * 0.25 + 20 * 0.5 + 10 * 0.75)
    without = [r for r in EVAL if r["budget_label"] != "32x8"]
    assert frontier.model_hypervolume(without, REF) == pytest.approx(20.0)
    # Same table as Arrow or pandas; row order does not matter.
    assert frontier.model_hypervolume(pa.Table.from_pylist(EVAL[::-1]), REF) == pytest.approx(20.0)
    assert frontier.model_hypervolume(pd.DataFrame(EVAL), REF) == pytest.approx(20.0)
    # A higher accuracy floor: (0.5 - 0.4) x 20 + (0.75 - 0.4) x 10; 8x4 below the floor adds nothing.
    assert frontier.model_hypervolume(EVAL, {"accuracy": 0.4, "tokens": 50.0}) == pytest.approx(0.1 * 20 + 0.35 * 10)
    # The thinking-token axis: 6..14 at 0.25, 14..33 at 0.5, 33..50 at 0.75.
    hv = frontier.model_hypervolume(EVAL, REF, tokens="mean_thinking_tokens")
    assert hv == pytest.approx(8 * 0.25 + 19 * 0.5 + 17 * 0.75)


def test_model_hypervolume_clips_at_the_reference_and_selects_budgets():
    # unconstrained at 40 tokens lies past a 35-token reference: the staircase stops there.
    assert frontier.model_hypervolume(EVAL, {"accuracy": 0.0, "tokens": 35.0}) == pytest.approx(10 * 0.25 + 15 * 0.5)
    # Only the budgets asked for count: a single point is one rectangle.
    assert frontier.model_hypervolume(EVAL, REF, budgets=["unconstrained"]) == pytest.approx(10 * 0.75)
    assert frontier.model_hypervolume(EVAL, REF, budgets=["8x4", "unconstrained"]) == pytest.approx(
        30 * 0.25 + 10 * 0.75)
    # A point with NaN accuracy (an eval that produced nothing) adds nothing; a box nobody reaches is 0.
    nan_row = [{**EVAL[0], "accuracy": None}, *EVAL[1:]]
    assert frontier.model_hypervolume(nan_row, REF) == pytest.approx(20 * 0.5 + 10 * 0.75)
    assert frontier.model_hypervolume(EVAL, {"accuracy": 0.9, "tokens": 50.0}) == 0.0


def test_model_hypervolume_bad_input():
    with pytest.raises(ValueError, match="no rows"):
        frontier.model_hypervolume([], REF)
    with pytest.raises(ValueError, match=r"\['4x4'\] have no row"):
        frontier.model_hypervolume(EVAL, REF, budgets=["4x4", "8x4"])
    with pytest.raises(KeyError, match="mean_solution_tokens"):
        frontier.model_hypervolume(EVAL, REF, tokens="mean_solution_tokens")
    with pytest.raises(KeyError, match="tokens"):
        frontier.model_hypervolume(EVAL, {"accuracy": 0.0})
