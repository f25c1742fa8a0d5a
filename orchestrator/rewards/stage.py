"""The reward stage over rollout tables: score every record, fill reward/correct/reward_error."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from . import RewardPool, RewardSpec, items_from_table, score


def score_rollouts(records: pa.Table, spec: RewardSpec, pool: RewardPool | None) -> tuple[pa.Table, dict]:
    """Rollout records with rewards filled in, and counts of reward errors and timeouts."""
    result = score(items_from_table(records), spec, pool)
    out = records
    for name, values, typ in (("reward", np.asarray(result.reward, np.float32), pa.float32()),
                              ("correct", np.asarray(result.correct, bool), pa.bool_()),
                              ("reward_error", result.error, pa.string())):
        idx = out.schema.get_field_index(name)
        out = out.set_column(idx, out.schema.field(idx), pa.array(values, typ))
    return out, {"reward_errors": result.num_errors, "reward_timeouts": result.num_timeouts}


def reward_spec(cfg, verifier: str) -> RewardSpec:
    """The reward of a run's ``reward`` config section with ``verifier`` (the task's or the user's)."""
    r = cfg.reward
    return RewardSpec(verifier=verifier, correct_reward=r.correct_reward, wrong_reward=r.wrong_reward,
                      format_weight=r.format_weight, format_fn=r.format_fn, length_penalty=r.length_penalty,
                      timeout_s=r.timeout_s)
