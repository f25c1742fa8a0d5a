"""The GRPO family as registries: advantage estimators, policy losses, loss aggregation, KL estimators,
dynamic-sampling filters and reward shaping, each name registered by a decorator with a one-line doc
(``python -m orchestrator algorithms`` lists them), plus the presets ``algorithm.name`` picks.

Importing this package fills every registry; nothing here imports torch at import time.
"""

from __future__ import annotations

from .advantages import ADVANTAGES
from .batch import learner_batch
from .filters import GROUP_FILTERS
from .losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES, kl_penalty, masked_aggregate
from .presets import PRESETS, AlgorithmConfig, DynamicSamplingConfig, OverlongConfig, resolve
from .sampling import fill_batch
from .shaping import LENGTH_TERM_ON, SHAPING

REGISTRIES = (ADVANTAGES, POLICY_LOSSES, AGGREGATIONS, KL_ESTIMATORS, GROUP_FILTERS, SHAPING)

__all__ = ["ADVANTAGES", "AGGREGATIONS", "GROUP_FILTERS", "KL_ESTIMATORS", "LENGTH_TERM_ON", "POLICY_LOSSES",
           "PRESETS", "REGISTRIES", "SHAPING", "AlgorithmConfig", "DynamicSamplingConfig", "OverlongConfig",
           "fill_batch", "kl_penalty", "learner_batch", "masked_aggregate", "resolve", "listing"]


def listing() -> str:
    """Every registered name per registry with its one-line doc, then the presets (the CLI prints it)."""
    lines = []
    for reg in REGISTRIES:
        lines.append(f"{reg.title} ({reg.key}):")
        width = max(len(n) for n in reg.names())
        lines += [f"  {name:<{width}}  {doc}" for name, doc in reg.docs()]
    lines.append("presets (algorithm.name; explicit keys override):")
    width = max(len(n) for n in PRESETS)
    for name, p in PRESETS.items():
        lines.append(f"  {name:<{width}}  advantage={p['advantage']} policy_loss={p['policy_loss']} "
                     f"loss_agg={p['loss_agg']} clip=({p['clip_low']:g}, {p['clip_high']:g}) "
                     f"dynamic_sampling={str(p['dynamic_sampling']).lower()} "
                     f"overlong.buffer_fraction={p['overlong']:g}")
    return "\n".join(lines)
