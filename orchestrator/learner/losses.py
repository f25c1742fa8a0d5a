"""Policy-gradient math for GRPO-style training: advantages, token logprobs, clipped loss, KL.

Pure functions over numpy arrays and torch tensors so they can be tested and reused without a Learner.
Token tensors are ``[batch, tokens]`` with a 0/1 ``mask`` marking the tokens that count.
"""

from __future__ import annotations

import numpy as np
import torch

AGGREGATIONS = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")
KL_ESTIMATORS = ("k1", "k2", "k3")
# Estimators usable as a loss term. k1's expected gradient is zero (E_pi[grad log pi] = 0): it only
# means something as a reward penalty, which the learner does not apply.
KL_LOSS_ESTIMATORS = ("k2", "k3")

# Caps the fp32 copy of the logits that log-softmax needs at once (no-grad passes); ~256 MiB.
_LOGIT_CHUNK_ELEMENTS = 64 * 1024 * 1024


def group_advantages(
    rewards: np.ndarray, group_index: np.ndarray, *, normalize_std: bool = True, eps: float = 1e-6
) -> np.ndarray:
    """GRPO advantages: reward minus its group's mean, over the group's std when ``normalize_std``.

    A group is all samples of one prompt (``group_index`` may be ints or prompt ids). The std is the
    unbiased one (ddof=1), as in the GRPO reference implementations. Groups whose rewards are all equal
    (including groups of one) give exactly 0: they carry no learning signal.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    group_index = np.asarray(group_index)
    if rewards.ndim != 1 or group_index.shape != rewards.shape:
        raise ValueError(
            f"group_index: shape {group_index.shape} must match 1-D rewards shape {rewards.shape}"
        )
    if rewards.size == 0:
        return np.zeros(0, dtype=np.float32)
    if not np.all(np.isfinite(rewards)):
        raise ValueError("rewards: contains NaN or inf")
    _, inv = np.unique(group_index, return_inverse=True)
    inv = inv.reshape(-1)
    n_groups = int(inv.max()) + 1
    counts = np.bincount(inv, minlength=n_groups).astype(np.float64)
    mean = np.bincount(inv, weights=rewards, minlength=n_groups) / counts
    adv = rewards - mean[inv]
    gmax = np.full(n_groups, -np.inf)
    gmin = np.full(n_groups, np.inf)
    np.maximum.at(gmax, inv, rewards)
    np.minimum.at(gmin, inv, rewards)
    constant = (gmax == gmin)[inv]
    if normalize_std:
        sq = np.bincount(inv, weights=adv**2, minlength=n_groups)
        std = np.sqrt(sq / np.maximum(counts - 1.0, 1.0))
        adv = adv / (std[inv] + eps)
    adv[constant] = 0.0
    return adv.astype(np.float32)


def token_logprobs(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    start: int = 0,
    with_entropy: bool = False,
):
    """Logprob of each next token, ``[B, T-1-start]`` in fp32: column j scores ``input_ids[:, start+j+1]``.

    ``start`` skips the positions before it (e.g. the shared part of the prompts) so their logits are
    never computed (``logits_to_keep``). Log-softmax runs in fp32 as ``gather - logsumexp`` in row chunks,
    never materializing more than one fp32 copy of a chunk's logits. With ``with_entropy`` also returns
    the per-token entropy of the predictive distribution (no gradient; a metric).
    """
    seq_len = input_ids.shape[1]
    keep = seq_len - start
    if start > 0:
        logits = model(
            input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep, use_cache=False
        ).logits
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    logits = logits[:, -keep:-1, :]
    targets = input_ids[:, start + 1 :].unsqueeze(-1)
    vocab = logits.shape[-1]
    rows_per_chunk = max(1, _LOGIT_CHUNK_ELEMENTS // max(1, logits.shape[1] * vocab))
    out, ent = [], []
    for lo in range(0, logits.shape[0], rows_per_chunk):
        chunk = logits[lo : lo + rows_per_chunk].float()
        lse = torch.logsumexp(chunk, dim=-1)
        out.append(chunk.gather(-1, targets[lo : lo + rows_per_chunk]).squeeze(-1) - lse)
        if with_entropy:
            with torch.no_grad():
                probs = torch.softmax(chunk.detach(), dim=-1)
                ent.append(lse.detach() - (probs * chunk.detach()).sum(-1))
    logprobs = torch.cat(out, dim=0)
    if with_entropy:
        return logprobs, torch.cat(ent, dim=0)
    return logprobs


def masked_aggregate(
    values: torch.Tensor, mask: torch.Tensor, agg: str = "token_mean", denom: float | None = None
) -> torch.Tensor:
    """Reduce per-token ``values`` to a scalar under ``agg``.

    - token_mean: sum over all masked tokens / number of masked tokens.
    - seq_mean_token_sum: mean over sequences of each sequence's token sum.
    - seq_mean_token_mean: mean over sequences of each sequence's token mean.

    ``denom`` overrides the divisor (masked-token count for token_mean, sequence count otherwise) so that
    summing the results over micro-batches, each given the whole mini-batch's count, equals the loss of
    the whole mini-batch in one piece.
    """
    mask = mask.to(values.dtype)
    if agg == "token_mean":
        total = (values * mask).sum()
        n = mask.sum() if denom is None else denom
    elif agg == "seq_mean_token_sum":
        total = (values * mask).sum()
        n = values.shape[0] if denom is None else denom
    elif agg == "seq_mean_token_mean":
        per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        total = per_seq.sum()
        n = values.shape[0] if denom is None else denom
    else:
        raise ValueError(f"loss_agg: unknown value {agg!r}; expected one of {AGGREGATIONS}")
    if not torch.is_tensor(n):
        n = torch.tensor(float(n), dtype=values.dtype, device=values.device)
    return total / n.clamp(min=1.0)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.2,
    agg: str = "token_mean",
    denom: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO/GRPO clipped surrogate with an asymmetric range ``[1-clip_low, 1+clip_high]`` (DAPO clip-higher).

    ``advantages`` is per sequence ``[B]`` or per token ``[B, T]``. Returns ``(loss, metrics)``; metrics
    are masked token means: ``clip_frac`` (tokens where the clipped branch was taken), ``approx_kl``
    (k3 estimate of KL(old || new)), ``ratio_mean``, plus ``tokens`` (the mask count, for weighting).
    """
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(-1)
    log_ratio = (logprobs - old_logprobs).clamp(-20.0, 20.0)  # exp overflow guard
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    loss = masked_aggregate(per_token, mask, agg, denom)
    with torch.no_grad():
        m = mask.to(logprobs.dtype)
        n = m.sum().clamp(min=1.0)
        metrics = {
            "clip_frac": float(((clipped > unclipped).to(m.dtype) * m).sum() / n),
            "approx_kl": float((((ratio - 1.0) - log_ratio) * m).sum() / n),
            "ratio_mean": float((ratio * m).sum() / n),
            "tokens": float(m.sum()),
        }
    return loss, metrics


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(policy || reference) from samples of the policy (Schulman's k1/k2/k3).

    k3 = exp(ref - logp) - (ref - logp) - 1 is unbiased, non-negative and low-variance ("low_var_kl" in
    GRPO / Elastic Reasoning); its log-ratio is clamped to +-20 and the result to 10 for stability.
    As loss terms, k2's expected gradient is that of KL(policy || ref) and k3's that of KL(ref || policy);
    k1's is zero (``KL_LOSS_ESTIMATORS``), so k1 is only a value (a metric or a reward penalty).
    """
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind == "k2":
        return 0.5 * (logprobs - ref_logprobs) ** 2
    if kind == "k3":
        log_ratio = (ref_logprobs - logprobs).clamp(-20.0, 20.0)
        return (torch.exp(log_ratio) - log_ratio - 1.0).clamp(max=10.0)
    raise ValueError(f"kl_estimator: unknown value {kind!r}; expected one of {KL_ESTIMATORS}")
