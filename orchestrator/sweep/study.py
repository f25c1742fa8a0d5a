"""The Optuna study: the sweep's durable state, its one-driver lease, and the Tune searcher that asks it.

The study in RDB storage is the source of truth. The driver asks it for trials (``make_searcher``'s
``StudySearcher``, a Tune ``Searcher``); each trial tells it its own result from inside the trial, so a
finished trial is recorded even if the driver dies a moment later. Its user attributes (names below)
hold the sweep's invocations, the driver's lease and each trial's run, overrides, metrics and evals.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from .. import tracking
from ..config import ConfigError
from .config import ParamSpec, SweepConfig, SweepPlan, grid_points
from .storage import open_storage, safe_url

# Study / trial user attributes (the study is the sweep's durable state).
ATTR_OBJECTIVES = "budgetrl.objectives"
ATTR_AREAS = "budgetrl.hypervolume_areas"  # each hypervolume objective's axis, budgets and reference
ATTR_INVOCATIONS = "budgetrl.invocations"
ATTR_LEASE = "budgetrl.driver"
T_INVOCATION, T_RUN_NAME, T_RUN_ID = "budgetrl.invocation", "budgetrl.run_name", "budgetrl.run_id"
T_OVERRIDES, T_METRICS, T_EVALS = "budgetrl.overrides", "budgetrl.metrics", "budgetrl.evals"
T_ERROR, T_INTERRUPTIONS, T_PRUNED_AT = "budgetrl.error", "budgetrl.interruptions", "budgetrl.pruned_at"
# Set by drivers before interrupted trials were continued: such a trial was failed and re-asked.
T_INTERRUPTED = "budgetrl.interrupted"

LEASE_HEARTBEAT_S = 30.0
LEASE_STALE_S = 120.0


def distributions(space: dict[str, ParamSpec]) -> dict:
    """The search space as Optuna distributions (sorted by key)."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    out = {}
    for key, p in sorted(space.items()):
        if p.type == "categorical":
            out[key] = CategoricalDistribution(list(p.choices))
        elif p.type == "int":
            out[key] = IntDistribution(int(p.low), int(p.high), step=int(p.step or 1))
        elif p.type == "log_float":
            out[key] = FloatDistribution(float(p.low), float(p.high), log=True)
        else:
            out[key] = FloatDistribution(float(p.low), float(p.high), step=p.step)
    return out


def quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_sampler(sweep: SweepConfig, n_existing: int):
    import optuna

    seed = sweep.seed + n_existing  # a new invocation must not replay the previous one's random points
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sweep.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    if sweep.sampler == "grid":
        return _grid_sampler(sweep, seed)
    # constant_liar: concurrent trials do not all pile onto the same promising point.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=sweep.n_startup_trials, multivariate=True,
                                      constant_liar=True)


def _grid_sampler(sweep: SweepConfig, seed: int):
    """Optuna's grid over the categorical choices; trial k of the study takes point k of the grid as Optuna
    shuffled it with the seed, so a resumed sweep continues the grid instead of repeating it."""
    import optuna

    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, study, trial, state, values) -> None:
            # Optuna's version calls study.stop(), which only works inside study.optimize; the sweep
            # asks and tells and counts its trials itself (num_trials <= grid size is checked at load).
            return None

    return Grid(grid_points(sweep.space), seed=seed)


def finished_states():
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def invocation_done(study, invocation: str) -> int:
    """Trials of an invocation that ran to an end (complete, pruned, failed; not interrupted)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=finished_states())
               if t.user_attrs.get(T_INVOCATION) == invocation and not t.user_attrs.get(T_INTERRUPTED))


def open_study(plan: SweepPlan, create: bool):
    """Load (or create) the study; refuses one whose objectives differ from the plan's."""
    import optuna

    quiet_optuna()
    db = tracking._sqlite_path(plan.storage)
    if db is not None:
        if not create and not db.is_file():
            return None
        db.parent.mkdir(parents=True, exist_ok=True)
    storage = open_storage(plan.storage)
    directions = ["maximize" if o.mode == "max" else "minimize" for o in plan.objectives]
    names = [o.name for o in plan.objectives]
    try:
        study = optuna.load_study(study_name=plan.study_name, storage=storage, sampler=optuna.samplers.RandomSampler())
    except KeyError:
        if not create:
            return None
        study = optuna.create_study(study_name=plan.study_name, storage=storage, directions=directions,
                                    load_if_exists=True)
        if not study.user_attrs.get(ATTR_OBJECTIVES):
            study.set_user_attr(ATTR_OBJECTIVES, names)
            study.set_user_attr(ATTR_AREAS, _areas(plan))
    have = study.user_attrs.get(ATTR_OBJECTIVES)
    have_dirs = [d.name.lower() for d in study.directions]
    if (have and have != names) or have_dirs != directions:
        raise ConfigError(f"objectives={names!r}: study {plan.study_name!r} in {safe_url(plan.storage)} was created with "
                          f"objectives {have} ({have_dirs}); use another study_name to change objectives")
    have_areas = study.user_attrs.get(ATTR_AREAS)
    if have_areas is not None and have_areas != _areas(plan):
        # Areas against another reference or over other budgets are other numbers under the same name.
        raise ConfigError(f"objectives: hypervolume {_areas(plan)} differs from {have_areas}, which study "
                          f"{plan.study_name!r} was created with; use another study_name to change them")
    return study


def _areas(plan: SweepPlan) -> dict:
    return {o.name: {"tokens": o.area.tokens, "budgets": list(o.area.budgets), "reference": o.area.reference}
            for o in plan.objectives if o.area is not None}


# ---------------------------------------------------------------------------------------------
# One driver per study


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SweepBusy(RuntimeError):
    """Another live driver holds the study."""


class Lease:
    """One driver per study: a heartbeat in the study's user attributes.

    A lease is stale when its heartbeat is older than LEASE_STALE_S, or at once when it belongs to a
    process on this host that no longer exists (a killed driver): then the next driver takes over.
    """

    def __init__(self, study):
        self.study = study
        self.token = f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        cur = self.study.user_attrs.get(ATTR_LEASE) or {}
        if cur.get("token"):
            age = time.time() - float(cur.get("heartbeat", 0))
            alive = age < LEASE_STALE_S
            if alive and cur.get("host") == socket.gethostname():
                alive = _pid_alive(int(cur.get("pid", -1)))
            if alive:
                raise SweepBusy(f"study {self.study.study_name!r} is being run by pid {cur.get('pid')} on "
                                f"{cur.get('host')} (heartbeat {age:.0f}s ago); wait for it or stop it")
        self._write()
        self._thread = threading.Thread(target=self._beat, name="sweep-lease", daemon=True)
        self._thread.start()

    def _write(self) -> None:
        self.study.set_user_attr(ATTR_LEASE, {"token": self.token, "host": socket.gethostname(),
                                              "pid": os.getpid(), "heartbeat": time.time()})

    def _beat(self) -> None:
        while not self._stop.wait(LEASE_HEARTBEAT_S):
            try:
                self._write()
            except Exception:  # noqa: BLE001 - a missed heartbeat is not fatal
                pass

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        try:
            if (self.study.user_attrs.get(ATTR_LEASE) or {}).get("token") == self.token:
                self.study.set_user_attr(ATTR_LEASE, {})
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------------------------------------
# The searcher (runs in the driver)


def make_searcher(study, space: dict[str, ParamSpec], invocation: str, remaining: int, log=print,
                  continued: list[int] | tuple[int, ...] = ()):
    """A Tune ``Searcher`` that hands out the ``continued`` trials (interrupted, still RUNNING in the
    study) first, then asks the Optuna study for new ones, counting toward a target.

    Trials tell the study themselves; the searcher only records a FAIL for a trial that ended in an
    error before it could (e.g. its process died). (Defined in a function so that importing this
    module does not import Ray Tune.)
    """
    from ray.tune.search import Searcher

    class StudySearcher(Searcher):
        # No closure variables in the methods: Tune cloudpickles its config, searcher class included.
        def __init__(self, study, dists, invocation, remaining, log, continued):
            super().__init__()
            self.study, self.invocation, self.remaining, self.log = study, invocation, remaining, log
            self.dists, self.continued = dists, list(continued)
            self.numbers: dict[str, int] = {}

        def __getstate__(self) -> dict:
            # Tune pickles its config (tuner.pkl); the study (a DB engine) stays out of it.
            return {"study_name": self.study.study_name, "invocation": self.invocation, "remaining": self.remaining,
                    "continued": self.continued}

        def __setstate__(self, state: dict) -> None:
            self.__dict__.update(state)

        def set_search_properties(self, metric, mode, config, **spec) -> bool:
            return True

        def suggest(self, trial_id: str):
            if self.remaining <= 0:
                return self.FINISHED
            self.remaining -= 1
            if self.continued:  # the same Optuna trial again: same number, params and run name
                number = self.continued.pop(0)
                storage = self.study._storage
                params = storage.get_trial(storage.get_trial_id_from_study_id_trial_number(
                    self.study._study_id, number)).params
                note = " (continued after an interruption)"
            else:
                trial = self.study.ask(self.dists)
                trial.set_user_attr(T_INVOCATION, self.invocation)
                number, params, note = trial.number, trial.params, ""
            self.numbers[trial_id] = number
            self.log(f"sweep: trial {number}{note}: {params}")
            return {"trial_number": number, "params": dict(params)}

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            from optuna.trial import TrialState

            number = self.numbers.pop(trial_id, None)
            if number is None:
                return
            ft = next((t for t in self.study.get_trials(deepcopy=False) if t.number == number), None)
            # Still RUNNING: the trial never told the study. If Tune saw it fail (its process died,
            # after any `retries`), that is the trial's failure. If Tune stopped it (Ctrl-C, the end
            # of the experiment), it stays RUNNING: the next driver retries it as interrupted.
            if ft is not None and ft.state == TrialState.RUNNING and error:
                self.study._storage.set_trial_user_attr(ft._trial_id, T_ERROR, "trial process failed before "
                                                        "telling the study (see the Tune trial's error.txt)")
                self.study.tell(number, state=TrialState.FAIL, skip_if_finished=True)

        def save(self, checkpoint_path: str) -> None:
            # The study is the state; resume goes through it, not through Tune's checkpoint.
            Path(checkpoint_path).write_text(json.dumps({"study": self.study.study_name,
                                                         "invocation": self.invocation}))

        def restore(self, checkpoint_path: str) -> None:
            pass

    return StudySearcher(study, distributions(space), invocation, remaining, log, continued)
