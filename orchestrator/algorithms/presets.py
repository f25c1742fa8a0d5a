"""The algorithm section of a config and the named presets it starts from.

``algorithm.name`` picks a preset (grpo, dr_grpo, dapo, rloo, reinforce_pp, gspo), which fills every key
left unset (None): advantage estimator, policy loss, loss aggregation, clip range, dynamic sampling and
overlong shaping. An explicit key overrides its preset value, so a sweep can treat the algorithm as
one categorical parameter. ``resolve`` fills and checks; errors are ValueErrors naming the key path
(config.py turns them into ConfigErrors before Ray starts; a Learner built by hand raises them as is).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from .advantages import ADVANTAGES
from .filters import GROUP_FILTERS
from .losses import AGGREGATIONS, KL_ESTIMATORS, POLICY_LOSSES
from .shaping import LENGTH_TERM_ON


@dataclass
class DynamicSamplingConfig:
    """DAPO dynamic sampling: drop groups whose rewards are all equal, generate more prompts to refill."""

    enabled: Optional[bool] = None  # None: the preset's (on for dapo)
    filter: str = "zero_variance"  # which groups to keep (registry: python -m orchestrator algorithms)
    max_tries: int = 4  # generation rounds per step at most, the first included; then pad with dropped groups


@dataclass
class OverlongConfig:
    """DAPO overlong reward shaping: a penalty ramping from 0 to ``penalty`` over the last part of the length limit."""

    buffer_fraction: Optional[float] = None  # share of a sample's length limit the ramp spans; 0: off; None: preset
    penalty: float = 1.0


@dataclass
class AlgorithmConfig:
    """GRPO-family policy-gradient settings (docs/algorithms.md); None means "the preset's value"."""

    name: str = "grpo"  # preset: grpo | dr_grpo | dapo | rloo | reinforce_pp | gspo
    advantage: Optional[str] = None  # registry: python -m orchestrator algorithms
    policy_loss: Optional[str] = None
    loss_agg: Optional[str] = None
    # The constant divisor of seq_mean_token_sum_norm (Dr.GRPO); 0: the longest training response
    # (budget.thinking + 1 + budget.solution), set when the config is loaded.
    norm_length: int = 0
    clip_low: Optional[float] = None
    clip_high: Optional[float] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"  # loss: k2 | k3 (k1 is refused: zero expected gradient); reward: k1 | k2 | k3
    kl_mode: str = "loss"  # loss: kl_coef x KL in the loss | reward: kl_coef x summed KL off the sequence reward
    ppo_epochs: int = 1
    mini_batches: int = 1
    dynamic_sampling: DynamicSamplingConfig = field(default_factory=DynamicSamplingConfig)
    overlong: OverlongConfig = field(default_factory=OverlongConfig)
    # Kimi k1.5's group-relative length reward (shaping.group_length_reward) at this weight; 0: off, < 2.
    length_reward: float = 0.0
    length_reward_on: str = "all"  # all (Kimi's: long wrong answers lose too) | correct (wrong answers get 0)


def _preset(advantage="grpo", policy_loss="ppo_clip", loss_agg="token_mean", clip=(0.2, 0.2),
            dynamic_sampling=False, overlong=0.0) -> dict[str, Any]:
    return {"advantage": advantage, "policy_loss": policy_loss, "loss_agg": loss_agg, "clip_low": clip[0],
            "clip_high": clip[1], "dynamic_sampling": dynamic_sampling, "overlong": overlong}


PRESETS: dict[str, dict[str, Any]] = {
    "grpo": _preset(),
    "dr_grpo": _preset(advantage="dr_grpo", loss_agg="seq_mean_token_sum_norm"),
    "dapo": _preset(clip=(0.2, 0.28), dynamic_sampling=True, overlong=0.2),
    "rloo": _preset(advantage="rloo"),
    "reinforce_pp": _preset(advantage="reinforce_pp"),
    "gspo": _preset(policy_loss="gspo", loss_agg="seq_mean_token_mean", clip=(3e-4, 4e-4)),
}
KL_MODES = ("loss", "reward")
# Why algorithm.kl_estimator=k1 is refused in the loss (kept verbatim: tests and users match it).
K1_AS_LOSS = ("as a loss term k1 has zero expected gradient (E_pi[grad log pi] = 0), so it does not pull the "
              "policy toward the reference; use k2 or k3 (k1 is meaningful only as a reward penalty: "
              "algorithm.kl_mode=reward)")


def _as_config(algorithm) -> AlgorithmConfig:
    if algorithm is None:
        return AlgorithmConfig()
    if isinstance(algorithm, AlgorithmConfig):
        return dataclasses.replace(algorithm, dynamic_sampling=dataclasses.replace(algorithm.dynamic_sampling),
                                   overlong=dataclasses.replace(algorithm.overlong))
    if isinstance(algorithm, dict):
        d = dict(algorithm)
        known = {f.name for f in dataclasses.fields(AlgorithmConfig)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"algorithm.{unknown[0]}: unknown key; keys: {', '.join(sorted(known))}")
        d["dynamic_sampling"] = DynamicSamplingConfig(**(d.get("dynamic_sampling") or {}))
        d["overlong"] = OverlongConfig(**(d.get("overlong") or {}))
        return AlgorithmConfig(**d)
    raise TypeError(f"algorithm: expected an AlgorithmConfig or a dict, got {type(algorithm).__name__}")


def resolve(algorithm=None, *, longest_response: int | None = None) -> AlgorithmConfig:
    """A copy of ``algorithm`` (AlgorithmConfig, dict or None) with the preset's values filled in, checked.

    ``longest_response`` fills ``norm_length`` when it is 0 and the aggregation needs it. Idempotent."""
    a = _as_config(algorithm)
    if a.name not in PRESETS:
        raise ValueError(f"algorithm.name={a.name!r}: unknown preset; presets: {', '.join(PRESETS)}")
    p = PRESETS[a.name]
    for key in ("advantage", "policy_loss", "loss_agg", "clip_low", "clip_high"):
        if getattr(a, key) is None:
            setattr(a, key, p[key])
    if a.dynamic_sampling.enabled is None:
        a.dynamic_sampling.enabled = p["dynamic_sampling"]
    if a.overlong.buffer_fraction is None:
        a.overlong.buffer_fraction = p["overlong"]
    if a.norm_length == 0 and longest_response and AGGREGATIONS.entry(a.loss_agg).meta.get("needs_norm_length"):
        a.norm_length = int(longest_response)
    check(a)
    return a


def check(a: AlgorithmConfig) -> None:
    """Reject unknown names and impossible values of a resolved section; the message names the key."""

    def bad(key: str, value: Any, why: str) -> None:
        raise ValueError(f"algorithm.{key}={value!r}: {why}")

    ADVANTAGES.entry(a.advantage)
    POLICY_LOSSES.entry(a.policy_loss)
    agg = AGGREGATIONS.entry(a.loss_agg)
    kl = KL_ESTIMATORS.entry(a.kl_estimator)
    for key in ("clip_low", "clip_high", "kl_coef"):
        if getattr(a, key) < 0:
            bad(key, getattr(a, key), "must be >= 0")
    if a.kl_mode not in KL_MODES:
        bad("kl_mode", a.kl_mode, f"must be one of {', '.join(KL_MODES)}")
    if a.kl_mode == "loss" and not kl.meta["as_loss"]:
        bad("kl_estimator", a.kl_estimator, K1_AS_LOSS)
    if agg.meta.get("needs_norm_length") and a.norm_length <= 0:
        bad("norm_length", a.norm_length, f"loss_agg={a.loss_agg!r} divides each sequence's token sum by it; "
            "set it > 0 (a loaded config sets it to the longest training response)")
    for key in ("ppo_epochs", "mini_batches"):
        if getattr(a, key) < 1:
            bad(key, getattr(a, key), "must be >= 1")
    GROUP_FILTERS.entry(a.dynamic_sampling.filter)
    if a.dynamic_sampling.max_tries < 1:
        bad("dynamic_sampling.max_tries", a.dynamic_sampling.max_tries, "must be >= 1 (the first generation counts)")
    if not 0 <= a.overlong.buffer_fraction < 1:
        bad("overlong.buffer_fraction", a.overlong.buffer_fraction, "must be in [0, 1) (0: off)")
    if a.overlong.penalty < 0:
        bad("overlong.penalty", a.overlong.penalty, "must be >= 0")
    if not 0 <= a.length_reward < 2:
        bad("length_reward", a.length_reward, "must be in [0, 2) (0: off; at 2 the longest correct answer of a "
            "group scores no more than its shortest wrong one)")
    if a.length_reward_on not in LENGTH_TERM_ON:
        bad("length_reward_on", a.length_reward_on, "must be all or correct")
