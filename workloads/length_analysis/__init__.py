"""Reasoning length vs accuracy ("o3-mini thinks harder, not longer", arXiv 2502.15631) over any rollout table.

Pure functions over a canonical pandas frame (``data.canonical`` maps any table to it):
``stats.accuracy_by_tier`` / ``accuracy_by_bin`` / ``conditional_error`` / ``marginal_gain``,
``regression.token_effect(s)`` / ``compare_token_effects``, ``plots.plot_*``. ``run_analysis(cfg)``
runs them all over configured inputs and logs one MLflow run; ``main`` is the ``budgetrl.workloads``
entry point.
"""

from .config import AnalysisConfig, BinsConfig, ColumnsConfig, InputSpec, TrackingSection, load_config, make_config
from .data import InputError, canonical, read_input
from .job import compute, main, run_analysis, summarize
from .regression import TokenEffect, compare_token_effects, token_effect, token_effects
from .stats import (
    accuracy_by_bin,
    accuracy_by_tier,
    conditional_error,
    marginal_gain,
    proportion_ci,
    select_budget,
    token_edges,
)

__all__ = [
    "AnalysisConfig", "BinsConfig", "ColumnsConfig", "InputError", "InputSpec", "TokenEffect", "TrackingSection",
    "accuracy_by_bin", "accuracy_by_tier", "canonical", "compare_token_effects", "compute", "conditional_error",
    "load_config", "main", "make_config", "marginal_gain", "proportion_ci", "read_input", "run_analysis",
    "select_budget", "summarize", "token_edges", "token_effect", "token_effects",
]
