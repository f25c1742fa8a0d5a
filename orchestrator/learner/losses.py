"""Token logprobs of a causal LM, computed in memory-bounded chunks (the learner's forward pass).

The losses built on them (advantages, policy losses, aggregation, KL) are registries in
orchestrator/algorithms/.
"""

from __future__ import annotations

import torch

# Caps the fp32 copy of the logits that log-softmax needs at once (no-grad passes); ~256 MiB.
_LOGIT_CHUNK_ELEMENTS = 64 * 1024 * 1024


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
