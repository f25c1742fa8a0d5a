"""Rewards for sampled responses: correctness verifiers, format and length shaping, a timeout-safe pool.

reward = (correct_reward if correct else wrong_reward) + format_weight * format_score
         - length_penalty * (thinking_tokens + solution_tokens) / (budget_thinking + budget_solution)
           [on every sample, or with length_penalty_on=correct on correct ones only]

Why ``correct``: priced on every sample, a group that is all wrong (most groups at a tight budget) prefers its
shortest sample, and the policy learns to stop at once (seen: every answer one token long after 400 steps at
length_penalty 0.2, docs/elastic.md). Priced on correct samples only, length is traded only among answers that
earn their reward, and a wrong answer never gains by being short.

A sample whose reward code raises or (in a RewardPool) runs past ``timeout_s`` gets reward 0.0 and
correct False, and is reported in ``error``; the rest of the batch is scored normally.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from orchestrator.rewards import shaping, verifiers  # noqa: F401  (registers the built-ins)
from orchestrator.rewards.pool import RewardPool, evaluate_in_process
from orchestrator.rewards.registry import (
    UnknownRewardError,
    get_format,
    get_verifier,
    list_formats,
    list_verifiers,
    register_format,
    register_verifier,
)
from orchestrator.rewards.shaping import length_fraction

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = [
    "RewardConfig",
    "RewardPool",
    "ScoreItem",
    "ScoreResult",
    "UnknownRewardError",
    "get_format",
    "get_verifier",
    "items_from_table",
    "list_formats",
    "list_verifiers",
    "register_format",
    "register_verifier",
    "score",
]


@dataclass(frozen=True)
class ScoreItem:
    """One sampled response, as the reward code sees it."""

    task: str
    thinking: str
    solution: str
    answer: str
    thinking_tokens: int
    solution_tokens: int
    budget_thinking: int
    budget_solution: int
    thinking_truncated: bool
    # The end-of-thinking marker was injected (budget ran out, or EOS came first); rollout tables
    # without this column fall back to thinking_truncated.
    forced_think_end: bool = False


# What a format function's True and False score (a float it returns is used as given).
FORMAT_OK, FORMAT_BAD = 1.0, -1.0


@dataclass
class RewardConfig:
    """The ``reward`` section of a training config (``config.Config.reward``), taken whole by ``score``."""

    verifier: str = "auto"  # "auto": the task's own verifier; else a registry name or "module:function"
    correct_reward: float = 1.0
    wrong_reward: float = 0.0
    format_weight: float = 0.0
    format_fn: str = "think_format"
    length_penalty: float = 0.0
    length_penalty_on: str = "all"  # all | correct: which samples the length price applies to (module doc)
    timeout_s: float = 5.0
    num_workers: int = 1  # RewardPool processes; 0: score in the driver (no timeouts)

    def for_verifier(self, verifier: str) -> RewardConfig:
        """This section scoring with ``verifier`` (what ``auto`` means for the task at hand)."""
        return dataclasses.replace(self, verifier=verifier)


@dataclass
class ScoreResult:
    reward: np.ndarray  # float32, one per item
    correct: np.ndarray  # bool
    error: list[str | None]  # None, "timeout", or "error: <ExcType>: <msg>"
    num_errors: int
    num_timeouts: int
    format_score: np.ndarray | None = None  # float32; None when format_weight == 0
    length_fraction: np.ndarray | None = None  # float32 tokens / budget, for metrics


def score(items: Sequence[ScoreItem], cfg: RewardConfig, pool: RewardPool | None = None) -> ScoreResult:
    """Score a batch. With ``pool=None`` reward code runs in this process: errors are caught, but a hang
    cannot be interrupted (no timeouts in-process), so training should always pass a RewardPool."""
    if cfg.verifier == "auto":
        raise ValueError("reward.verifier='auto' names no verifier yet: score with "
                         "RewardConfig.for_verifier(the task's verifier)")
    get_verifier(cfg.verifier)  # fail fast, in the caller, on a bad name
    use_format = cfg.format_weight != 0.0
    if use_format:
        get_format(cfg.format_fn)
    format_fn = cfg.format_fn if use_format else None
    if pool is None:
        outcomes = evaluate_in_process(items, cfg.verifier, format_fn)
    else:
        outcomes = pool.evaluate(items, cfg.verifier, format_fn, timeout_s=cfg.timeout_s)

    n = len(items)
    correct = np.zeros(n, dtype=bool)
    fmt = np.zeros(n, dtype=np.float64)
    errors: list[str | None] = [None] * n
    for i, (ok, value, err) in enumerate(outcomes):
        if err is not None:
            errors[i] = err
            continue
        correct[i] = ok
        if use_format:
            fmt[i] = (FORMAT_OK if value else FORMAT_BAD) if isinstance(value, bool) else value
    frac = length_fraction(
        [it.thinking_tokens for it in items],
        [it.solution_tokens for it in items],
        [it.budget_thinking for it in items],
        [it.budget_solution for it in items],
    ).reshape(n)
    reward = np.where(correct, cfg.correct_reward, cfg.wrong_reward)
    priced = correct if cfg.length_penalty_on == "correct" else np.ones(n, dtype=bool)
    reward = reward + cfg.format_weight * fmt - cfg.length_penalty * frac * priced
    failed = np.array([e is not None for e in errors], dtype=bool)
    reward[failed] = 0.0
    num_timeouts = sum(e == "timeout" for e in errors)
    return ScoreResult(
        reward=reward.astype(np.float32),
        correct=correct,
        error=errors,
        num_errors=int(failed.sum()) - num_timeouts,
        num_timeouts=num_timeouts,
        format_score=fmt.astype(np.float32) if use_format else None,
        length_fraction=frac.astype(np.float32),
    )


_ITEM_DEFAULTS = {
    "task": "",
    "thinking": "",
    "solution": "",
    "answer": "",
    "thinking_truncated": False,
    "forced_think_end": False,
}
_OPTIONAL_COLUMNS = ("forced_think_end",)


def items_from_table(table: pa.Table) -> list[ScoreItem]:
    """ScoreItems from a rollout-records table (orchestrator.data.schema.ROLLOUT_SCHEMA columns)."""
    names = [
        f for f in ScoreItem.__dataclass_fields__ if f not in _OPTIONAL_COLUMNS or f in table.column_names
    ]
    missing = [c for c in names if c not in table.column_names]
    if missing:
        raise ValueError(f"rollout table lacks columns needed for scoring: {missing}")
    columns = {c: table.column(c).to_pylist() for c in names}
    items = []
    for i in range(table.num_rows):
        row = {c: columns[c][i] for c in names}
        for c, v in row.items():
            if v is None:
                row[c] = _ITEM_DEFAULTS.get(c, 0)
        items.append(ScoreItem(**row))
    return items
