"""Advantage estimators: a scalar per sample from its sequence reward and its group (one prompt's samples).

Every estimator takes ``(rewards [N], group_index [N])`` (ints or prompt ids) and returns float32 ``[N]``.
All of them subtract a group baseline, so a group whose rewards are all equal (or a group of one)
gets exactly 0: it carries no learning signal.
"""

from __future__ import annotations

import numpy as np

from .registry import Registry

ADVANTAGES = Registry("advantage estimator", "algorithm.advantage")


class _Groups:
    """Group statistics of a reward vector (checked: 1-D, finite, one group id per reward)."""

    def __init__(self, rewards, group_index):
        self.rewards = np.asarray(rewards, dtype=np.float64)
        group_index = np.asarray(group_index)
        if self.rewards.ndim != 1 or group_index.shape != self.rewards.shape:
            raise ValueError(
                f"group_index: shape {group_index.shape} must match 1-D rewards shape {self.rewards.shape}"
            )
        if not np.all(np.isfinite(self.rewards)):
            raise ValueError("rewards: contains NaN or inf")
        if self.rewards.size == 0:
            return
        _, inv = np.unique(group_index, return_inverse=True)
        self.inv = inv.reshape(-1)
        self.n_groups = int(self.inv.max()) + 1
        self.counts = np.bincount(self.inv, minlength=self.n_groups).astype(np.float64)
        self.sums = np.bincount(self.inv, weights=self.rewards, minlength=self.n_groups)
        gmax = np.full(self.n_groups, -np.inf)
        gmin = np.full(self.n_groups, np.inf)
        np.maximum.at(gmax, self.inv, self.rewards)
        np.minimum.at(gmin, self.inv, self.rewards)
        self.constant = (gmax == gmin)[self.inv]  # per sample: its group has one reward value

    def centered(self) -> np.ndarray:
        """Reward minus its group's mean."""
        return self.rewards - (self.sums / self.counts)[self.inv]


def _estimate(rewards, group_index, body) -> np.ndarray:
    g = _Groups(rewards, group_index)
    if g.rewards.size == 0:
        return np.zeros(0, dtype=np.float32)
    adv = body(g)
    adv[g.constant] = 0.0
    return adv.astype(np.float32)


def _group_std_normalized(g: _Groups, eps: float) -> np.ndarray:
    adv = g.centered()
    sq = np.bincount(g.inv, weights=adv**2, minlength=g.n_groups)
    std = np.sqrt(sq / np.maximum(g.counts - 1.0, 1.0))
    return adv / (std[g.inv] + eps)


@ADVANTAGES.register("grpo")
def grpo(rewards, group_index, eps: float = 1e-6) -> np.ndarray:
    """GRPO: (r - group mean) / (group std (ddof=1) + 1e-6)."""
    return _estimate(rewards, group_index, lambda g: _group_std_normalized(g, eps))


@ADVANTAGES.register("dr_grpo")
def dr_grpo(rewards, group_index, eps: float = 1e-6) -> np.ndarray:
    """Dr.GRPO: r - group mean (no std division; pair it with the seq_mean_token_sum_norm aggregation)."""
    return _estimate(rewards, group_index, lambda g: g.centered())


@ADVANTAGES.register("rloo")
def rloo(rewards, group_index, eps: float = 1e-6) -> np.ndarray:
    """RLOO: r_i - mean of the other samples of the group (leave-one-out baseline)."""

    def body(g: _Groups) -> np.ndarray:
        others = np.maximum(g.counts - 1.0, 1.0)[g.inv]
        return g.rewards - (g.sums[g.inv] - g.rewards) / others

    return _estimate(rewards, group_index, body)


@ADVANTAGES.register("reinforce_pp")
def reinforce_pp(rewards, group_index, eps: float = 1e-6) -> np.ndarray:
    """REINFORCE++-baseline: (r - group mean) / (std (ddof=1) of those over the whole batch + 1e-6)."""

    def body(g: _Groups) -> np.ndarray:
        adv = g.centered()
        adv[g.constant] = 0.0
        std = float(np.std(adv, ddof=1)) if adv.size > 1 else 0.0
        return adv / (std + eps)

    return _estimate(rewards, group_index, body)
