"""A sweep's config: the schema (``SweepConfig``), its validation and the resolved ``SweepPlan``.

A sweep config (YAML + ``key=value`` overrides) names a base training config, a search space over its
keys (plus ``budget.total`` / ``budget.thinking_fraction``, which derive ``budget.thinking`` and
``budget.solution``), objectives, and how many trials to run how widely. ``load_sweep`` validates all of
it before any storage, MLflow run or Ray runtime is created, naming the bad key and value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .. import tracking
from ..config import Budget, Config, ConfigError, eval_budgets, load_config, parse_budget
from ..config_merge import describe_error
from ..cost import CostModel
from .storage import bad as _bad
from .storage import check_storage_url, safe_url, sqlite_abs

PARAM_TYPES = ("float", "int", "log_float", "categorical")
# Objective metrics: where the value comes from and its natural direction.
EVAL_METRICS = {"accuracy": "max", "mean_tokens": "min", "mean_thinking_tokens": "min", "truncation_rate": "min"}
RUN_METRICS = {"cost": "min", "generated_tokens": "min", "wall_seconds": "min", "accelerator_hours": "min"}
# The area of the trial's own accuracy-vs-tokens staircase over its eval grid (frontier.model_hypervolume).
HYPERVOLUME = "hypervolume"
TOKEN_AXES = ("mean_tokens", "mean_thinking_tokens")  # its token axis
# Space keys that are not config keys: they derive budget.thinking / budget.solution.
TOTAL_KEY, FRACTION_KEY = "budget.total", "budget.thinking_fraction"
VIRTUAL_KEYS = (TOTAL_KEY, FRACTION_KEY)
SAMPLERS = ("tpe", "nsga2", "random", "grid")
STORAGE_ENV = "OPTUNA_STORAGE"  # where a cluster passes the study's database URL (kept out of job specs)
_STUDY_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


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
    metric: str = MISSING  # accuracy | mean_tokens | mean_thinking_tokens | truncation_rate | cost | hypervolume ...
    budget: Optional[str] = None  # eval budget label for eval metrics ("16x8", "unconstrained")
    mode: Optional[str] = None  # max | min; default: the metric's natural direction
    # hypervolume only: the token axis (mean_tokens | mean_thinking_tokens), the eval budgets whose points
    # count (None: all of eval.budgets), and the reference {accuracy: worst, tokens: most} (defaults:
    # accuracy 0, tokens the largest limit of the counted budgets on that axis).
    tokens: Optional[str] = None
    budgets: Optional[list[str]] = None
    reference: Optional[dict[str, Any]] = None  # checked here, naming the objective (OmegaConf would not)


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
class StaircaseArea:
    """A resolved hypervolume objective: the trial's (accuracy, ``tokens``) points at ``budgets``,
    measured against (``ref_accuracy``, ``ref_tokens``)."""

    tokens: str
    budgets: tuple[str, ...]
    ref_accuracy: float
    ref_tokens: float

    @property
    def reference(self) -> dict[str, float]:
        return {"accuracy": self.ref_accuracy, "tokens": self.ref_tokens}


@dataclass(frozen=True)
class Objective:
    name: str  # column / metric name, e.g. "accuracy_16x8", "cost", "hypervolume"
    metric: str
    budget: Optional[str]
    mode: str  # max | min
    area: Optional[StaircaseArea] = None  # metric hypervolume only


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


# ---------------------------------------------------------------------------------------------
# Parameters -> training config overrides


def base_budget(cfg: Config) -> Budget:
    """The base training config's budget, as the one ``Budget`` value (``budget.total`` and
    ``budget.thinking_fraction`` are derived from it when a trial leaves one of them out)."""
    t, s = cfg.budget.thinking, cfg.budget.solution
    return Budget(t, s)


def _format_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "null"
    if isinstance(v, float):
        return repr(v)
    return str(v)


def derive_params(params: dict[str, Any], base: Budget) -> dict[str, Any]:
    """Trial parameters -> config values; ``budget.total`` x ``budget.thinking_fraction`` -> the two budgets.

    A missing one of the two comes from the base budget (its total, or its thinking share).
    """
    out = {k: v for k, v in params.items() if k not in VIRTUAL_KEYS}
    if TOTAL_KEY in params or FRACTION_KEY in params:
        bt, bs = base.thinking, base.solution
        total = int(params.get(TOTAL_KEY, bt + bs))
        frac = float(params.get(FRACTION_KEY, bt / (bt + bs)))
        thinking = int(min(total - 1, max(1, round(total * frac))))
        out["budget.thinking"], out["budget.solution"] = thinking, total - thinking
    return out


def param_overrides(params: dict[str, Any], base: Budget) -> list[str]:
    """``key=value`` overrides; a string key's value is quoted so YAML text in it ("[think {thinking}] ") stays text."""
    return [f"{k}={json.dumps(v) if _scalar(_schema_type(k)) is str else _format_value(v)}"
            for k, v in sorted(derive_params(params, base).items())]


def space_values(p: ParamSpec) -> list[Any]:
    """The extreme values of a dimension (validation probes the base config with each)."""
    if p.type == "categorical":
        return list(p.choices)
    if p.type == "int":
        return [int(p.low), int(p.high)]
    return [float(p.low), float(p.high)]


# ---------------------------------------------------------------------------------------------
# Validation


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


def _declared_type(key: str, where: str) -> type:
    """The Python type a space key takes (the virtual budget keys: int total, float fraction)."""
    if key in VIRTUAL_KEYS:
        return int if key == TOTAL_KEY else float
    tp = _schema_type(key)
    if tp is None:
        raise _bad(f"{where}", key, "not a key of the training config schema (orchestrator/config.py); "
                   f"searchable keys are scalar leaves such as learner.lr, or {', '.join(VIRTUAL_KEYS)}")
    if typing.get_origin(tp) is list:
        return list  # searched as categorical choices written as YAML lists ("[8, 16, 32]")
    declared = _scalar(tp)
    if declared is None:
        raise _bad(where, key, f"has type {tp}; only scalar keys (int, float, bool, str) and lists can be searched")
    return declared


def _check_list_choices(p: ParamSpec, where: str) -> None:
    """A list key is searched over whole lists, each choice a YAML list in a string (Optuna keeps scalars)."""
    if p.type != "categorical":
        raise _bad(f"{where}.type", p.type, "a list key is searched as categorical, each choice a list in quotes")
    for c in p.choices or ():
        if not (isinstance(c, str) and isinstance(yaml.safe_load(c), list)):
            raise _bad(f"{where}.choices", c, 'each choice of a list key is a YAML list in quotes, e.g. "[8, 16, 32]"')


def _check_categorical(p: ParamSpec, where: str) -> None:
    if p.low is not None or p.high is not None or p.step is not None:
        raise _bad(where, {"low": p.low, "high": p.high}, "categorical takes choices, not low/high/step")
    if not p.choices:
        raise _bad(f"{where}.choices", p.choices, "empty; list at least one choice")
    for c in p.choices:
        if not isinstance(c, (bool, int, float, str)) or c is None:
            raise _bad(f"{where}.choices", c, "choices must be numbers, strings or booleans")


def _check_range(key: str, p: ParamSpec, declared: type, where: str) -> None:
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


def _validate_space(space: dict[str, ParamSpec]) -> None:
    if not space:
        raise _bad("space", {}, "empty search space; give at least one parameter")
    keys = set(space)
    if keys & set(VIRTUAL_KEYS) and keys & {"budget.thinking", "budget.solution"}:
        raise _bad("space", sorted(keys), f"{'/'.join(VIRTUAL_KEYS)} derive budget.thinking and budget.solution; "
                   "search one way or the other, not both")
    for key, p in space.items():
        where = f"space[{key!r}]"
        declared = _declared_type(key, where)
        if p.type not in PARAM_TYPES:
            raise _bad(f"{where}.type", p.type, f"unknown parameter type; use one of {', '.join(PARAM_TYPES)}")
        if declared is list:
            _check_list_choices(p, where)
        if p.type == "categorical":
            _check_categorical(p, where)
        else:
            _check_range(key, p, declared, where)


def _check_settings(sweep: SweepConfig) -> None:
    """The sweep's own scalar settings (not the space, not the base config)."""
    if not sweep.study_name or not _STUDY_NAME_RE.match(sweep.study_name):
        raise _bad("study_name", sweep.study_name, "use letters, digits, '_', '-', '.' (at most 100 characters)")
    for key in ("num_trials", "max_concurrency"):
        if getattr(sweep, key) < 1:
            raise _bad(key, getattr(sweep, key), "must be >= 1")
    if sweep.sampler not in SAMPLERS:
        raise _bad("sampler", sweep.sampler, f"must be one of {', '.join(SAMPLERS)}")
    for key in ("n_startup_trials", "retries"):
        if getattr(sweep, key) < 0:
            raise _bad(key, getattr(sweep, key), "must be >= 0")
    res = sweep.resources
    if res.trial_cpus <= 0:
        raise _bad("resources.trial_cpus", res.trial_cpus, "must be > 0 (the trial's controller loop runs there)")
    if res.trial_gpus < 0:
        raise _bad("resources.trial_gpus", res.trial_gpus, "must be >= 0")
    if res.ray_num_cpus is not None and res.ray_num_cpus < 1:
        raise _bad("resources.ray_num_cpus", res.ray_num_cpus, "must be >= 1")
    es = sweep.early_stopping
    for key in ("min_step", "min_peers"):
        if getattr(es, key) < 1:
            raise _bad(f"early_stopping.{key}", getattr(es, key), "must be >= 1")
    if not 0 < es.dominated_fraction <= 1:
        raise _bad("early_stopping.dominated_fraction", es.dominated_fraction, "must be in (0, 1]")
    for key in ("accelerator_hour_price", "cpu_hour_price"):
        if getattr(sweep.cost, key) < 0:
            raise _bad(f"cost.{key}", getattr(sweep.cost, key), "must be >= 0")


def grid_points(space: dict[str, ParamSpec]) -> dict[str, list]:
    """``sampler: grid``: every categorical parameter's choices (the grid is their product)."""
    return {key: list(p.choices) for key, p in sorted(space.items())}


def _check_grid(sweep: SweepConfig) -> None:
    """A grid runs every combination of categorical choices once: a range has no finite grid, and more
    trials than points would repeat points."""
    if sweep.sampler != "grid":
        return
    for key, p in sorted(sweep.space.items()):
        if p.type != "categorical":
            raise _bad(f"space[{key!r}].type", p.type, "sampler 'grid' needs categorical parameters "
                       "(list the values to try as choices)")
    size = 1
    for choices in grid_points(sweep.space).values():
        size *= len(choices)
    if sweep.num_trials > size:
        raise _bad("num_trials", sweep.num_trials, f"the grid has {size} points; a grid sweep runs each once")


def _eval_label(text: str, base: Config, labels: list[str], where: str) -> str:
    """A budget as written ("16x8", "unconstrained") -> its label in the base config's eval grid."""
    budget = text
    if budget != "unconstrained":
        try:
            budget = parse_budget(str(budget), base.eval).label
        except ConfigError:
            raise _bad(where, text, "not a THINKxSOLUTION budget or 'unconstrained'") from None
    if budget not in labels:
        raise _bad(where, text, f"not in the base config's eval.budgets {labels}; "
                   "an objective reads the final eval at one of those budgets")
    return budget


def _area(o: ObjectiveSpec, base: Config, where: str) -> tuple[str, StaircaseArea]:
    """A ``hypervolume`` objective: its name and its resolved axis, budgets and reference."""
    grid = {b.label: b for b in eval_budgets(base)}
    labels = list(grid)
    if o.budget is not None:
        raise _bad(f"{where}.budget", o.budget, "a hypervolume objective spans several budgets; list them "
                   "as budgets: [...] (default: all of eval.budgets)")
    tokens = o.tokens or "mean_tokens"
    if tokens not in TOKEN_AXES:
        raise _bad(f"{where}.tokens", o.tokens, f"the token axis must be one of {', '.join(TOKEN_AXES)}")
    if o.budgets is not None and not o.budgets:
        raise _bad(f"{where}.budgets", [], "empty; list eval budgets or leave it out for all of them")
    budgets = [_eval_label(b, base, labels, f"{where}.budgets") for b in (o.budgets or labels)]
    if len(set(budgets)) < len(budgets):
        raise _bad(f"{where}.budgets", o.budgets, "lists a budget twice")
    ref = dict(o.reference or {})
    for k, v in ref.items():
        if k not in ("accuracy", "tokens"):
            raise _bad(f"{where}.reference.{k}", v, "unknown key; the reference takes accuracy and tokens")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _bad(f"{where}.reference.{k}", v, "must be a number")
    limit = max(grid[b].total if tokens == "mean_tokens" else grid[b].thinking for b in budgets)
    acc, tok = float(ref.get("accuracy", 0.0)), float(ref.get("tokens", limit))
    if not (math.isfinite(acc) and 0.0 <= acc < 1.0):
        raise _bad(f"{where}.reference.accuracy", ref["accuracy"], "must be in [0, 1): the worst accuracy that counts")
    if not (math.isfinite(tok) and tok > 0):
        raise _bad(f"{where}.reference.tokens", ref["tokens"], f"must be a number of tokens > 0 (default: {limit}, "
                   "the largest limit of the counted budgets)")
    name = HYPERVOLUME if tokens == "mean_tokens" else f"{HYPERVOLUME}_{tokens}"
    return name, StaircaseArea(tokens, tuple(budgets), acc, tok)


def _objectives(sweep: SweepConfig, base: Config) -> list[Objective]:
    if not sweep.objectives:
        raise _bad("objectives", [], "give at least one objective")
    labels = [b.label for b in eval_budgets(base)]
    out: list[Objective] = []
    for i, o in enumerate(sweep.objectives):
        where, area = f"objectives[{i}]", None
        if o.metric != HYPERVOLUME:
            for key in ("tokens", "budgets", "reference"):
                if getattr(o, key) is not None:
                    raise _bad(f"{where}.{key}", getattr(o, key), f"only a {HYPERVOLUME} objective takes {key}")
        if o.metric in EVAL_METRICS:
            budget = _eval_label(o.budget if o.budget is not None else "unconstrained", base, labels, f"{where}.budget")
            name, natural = f"{o.metric}_{budget}", EVAL_METRICS[o.metric]
        elif o.metric in RUN_METRICS:
            if o.budget is not None:
                raise _bad(f"{where}.budget", o.budget, f"{o.metric} is a per-run metric; it takes no budget")
            budget, name, natural = None, o.metric, RUN_METRICS[o.metric]
        elif o.metric == HYPERVOLUME:
            (name, area), budget, natural = _area(o, base, where), None, "max"
            if o.mode not in (None, "max"):
                raise _bad(f"{where}.mode", o.mode, "a hypervolume is maximized (a larger area: a more elastic model)")
        else:
            raise _bad(f"{where}.metric", o.metric, "unknown objective; use one of "
                       f"{', '.join([*EVAL_METRICS, *RUN_METRICS, HYPERVOLUME])}")
        mode = o.mode or natural
        if mode not in ("max", "min"):
            raise _bad(f"{where}.mode", o.mode, "must be max or min")
        if name in [x.name for x in out]:
            raise _bad(f"{where}", name, "duplicate objective")
        out.append(Objective(name, o.metric, budget, mode, area))
    return out


def _frontier_budget(sweep: SweepConfig, base: Config, objectives: list[Objective]) -> str:
    """The eval budget of the standard plots: the sweep's, else the first eval objective's."""
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
    return fb


# ---------------------------------------------------------------------------------------------
# Loading


def _read_sweep(path: str | os.PathLike, overrides) -> tuple[SweepConfig, list[str]]:
    """The sweep file with its overrides merged; ``base.KEY=value`` overrides returned apart."""
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
        return OmegaConf.to_object(OmegaConf.merge(*layers)), extra_base
    except OmegaConfBaseException as exc:
        raise ConfigError(describe_error(exc)) from None


def _resolve_base_path(base: str, sweep_path: Path) -> Path:
    p = Path(base)
    if p.is_absolute():
        return p
    beside = (sweep_path.parent / p)
    return beside if beside.is_file() else Path.cwd() / p


def _load_base(sweep: SweepConfig, base_path: Path, base_overrides: list[str]) -> Config:
    try:
        base = load_config(base_path, base_overrides)
    except ConfigError as exc:
        raise ConfigError(f"base_config {str(base_path)!r}: {exc}") from None
    if sweep.early_stopping.enabled and not 0 < base.trainer.eval_every < base.trainer.steps:
        raise _bad("early_stopping.enabled", True, "needs intermediate evals: set 0 < trainer.eval_every < "
                   f"trainer.steps (now {base.trainer.eval_every} and {base.trainer.steps}) in the base config "
                   "(or base.trainer.eval_every=N)")
    return base


def _probe_space(sweep: SweepConfig, base_path: Path, base_overrides: list[str], base: Config) -> None:
    """Every extreme of every dimension must give a valid training config (one at a time, then all lows
    and all highs together): a space that can produce an impossible run fails now, not in trial 7."""
    bb = base_budget(base)
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


def _storage(sweep: SweepConfig, out_dir: Path) -> str:
    """The study's database URL (the sweep's, else $OPTUNA_STORAGE, else SQLite beside the outputs), checked."""
    storage = sweep.storage or os.environ.get(STORAGE_ENV) or f"sqlite:///{out_dir / 'sweeps' / 'optuna.db'}"
    storage = sqlite_abs(storage)
    check_storage_url(storage, "storage" if sweep.storage or not os.environ.get(STORAGE_ENV) else STORAGE_ENV)
    return storage


def _tracking_uri(sweep: SweepConfig, base: Config) -> str:
    uri = tracking.resolve_tracking_uri(sweep.tracking_uri or base.tracking.tracking_uri)
    try:
        tracking._probe(uri)
    except tracking.TrackingError as exc:
        raise _bad("tracking_uri", uri, str(exc)) from None
    return uri


def load_sweep(path: str | os.PathLike, overrides: list[str] | tuple[str, ...] = ()) -> SweepPlan:
    """Sweep YAML + overrides -> validated ``SweepPlan``. Starts nothing and writes nothing.

    Overrides: ``key=value`` for sweep keys (``num_trials=4``), ``base.KEY=value`` for the base
    training config (``base.trainer.steps=2``), appended after the sweep file's ``base_overrides``.
    """
    p = Path(path)
    sweep, extra_base = _read_sweep(path, overrides)
    _check_settings(sweep)
    _validate_space(sweep.space)
    _check_grid(sweep)
    base_path = _resolve_base_path(sweep.base_config, p)
    base_overrides = [*sweep.base_overrides, *extra_base]
    base = _load_base(sweep, base_path, base_overrides)
    _probe_space(sweep, base_path, base_overrides, base)
    objectives = _objectives(sweep, base)
    fb = _frontier_budget(sweep, base, objectives)
    out_dir = Path(base.trainer.output_dir).resolve()
    storage = _storage(sweep, out_dir)
    uri = _tracking_uri(sweep, base)
    return SweepPlan(sweep=sweep, sweep_path=str(p.resolve()), base_path=str(base_path.resolve()),
                     base_overrides=base_overrides, base=base, objectives=objectives, storage=storage,
                     tracking_uri=uri, experiment=sweep.experiment or base.tracking.experiment,
                     sweep_dir=str(out_dir / "sweeps" / sweep.study_name), frontier_budget=fb)


def describe_plan(plan: SweepPlan) -> str:
    """A short human summary (``sweep --check``)."""
    lines = [f"study {plan.study_name!r} in {safe_url(plan.storage)}",
             f"base {plan.base_path} + {plan.base_overrides}",
             f"objectives: {', '.join(f'{o.mode} {o.name}' for o in plan.objectives)}",
             *[f"  {o.name}: area under accuracy vs {o.area.tokens} over budgets {list(o.area.budgets)}, "
               f"reference accuracy {o.area.ref_accuracy:g}, tokens {o.area.ref_tokens:g}"
               for o in plan.objectives if o.area],
             f"space: {', '.join(f'{k} ({p.type})' for k, p in sorted(plan.sweep.space.items()))}",
             f"{plan.sweep.num_trials} trials per invocation, {plan.sweep.max_concurrency} at a time; "
             f"MLflow {plan.tracking_uri} experiment {plan.experiment!r}; outputs {plan.sweep_dir}"]
    return "\n".join(lines)
