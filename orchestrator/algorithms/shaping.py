"""Reward shaping applied to the sequence reward before advantages: DAPO's overlong penalty, Kimi k1.5's
group-relative length reward and KL as a penalty.

Each returns what is added to each sample's reward (<= 0 for the overlong penalty).
"""

from __future__ import annotations

import numpy as np

from .registry import Registry

SHAPING = Registry("reward shaping", "algorithm.overlong, algorithm.kl_mode=reward", "reward shaping")
# Which answers a length term touches (algorithm.length_reward_on, reward.length_penalty_on): every one, or only
# correct ones.
LENGTH_TERM_ON = ("all", "correct")


@SHAPING.register("overlong")
def overlong_penalty(lengths, limits, buffer_fraction: float, penalty: float = 1.0) -> np.ndarray:
    """DAPO soft overlong punishment: 0 up to limit - buffer, then -penalty x (len - (limit - buffer)) / buffer.

    ``buffer = buffer_fraction x limit`` per sample (limit: its thinking + solution budget); a sample at or
    past its limit gets ``-penalty``. ``buffer_fraction`` 0 turns it off (all zeros).
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    limits = np.asarray(limits, dtype=np.float64)
    if lengths.shape != limits.shape:
        raise ValueError(f"limits: shape {limits.shape} must match lengths shape {lengths.shape}")
    if buffer_fraction <= 0:
        return np.zeros_like(lengths)
    buffer = buffer_fraction * limits
    over = np.clip((lengths - (limits - buffer)) / np.maximum(buffer, 1e-9), 0.0, 1.0)
    return -penalty * over


@SHAPING.register("group_length")
def group_length_reward(lengths, correct, groups, weight: float, on: str = "all") -> np.ndarray:
    """Kimi k1.5 length reward, relative within each group: weight x lam on correct samples, weight x min(0, lam)
    on wrong ones (``on="all"``, Kimi's) or 0 on wrong ones (``on="correct"``), lam = 0.5 - (len - min) /
    (max - min) over the group (0 where all are as long).

    Why relative: the shorter of two correct answers always gains by the same margin, whatever the budget, and a
    group whose samples all ran to the budget gets nothing; a correct answer keeps more than any wrong one while
    weight < 2. Why ``correct``: with Kimi's min(0, lam) a group that is all wrong (common at a tight budget)
    still prefers its shortest sample, and a small model learns to stop thinking at once (docs/elastic.md)."""
    if on not in LENGTH_TERM_ON:
        raise ValueError(f"on={on!r}: must be all or correct")
    lengths = np.asarray(lengths, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    groups = np.asarray(groups)
    if not (lengths.shape == correct.shape == groups.shape):
        raise ValueError(f"lengths {lengths.shape}, correct {correct.shape} and groups {groups.shape} must match")
    lam = np.zeros_like(lengths)
    for g in np.unique(groups):
        idx = groups == g
        lo, hi = lengths[idx].min(), lengths[idx].max()
        if hi > lo:
            lam[idx] = 0.5 - (lengths[idx] - lo) / (hi - lo)
    return float(weight) * np.where(correct, lam, np.minimum(lam, 0.0) if on == "all" else 0.0)


@SHAPING.register("kl_reward")
def kl_reward_penalty(sequence_kl, kl_coef: float) -> np.ndarray:
    """KL as a reward penalty: -kl_coef x (the sample's summed per-token KL estimate, e.g. k1 = logp - ref)."""
    return -float(kl_coef) * np.asarray(sequence_kl, dtype=np.float64)
