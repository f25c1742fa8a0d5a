"""Curricula: the hook through which a workload decides what the policy trains on, step by step.

The controller loop asks the curriculum to ``select`` from each sampled prompt batch (drop rows, add a
hint, set a ``response_prefix``) and tells it the scored records (``observe``). A curriculum keeps its
own per-prompt statistics and saves them with the run's resumable state. ``setup`` may run preview
rollouts through the same rollout workers and reward stage as training (their generated tokens count
toward the run's token totals, so a comparison at equal generated tokens stays fair).

A ``response_prefix`` column (text, may be null) makes the rollout continue from that prefix: its tokens
join the response as injected tokens with loss weight 0, and do not use the thinking budget.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import pyarrow as pa

PREFIX_COLUMN = "response_prefix"


@dataclass
class CurriculumContext:
    # Scored rollout records for ``prompts`` x ``group_size`` samples at the training budget and sampling.
    rollout: Callable[[pa.Table, int], pa.Table]
    train_prompts: pa.Table
    log: Callable[..., None]


class Curriculum(Protocol):
    def setup(self, ctx: CurriculumContext) -> dict[str, float]:
        """Before the first step (not on resume): e.g. preview rollouts. Returns metrics for step 0."""

    def select(self, prompts: pa.Table, step: int) -> pa.Table:
        """The prompts to train on this step: a subset of ``prompts``, possibly with a ``response_prefix``."""

    def observe(self, records: pa.Table, step: int) -> dict[str, float]:
        """Update statistics from the step's scored records; returns ``curriculum/*`` metrics."""

    def state(self) -> dict:
        """JSON-able state, saved with the run's resumable state."""

    def restore(self, state: dict) -> None: ...
