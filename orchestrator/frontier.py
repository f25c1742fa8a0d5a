"""Pareto frontiers of accuracy vs tokens vs cost: which budgets/runs are worth it, and how much.

Points are rows of a DataFrame or Arrow table (``accuracy``, ``mean_tokens``, ``cost`` plus labels such
as ``label``, ``budget_thinking``, ``budget_solution``, ``run_id``). A row is on the front when no other
row is at least as good in every objective and strictly better in one. Rows with a NaN objective are
never on the front and dominate nothing. Exact duplicates dominate neither each other, so all copies of
a front point are on the front: the result depends on the values only, never on row order.

The ``frontier`` command (``frontier_command``) recomputes both fronts (accuracy vs tokens, accuracy vs
cost) from any MLflow runs: an experiment, a sweep's study, or run ids.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import tracking
from .cost import CostModel, run_cost

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


def model_hypervolume(
    rows: Points | Sequence[dict],
    reference: dict[str, float],
    tokens: str = "mean_tokens",
    budgets: Sequence[str] | None = None,
) -> float:
    """How elastic one model is: the area of its own accuracy-vs-tokens staircase over an eval grid.

    ``rows``: one model's eval summary (``budget_label``, ``accuracy``, the ``tokens`` column), one row
    per budget. The area is the part of the box [0, reference tokens] x [reference accuracy, 1] that some
    budget's point dominates (no more tokens, no less accuracy): high accuracy at every budget, cheap ones
    too, scores high; a model that is good only when unconstrained scores low. ``reference``:
    ``{"accuracy": worst, "tokens": most}``; points past it add nothing. ``budgets``: the rows that
    count (None: all). Empty rows, or a listed budget without a row, raise ValueError.
    """
    df = _frame(rows) if isinstance(rows, (pd.DataFrame, pa.Table)) else pd.DataFrame(list(rows))
    if df.empty:
        raise ValueError("model_hypervolume: the eval table has no rows")
    for col in ("budget_label", "accuracy", tokens):
        if col not in df.columns:
            raise KeyError(f"model_hypervolume: column {col!r} not in the eval table (have {list(df.columns)})")
    if budgets is not None:
        missing = [b for b in budgets if b not in set(df["budget_label"])]
        if missing:
            raise ValueError(f"model_hypervolume: budgets {missing} have no row in the eval table "
                             f"(have {df['budget_label'].tolist()})")
        df = df[df["budget_label"].isin(list(budgets))]
    pts = pd.DataFrame({"accuracy": pd.to_numeric(df["accuracy"], errors="coerce").astype(float),
                        "tokens": pd.to_numeric(df[tokens], errors="coerce").astype(float)})
    return hypervolume(pts, ["accuracy"], ["tokens"], reference={k: reference[k] for k in ("accuracy", "tokens")})


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


# ---------------------------------------------------------------------------------------------
# The `frontier` command: a front from any MLflow runs

_EVAL_KEY = re.compile(r"^eval/(?P<label>[^/]+)/accuracy$")


def _run_cost_from_params(params: dict[str, str], wall: float, model: CostModel) -> float:
    """Cost of a run that did not log ``cost/total``: its resources from the logged config params."""

    def num(key: str, default: float) -> float:
        try:
            return float(json.loads(params[key]))
        except (KeyError, ValueError, TypeError):
            return default

    cfg = type("C", (), {})()
    cfg.rollout = type("R", (), {"num_workers": num("rollout.num_workers", 1), "cpus_per_worker":
                                 num("rollout.cpus_per_worker", 1), "gpus_per_worker": num("rollout.gpus_per_worker", 0)})
    cfg.learner = type("L", (), {"num_workers": num("learner.num_workers", 1), "cpus_per_worker":
                                 num("learner.cpus_per_worker", 1), "gpus_per_worker": num("learner.gpus_per_worker", 0)})
    return run_cost(cfg, wall, model)["cost/total"]


def select_runs(client, *, experiment: str | None = None, study: str | None = None,
                run_ids: list[str] | None = None) -> list:
    """Training runs named by an experiment, a study tag, or explicit ids (sweep/frontier parents excluded)."""
    from mlflow.entities import ViewType

    if run_ids:
        runs = []
        for r in run_ids:
            try:
                runs.append(client.get_run(r))
            except Exception as e:  # noqa: BLE001 - MlflowException: no such run
                raise ValueError(f"no MLflow run {r!r}: {str(e).splitlines()[0]}") from None
    elif experiment is not None:
        exp = client.get_experiment_by_name(experiment)
        if exp is None:
            raise ValueError(f"no MLflow experiment named {experiment!r}")
        runs = client.search_runs([exp.experiment_id], max_results=50000)
    elif study is not None:
        ids = [e.experiment_id for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        runs = client.search_runs(ids, filter_string=f"tags.`{tracking.TAG_STUDY}` = '{study}'", max_results=50000)
    else:
        raise ValueError("name an experiment, a study or run ids")
    skip = {"sweep", "frontier"}
    return [r for r in runs if r.data.tags.get(tracking.TAG_WORKLOAD) not in skip]


def run_points(runs, *, budget: str | None = None, cost_model: CostModel | None = None,
               include_unfinished: bool = False, include_pruned: bool = False) -> pd.DataFrame:
    """One row per (run, eval budget): the run's last logged eval at that budget, and its cost."""
    model = cost_model or CostModel()
    rows = []
    for r in runs:
        if not include_unfinished and r.info.status != "FINISHED":
            continue
        if not include_pruned and r.data.tags.get(tracking.TAG_PRUNED) == "true":
            continue
        m = r.data.metrics
        if "cost/total" in m:
            cost = m["cost/total"]
        elif "cost/wall_seconds" in m:
            cost = _run_cost_from_params(r.data.params, m["cost/wall_seconds"], model)
        else:
            cost = math.nan
        for key in m:
            g = _EVAL_KEY.match(key)
            if not g or (budget is not None and g["label"] != budget):
                continue
            label = g["label"]
            rows.append({"run_id": r.info.run_id, "run_name": r.info.run_name, "budget_label": label,
                         "label": f"{r.info.run_name}@{label}", "study": r.data.tags.get(tracking.TAG_STUDY),
                         "trial": r.data.tags.get(tracking.TAG_TRIAL), "accuracy": m[key],
                         "mean_tokens": m.get(f"eval/{label}/mean_tokens", math.nan),
                         "mean_thinking_tokens": m.get(f"eval/{label}/mean_thinking_tokens", math.nan),
                         "cost": cost, "generated_tokens": m.get("cost/generated_tokens_total", math.nan)})
    return pd.DataFrame(rows, columns=["run_id", "run_name", "budget_label", "label", "study", "trial", "accuracy",
                                       "mean_tokens", "mean_thinking_tokens", "cost", "generated_tokens"])


def frontier_report(points: pd.DataFrame) -> dict:
    """Both fronts (accuracy vs tokens, accuracy vs cost) with hypervolumes against a fixed-rule reference
    (accuracy 0; tokens / cost: 1.1 x the largest value among the points)."""
    out = {}
    for x in ("mean_tokens", "cost"):
        pts = points[np.isfinite(points[x].astype(float))] if len(points) else points
        table = frontier_table(pts, maximize=("accuracy",), minimize=(x,))
        worst = float(pts[x].max()) if len(pts) else 0.0
        ref = {"accuracy": 0.0, x: worst * 1.1 + 1e-9}
        hv = hypervolume(pts, ["accuracy"], [x], reference=ref) if len(pts) else 0.0
        out[x] = {"table": table, "points": pts, "hypervolume": hv, "reference": ref}
    return out


def frontier_command(*, tracking_uri: str | None, experiment: str | None, study: str | None,
                     run_ids: list[str] | None, budget: str | None, out_dir: str | None, log_run: bool,
                     log_experiment: str | None, cost_model: CostModel | None = None,
                     include_unfinished: bool = False, include_pruned: bool = False, log=print) -> dict:
    """Recompute the fronts from MLflow runs, print them, optionally write files and log an MLflow run."""
    from mlflow import MlflowClient

    uri = tracking.resolve_tracking_uri(tracking_uri)
    tracking._probe(uri)
    client = MlflowClient(uri)
    runs = select_runs(client, experiment=experiment, study=study, run_ids=run_ids)
    points = run_points(runs, budget=budget, cost_model=cost_model, include_unfinished=include_unfinished,
                        include_pruned=include_pruned)
    if points.empty:
        raise ValueError(f"no finished runs with eval metrics among {len(runs)} selected run(s)")
    report = frontier_report(points)
    source = (f"experiment {experiment}" if experiment else f"study {study}" if study else f"{len(run_ids)} runs")
    for x, r in report.items():
        front = r["table"].to_pandas()
        front = front[front["on_front"]].sort_values(x)
        log(f"accuracy vs {x} ({source}; {len(r['points'])} points, hypervolume {r['hypervolume']:.4g}):")
        log(front[["run_name", "budget_label", "accuracy", "mean_tokens", "cost"]].to_string(index=False)
            if not front.empty else "  (no points with this metric)")
    figs = {x: plot_frontier(r["points"], x=x, y="accuracy", label="label",
                             title=f"accuracy vs {x}: {source}") for x, r in report.items()}
    names = {"mean_tokens": "accuracy_vs_tokens", "cost": "accuracy_vs_cost"}
    if out_dir:
        import pyarrow.parquet as pq

        d = Path(out_dir)
        d.mkdir(parents=True, exist_ok=True)
        for x, r in report.items():
            pq.write_table(r["table"], d / f"{names[x]}.parquet")
            figs[x].savefig(d / f"{names[x]}.png", dpi=120)
        log(f"frontier written to {d}")
    run_id = None
    if log_run:
        exp_name = log_experiment or experiment or client.get_experiment(runs[0].info.experiment_id).name
        sel = {"experiment": experiment, "study": study, "run_ids": ",".join(run_ids or []), "budget": budget}
        tags = {tracking.TAG_WORKLOAD: "frontier", "budgetrl.frontier_source": source}
        if study:
            tags[tracking.TAG_STUDY] = study
        with tracking.Tracker.start(uri, exp_name, run_name=f"frontier-{_dt.datetime.now():%Y%m%d-%H%M%S}",
                                    params={k: v for k, v in sel.items() if v}, tags=tags) as t:
            for x, r in report.items():
                t.log_table(r["table"], f"frontier/{names[x]}.parquet")
                t.log_figure(figs[x], f"frontier/{names[x]}.png")
            t.log_metrics({"frontier/hypervolume_tokens": report["mean_tokens"]["hypervolume"],
                           "frontier/hypervolume_cost": report["cost"]["hypervolume"],
                           "frontier/points": float(len(points))}, step=0)
            t.log_dict({"runs": sorted({r.info.run_id for r in runs}),
                        "reference": {x: r["reference"] for x, r in report.items()}}, "frontier/summary.json")
            run_id = t.run_id
        log(f"frontier logged to MLflow run {run_id} (experiment {exp_name})")
    return {"points": points, "report": report, "run_id": run_id}
