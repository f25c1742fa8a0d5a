"""The length-analysis job's config: which tables to read, which columns mean what, bins, thresholds.

One YAML file plus dotted ``key=value`` overrides, like every other command. Unknown keys, wrong types
and impossible values raise ``ConfigError`` naming the key path and the value.

Column roles (``columns.*``): ``correct`` and ``tokens`` are required. ``difficulty``, ``domain``,
``budget``, ``budget_solution``, ``prompt_id`` and ``sample_index`` take a column name (required to be
present), ``"auto"`` (the rollout-schema name if the table has it, else unused) or null (unused).
``tokens`` may sum columns: ``"thinking_tokens+solution_tokens"``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from orchestrator.config import ConfigError, durable_output, merge_structured

AUTO = "auto"

# Rollout-schema name each "auto" role resolves to (orchestrator/data/schema.py ROLLOUT_SCHEMA).
ROLLOUT_NAMES = {
    "difficulty": "difficulty",
    "domain": "domain",
    "budget": "budget_thinking",
    "budget_solution": "budget_solution",
    "prompt_id": "prompt_id",
    "sample_index": "sample_index",
}

BIN_METHODS = ("quantile", "fixed", "edges")
CI_METHODS = ("wilson", "jeffreys")


@dataclass
class InputSpec:
    """One table to analyze: a Parquet/CSV/JSONL file, a directory of Parquet files, or a glob."""

    path: str = ""
    label: Optional[str] = None  # default: the file name without extension
    # Keep only rows whose column equals the value (or is in the list), e.g. {step: 200}.
    where: dict[str, Any] = field(default_factory=dict)


@dataclass
class ColumnsConfig:
    correct: str = "correct"  # bool or 0/1 (also "true"/"false")
    tokens: str = "thinking_tokens"  # reasoning tokens per row; "a+b" sums columns
    difficulty: Optional[str] = AUTO
    domain: Optional[str] = AUTO
    budget: Optional[str] = AUTO  # thinking budget of the row (budget-grid evals)
    budget_solution: Optional[str] = AUTO
    prompt_id: Optional[str] = AUTO  # clusters for robust standard errors; pairs rows across budgets
    sample_index: Optional[str] = AUTO


@dataclass
class BinsConfig:
    method: str = "quantile"  # quantile (per difficulty x domain) | fixed (width) | edges (list)
    n: int = 5  # quantile bins
    width: Optional[float] = None  # fixed bins: [k*width, (k+1)*width)
    edges: Optional[list[float]] = None  # explicit edges, ascending


@dataclass
class TrackingSection:
    enabled: bool = True
    tracking_uri: Optional[str] = None  # None: MLFLOW_TRACKING_URI, else ./mlflow.db
    experiment: str = "budgetrl"
    run_name: Optional[str] = None  # default: "length-analysis"
    parent_run_id: Optional[str] = None
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class AnalysisConfig:
    inputs: list[InputSpec] = field(default_factory=list)
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)
    # Rows the length analyses (bins, P(wrong | T > B), regression) use when a budget column exists:
    # "max" = each input's largest (least binding) budget, "all" = every row, or a budget value ("64").
    # Pooling budgets mixes "thought longer" with "was cut off later"; marginal gain always uses all.
    budget_filter: str = "max"
    bins: BinsConfig = field(default_factory=BinsConfig)
    thresholds: Optional[list[float]] = None  # B grid; None: pooled token quantiles 0, 1/n, ..., (n-1)/n
    n_thresholds: int = 10
    per_tokens: float = 1000.0  # unit of the token effect: "accuracy change per <per_tokens> tokens"
    per_tier_effects: bool = True  # also fit the token effect within each difficulty tier
    ci: str = "wilson"  # proportion CIs: wilson | jeffreys
    confidence: float = 0.95
    output_dir: str = "outputs/length_analysis"  # a run_name subdirectory is made; never overwritten
    tracking: TrackingSection = field(default_factory=TrackingSection)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> AnalysisConfig:
    """YAML file + ``key=value`` overrides -> validated ``AnalysisConfig``.

    Input paths that are relative resolve against the current directory (where the command runs).
    """
    cfg = merge_structured(AnalysisConfig, path, overrides)
    cfg.output_dir = durable_output(cfg.output_dir, "output_dir")
    validate(cfg)
    return cfg


def make_config(**kwargs: Any) -> AnalysisConfig:
    """Build and validate a config from Python values (nested dicts allowed), e.g. in a notebook."""
    cfg = merge_structured(AnalysisConfig, extra=kwargs)
    validate(cfg)
    return cfg


def validate(cfg: AnalysisConfig) -> None:
    def bad(key: str, value: Any, why: str) -> None:
        raise ConfigError(f"{key}={value!r}: {why}")

    if not cfg.inputs:
        bad("inputs", cfg.inputs, "give at least one input: [{path: ..., label: ...}]")
    labels = []
    for i, spec in enumerate(cfg.inputs):
        if not spec.path:
            bad(f"inputs[{i}].path", spec.path, "missing: a Parquet/CSV/JSONL file, a directory or a glob")
        labels.append(spec.label or Path(spec.path).stem)
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    if dupes:
        bad("inputs[].label", dupes[0], "labels must be unique (set label: for each input)")
    c = cfg.columns
    if not c.correct:
        bad("columns.correct", c.correct, "name the correctness column")
    if not c.tokens or not all(part.strip() for part in c.tokens.split("+")):
        bad("columns.tokens", c.tokens, "name the token-count column (or 'a+b' to sum columns)")
    if cfg.budget_filter not in ("max", "all"):
        try:
            float(cfg.budget_filter)
        except ValueError:
            bad("budget_filter", cfg.budget_filter, "must be 'max', 'all' or a budget value such as '64'")
    b = cfg.bins
    if b.method not in BIN_METHODS:
        bad("bins.method", b.method, f"must be one of {', '.join(BIN_METHODS)}")
    if b.method == "quantile" and b.n < 1:
        bad("bins.n", b.n, "must be >= 1")
    if b.method == "fixed" and (b.width is None or not b.width > 0):
        bad("bins.width", b.width, "fixed bins need a width > 0")
    if b.method == "edges":
        edges = b.edges or []
        if len(edges) < 2 or any(not math.isfinite(e) for e in edges) or any(
            e2 <= e1 for e1, e2 in zip(edges, edges[1:])
        ):
            bad("bins.edges", edges, "need at least two finite, strictly increasing edges")
    if cfg.thresholds is not None and (
        not cfg.thresholds or any(not math.isfinite(t) for t in cfg.thresholds)
    ):
        bad("thresholds", cfg.thresholds, "a non-empty list of finite token counts, or null for auto")
    if cfg.n_thresholds < 1:
        bad("n_thresholds", cfg.n_thresholds, "must be >= 1")
    if not (cfg.per_tokens > 0 and math.isfinite(cfg.per_tokens)):
        bad("per_tokens", cfg.per_tokens, "must be a positive number of tokens (e.g. 1000, or 10 for tiny models)")
    if cfg.ci not in CI_METHODS:
        bad("ci", cfg.ci, f"must be one of {', '.join(CI_METHODS)}")
    if not 0.5 <= cfg.confidence < 1:
        bad("confidence", cfg.confidence, "must be in [0.5, 1)")
    if not cfg.output_dir:
        bad("output_dir", cfg.output_dir, "must be a directory path")


def label_of(spec: InputSpec) -> str:
    return spec.label or Path(spec.path).stem


def to_dict(cfg: AnalysisConfig) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: AnalysisConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
