"""The advantage step: scored rollout records -> the learner's batch (tokens, loss mask, advantage).

The sequence reward is shaped first (overlong penalty, group-relative length reward, KL penalty when
``algorithm.kl_mode=reward``),
then the advantage estimator turns it into one advantage per sample.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .advantages import ADVANTAGES
from .presets import resolve
from .shaping import group_length_reward, kl_reward_penalty, overlong_penalty

LEARNER_COLUMNS = ("prompt_token_ids", "response_token_ids", "loss_mask")


def _column(records: pa.Table, name: str) -> np.ndarray:
    return np.asarray(records[name].to_numpy(zero_copy_only=False))


def learner_batch(records: pa.Table, algorithm, sequence_kl: Callable[[pa.Table], np.ndarray] | None = None
                  ) -> tuple[pa.Table, dict[str, float]]:
    """(learner batch with an ``advantage`` column, metrics) from scored records.

    ``sequence_kl(batch)`` returns each sample's summed per-token KL to the reference (the learner holds
    the reference: ``Learner.sequence_kl``); it is called only when ``algorithm.kl_mode=reward`` and
    ``kl_coef > 0``. A group is all samples of one prompt (``prompt_id``)."""
    a = resolve(algorithm)
    rewards = _column(records, "reward").astype(np.float32)
    groups = pc.dictionary_encode(records["prompt_id"]).combine_chunks().indices.to_numpy()
    batch = records.select(list(LEARNER_COLUMNS))
    shaped, metrics = rewards, {}
    if a.overlong.buffer_fraction > 0 or a.length_reward > 0:
        lengths = _column(records, "thinking_tokens") + _column(records, "solution_tokens")
    if a.overlong.buffer_fraction > 0:
        limits = _column(records, "budget_thinking") + _column(records, "budget_solution")
        pen = overlong_penalty(lengths, limits, a.overlong.buffer_fraction, a.overlong.penalty)
        shaped = shaped + pen
        metrics["overlong_penalty_mean"] = float(pen.mean())
        metrics["overlong_fraction"] = float(np.mean(pen < 0))
    if a.length_reward > 0:
        bonus = group_length_reward(lengths, _column(records, "correct").astype(bool), groups, a.length_reward,
                                    a.length_reward_on)
        shaped = shaped + bonus
        metrics["length_reward_mean"] = float(bonus.mean())
    if a.kl_mode == "reward" and a.kl_coef > 0:
        if sequence_kl is None:
            raise ValueError("algorithm.kl_mode='reward': the advantage step needs the learner's sequence_kl")
        kl = np.asarray(sequence_kl(batch), dtype=np.float64)
        shaped = shaped + kl_reward_penalty(kl, a.kl_coef)
        metrics["kl_reward_mean"] = float(kl.mean())
    adv = ADVANTAGES.get(a.advantage)(shaped, groups).astype(np.float32)
    batch = batch.append_column("advantage", pa.array(adv, pa.float32()))
    # Share of groups whose rewards differ: only those carry a learning signal.
    uniq: dict[int, set] = {}
    for g, r in zip(groups, rewards):
        uniq.setdefault(int(g), set()).add(float(r))
    mixed = float(np.mean([len(v) > 1 for v in uniq.values()])) if uniq else 0.0
    return batch, {"mixed_group_fraction": mixed, "advantage_abs_mean": float(np.abs(adv).mean()), **metrics}
