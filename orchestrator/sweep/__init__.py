"""Hyperparameter sweeps: Ray Tune runs the trials, an Optuna study (RDB storage) decides and remembers.

One module per job:

- ``config``   the sweep schema (``SweepConfig``), ``load_sweep`` -> a validated ``SweepPlan``; nothing
               starts before it passes.
- ``storage``  the study's database URL: checked, masked, opened.
- ``study``    the Optuna study (the source of truth), the one-driver lease, the Tune searcher that asks it.
- ``trial``    what one Tune trial runs: a real ``trainer.train`` with the trial's overrides, in its own
               placement group and its own MLflow run nested under the sweep's parent; it tells the study.
- ``attempts`` a trial's wall-clock seconds over all its attempts (its cost counts them all).
- ``front``    the study's Pareto front, hypervolume, plots and ready-to-run configs in the parent run.
- ``run``      one invocation: parent run, resume, Tune. See docs/sweeps.md.

The ``frontier`` command (a front from any MLflow runs) lives in ``orchestrator/frontier.py``.
"""

from .config import (EVAL_METRICS, HYPERVOLUME, RUN_METRICS, STORAGE_ENV, EarlyStoppingSpec, Objective,
                     ObjectiveSpec, ParamSpec, ResourcesSpec, StaircaseArea, SweepConfig, SweepPlan, base_budget,
                     derive_params, describe_plan, load_sweep, param_overrides)
from .front import log_study_frontier, reference_point, trials_table
from .run import SweepResult, run_sweep
from .storage import check_storage_url, open_storage, safe_url
from .study import (ATTR_INVOCATIONS, SweepBusy, distributions, finished_states, invocation_done, make_searcher,
                    open_study)
from .trial import TrialContext, dominated_share, run_trial

__all__ = ["ATTR_INVOCATIONS", "EVAL_METRICS", "HYPERVOLUME", "RUN_METRICS", "STORAGE_ENV", "EarlyStoppingSpec",
           "Objective", "ObjectiveSpec", "ParamSpec", "ResourcesSpec", "StaircaseArea", "SweepBusy", "SweepConfig",
           "SweepPlan", "SweepResult", "TrialContext", "base_budget", "check_storage_url", "derive_params",
           "describe_plan", "distributions", "dominated_share", "finished_states", "invocation_done", "load_sweep",
           "log_study_frontier", "make_searcher", "open_storage", "open_study", "param_overrides", "reference_point",
           "run_sweep", "run_trial", "safe_url", "trials_table"]
