"""The reward stage over rollout tables: score every record, fill reward/correct/reward_error."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from . import RewardPool, RewardSpec, ScoreItem, score

_ITEM_COLUMNS = (
    "task",
    "thinking",
    "solution",
    "answer",
    "thinking_tokens",
    "solution_tokens",
    "budget_thinking",
    "budget_solution",
    "thinking_truncated",
)


def score_rollouts(records: pa.Table, spec: RewardSpec, pool: RewardPool | None) -> tuple[pa.Table, dict]:
    """Rollout records with rewards filled in, and counts of reward errors and timeouts."""
    cols = {c: records.column(c).to_pylist() for c in _ITEM_COLUMNS}
    items = [
        ScoreItem(
            task=t or "",
            thinking=th or "",
            solution=so or "",
            answer=a or "",
            thinking_tokens=int(tt),
            solution_tokens=int(st),
            budget_thinking=int(bt),
            budget_solution=int(bs),
            thinking_truncated=bool(tr),
        )
        for t, th, so, a, tt, st, bt, bs, tr in zip(*(cols[c] for c in _ITEM_COLUMNS))
    ]
    result = score(items, spec, pool)
    out = records
    for name, values, typ in (
        ("reward", np.asarray(result.reward, np.float32), pa.float32()),
        ("correct", np.asarray(result.correct, bool), pa.bool_()),
        ("reward_error", result.error, pa.string()),
    ):
        idx = out.schema.get_field_index(name)
        out = out.set_column(idx, out.schema.field(idx), pa.array(values, typ))
    return out, {"reward_errors": result.num_errors, "reward_timeouts": result.num_timeouts}
