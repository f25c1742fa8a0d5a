"""Pareto frontiers of accuracy vs tokens vs cost: which budgets/runs are worth it, and how much.

Points are rows of a DataFrame or Arrow table (``accuracy``, ``mean_tokens``, ``cost`` plus labels such
as ``label``, ``budget_thinking``, ``budget_solution``, ``run_id``). A row is on the front when no other
row is at least as good in every objective and strictly better in one. Rows with a NaN objective are
never on the front and dominate nothing. Exact duplicates dominate neither each other, so all copies of
a front point are on the front: the result depends on the values only, never on row order.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Points = pd.DataFrame | pa.Table


def _frame(points: Points) -> pd.DataFrame:
    return points.to_pandas() if isinstance(points, pa.Table) else points


def _losses(df: pd.DataFrame, maximize: Sequence[str], minimize: Sequence[str]) -> np.ndarray:
    """Objectives as an (n, d) float matrix where smaller is better (maximized columns negated)."""
    if not maximize and not minimize:
        raise ValueError("pareto: give at least one column to maximize or minimize")
    missing = [c for c in [*maximize, *minimize] if c not in df.columns]
    if missing:
        raise KeyError(f"pareto: columns {missing} not in points (have {list(df.columns)})")
    cols = [-df[c].to_numpy(dtype=float) for c in maximize] + [df[c].to_numpy(dtype=float) for c in minimize]
    return np.column_stack(cols) if cols else np.empty((len(df), 0))


def _mask(losses: np.ndarray) -> np.ndarray:
    valid = ~np.isnan(losses).any(axis=1)
    pts = losses[valid]
    front = np.ones(len(pts), dtype=bool)
    for i, p in enumerate(pts):  # O(n^2 d), fine for the thousands of points a frontier has
        front[i] = not ((pts <= p).all(axis=1) & (pts < p).any(axis=1)).any()
    mask = np.zeros(len(losses), dtype=bool)
    mask[valid] = front
    return mask


def pareto_mask(points: Points, maximize: Sequence[str] = (), minimize: Sequence[str] = ()) -> np.ndarray:
    """Boolean array, True for non-dominated rows (in row order)."""
    return _mask(_losses(_frame(points), maximize, minimize))


def _group_mask(df: pd.DataFrame, maximize, minimize, group: str | None) -> np.ndarray:
    """Front membership computed separately within each value of ``group`` (e.g. one front per method)."""
    if group is None:
        return pareto_mask(df, maximize, minimize)
    mask = np.zeros(len(df), dtype=bool)
    for rows in df.groupby(group, sort=False, dropna=False).indices.values():
        mask[rows] = pareto_mask(df.iloc[rows], maximize, minimize)
    return mask


def _sort_front(front: pd.DataFrame, maximize: Sequence[str], minimize: Sequence[str]) -> pd.DataFrame:
    """By the first minimized column ascending, ties broken by the rest (best first), stably."""
    keys = [*minimize, *maximize]
    return front.sort_values(
        keys, ascending=[True] * len(minimize) + [False] * len(maximize), kind="mergesort"
    )


def pareto_front(points: Points, maximize: Sequence[str] = (), minimize: Sequence[str] = ()) -> pd.DataFrame:
    """The non-dominated rows, sorted by the first minimized column; the original index is kept."""
    df = _frame(points)
    return _sort_front(df[pareto_mask(df, maximize, minimize)], maximize, minimize)


def _optuna_hypervolume(losses: np.ndarray, reference: np.ndarray) -> float:
    # Optuna ships an exact hypervolume (2-D sweep, 3-D, WFG beyond) that its own multi-objective
    # samplers rely on; reusing it beats maintaining our own. It is a private module, so it is
    # imported only here: if a future Optuna moves it, this is the one place to change.
    from optuna._hypervolume import compute_hypervolume

    return float(compute_hypervolume(losses, reference))


def hypervolume(
    points: Points,
    maximize: Sequence[str] = (),
    minimize: Sequence[str] = (),
    reference: dict[str, float] | None = None,
) -> float:
    """Volume dominated by the points and bounded by ``reference`` (one worst value per objective).

    Points not strictly better than the reference in every objective add nothing and are ignored;
    NaN rows too. Compare hypervolumes only across runs that use the same reference.
    """
    df = _frame(points)
    missing = [c for c in [*maximize, *minimize] if c not in (reference or {})]
    if missing:
        raise ValueError(f"hypervolume: reference has no value for {missing} (got {reference})")
    losses = _losses(df, maximize, minimize)
    ref = np.array([-float(reference[c]) for c in maximize] + [float(reference[c]) for c in minimize])
    inside = (~np.isnan(losses).any(axis=1)) & (losses < ref).all(axis=1)
    if not inside.any():
        return 0.0
    return _optuna_hypervolume(losses[inside], ref)


def frontier_table(
    points: Points,
    maximize: Sequence[str] = ("accuracy",),
    minimize: Sequence[str] = ("mean_tokens",),
    group: str | None = None,
) -> pa.Table:
    """All points plus an ``on_front`` bool column (per ``group`` if given), for logging as Parquet."""
    df = _frame(points).copy()
    df["on_front"] = _group_mask(df, maximize, minimize, group)
    return pa.Table.from_pandas(df, preserve_index=False)


def plot_frontier(
    points: Points,
    x: str = "mean_tokens",
    y: str = "accuracy",
    label: str | None = "label",
    group: str | None = None,
    title: str | None = None,
    logx: bool = False,
) -> Figure:
    """Scatter of all points (faint), the front (min ``x``, max ``y``) as a step line, labels on it.

    Builds a bare Agg ``Figure`` (no pyplot): no global figure registry, no display, safe in
    threads and Ray actors. Save with ``fig.savefig`` or ``Tracker.log_figure``.
    """
    df = _frame(points)
    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    groups = [(None, df)] if group is None else list(df.groupby(group, sort=True, dropna=False))
    for i, (name, sub) in enumerate(groups):
        color = f"C{i % 10}"
        legend = None if name is None else str(name)
        ax.scatter(sub[x], sub[y], s=14, color=color, alpha=0.25, linewidths=0)
        front = _sort_front(sub[pareto_mask(sub, [y], [x])], [y], [x])
        if front.empty:
            continue
        ax.step(front[x], front[y], where="post", color=color, lw=1.8, label=legend)
        ax.scatter(front[x], front[y], s=30, color=color, zorder=3)
        if label is not None and label in df.columns:
            for _, row in front.iterrows():
                ax.annotate(
                    str(row[label]),
                    (row[x], row[y]),
                    textcoords="offset points",
                    xytext=(4, 4),
                    fontsize=7,
                    color=color,
                )
    if logx:
        ax.set_xscale("log")
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.set_title(title if title is not None else f"{y} vs {x}: Pareto front")
    if group is not None:
        ax.legend(title=group, fontsize=8)
    return fig
