"""Reward shaping applied to the sequence reward before advantages: DAPO's overlong penalty and KL as a penalty.

Both return what is added to each sample's reward (<= 0 for the overlong penalty).
"""

from __future__ import annotations

import numpy as np

from .registry import Registry

SHAPING = Registry("reward shaping", "algorithm.overlong, algorithm.kl_mode=reward", "reward shaping")


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


@SHAPING.register("kl_reward")
def kl_reward_penalty(sequence_kl, kl_coef: float) -> np.ndarray:
    """KL as a reward penalty: -kl_coef x (the sample's summed per-token KL estimate, e.g. k1 = logp - ref)."""
    return -float(kl_coef) * np.asarray(sequence_kl, dtype=np.float64)
