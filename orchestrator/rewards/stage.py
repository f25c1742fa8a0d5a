"""The reward stage over rollout tables: score every record, fill reward/correct/reward_error."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from . import RewardConfig, RewardPool, items_from_table, score


def score_rollouts(records: pa.Table, reward: RewardConfig, pool: RewardPool | None) -> tuple[pa.Table, dict]:
    """Rollout records with rewards filled in, and counts of reward errors and timeouts."""
    result = score(items_from_table(records), reward, pool)
    out = records
    for name, values, typ in (("reward", np.asarray(result.reward, np.float32), pa.float32()),
                              ("correct", np.asarray(result.correct, bool), pa.bool_()),
                              ("reward_error", result.error, pa.string())):
        idx = out.schema.get_field_index(name)
        out = out.set_column(idx, out.schema.field(idx), pa.array(values, typ))
    return out, {"reward_errors": result.num_errors, "reward_timeouts": result.num_timeouts}

