"""Policy losses, loss aggregation modes and KL estimators, each a registry.

Token tensors are ``[batch, tokens]`` with a 0/1 ``mask`` marking the tokens that count. The code uses
tensor methods only and never imports torch itself: config validation and ``python -m orchestrator
algorithms`` read these registries before any actor (or torch) starts.
"""

from __future__ import annotations

import numbers

from .registry import Registry

AGGREGATIONS = Registry("loss aggregation", "algorithm.loss_agg")
POLICY_LOSSES = Registry("policy loss", "algorithm.policy_loss", "policy losses")
KL_ESTIMATORS = Registry("KL estimator", "algorithm.kl_estimator")


# ---- aggregation: per-token values -> (sum, default divisor) ------------------------------------------
# ``per_token``: the divisor is a token count (else a sequence count), which is what the learner passes
# as ``denom`` when a mini-batch is split into micro-batches.


@AGGREGATIONS.register("token_mean", per_token=True)
def _token_mean(values, mask, norm_length):
    """sum over all masked tokens / number of masked tokens (DAPO's token-level loss)."""
    return (values * mask).sum(), mask.sum()


@AGGREGATIONS.register("seq_mean_token_sum", per_token=False)
def _seq_mean_token_sum(values, mask, norm_length):
    """mean over sequences of each sequence's token sum."""
    return (values * mask).sum(), values.shape[0]


@AGGREGATIONS.register("seq_mean_token_mean", per_token=False)
def _seq_mean_token_mean(values, mask, norm_length):
    """mean over sequences of each sequence's token mean (GRPO paper, GSPO)."""
    per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return per_seq.sum(), values.shape[0]


@AGGREGATIONS.register("seq_mean_token_sum_norm", per_token=False, needs_norm_length=True)
def _seq_mean_token_sum_norm(values, mask, norm_length):
    """Dr.GRPO: mean over sequences of token sum / a constant (algorithm.norm_length, the generation budget)."""
    if not norm_length or norm_length <= 0:
        raise ValueError(f"algorithm.norm_length={norm_length!r}: seq_mean_token_sum_norm needs a length > 0")
    return (values * mask).sum() / float(norm_length), values.shape[0]


def masked_aggregate(values, mask, agg: str = "token_mean", denom: float | None = None,
                     norm_length: int | None = None):
    """Reduce per-token ``values`` to a scalar under the aggregation ``agg`` (``AGGREGATIONS``).

    ``denom`` overrides the divisor (masked-token count for a per-token mode, sequence count otherwise) so
    that summing the results over micro-batches, each given the whole mini-batch's count, equals the
    loss of the whole mini-batch in one piece.
    """
    mask = mask.to(values.dtype)
    total, n = AGGREGATIONS.get(agg)(values, mask, norm_length)
    if denom is not None:
        n = denom
    if isinstance(n, numbers.Number):
        n = values.new_tensor(float(n))
    return total / n.clamp(min=1.0)


# ---- policy losses: (logprobs, old logprobs, advantages, mask) -> (loss, metrics) ----------------------


def _ratio_metrics(ratio, log_ratio, clipped_taken, mask) -> dict[str, float]:
    """Masked token means of the clip indicator, k3 KL(old || new) and the ratio, plus the token count."""
    m = mask.detach().to(ratio.dtype)
    ratio, log_ratio = ratio.detach(), log_ratio.detach()
    n = m.sum().clamp(min=1.0)
    return {
        "clip_frac": float((clipped_taken.to(m.dtype) * m).sum() / n),
        "approx_kl": float((((ratio - 1.0) - log_ratio) * m).sum() / n),
        "ratio_mean": float((ratio * m).sum() / n),
        "tokens": float(m.sum()),
    }


@POLICY_LOSSES.register("ppo_clip", clip=(0.2, 0.2))
def ppo_clip(logprobs, old_logprobs, advantages, mask, *, clip_low: float = 0.2, clip_high: float = 0.2,
             agg: str = "token_mean", denom: float | None = None, norm_length: int | None = None):
    """PPO clipped surrogate per token, ratio in [1-clip_low, 1+clip_high] (asymmetric: DAPO clip-higher).

    ``advantages`` is per sequence ``[B]`` or per token ``[B, T]``. Returns ``(loss, metrics)``; metrics
    are masked token means: ``clip_frac`` (tokens where the clipped branch was taken), ``approx_kl``
    (k3 estimate of KL(old || new)), ``ratio_mean``, plus ``tokens`` (the mask count, for weighting).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)  # exp overflow guard
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = unclipped.maximum(clipped)
    loss = masked_aggregate(per_token, mask, agg, denom, norm_length)
    return loss, _ratio_metrics(ratio, log_ratio, clipped.detach() > unclipped.detach(), mask)


@POLICY_LOSSES.register("gspo", clip=(3e-4, 4e-4))
def gspo(logprobs, old_logprobs, advantages, mask, *, clip_low: float = 3e-4, clip_high: float = 4e-4,
         agg: str = "seq_mean_token_mean", denom: float | None = None, norm_length: int | None = None):
    """GSPO: sequence ratio exp(mean over the sample's tokens of log-ratio), clipped per sequence.

    The ratio is a length-normalized geometric mean, so its range is small (GSPO's 3e-4 / 4e-4). Each
    sequence's clipped loss is spread over its tokens and aggregated under ``agg`` (seq_mean_token_mean:
    the mean over sequences). Metrics as ``ppo_clip``'s, with the sequence ratio at every token.
    """
    if advantages.dim() != 1:
        raise ValueError(f"advantages: gspo needs one advantage per sequence, got shape {tuple(advantages.shape)}")
    m = mask.to(logprobs.dtype)
    seq_log_ratio = ((logprobs - old_logprobs) * m).sum(-1) / m.sum(-1).clamp(min=1.0)
    seq_log_ratio = seq_log_ratio.clamp(-20.0, 20.0).unsqueeze(-1)
    ratio = seq_log_ratio.exp()
    adv = advantages.unsqueeze(-1)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = unclipped.maximum(clipped).expand_as(logprobs)
    loss = masked_aggregate(per_token, mask, agg, denom, norm_length)
    shape = logprobs.shape
    return loss, _ratio_metrics(ratio.expand(shape), seq_log_ratio.expand(shape),
                                (clipped.detach() > unclipped.detach()).expand(shape), mask)


# ---- KL(policy || reference) per token from samples of the policy (Schulman's k1/k2/k3) ---------------
# ``as_loss``: usable as a loss term. k1's expected gradient is zero (E_pi[grad log pi] = 0), so it only
# means something as a reward penalty (algorithm.kl_mode=reward).


@KL_ESTIMATORS.register("k1", as_loss=False)
def _k1(logprobs, ref_logprobs):
    """logp - ref_logp; unbiased, can be negative; a reward penalty only (zero expected gradient as a loss)."""
    return logprobs - ref_logprobs


@KL_ESTIMATORS.register("k2", as_loss=True)
def _k2(logprobs, ref_logprobs):
    """0.5 (logp - ref_logp)^2; as a loss its expected gradient is that of KL(policy || ref)."""
    return 0.5 * (logprobs - ref_logprobs) ** 2


@KL_ESTIMATORS.register("k3", as_loss=True)
def _k3(logprobs, ref_logprobs):
    """exp(ref - logp) - (ref - logp) - 1, log-ratio clamped to +-20, value to 10 ("low_var_kl")."""
    log_ratio = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
    return (log_ratio.exp() - log_ratio - 1.0).clamp(max=10.0)


def kl_penalty(logprobs, ref_logprobs, kind: str = "k3"):
    """Per-token estimate of KL(policy || reference) under the estimator ``kind`` (``KL_ESTIMATORS``)."""
    return KL_ESTIMATORS.get(kind)(logprobs, ref_logprobs)
