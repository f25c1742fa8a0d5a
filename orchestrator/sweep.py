"""Hyperparameter sweeps: Ray Tune runs the trials, an Optuna study (RDB storage) decides and remembers.

A sweep config (``SweepConfig`` below, YAML + ``key=value`` overrides) names a base training config,
a search space over its keys (plus ``budget.total`` / ``budget.thinking_fraction``, which derive
``budget.thinking`` and ``budget.solution``), objectives, and how many trials to run how widely.
Everything is validated before any storage, MLflow run or Ray runtime is created.

Who does what:

- The **Optuna study** in RDB storage (SQLite by default, any SQLAlchemy URL) is the source of truth.
  The driver asks it for trials (``StudySearcher``, a Tune ``Searcher``); each trial tells it its own
  result from inside the trial, so a finished trial is recorded even if the driver dies a moment later.
- **Ray Tune** only executes: concurrency, resources, failures, intermediate reports.
- Each trial is a real ``trainer.train`` run with the trial's overrides: its own placement group of
  rollout and learner actors, its own MLflow run nested under the sweep's parent run.

Resume: a sweep invocation records its target trial count in the study. Re-running a sweep whose
last invocation did not finish resumes it (finished trials are kept; a trial left RUNNING by the dead
driver is continued first, as the same Optuna trial under its own run name, so its run resumes from
its last state); re-running a finished sweep starts a new invocation that adds trials to the same
study. See docs/sweeps.md.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import re
import socket
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional
from collections.abc import Callable

import numpy as np
import pandas as pd
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import frontier, tracking
from .config import Config, ConfigError, _describe, eval_budgets, load_config, parse_budget, to_dict, to_yaml
from .cost import CostModel, reserved_resources, run_cost
from .sweep_attempts import AttemptClock

# ---------------------------------------------------------------------------------------------
# Schema

PARAM_TYPES = ("float", "int", "log_float", "categorical")
# Objective metrics: where the value comes from and its natural direction.
EVAL_METRICS = {"accuracy": "max", "mean_tokens": "min", "mean_thinking_tokens": "min", "truncation_rate": "min"}
RUN_METRICS = {"cost": "min", "generated_tokens": "min", "wall_seconds": "min", "accelerator_hours": "min"}
# Space keys that are not config keys: they derive budget.thinking / budget.solution.
TOTAL_KEY, FRACTION_KEY = "budget.total", "budget.thinking_fraction"
VIRTUAL_KEYS = (TOTAL_KEY, FRACTION_KEY)
SAMPLERS = ("tpe", "nsga2", "random")
STORAGE_ENV = "OPTUNA_STORAGE"  # where a cluster passes the study's database URL (kept out of job specs)
_STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")

# Study / trial user attributes (the study is the sweep's durable state).
ATTR_OBJECTIVES = "budgetrl.objectives"
ATTR_INVOCATIONS = "budgetrl.invocations"
ATTR_LEASE = "budgetrl.driver"
T_INVOCATION, T_RUN_NAME, T_RUN_ID = "budgetrl.invocation", "budgetrl.run_name", "budgetrl.run_id"
T_OVERRIDES, T_METRICS, T_EVALS = "budgetrl.overrides", "budgetrl.metrics", "budgetrl.evals"
T_ERROR, T_INTERRUPTIONS, T_PRUNED_AT = "budgetrl.error", "budgetrl.interruptions", "budgetrl.pruned_at"
# Set by drivers before interrupted trials were continued: such a trial was failed and re-asked.
T_INTERRUPTED = "budgetrl.interrupted"
TAG_TRIAL, TAG_INVOCATION, TAG_PRUNED = "budgetrl.trial", "budgetrl.sweep_invocation", "budgetrl.pruned"

LEASE_HEARTBEAT_S = 30.0
LEASE_STALE_S = 120.0


@dataclass
class ParamSpec:
    """One search dimension. ``float``/``int``/``log_float`` take low, high (and step); ``categorical`` choices."""

    type: str = MISSING
    low: Optional[float] = None
    high: Optional[float] = None
    step: Optional[float] = None
    choices: Optional[list[Any]] = None


@dataclass
class ObjectiveSpec:
    metric: str = MISSING  # accuracy | mean_tokens | mean_thinking_tokens | truncation_rate | cost | ...
    budget: Optional[str] = None  # eval budget label for eval metrics ("16x8", "unconstrained")
    mode: Optional[str] = None  # max | min; default: the metric's natural direction


@dataclass
class ResourcesSpec:
    trial_cpus: float = 0.1  # the trial's own process (the controller loop); workers come from the base config
    trial_gpus: float = 0.0
    # Logical CPUs of a local Ray runtime started by the sweep; None: enough for max_concurrency trials.
    ray_num_cpus: Optional[int] = None


@dataclass
class EarlyStoppingSpec:
    """Pareto median stopping: at an eval step >= min_step, stop a trial whose point is dominated by at
    least ``dominated_fraction`` of the (>= ``min_peers``) other trials that reported the same step.
    Stopped trials are recorded PRUNED, so they never enter the front."""

    enabled: bool = False
    min_step: int = 1
    min_peers: int = 3
    dominated_fraction: float = 0.5


@dataclass
class SweepConfig:
    base_config: str = MISSING  # a training config YAML (relative paths: to the sweep file, then cwd)
    base_overrides: list[str] = field(default_factory=list)
    space: dict[str, ParamSpec] = field(default_factory=dict)
    objectives: list[ObjectiveSpec] = field(default_factory=lambda: [
        ObjectiveSpec(metric="accuracy"), ObjectiveSpec(metric="mean_tokens")])
    num_trials: int = 8  # trials per invocation
    max_concurrency: int = 1
    study_name: str = MISSING
    # Any SQLAlchemy URL; None: $OPTUNA_STORAGE, else sqlite:///<base trainer.output_dir>/sweeps/optuna.db
    storage: Optional[str] = None
    experiment: Optional[str] = None  # MLflow experiment; None: the base config's tracking.experiment
    tracking_uri: Optional[str] = None  # None: the base config's, else MLFLOW_TRACKING_URI, else ./mlflow.db
    sampler: str = "tpe"
    n_startup_trials: int = 4  # random trials before TPE models the space
    seed: int = 0
    retries: int = 0  # Tune re-runs of a trial that raised (FailureConfig.max_failures)
    resume: bool = True  # False: abandon an unfinished invocation instead of resuming it
    resources: ResourcesSpec = field(default_factory=ResourcesSpec)
    early_stopping: EarlyStoppingSpec = field(default_factory=EarlyStoppingSpec)
    cost: CostModel = field(default_factory=CostModel)
    # Eval budget whose accuracy/mean_tokens the standard plots use; None: the first eval objective's.
    frontier_budget: Optional[str] = None
    # Hypervolume reference per objective name (worst acceptable value); missing: see reference_point().
    reference: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Objective:
    name: str  # column / metric name, e.g. "accuracy_16x8", "cost"
    metric: str
    budget: Optional[str]
    mode: str  # max | min


@dataclass
class SweepPlan:
    """A validated sweep: everything the driver and the trials need, all paths resolved."""

    sweep: SweepConfig
    sweep_path: str
    base_path: str
    base_overrides: list[str]
    base: Config
    objectives: list[Objective]
    storage: str
    tracking_uri: str
    experiment: str
    sweep_dir: str
    frontier_budget: str

    @property
    def study_name(self) -> str:
        return self.sweep.study_name


def _bad(key: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{key}={value!r}: {why}")


def _schema_type(key: str) -> Any:
    """The declared type of a dotted ``Config`` key, or None if there is no such leaf."""
    obj: Any = Config
    for part in key.split("."):
        if not (dataclasses.is_dataclass(obj) and isinstance(obj, type)):
            return None
        names = {f.name for f in dataclasses.fields(obj)}
        if part not in names:
            return None
        obj = typing.get_type_hints(obj)[part]
    if dataclasses.is_dataclass(obj):
        return None
    return obj


def _scalar(tp: Any) -> Any:
    """Optional[X] -> X; list/dict types -> None (not searchable)."""
    if typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if tp in (int, float, bool, str) else None


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def derive_params(params: dict[str, Any], base_budget: tuple[int, int]) -> dict[str, Any]:
    """Trial parameters -> config values; ``budget.total`` x ``budget.thinking_fraction`` -> the two budgets.

    A missing one of the two comes from the base config (its total, or its thinking share).
    """
    out = {k: v for k, v in params.items() if k not in VIRTUAL_KEYS}
    if TOTAL_KEY in params or FRACTION_KEY in params:
        bt, bs = base_budget
        total = int(params.get(TOTAL_KEY, bt + bs))
        frac = float(params.get(FRACTION_KEY, bt / (bt + bs)))
        thinking = int(min(total - 1, max(1, round(total * frac))))
        out["budget.thinking"], out["budget.solution"] = thinking, total - thinking
    return out


def param_overrides(params: dict[str, Any], base_budget: tuple[int, int]) -> list[str]:
    return [f"{k}={_format_value(v)}" for k, v in sorted(derive_params(params, base_budget).items())]


def _validate_space(space: dict[str, ParamSpec]) -> None:
    if not space:
        raise _bad("space", {}, "empty search space; give at least one parameter")
    keys = set(space)
    if keys & set(VIRTUAL_KEYS) and keys & {"budget.thinking", "budget.solution"}:
        raise _bad("space", sorted(keys), f"{'/'.join(VIRTUAL_KEYS)} derive budget.thinking and budget.solution; "
                   "search one way or the other, not both")
    for key, p in space.items():
        where = f"space[{key!r}]"
        if key in VIRTUAL_KEYS:
            declared = int if key == TOTAL_KEY else float
        else:
            tp = _schema_type(key)
            if tp is None:
                raise _bad(f"{where}", key, "not a key of the training config schema (orchestrator/config.py); "
                           f"searchable keys are scalar leaves such as learner.lr, or {', '.join(VIRTUAL_KEYS)}")
            declared = _scalar(tp)
            if declared is None:
                raise _bad(where, key, f"has type {tp}; only scalar keys (int, float, bool, str) can be searched")
        if p.type not in PARAM_TYPES:
            raise _bad(f"{where}.type", p.type, f"unknown parameter type; use one of {', '.join(PARAM_TYPES)}")
        if p.type == "categorical":
            if p.low is not None or p.high is not None or p.step is not None:
                raise _bad(where, {"low": p.low, "high": p.high}, "categorical takes choices, not low/high/step")
            if not p.choices:
                raise _bad(f"{where}.choices", p.choices, "empty; list at least one choice")
            for c in p.choices:
                if not isinstance(c, (bool, int, float, str)) or c is None:
                    raise _bad(f"{where}.choices", c, "choices must be numbers, strings or booleans")
            continue
        if p.choices is not None:
            raise _bad(f"{where}.choices", p.choices, f"a {p.type} parameter takes low/high, not choices")
        if p.low is None or p.high is None:
            raise _bad(where, {"low": p.low, "high": p.high}, f"a {p.type} parameter needs both low and high")
        if p.low > p.high:
            raise _bad(f"{where}.low", p.low, f"greater than high={p.high!r}: empty range")
        if declared in (bool, str):
            raise _bad(f"{where}.type", p.type, f"{key} is a {declared.__name__}; search it as categorical")
        if declared is int and p.type not in ("int",):
            raise _bad(f"{where}.type", p.type, f"{key} is an int; use type int (or categorical)")
        if p.type == "int":
            for k, v in (("low", p.low), ("high", p.high), ("step", p.step)):
                if v is not None and float(v) != int(v):
                    raise _bad(f"{where}.{k}", v, "an int parameter needs whole numbers")
        if p.type == "log_float":
            if p.low <= 0:
                raise _bad(f"{where}.low", p.low, "log_float needs low > 0")
            if p.step is not None:
                raise _bad(f"{where}.step", p.step, "log_float takes no step")
        if p.step is not None and p.step <= 0:
            raise _bad(f"{where}.step", p.step, "must be > 0")
        if key == FRACTION_KEY and not (0 < p.low and p.high < 1):
            raise _bad(where, {"low": p.low, "high": p.high}, "a thinking fraction must lie in (0, 1)")
        if key == TOTAL_KEY and p.low < 2:
            raise _bad(f"{where}.low", p.low, "a total budget needs at least 2 tokens (thinking + solution)")


def space_values(p: ParamSpec) -> list[Any]:
    """The extreme values of a dimension (validation probes the base config with each)."""
    if p.type == "categorical":
        return list(p.choices)
    if p.type == "int":
        return [int(p.low), int(p.high)]
    return [float(p.low), float(p.high)]


def distributions(space: dict[str, ParamSpec]) -> dict:
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


def _objectives(sweep: SweepConfig, base: Config) -> list[Objective]:
    if not sweep.objectives:
        raise _bad("objectives", [], "give at least one objective")
    labels = [b.label for b in eval_budgets(base)]
    out: list[Objective] = []
    for i, o in enumerate(sweep.objectives):
        where = f"objectives[{i}]"
        if o.metric in EVAL_METRICS:
            budget = o.budget if o.budget is not None else "unconstrained"
            if budget != "unconstrained":
                try:
                    budget = parse_budget(budget, base.eval).label
                except ConfigError:
                    raise _bad(f"{where}.budget", o.budget, "not a THINKxSOLUTION budget or 'unconstrained'") from None
            if budget not in labels:
                raise _bad(f"{where}.budget", o.budget, f"not in the base config's eval.budgets {labels}; "
                           "an objective reads the final eval at one of those budgets")
            name, natural = f"{o.metric}_{budget}", EVAL_METRICS[o.metric]
        elif o.metric in RUN_METRICS:
            if o.budget is not None:
                raise _bad(f"{where}.budget", o.budget, f"{o.metric} is a per-run metric; it takes no budget")
            budget, name, natural = None, o.metric, RUN_METRICS[o.metric]
        else:
            raise _bad(f"{where}.metric", o.metric, "unknown objective; use one of "
                       f"{', '.join([*EVAL_METRICS, *RUN_METRICS])}")
        mode = o.mode or natural
        if mode not in ("max", "min"):
            raise _bad(f"{where}.mode", o.mode, "must be max or min")
        if name in [x.name for x in out]:
            raise _bad(f"{where}", name, "duplicate objective")
        out.append(Objective(name, o.metric, budget, mode))
    return out


def safe_url(url: str) -> str:
    """A database URL with its password masked, for messages, logs and MLflow params."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        return parsed.render_as_string(hide_password=True) if parsed.password else url
    except Exception:  # noqa: BLE001 - not parseable: mask anything that looks like user:password@
        return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def check_storage_url(url: str, key: str = "storage") -> None:
    """Fail (ConfigError) if the study storage cannot be used; creates nothing.

    SQLite: the file's directory must exist or be creatable, and be writable. Other databases: the
    SQLAlchemy driver must be installed and the server must accept a connection within 10 s.
    """
    import sqlalchemy
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise _bad(key, safe_url(url), f"not a SQLAlchemy database URL ({e})") from None
    if parsed.get_backend_name() == "sqlite":
        db = parsed.database
        if not db or db == ":memory:":
            raise _bad(key, safe_url(url), "an in-memory SQLite study is lost when the driver exits; give a file path")
        path = Path(db).resolve()
        if path.exists() and not path.is_file():
            raise _bad(key, safe_url(url), f"{path} exists and is not a file")
        probe = path.parent
        while not probe.exists():
            probe = probe.parent
        if not probe.is_dir() or not os.access(probe, os.W_OK):
            raise _bad(key, safe_url(url), f"cannot create or write {path} ({probe} is not a writable directory)")
        return
    try:
        engine = sqlalchemy.create_engine(url)
    except (NoSuchModuleError, ModuleNotFoundError, ImportError) as e:
        raise _bad(key, safe_url(url), f"no SQLAlchemy driver for this URL: {e}") from None
    except Exception as e:  # noqa: BLE001 - any construction error is a bad URL
        raise _bad(key, safe_url(url), f"unusable storage URL: {type(e).__name__}: {e}") from None
    error: list[BaseException] = []

    def connect() -> None:
        try:
            with engine.connect():
                pass
        except BaseException as e:  # noqa: BLE001
            error.append(e)

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(10.0)
    if t.is_alive():
        raise _bad(key, safe_url(url), "storage unreachable (no connection within 10 s)")
    if error:
        e = error[0]
        raise _bad(key, safe_url(url), f"storage unreachable: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    engine.dispose()


def _resolve_base_path(base: str, sweep_path: Path) -> Path:
    p = Path(base)
    if p.is_absolute():
        return p
    beside = (sweep_path.parent / p)
    return beside if beside.is_file() else Path.cwd() / p


def _sqlite_abs(url: str) -> str:
    """Make a relative ``sqlite:///`` path absolute (trials run in other working directories)."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        rest = url[len("sqlite:///"):]
        path, _, query = rest.partition("?")
        if path and path != ":memory:":
            return "sqlite:///" + str(Path(path).resolve()) + (f"?{query}" if query else "")
    return url


def load_sweep(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> SweepPlan:
    """Sweep YAML + overrides -> validated ``SweepPlan``. Starts nothing and writes nothing.

    Overrides: ``key=value`` for sweep keys (``num_trials=4``), ``base.KEY=value`` for the base
    training config (``base.trainer.steps=2``), appended after the sweep file's ``base_overrides``.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"sweep config {str(path)!r} does not exist")
    try:
        layers = [OmegaConf.structured(SweepConfig), OmegaConf.load(p)]
    except Exception as exc:  # YAML syntax
        raise ConfigError(f"sweep config {str(path)!r} is not valid YAML: {exc}") from None
    extra_base, dotlist = [], []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value")
        key, value = item.split("=", 1)
        key = key.strip().lstrip("+")
        if key.startswith("base."):
            extra_base.append(f"{key[len('base.'):]}={value}")
        else:
            dotlist.append(f"{key}={value}")
    try:
        if dotlist:
            layers.append(OmegaConf.from_dotlist(dotlist))
        sweep: SweepConfig = OmegaConf.to_object(OmegaConf.merge(*layers))
    except OmegaConfBaseException as exc:
        raise ConfigError(_describe(exc)) from None

    if not sweep.study_name or not _STUDY_NAME_RE.match(sweep.study_name):
        raise _bad("study_name", sweep.study_name, "use letters, digits, '_', '-', '.' (at most 100 characters)")
    if sweep.num_trials < 1:
        raise _bad("num_trials", sweep.num_trials, "must be >= 1")
    if sweep.max_concurrency < 1:
        raise _bad("max_concurrency", sweep.max_concurrency, "must be >= 1")
    if sweep.sampler not in SAMPLERS:
        raise _bad("sampler", sweep.sampler, f"must be one of {', '.join(SAMPLERS)}")
    if sweep.n_startup_trials < 0:
        raise _bad("n_startup_trials", sweep.n_startup_trials, "must be >= 0")
    if sweep.retries < 0:
        raise _bad("retries", sweep.retries, "must be >= 0")
    res = sweep.resources
    if res.trial_cpus <= 0:
        raise _bad("resources.trial_cpus", res.trial_cpus, "must be > 0 (the trial's controller loop runs there)")
    if res.trial_gpus < 0:
        raise _bad("resources.trial_gpus", res.trial_gpus, "must be >= 0")
    if res.ray_num_cpus is not None and res.ray_num_cpus < 1:
        raise _bad("resources.ray_num_cpus", res.ray_num_cpus, "must be >= 1")
    es = sweep.early_stopping
    if es.min_step < 1:
        raise _bad("early_stopping.min_step", es.min_step, "must be >= 1")
    if es.min_peers < 1:
        raise _bad("early_stopping.min_peers", es.min_peers, "must be >= 1")
    if not 0 < es.dominated_fraction <= 1:
        raise _bad("early_stopping.dominated_fraction", es.dominated_fraction, "must be in (0, 1]")
    for key in ("accelerator_hour_price", "cpu_hour_price"):
        if getattr(sweep.cost, key) < 0:
            raise _bad(f"cost.{key}", getattr(sweep.cost, key), "must be >= 0")

    _validate_space(sweep.space)

    base_path = _resolve_base_path(sweep.base_config, p)
    base_overrides = [*sweep.base_overrides, *extra_base]
    try:
        base = load_config(base_path, base_overrides)
    except ConfigError as exc:
        raise ConfigError(f"base_config {str(base_path)!r}: {exc}") from None
    if es.enabled and not 0 < base.trainer.eval_every < base.trainer.steps:
        raise _bad("early_stopping.enabled", True, "needs intermediate evals: set 0 < trainer.eval_every < "
                   f"trainer.steps (now {base.trainer.eval_every} and {base.trainer.steps}) in the base config "
                   "(or base.trainer.eval_every=N)")

    # Every extreme of every dimension must give a valid training config (one at a time, then all
    # lows and all highs together): a space that can produce an impossible run fails now, not in trial 7.
    bb = (base.budget.thinking, base.budget.solution)
    probes: list[dict[str, Any]] = []
    for key, spec in sorted(sweep.space.items()):
        probes += [{key: v} for v in space_values(spec)]
    probes.append({k: space_values(s)[0] for k, s in sweep.space.items()})
    probes.append({k: space_values(s)[-1] for k, s in sweep.space.items()})
    for probe in probes:
        try:
            load_config(base_path, [*base_overrides, *param_overrides(probe, bb)])
        except ConfigError as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in probe.items())
            raise ConfigError(f"space: the point {{{shown}}} gives an invalid training config: {exc}") from None

    objectives = _objectives(sweep, base)
    labels = [b.label for b in eval_budgets(base)]
    fb = sweep.frontier_budget
    if fb is None:
        fb = next((o.budget for o in objectives if o.budget), "unconstrained" if "unconstrained" in labels else labels[0])
    elif fb not in labels:
        raise _bad("frontier_budget", fb, f"not in the base config's eval.budgets {labels}")
    names = [o.name for o in objectives]
    for k in sweep.reference:
        if k not in names:
            raise _bad(f"reference.{k}", sweep.reference[k], f"not an objective name; objectives are {names}")

    out_dir = Path(base.trainer.output_dir).resolve()
    storage = sweep.storage or os.environ.get(STORAGE_ENV) or f"sqlite:///{out_dir / 'sweeps' / 'optuna.db'}"
    storage = _sqlite_abs(storage)
    check_storage_url(storage, "storage" if sweep.storage or not os.environ.get(STORAGE_ENV) else STORAGE_ENV)
    uri = tracking.resolve_tracking_uri(sweep.tracking_uri or base.tracking.tracking_uri)
    try:
        tracking._probe(uri)
    except tracking.TrackingError as exc:
        raise _bad("tracking_uri", uri, str(exc)) from None
    return SweepPlan(sweep=sweep, sweep_path=str(p.resolve()), base_path=str(base_path.resolve()),
                     base_overrides=base_overrides, base=base, objectives=objectives, storage=storage,
                     tracking_uri=uri, experiment=sweep.experiment or base.tracking.experiment,
                     sweep_dir=str(out_dir / "sweeps" / sweep.study_name), frontier_budget=fb)


# ---------------------------------------------------------------------------------------------
# Metrics of a trial


def eval_metrics(rows: list[dict]) -> dict[str, float]:
    """Per-budget eval summary rows -> ``{"accuracy_16x8": ..., "mean_tokens_16x8": ...}``."""
    out = {}
    for row in rows:
        for m in EVAL_METRICS:
            if m in row and row[m] is not None:
                out[f"{m}_{row['budget_label']}"] = float(row[m])
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
# Storage, study, lease


def open_storage(url: str):
    import optuna

    kwargs = {}
    if url.startswith("sqlite"):
        # Trials tell the study from their own processes; wait for the SQLite lock instead of failing.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as exc:  # two processes creating the schema at once: one loses the race
            if "already exists" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def _sampler(sweep: SweepConfig, n_existing: int):
    import optuna

    seed = sweep.seed + n_existing  # a new invocation must not replay the previous one's random points
    if sweep.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if sweep.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    # constant_liar: concurrent trials do not all pile onto the same promising point.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=sweep.n_startup_trials, multivariate=True,
                                      constant_liar=True)


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


class _Lease:
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


def _finished_states():
    from optuna.trial import TrialState

    return (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)


def invocation_done(study, invocation: str) -> int:
    """Trials of an invocation that ran to an end (complete, pruned, failed; not interrupted)."""
    return sum(1 for t in study.get_trials(deepcopy=False, states=_finished_states())
               if t.user_attrs.get(T_INVOCATION) == invocation and not t.user_attrs.get(T_INTERRUPTED))


def open_study(plan: SweepPlan, create: bool):
    """Load (or create) the study; refuses one whose objectives differ from the plan's."""
    import optuna

    _quiet_optuna()
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
    have = study.user_attrs.get(ATTR_OBJECTIVES)
    have_dirs = [d.name.lower() for d in study.directions]
    if (have and have != names) or have_dirs != directions:
        raise ConfigError(f"objectives={names!r}: study {plan.study_name!r} in {safe_url(plan.storage)} was created with "
                          f"objectives {have} ({have_dirs}); use another study_name to change objectives")
    return study


# ---------------------------------------------------------------------------------------------
# The trial (runs inside a Tune worker)


@dataclass
class TrialContext:
    """What every trial needs from the driver (shipped once through the object store)."""

    study_name: str
    storage: str
    base_path: str
    base_overrides: list[str]
    base_budget: tuple[int, int]
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


def _default_train() -> Callable:
    from .trainer import train

    return train


def _supports(fn: Callable, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def _find_run_id(client, experiment: str, run_name: str) -> str | None:
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
        cfg.tracking.tags = {**(cfg.tracking.tags or {}), tracking.TAG_STUDY: ctx.study_name, TAG_TRIAL: str(number)}
    return cfg, nested_at_start


def run_trial(config: dict, ctx: TrialContext) -> None:
    """Tune function trainable: one training run with the trial's parameters; tells the study itself.

    Every attempt of a trial (a Tune retry, or a continuation after the driver died) trains under the
    trial's one run name, so the trainer continues the run from its last state, and the trial's cost
    counts every attempt (``sweep_attempts``)."""
    import optuna
    from mlflow import MlflowClient
    from optuna.trial import TrialState
    from ray import tune

    # Tune moves a trial into its own directory; the base config's relative paths (model, outputs)
    # mean the driver's working directory (or the job's working_dir on a cluster).
    for d in (ctx.cwd, os.environ.get("TUNE_ORIG_WORKING_DIR")):
        if d and os.path.isdir(d):
            os.chdir(d)
            break
    _quiet_optuna()
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

    train_fn = ctx.train_fn or _default_train()
    es, objectives = ctx.early_stopping, ctx.objectives
    evals: dict[str, dict[str, float]] = dict(trial.user_attrs.get(T_EVALS) or {})  # earlier attempts' points
    pruned_at: list[int] = []

    def on_eval(step: int, rows: list[dict]) -> bool:
        metrics = eval_metrics(rows)
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

    kwargs = {"log": lambda *a, **k: print(*a, **k)}
    if _supports(train_fn, "on_eval"):
        kwargs["on_eval"] = on_eval
    client = MlflowClient(ctx.tracking_uri)
    try:
        result = train_fn(cfg, **kwargs)
    except BaseException as exc:
        error = f"{type(exc).__name__}: {exc}"[:2000]
        clock.stop(error)
        run_id = _find_run_id(client, ctx.experiment, run_name)
        if run_id:
            trial.set_user_attr(T_RUN_ID, run_id)
            _tag_child(client, run_id, ctx, number, nested_at_start)
        if clock.index >= ctx.retries:  # else Tune retries it: the trial stays RUNNING for the retry
            trial.set_user_attr(T_ERROR, error)
            study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
        raise
    _report_result(study, trial, ctx, cfg, result, clock.stop(), pruned_at, nested_at_start)


def _report_result(study, trial, ctx: TrialContext, cfg: Config, result, wall: float, pruned_at: list[int],
                   nested_at_start: bool) -> None:
    """Cost (every attempt's ``wall`` seconds) and objectives into the run, then tell the study and Tune."""
    from mlflow import MlflowClient
    from optuna.trial import TrialState
    from ray import tune

    number, objectives, client = trial.number, ctx.objectives, MlflowClient(ctx.tracking_uri)
    run_id = result.run_id
    trial.set_user_attr(T_RUN_ID, run_id)
    _tag_child(client, run_id, ctx, number, nested_at_start)
    costs = run_cost(cfg, wall, ctx.cost, ctx.trial_cpus)
    logged = client.get_run(run_id).data.metrics
    metrics = eval_metrics(result.eval_after)
    metrics.update({"cost": costs["cost/total"], "wall_seconds": wall,
                    "accelerator_hours": costs["cost/accelerator_hours"],
                    "generated_tokens": float(logged.get("cost/generated_tokens_total", math.nan))})
    values = objective_values(metrics, objectives)
    pruned = bool(pruned_at) or bool(getattr(result, "stopped_early", False))
    tracker = tracking.Tracker(ctx.tracking_uri, run_id, client.get_run(run_id).info.experiment_id)
    step = int(getattr(result, "steps", 0) or 0)
    tracker.log_metrics({**costs, **{f"sweep/{k}": v for k, v in values.items()}}, step=step)
    tracker.set_tags({"budgetrl.cost_currency": ctx.cost.currency, TAG_PRUNED: str(pruned).lower()})
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


def _tag_child(client, run_id: str, ctx: TrialContext, number: int, nested_at_start: bool) -> None:
    from mlflow.entities import RunTag

    tags = {tracking.TAG_STUDY: ctx.study_name, TAG_TRIAL: str(number), TAG_INVOCATION: ctx.invocation}
    if not nested_at_start:
        tags[tracking.TAG_PARENT_RUN] = ctx.parent_run_id
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


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


# ---------------------------------------------------------------------------------------------
# The driver


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
            run_id = _find_run_id(client, plan.experiment, ft.user_attrs[T_RUN_NAME])
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
    from .runtime import start_local_ray

    start_local_ray(num_cpus=num_cpus, log_to_driver=False)
    return True


def _warmstart_in_trials(plan: SweepPlan) -> bool:
    """Whether trials may have to build/warm-start their own start checkpoint (space touches its key)."""
    return plan.base.warmstart.steps > 0 and any(
        k.split(".")[0] in ("model", "warmstart", "data") for k in plan.sweep.space)


def run_sweep(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = (), *, log=print,
              train_fn: Callable | None = None, plan: SweepPlan | None = None) -> SweepResult:
    """Run (or resume) one sweep invocation; returns the study's trials and front afterwards."""
    plan = plan or load_sweep(path, overrides)
    sweep = plan.sweep
    Path(plan.sweep_dir).mkdir(parents=True, exist_ok=True)
    study = open_study(plan, create=True)
    study.sampler = _sampler(sweep, len(study.get_trials(deepcopy=False)))
    lease = _Lease(study)
    lease.acquire()
    started_ray = False
    try:
        invocations = list(study.user_attrs.get(ATTR_INVOCATIONS) or [])
        last = invocations[-1] if invocations else None
        parent: tracking.Tracker
        if last is not None and last.get("status") != "finished" and sweep.resume:
            inv = last
            log(f"sweep: resuming invocation {inv['id']} of study {plan.study_name!r} "
                f"({invocation_done(study, inv['id'])}/{inv['target']} trials done)")
            parent = tracking.Tracker.resume(plan.tracking_uri, inv["parent_run_id"])
        else:
            if last is not None and last.get("status") != "finished":
                last["status"] = "abandoned"
            sweep_dict = dataclasses.asdict(sweep)
            sweep_dict["storage"] = safe_url(plan.storage)  # never a database password in MLflow
            inv = {"id": f"{len(invocations) + 1:03d}", "target": sweep.num_trials, "status": "running",
                   "started": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
            parent = tracking.Tracker.start(
                plan.tracking_uri, plan.experiment, run_name=f"sweep-{plan.study_name}-{inv['id']}",
                params={"sweep": sweep_dict},
                tags={**tracking.lineage_tags(sweep_dict, workload="sweep", stage="sweep"),
                      tracking.TAG_STUDY: plan.study_name, TAG_INVOCATION: inv["id"]})
            inv["parent_run_id"] = parent.run_id
            invocations.append(inv)
            study.set_user_attr(ATTR_INVOCATIONS, invocations)
            parent.log_dict(sweep_dict, "sweep/sweep.yaml")
            parent.log_dict({"base_config": plan.base_path, "base_overrides": plan.base_overrides,
                             "resolved": to_dict(plan.base)}, "sweep/base_config.json")
        with parent:
            continued = _interrupted(study, plan, inv["id"], log)
            remaining = max(inv["target"] - invocation_done(study, inv["id"]), len(continued))
            # Each trial: its own controller process plus the placement group its WorkerGroup reserves.
            workers = reserved_resources(plan.base)
            res = sweep.resources
            warm_in_trials = _warmstart_in_trials(plan)
            demand = res.trial_cpus + workers["cpus"] + (1.0 if warm_in_trials else 0.0)
            if remaining > 0:
                if sweep.early_stopping.enabled and not _supports(train_fn or _default_train(), "on_eval"):
                    log("sweep: WARNING early_stopping.enabled, but this trainer.train has no on_eval hook: "
                        "trials report only their final result and none is stopped early")
                started_ray = _init_ray(plan, demand, log)
                _prepare_shared_start(plan, warm_in_trials, log)
                _fit(plan, study, inv, remaining, continued, parent.run_id, warm_in_trials, log, train_fn)
            done = invocation_done(study, inv["id"])
            finished = done >= inv["target"]
            invocations = list(study.user_attrs.get(ATTR_INVOCATIONS) or [])
            for item in invocations:
                if item["id"] == inv["id"]:
                    item["status"] = "finished" if finished else "interrupted"
                    item["ended"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            study.set_user_attr(ATTR_INVOCATIONS, invocations)
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
    from .warmstart import prepare_start_checkpoint

    start, _ = prepare_start_checkpoint(plan.base, log=log)
    log(f"sweep: trials start from {start}")


def _fit(plan: SweepPlan, study, inv: dict, remaining: int, continued: list[int], parent_run_id: str,
         warm_in_trials: bool, log, train_fn) -> None:
    from ray import tune

    sweep = plan.sweep
    ctx = TrialContext(study_name=plan.study_name, storage=plan.storage, base_path=plan.base_path,
                       base_overrides=plan.base_overrides,
                       base_budget=(plan.base.budget.thinking, plan.base.budget.solution),
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


# ---------------------------------------------------------------------------------------------
# Frontiers


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
    (accuracy 0, mean tokens at a budget: that budget's thinking + solution), else 1.1 x the worst seen
    (which moves as trials are added: set ``reference`` to compare hypervolumes across invocations)."""
    ref = {}
    limits = {b.label: (b.thinking, b.solution) for b in eval_budgets(plan.base)}
    for o in plan.objectives:
        if o.name in plan.sweep.reference:
            ref[o.name] = float(plan.sweep.reference[o.name])
        elif o.metric in ("accuracy",) and o.mode == "max":
            ref[o.name] = 0.0
        elif o.metric in ("mean_tokens", "mean_thinking_tokens") and o.mode == "min" and o.budget in limits:
            t, s = limits[o.budget]
            ref[o.name] = float(t + s if o.metric == "mean_tokens" else t)
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


def _export_config(plan: SweepPlan, overrides: list[str], header: str) -> str:
    cfg = load_config(plan.base_path, [*plan.base_overrides, *overrides])
    return header + to_yaml(cfg)


def log_study_frontier(study, plan: SweepPlan, parent: tracking.Tracker, log=print) -> tuple[pd.DataFrame, list[int], float]:
    """Pareto front of the whole study (every invocation's complete trials) into the parent run.

    Artifacts: frontier/trials.parquet (all finished trials, ``on_front`` for the sweep objectives),
    frontier/accuracy_vs_tokens.{parquet,png}, frontier/accuracy_vs_cost.{parquet,png},
    frontier/configs/trial_NNNN.yaml (ready-to-run training configs of the front). Metrics:
    frontier/hypervolume (sweep objectives), frontier/size, frontier/complete_trials.
    """
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
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_pandas(df, preserve_index=False)
    pq.write_table(table, out / "trials.parquet")
    parent.log_table(table, "frontier/trials.parquet")
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
    bb = (plan.base.budget.thinking, plan.base.budget.solution)
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
        (configs / f"trial_{n:04d}.yaml").write_text(_export_config(plan, overrides, header))
    if front.shape[0]:
        parent.log_artifacts(str(configs), "frontier/configs")
    parent.log_dict({"reference": ref, "objectives": [dataclasses.asdict(o) for o in plan.objectives],
                     "front": front["trial"].astype(int).tolist()}, "frontier/summary.json")
    parent.log_metrics({"frontier/hypervolume": hv, "frontier/size": float(len(front)),
                        "frontier/complete_trials": float(len(complete))}, step=len(complete))
    cols = ["trial", *[o.name for o in plan.objectives]] + [c for c in df.columns if c.startswith("param.")]
    log(f"sweep: Pareto front of study {plan.study_name!r} ({len(front)} of {len(complete)} complete trials), "
        f"hypervolume {hv:.4g}:\n{front[cols].to_string(index=False)}")
    return df, front["trial"].astype(int).tolist(), float(hv)


# ---------------------------------------------------------------------------------------------
# `frontier` command: a front from any MLflow runs

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
        if not include_pruned and r.data.tags.get(TAG_PRUNED) == "true":
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
                         "trial": r.data.tags.get(TAG_TRIAL), "accuracy": m[key],
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
        table = frontier.frontier_table(pts, maximize=("accuracy",), minimize=(x,))
        worst = float(pts[x].max()) if len(pts) else 0.0
        ref = {"accuracy": 0.0, x: worst * 1.1 + 1e-9}
        hv = frontier.hypervolume(pts, ["accuracy"], [x], reference=ref) if len(pts) else 0.0
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
    figs = {x: frontier.plot_frontier(r["points"], x=x, y="accuracy", label="label",
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


def describe_plan(plan: SweepPlan) -> str:
    """A short human summary (``sweep --check``)."""
    lines = [f"study {plan.study_name!r} in {safe_url(plan.storage)}",
             f"base {plan.base_path} + {plan.base_overrides}",
             f"objectives: {', '.join(f'{o.mode} {o.name}' for o in plan.objectives)}",
             f"space: {', '.join(f'{k} ({p.type})' for k, p in sorted(plan.sweep.space.items()))}",
             f"{plan.sweep.num_trials} trials per invocation, {plan.sweep.max_concurrency} at a time; "
             f"MLflow {plan.tracking_uri} experiment {plan.experiment!r}; outputs {plan.sweep_dir}"]
    return "\n".join(lines)


__all__ = ["SweepConfig", "ParamSpec", "ObjectiveSpec", "SweepPlan", "SweepResult", "load_sweep", "run_sweep",
           "frontier_command", "derive_params", "dominated_share", "check_storage_url", "describe_plan"]
