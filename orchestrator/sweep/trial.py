"""What one Tune trial runs: a real ``trainer.train`` run with the trial's overrides, which tells the study.

Each trial has its own placement group of rollout and learner actors and its own MLflow run nested
under the sweep's parent run. It reports each eval to Tune and into the study (Pareto median stopping
reads the peers' points there), and at the end its objectives and cost (every attempt's seconds,
``attempts.py``) into its run and the study.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .. import frontier, tracking
from ..config import Budget, Config, load_config
from ..cost import CostModel, run_cost
from .attempts import AttemptClock
from .config import EVAL_METRICS, EarlyStoppingSpec, Objective, param_overrides
from .storage import open_storage
from .study import T_ERROR, T_EVALS, T_METRICS, T_OVERRIDES, T_PRUNED_AT, T_RUN_ID, T_RUN_NAME, quiet_optuna


@dataclass
class TrialContext:
    """What every trial needs from the driver (shipped once through the object store)."""

    study_name: str
    storage: str
    base_path: str
    base_overrides: list[str]
    base_budget: Budget
    objectives: list[Objective]
    tracking_uri: str
    experiment: str
    parent_run_id: str
    invocation: str
    cost: CostModel
    trial_cpus: float
    early_stopping: EarlyStoppingSpec
    cwd: str
    train_fn: Optional[Callable] = None  # None: orchestrator.trainer.train (tests pass a stand-in)
    retries: int = 0  # Tune's retries of a failed trial: only the last allowed attempt tells FAIL


# ---------------------------------------------------------------------------------------------
# Metrics of a trial


def eval_metrics(rows: list[dict], objectives: list[Objective] = ()) -> dict[str, float]:
    """Per-budget eval summary rows -> ``{"accuracy_16x8": ..., "mean_tokens_16x8": ...}``, plus each
    hypervolume objective's area over those rows (NaN when the rows cannot give it: the trial fails)."""
    out = {}
    for row in rows:
        for m in EVAL_METRICS:
            if m in row and row[m] is not None:
                out[f"{m}_{row['budget_label']}"] = float(row[m])
    for o in objectives:
        if o.area is not None:
            try:
                out[o.name] = frontier.model_hypervolume(rows, o.area.reference, o.area.tokens, o.area.budgets)
            except (KeyError, ValueError):
                out[o.name] = math.nan
    return out


def objective_values(metrics: dict[str, float], objectives: list[Objective]) -> dict[str, float]:
    return {o.name: float(metrics.get(o.name, math.nan)) for o in objectives}


def dominated_share(point: dict[str, float], peers: list[dict[str, float]], objectives: list[Objective]) -> float:
    """Fraction of ``peers`` that Pareto-dominate ``point`` (peers with a NaN objective never do)."""
    if not peers:
        return 0.0
    sign = {o.name: (-1.0 if o.mode == "max" else 1.0) for o in objectives}
    mine = np.array([sign[o.name] * point.get(o.name, math.nan) for o in objectives], dtype=float)
    if np.isnan(mine).any():
        return 0.0
    n = 0
    for peer in peers:
        theirs = np.array([sign[o.name] * peer.get(o.name, math.nan) for o in objectives], dtype=float)
        if not np.isnan(theirs).any() and (theirs <= mine).all() and (theirs < mine).any():
            n += 1
    return n / len(peers)


# ---------------------------------------------------------------------------------------------
# The trial (runs inside a Tune worker)


def default_train() -> Callable:
    from ..trainer import train

    return train


def supports(fn: Callable, name: str) -> bool:
    """Whether ``fn`` takes a parameter ``name`` (a stand-in trainer may not take ``on_eval``)."""
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def find_run_id(client, experiment: str, run_name: str) -> str | None:
    """The newest MLflow run of that name in the experiment (a trial's run, before it told its id)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"attributes.run_name = '{run_name}'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0].info.run_id if runs else None


def _trial_config(ctx: TrialContext, number: int, run_name: str, overrides: list[str]) -> tuple[Config, bool]:
    """(training config, nested at start). Its tags name the study and the trial only, which hold for
    the trial's whole life: a continued trial's config must equal the one its run started with, or the
    trainer refuses to resume the run (the invocation tag is set when the trial ends, ``_tag_child``)."""
    cfg = load_config(ctx.base_path, [*ctx.base_overrides, *overrides, f"trainer.run_name={run_name}",
                                      f"tracking.tracking_uri={ctx.tracking_uri}",
                                      f"tracking.experiment={ctx.experiment}"])
    # Nest the trial's run under the sweep's parent from its start when the config supports it
    # (tracking.parent_run_id / tracking.tags); otherwise the tags are set once the run id is known.
    nested_at_start = hasattr(cfg.tracking, "parent_run_id")
    if nested_at_start:
        cfg.tracking.parent_run_id = ctx.parent_run_id
    if hasattr(cfg.tracking, "tags"):
        cfg.tracking.tags = {**(cfg.tracking.tags or {}), tracking.TAG_STUDY: ctx.study_name,
                             tracking.TAG_TRIAL: str(number)}
    return cfg, nested_at_start


def _eval_hook(ctx: TrialContext, study, trial, cfg: Config, clock: AttemptClock, pruned_at: list[int]):
    """``on_eval(step, rows) -> stop``: each eval into Tune and the study; True stops a dominated trial."""
    from optuna.trial import TrialState
    from ray import tune

    es, objectives, number = ctx.early_stopping, ctx.objectives, trial.number
    evals: dict[str, dict[str, float]] = dict(trial.user_attrs.get(T_EVALS) or {})  # earlier attempts' points

    def on_eval(step: int, rows: list[dict]) -> bool:
        metrics = eval_metrics(rows, objectives)
        wall = clock.total()
        metrics.update({"cost": run_cost(cfg, wall, ctx.cost, ctx.trial_cpus)["cost/total"], "wall_seconds": wall})
        point = objective_values(metrics, objectives)
        evals[str(step)] = point
        trial.set_user_attr(T_EVALS, evals)
        tune.report({"step": step, "final": 0, "pruned": 0, **metrics})
        if not es.enabled or step < es.min_step or step >= cfg.trainer.steps:
            return False
        peers = [t.user_attrs[T_EVALS][str(step)]
                 for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                                   TrialState.RUNNING))
                 if t.number != number and str(step) in (t.user_attrs.get(T_EVALS) or {})]
        if len(peers) >= es.min_peers and dominated_share(point, peers, objectives) >= es.dominated_fraction:
            pruned_at.append(step)
            return True
        return False

    return on_eval


def run_trial(config: dict, ctx: TrialContext) -> None:
    """Tune function trainable: one training run with the trial's parameters; tells the study itself.

    Every attempt of a trial (a Tune retry, or a continuation after the driver died) trains under the
    trial's one run name, so the trainer continues the run from its last state, and the trial's cost
    counts every attempt (``attempts.py``)."""
    import optuna
    from mlflow import MlflowClient
    from optuna.trial import TrialState

    # Tune moves a trial into its own directory; the base config's relative paths (model, outputs)
    # mean the driver's working directory (or the job's working_dir on a cluster).
    for d in (ctx.cwd, os.environ.get("TUNE_ORIG_WORKING_DIR")):
        if d and os.path.isdir(d):
            os.chdir(d)
            break
    quiet_optuna()
    number, params = int(config["trial_number"]), dict(config["params"])
    study = optuna.load_study(study_name=ctx.study_name, storage=open_storage(ctx.storage),
                              sampler=optuna.samplers.RandomSampler())
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    if study._storage.get_trial(trial_id).state.is_finished():
        return  # an earlier attempt told the study (its last allowed failure): nothing left to run
    clock = AttemptClock(study._storage, trial_id)
    trial = optuna.trial.Trial(study, trial_id)
    run_name = trial.user_attrs.get(T_RUN_NAME) or f"{ctx.study_name}-t{number:04d}"
    overrides = param_overrides(params, ctx.base_budget)
    trial.set_user_attr(T_RUN_NAME, run_name)
    trial.set_user_attr(T_OVERRIDES, overrides)
    cfg, nested_at_start = _trial_config(ctx, number, run_name, overrides)

    train_fn = ctx.train_fn or default_train()
    pruned_at: list[int] = []
    kwargs = {"log": lambda *a, **k: print(*a, **k)}
    if supports(train_fn, "on_eval"):
        kwargs["on_eval"] = _eval_hook(ctx, study, trial, cfg, clock, pruned_at)
    client = MlflowClient(ctx.tracking_uri)
    try:
        result = train_fn(cfg, **kwargs)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"[:2000]
        clock.stop(error)
        run_id = find_run_id(client, ctx.experiment, run_name)
        if run_id:
            trial.set_user_attr(T_RUN_ID, run_id)
            _tag_child(client, run_id, ctx, number, nested_at_start, params)
        if clock.index >= ctx.retries:  # else Tune retries it: the trial stays RUNNING for the retry
            trial.set_user_attr(T_ERROR, error)
            study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        raise
    _report_result(study, trial, ctx, cfg, result, clock.stop(), pruned_at, nested_at_start, params)


def _report_result(study, trial, ctx: TrialContext, cfg: Config, result, wall: float, pruned_at: list[int],
                   nested_at_start: bool, params: dict) -> None:
    """Cost (every attempt's ``wall`` seconds) and objectives into the run, then tell the study and Tune."""
    from mlflow import MlflowClient
    from optuna.trial import TrialState
    from ray import tune

    number, objectives, client = trial.number, ctx.objectives, MlflowClient(ctx.tracking_uri)
    run_id = result.run_id
    trial.set_user_attr(T_RUN_ID, run_id)
    _tag_child(client, run_id, ctx, number, nested_at_start, params)
    costs = run_cost(cfg, wall, ctx.cost, ctx.trial_cpus)
    logged = client.get_run(run_id).data.metrics
    metrics = eval_metrics(result.eval_after, objectives)
    metrics.update({"cost": costs["cost/total"], "wall_seconds": wall,
                    "accelerator_hours": costs["cost/accelerator_hours"],
                    "generated_tokens": float(logged.get("cost/generated_tokens_total", math.nan))})
    values = objective_values(metrics, objectives)
    pruned = bool(pruned_at) or bool(getattr(result, "stopped_early", False))
    tracker = tracking.Tracker(ctx.tracking_uri, run_id, client.get_run(run_id).info.experiment_id)
    step = int(getattr(result, "steps", 0) or 0)
    tracker.log_metrics({**costs, **{f"sweep/{k}": v for k, v in values.items()}}, step=step)
    tracker.set_tags({"budgetrl.cost_currency": ctx.cost.currency, tracking.TAG_PRUNED: str(pruned).lower()})
    trial.set_user_attr(T_METRICS, metrics)
    if pruned:
        trial.set_user_attr(T_PRUNED_AT, pruned_at[0] if pruned_at else step)
        study.tell(number, state=TrialState.PRUNED, skip_if_finished=True)
    elif all(math.isfinite(v) for v in values.values()):
        study.tell(number, [values[o.name] for o in objectives], skip_if_finished=True)
    else:
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        trial.set_user_attr(T_ERROR, f"objectives {bad} are not finite numbers")
        study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    tune.report({"step": step, "final": 1, "pruned": int(pruned), **metrics})


def sweep_params(params: dict) -> dict[str, str]:
    """A trial's sampled parameters as MLflow params ``sweep/<space key>`` (derived ones such as
    ``budget.thinking_fraction`` included): the same keys on every child of a study, so the UI's compare
    view and parallel-coordinates plot line the trials up against their ``sweep/<objective>`` metrics."""
    from ..tracking import flatten

    return {f"sweep/{k}": v for k, v in flatten(dict(params)).items()}


def _tag_child(client, run_id: str, ctx: TrialContext, number: int, nested_at_start: bool, params: dict) -> None:
    from mlflow.entities import Param, RunTag

    tags = {tracking.TAG_STUDY: ctx.study_name, tracking.TAG_TRIAL: str(number),
            tracking.TAG_SWEEP_INVOCATION: ctx.invocation}
    if not nested_at_start:
        tags[tracking.TAG_PARENT_RUN] = ctx.parent_run_id
    logged = client.get_run(run_id).data.params  # a continued trial's run has them already (same values)
    new = [Param(k, v) for k, v in sweep_params(params).items() if k not in logged]
    client.log_batch(run_id, params=new, tags=[RunTag(k, v) for k, v in tags.items()])
