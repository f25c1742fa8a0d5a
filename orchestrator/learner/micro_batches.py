"""Micro-batches of a learner mini-batch: which rows go together, and their padded tensors.

A mini-batch's gradient is accumulated over micro-batches, so how rows are grouped changes memory
and speed, never the gradient: loss denominators are the whole mini-batch's counts (``losses.py``).
Rows are grouped by length (similar lengths pad little). ``micro_batch_size`` caps the rows of a
micro-batch; ``micro_batch_tokens`` (when > 0) also caps rows x padded length, which is what the
activations and logits of a forward pass grow with.

Every rank of a data-parallel group gets the same number of micro-batches (FSDP runs collectives
inside each forward); a rank may get empty ones. Every rank sees the whole batch, so each one can
work out every rank's count without a collective.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Packed:
    """A micro-batch: left-aligned, right-padded ids; token tensors cover shifted columns from ``start``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    start: int
    resp_col: np.ndarray  # column of each sequence's first response token in the [B, W] token tensors
    resp_len: np.ndarray
    width: int


def split_by_tokens(order: np.ndarray, lengths: np.ndarray, micro_batch_size: int,
                    micro_batch_tokens: int) -> list[np.ndarray]:
    """``order`` (rows sorted by ascending length; ``lengths`` theirs, in that order) as consecutive
    micro-batches, greedily: a row joins the current one while it keeps <= ``micro_batch_size`` rows and
    rows x longest row <= ``micro_batch_tokens``. A row longer than the cap is a micro-batch of its own
    (a row cannot be split)."""
    chunks: list[np.ndarray] = []
    begin = 0
    for end in range(1, len(order) + 1):
        rows = end - begin
        if rows > 1 and (rows > micro_batch_size or rows * int(lengths[end - 1]) > micro_batch_tokens):
            chunks.append(order[begin : end - 1])
            begin = end - 1
    chunks.append(order[begin:])
    return chunks


def local_chunks(lengths: np.ndarray, idx: np.ndarray, rank: int, world_size: int, micro_batch_size: int,
                 micro_batch_tokens: int = 0) -> list[np.ndarray]:
    """This rank's rows of ``idx`` (every world_size-th) as micro-batches of similar length, as many
    as the rank with the most (empty ones where a rank has fewer); ``lengths`` is indexed by row."""

    def sorted_share(r: int) -> np.ndarray:
        local = idx[r::world_size]
        return local[np.argsort(lengths[local], kind="stable")]

    if micro_batch_tokens <= 0:  # rows only: ceil(largest share / micro_batch_size) nearly equal chunks
        per_rank = -(-len(idx) // world_size)
        k = max(1, -(-per_rank // micro_batch_size))
        return np.array_split(sorted_share(rank), k)
    shares = [sorted_share(r) for r in range(world_size)]
    split = [split_by_tokens(s, lengths[s], micro_batch_size, micro_batch_tokens) for s in shares]
    most = max(len(c) for c in split)
    return split[rank] + [idx[:0]] * (most - len(split[rank]))


def pack(seqs, idx: np.ndarray, device: torch.device) -> Packed:
    """Rows ``idx`` of ``seqs`` (a ``worker.Sequences``) as one right-padded micro-batch on ``device``."""
    prompt_len, resp_len = seqs.prompt_len[idx], seqs.resp_len[idx]
    lengths = prompt_len + resp_len
    seq_len = int(lengths.max())
    start = int(prompt_len.min()) - 1  # logits before the first prompt's last token are never needed
    ids = np.zeros((len(idx), seq_len), dtype=np.int64)  # pad id is irrelevant: masked everywhere
    attn = np.zeros((len(idx), seq_len), dtype=np.int64)
    for row, i in enumerate(idx):
        ids[row, : lengths[row]] = seqs.tokens[i]
        attn[row, : lengths[row]] = 1
    return Packed(
        input_ids=torch.from_numpy(ids).to(device),
        attention_mask=torch.from_numpy(attn).to(device),
        start=start,
        resp_col=prompt_len - 1 - start,
        resp_len=resp_len,
        width=seq_len - 1 - start,
    )


def place(per_seq: list[np.ndarray], idx: np.ndarray, packed: Packed, device: torch.device) -> torch.Tensor:
    """Scatter per-response-token arrays into the micro-batch's ``[B, W]`` token layout."""
    out = np.zeros((len(idx), packed.width), dtype=np.float32)
    for row, i in enumerate(idx):
        col = packed.resp_col[row]
        out[row, col : col + packed.resp_len[row]] = per_seq[i]
    return torch.from_numpy(out).to(device)
