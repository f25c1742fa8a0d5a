"""The study's Pareto front: every invocation's finished trials as one table, the front of the sweep's
objectives, its hypervolume, the standard plots and ready-to-run configs, logged to the parent run."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from .. import frontier, tracking
from ..config import eval_budgets, load_config, to_yaml
from .config import SweepPlan, base_budget, param_overrides
from .study import T_INTERRUPTED, T_INVOCATION, T_METRICS, T_OVERRIDES, T_RUN_ID


def trials_table(study, plan: SweepPlan) -> pd.DataFrame:
    """One row per finished trial: number, state, run id, params, objectives, standard plot columns."""
    from optuna.trial import TrialState

    rows = []
    fb = plan.frontier_budget
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)):
        if t.user_attrs.get(T_INTERRUPTED):
            continue
        m = t.user_attrs.get(T_METRICS) or {}
        row = {"trial": t.number, "state": t.state.name, "run_id": t.user_attrs.get(T_RUN_ID),
               "invocation": t.user_attrs.get(T_INVOCATION),
               "label": f"t{t.number}", "accuracy": m.get(f"accuracy_{fb}", math.nan),
               "mean_tokens": m.get(f"mean_tokens_{fb}", math.nan), "cost": m.get("cost", math.nan),
               "generated_tokens": m.get("generated_tokens", math.nan), "wall_seconds": m.get("wall_seconds", math.nan)}
        for o in plan.objectives:
            row[o.name] = t.values[plan.objectives.index(o)] if t.state == TrialState.COMPLETE and t.values \
                else m.get(o.name, math.nan)
        for k, v in t.params.items():
            row[f"param.{k}"] = v
        rows.append(row)
    return pd.DataFrame(rows)


def reference_point(plan: SweepPlan, df: pd.DataFrame) -> dict[str, float]:
    """Hypervolume reference: the sweep's ``reference``, else a worst value each objective can take
    (accuracy 0, a trial's own hypervolume 0, mean tokens at a budget: that budget's thinking + solution),
    else 1.1 x the worst seen (which moves as trials are added: set ``reference`` to compare hypervolumes
    across invocations)."""
    ref = {}
    limits = {b.label: b for b in eval_budgets(plan.base)}
    for o in plan.objectives:
        if o.name in plan.sweep.reference:
            ref[o.name] = float(plan.sweep.reference[o.name])
        elif o.metric in ("accuracy", "hypervolume") and o.mode == "max":
            ref[o.name] = 0.0
        elif o.metric in ("mean_tokens", "mean_thinking_tokens") and o.mode == "min" and o.budget in limits:
            b = limits[o.budget]
            ref[o.name] = float(b.thinking + b.solution if o.metric == "mean_tokens" else b.thinking)
        else:
            col = df[o.name].astype(float) if o.name in df else pd.Series(dtype=float)
            worst = col.max() if o.mode == "min" else col.min()
            worst = 0.0 if not np.isfinite(worst) else float(worst)
            ref[o.name] = worst * 1.1 + 1e-9 if o.mode == "min" else worst - abs(worst) * 0.1 - 1e-9
    return ref


def _hypervolume(df: pd.DataFrame, maximize: list[str], minimize: list[str], ref: dict[str, float]) -> float:
    if df.empty:
        return 0.0
    if len(maximize) + len(minimize) == 1:  # one objective: the best improvement over the reference
        (name,) = [*maximize, *minimize]
        vals = df[name].astype(float).to_numpy()
        gain = (vals - ref[name]) if maximize else (ref[name] - vals)
        gain = gain[np.isfinite(gain)]
        return float(max(0.0, gain.max())) if gain.size else 0.0
    return frontier.hypervolume(df, maximize, minimize, reference=ref)


def _log_plots(plan: SweepPlan, complete: pd.DataFrame, parent: tracking.Tracker, out: Path) -> None:
    """accuracy vs tokens and vs cost: a Parquet table and a PNG each, on disk and in the parent run."""
    import pyarrow.parquet as pq

    fb = plan.frontier_budget
    for x, name in (("mean_tokens", "accuracy_vs_tokens"), ("cost", "accuracy_vs_cost")):
        pts = complete[["trial", "label", "run_id", "accuracy", x]]
        t = frontier.frontier_table(pts, maximize=("accuracy",), minimize=(x,))
        pq.write_table(t, out / f"{name}.parquet")
        parent.log_table(t, f"frontier/{name}.parquet")
        xlabel = f"cost ({plan.sweep.cost.currency})" if x == "cost" else f"mean tokens at {fb}"
        fig = frontier.plot_frontier(pts, x=x, y="accuracy", label="label",
                                     title=f"{plan.study_name}: accuracy at {fb} vs {xlabel}")
        fig.savefig(out / f"{name}.png", dpi=120)
        parent.log_figure(fig, f"frontier/{name}.png")


def _export_configs(study, plan: SweepPlan, front: pd.DataFrame, parent: tracking.Tracker, out: Path) -> None:
    """frontier/configs/trial_NNNN.yaml: each front trial's full training config, ready to run."""
    bb = base_budget(plan.base)
    configs = out / "configs"
    configs.mkdir(exist_ok=True)
    for old in configs.glob("trial_*.yaml"):
        old.unlink()
    for _, row in front.iterrows():
        n = int(row["trial"])
        ft = study.get_trials(deepcopy=False)[n]
        overrides = ft.user_attrs.get(T_OVERRIDES) or param_overrides(ft.params, bb)
        values = ", ".join(f"{o.name}={row[o.name]:.4g}" for o in plan.objectives)
        header = (f"# Pareto-optimal config of study {plan.study_name!r}, trial {n} (run {row['run_id']}): {values}\n"
                  f"# params: {json.dumps(ft.params)}\n# run: python -m orchestrator train THIS_FILE\n")
        cfg = load_config(plan.base_path, [*plan.base_overrides, *overrides])
        (configs / f"trial_{n:04d}.yaml").write_text(header + to_yaml(cfg))
    if front.shape[0]:
        parent.log_artifacts(str(configs), "frontier/configs")


def _value(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def describe_study(plan: SweepPlan, df: pd.DataFrame | None = None, front: list[int] = (), hv: float | None = None
                   ) -> str:
    """The parent run's description (MLflow's run note, markdown): the study, its objectives and space,
    where to compare the trials in the UI, and (once trials finished) the frontier trials."""
    sw = plan.sweep
    objs = ", ".join(f"`sweep/{o.name}` ({o.mode})" for o in plan.objectives)
    space = ", ".join(f"`sweep/{k}`" for k in sw.space)
    lines = [f"**Sweep `{plan.study_name}`** (Optuna study, {sw.sampler} sampler, {sw.num_trials} trials per "
             f"invocation, {sw.max_concurrency} at a time), base config `{plan.base_path}`.", "",
             f"Objectives (each child run's metrics): {objs}.", f"Parameters (each child run's params): {space}.", "",
             "Compare the child runs (expand this run in the runs table, select them, *Compare*): the "
             "parallel-coordinates plot takes these params and metrics as its axes."]
    if df is None or df.empty:
        return "\n".join(lines)
    lines += ["", f"**Frontier**: {len(front)} of {int((df['state'] == 'COMPLETE').sum())} complete trials; "
              f"hypervolume {_value(float(hv or 0.0))} (`frontier/hypervolume`).", ""]
    params = [c for c in df.columns if c.startswith("param.")]
    cols = ["trial", "run", *[o.name for o in plan.objectives], *[c[len("param."):] for c in params]]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, row in df[df["trial"].isin(list(front))].sort_values("trial").iterrows():
        cells = [str(int(row["trial"])), f"`{row['run_id']}`", *[_value(row[o.name]) for o in plan.objectives],
                 *[_value(row[c]) for c in params]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def log_study_frontier(study, plan: SweepPlan, parent: tracking.Tracker, log=print) -> tuple[pd.DataFrame, list[int], float]:
    """Pareto front of the whole study (every invocation's complete trials) into the parent run.

    Artifacts: frontier/trials.parquet (all finished trials, ``on_front`` for the sweep objectives),
    frontier/accuracy_vs_tokens.{parquet,png}, frontier/accuracy_vs_cost.{parquet,png},
    frontier/configs/trial_NNNN.yaml (ready-to-run training configs of the front). Metrics:
    frontier/hypervolume (sweep objectives), frontier/size, frontier/complete_trials.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    df = trials_table(study, plan)
    if df.empty:
        log("sweep: no finished trials yet; no frontier")
        return df, [], 0.0
    complete = df[df["state"] == "COMPLETE"].copy()
    maximize = [o.name for o in plan.objectives if o.mode == "max"]
    minimize = [o.name for o in plan.objectives if o.mode == "min"]
    df["on_front"] = False
    if not complete.empty:
        df.loc[complete.index, "on_front"] = frontier.pareto_mask(complete, maximize, minimize)
    front = df[df["on_front"]]
    ref = reference_point(plan, complete)
    hv = _hypervolume(complete, maximize, minimize, ref)
    out = Path(plan.sweep_dir) / "frontier"
    out.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table, out / "trials.parquet")
    parent.log_table(table, "frontier/trials.parquet")
    _log_plots(plan, complete, parent, out)
    _export_configs(study, plan, front, parent, out)
    parent.log_dict({"reference": ref, "objectives": [dataclasses.asdict(o) for o in plan.objectives],
                     "front": front["trial"].astype(int).tolist()}, "frontier/summary.json")
    parent.log_metrics({"frontier/hypervolume": hv, "frontier/size": float(len(front)),
                        "frontier/complete_trials": float(len(complete))}, step=len(complete))
    parent.set_tags({MLFLOW_RUN_NOTE: describe_study(plan, df, front["trial"].astype(int).tolist(), hv)})
    cols = ["trial", *[o.name for o in plan.objectives]] + [c for c in df.columns if c.startswith("param.")]
    log(f"sweep: Pareto front of study {plan.study_name!r} ({len(front)} of {len(complete)} complete trials), "
        f"hypervolume {hv:.4g}:\n{front[cols].to_string(index=False)}")
    return df, front["trial"].astype(int).tolist(), float(hv)
