"""Running a whole sweep: one invocation of the study under an MLflow parent run, its trials on Ray Tune.

Ray Tune only executes (concurrency, resources, failures, intermediate reports); the study decides and
remembers. Resume: an invocation records its target trial count in the study. Re-running a sweep whose
last invocation did not finish resumes it (finished trials are kept; a trial left RUNNING by the dead
driver is continued first, as the same Optuna trial under its own run name, so its run resumes from its
last state); re-running a finished sweep starts a new invocation that adds trials to the same study.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

from .. import tracking
from ..config import to_dict
from ..cost import reserved_resources
from .config import SweepPlan, base_budget, load_sweep
from .front import describe_study, log_study_frontier
from .storage import safe_url
from .study import (ATTR_INVOCATIONS, T_INTERRUPTIONS, T_INVOCATION, T_RUN_ID, T_RUN_NAME, Lease, invocation_done,
                    make_sampler, make_searcher, open_study)
from .trial import TrialContext, default_train, find_run_id, run_trial, supports


@dataclass
class SweepResult:
    study_name: str
    storage: str
    parent_run_id: str
    invocation: str
    finished: bool
    trials: pd.DataFrame
    front: list[int]  # trial numbers on the Pareto front of the sweep objectives
    hypervolume: float
    sweep_dir: str


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _interrupted(study, plan: SweepPlan, invocation: str, log) -> list[int]:
    """Trials left RUNNING by a dead driver, to be continued first by this invocation: each stays the
    same Optuna trial (number, parameters, run name), so its re-run continues its own run from the
    run's last state. Their MLflow runs are marked KILLED until then. Returns their numbers."""
    from mlflow import MlflowClient
    from optuna.trial import TrialState

    client = MlflowClient(plan.tracking_uri)
    numbers = []
    for ft in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        times = int(ft.user_attrs.get(T_INTERRUPTIONS, 0)) + 1
        study._storage.set_trial_user_attr(ft._trial_id, T_INTERRUPTIONS, times)
        study._storage.set_trial_user_attr(ft._trial_id, T_INVOCATION, invocation)
        run_id = ft.user_attrs.get(T_RUN_ID)
        if not run_id and ft.user_attrs.get(T_RUN_NAME):
            run_id = find_run_id(client, plan.experiment, ft.user_attrs[T_RUN_NAME])
        if run_id:
            try:
                if client.get_run(run_id).info.status == "RUNNING":
                    client.set_terminated(run_id, "KILLED")
                client.set_tag(run_id, T_INTERRUPTIONS, str(times))
            except Exception:  # noqa: BLE001 - the run may be gone; continuing the trial matters more
                pass
        log(f"sweep: trial {ft.number} was interrupted; it continues first")
        numbers.append(ft.number)
    return numbers


def _init_ray(plan: SweepPlan, demand_cpus: float, log) -> bool:
    """Join or start Ray; returns True when this call started a local runtime (to shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    address = plan.base.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        return False
    num_cpus = plan.sweep.resources.ray_num_cpus or plan.base.ray.num_cpus or max(
        2, math.ceil(plan.sweep.max_concurrency * demand_cpus))
    log(f"sweep: starting a local Ray runtime with {num_cpus} logical CPUs")
    from ..runtime import start_local_ray

    start_local_ray(num_cpus=num_cpus, log_to_driver=False)
    return True


def _warmstart_in_trials(plan: SweepPlan) -> bool:
    """Whether trials may have to build/warm-start their own start checkpoint (space touches its key)."""
    return plan.base.warmstart.steps > 0 and any(
        k.split(".")[0] in ("model", "warmstart", "data") for k in plan.sweep.space)


def _open_invocation(study, plan: SweepPlan, log) -> tuple[dict, tracking.Tracker]:
    """The unfinished last invocation and its parent run, resumed; else a new invocation and parent run."""
    sweep = plan.sweep
    invocations = list(study.user_attrs.get(ATTR_INVOCATIONS) or [])
    last = invocations[-1] if invocations else None
    if last is not None and last.get("status") != "finished" and sweep.resume:
        log(f"sweep: resuming invocation {last['id']} of study {plan.study_name!r} "
            f"({invocation_done(study, last['id'])}/{last['target']} trials done)")
        return last, tracking.Tracker.resume(plan.tracking_uri, last["parent_run_id"])
    if last is not None and last.get("status") != "finished":
        last["status"] = "abandoned"
    sweep_dict = dataclasses.asdict(sweep)
    sweep_dict["storage"] = safe_url(plan.storage)  # never a database password in MLflow
    inv = {"id": f"{len(invocations) + 1:03d}", "target": sweep.num_trials, "status": "running", "started": _now()}
    parent = tracking.Tracker.start(
        plan.tracking_uri, plan.experiment, run_name=f"sweep-{plan.study_name}-{inv['id']}",
        params={"sweep": sweep_dict},
        tags={**tracking.lineage_tags(sweep_dict, workload="sweep", stage="sweep"),
              tracking.TAG_STUDY: plan.study_name, tracking.TAG_SWEEP_INVOCATION: inv["id"],
              MLFLOW_RUN_NOTE: describe_study(plan)})  # the frontier trials are added at the end
    inv["parent_run_id"] = parent.run_id
    invocations.append(inv)
    study.set_user_attr(ATTR_INVOCATIONS, invocations)
    parent.log_dict(sweep_dict, "sweep/sweep.yaml")
    parent.log_dict({"base_config": plan.base_path, "base_overrides": plan.base_overrides,
                     "resolved": to_dict(plan.base)}, "sweep/base_config.json")
    return inv, parent


def _close_invocation(study, inv: dict) -> tuple[int, bool]:
    """Record the invocation finished (its target reached) or interrupted; returns (done, finished)."""
    done = invocation_done(study, inv["id"])
    finished = done >= inv["target"]
    invocations = list(study.user_attrs.get(ATTR_INVOCATIONS) or [])
    for item in invocations:
        if item["id"] == inv["id"]:
            item["status"] = "finished" if finished else "interrupted"
            item["ended"] = _now()
    study.set_user_attr(ATTR_INVOCATIONS, invocations)
    return done, finished


def _trial_cpus(plan: SweepPlan, warm_in_trials: bool, train_fn, log) -> float:
    """CPUs one trial holds: its own controller process plus the placement group its WorkerGroup reserves."""
    if plan.sweep.early_stopping.enabled and not supports(train_fn or default_train(), "on_eval"):
        log("sweep: WARNING early_stopping.enabled, but this trainer.train has no on_eval hook: "
            "trials report only their final result and none is stopped early")
    return plan.sweep.resources.trial_cpus + reserved_resources(plan.base)["cpus"] + (1.0 if warm_in_trials else 0.0)


def run_sweep(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *, log=print,
              train_fn: Callable | None = None, plan: SweepPlan | None = None) -> SweepResult:
    """Run (or resume) one sweep invocation; returns the study's trials and front afterwards."""
    plan = plan or load_sweep(path, overrides)
    Path(plan.sweep_dir).mkdir(parents=True, exist_ok=True)
    study = open_study(plan, create=True)
    study.sampler = make_sampler(plan.sweep, len(study.get_trials(deepcopy=False)))
    lease = Lease(study)
    lease.acquire()
    started_ray = False
    try:
        inv, parent = _open_invocation(study, plan, log)
        with parent:
            continued = _interrupted(study, plan, inv["id"], log)
            remaining = max(inv["target"] - invocation_done(study, inv["id"]), len(continued))
            if remaining > 0:
                warm_in_trials = _warmstart_in_trials(plan)
                started_ray = _init_ray(plan, _trial_cpus(plan, warm_in_trials, train_fn, log), log)
                _prepare_shared_start(plan, warm_in_trials, log)
                _fit(plan, study, inv, remaining, continued, parent.run_id, warm_in_trials, log, train_fn)
            done, finished = _close_invocation(study, inv)
            table, front, hv = log_study_frontier(study, plan, parent, log)
            parent.log_metrics({"sweep/trials_done": done, "sweep/trials_target": inv["target"]}, step=0)
            if not finished:
                log(f"sweep: invocation {inv['id']} ended with {done}/{inv['target']} trials; "
                    "run the same command again to resume it")
                parent.end("KILLED")
        return SweepResult(plan.study_name, plan.storage, parent.run_id, inv["id"], finished, table, front, hv,
                           plan.sweep_dir)
    finally:
        lease.release()
        if started_ray:
            import ray

            ray.shutdown()


def _prepare_shared_start(plan: SweepPlan, warm_in_trials: bool, log) -> None:
    """Build the tiny model / warm start once in the driver, so concurrent trials reuse it.

    (Inside a trial, the warm-start task would land in the trial's own placement group.)
    """
    if warm_in_trials:
        return
    from ..warmstart import prepare_start_checkpoint

    start, _ = prepare_start_checkpoint(plan.base, log=log)
    log(f"sweep: trials start from {start}")


def _fit(plan: SweepPlan, study, inv: dict, remaining: int, continued: list[int], parent_run_id: str,
         warm_in_trials: bool, log, train_fn) -> None:
    from ray import tune

    sweep = plan.sweep
    ctx = TrialContext(study_name=plan.study_name, storage=plan.storage, base_path=plan.base_path,
                       base_overrides=plan.base_overrides, base_budget=base_budget(plan.base),
                       objectives=plan.objectives, tracking_uri=plan.tracking_uri, experiment=plan.experiment,
                       parent_run_id=parent_run_id, invocation=inv["id"], cost=sweep.cost,
                       trial_cpus=sweep.resources.trial_cpus, early_stopping=sweep.early_stopping,
                       cwd=os.getcwd(), train_fn=train_fn, retries=sweep.retries)
    bundle = {"CPU": sweep.resources.trial_cpus}
    if sweep.resources.trial_gpus:
        bundle["GPU"] = sweep.resources.trial_gpus
    bundles = [bundle] + ([{"CPU": 1.0}] if warm_in_trials else [])
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), tune.PlacementGroupFactory(bundles))
    searcher = make_searcher(study, sweep.space, inv["id"], remaining, log=log, continued=continued)
    attempt = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1, max_concurrent_trials=sweep.max_concurrency,
                                    reuse_actors=False),
        run_config=tune.RunConfig(name=f"{plan.study_name}-{inv['id']}-{attempt}",
                                  storage_path=str(Path(plan.sweep_dir) / "tune"), verbose=1, log_to_file=True,
                                  # the trials' stdout/stderr files land next to their results
                                  sync_config=tune.SyncConfig(sync_artifacts=True),
                                  failure_config=tune.FailureConfig(max_failures=sweep.retries)),
    )
    log(f"sweep: running {remaining} trial(s), {sweep.max_concurrency} at a time")
    tuner.fit()
