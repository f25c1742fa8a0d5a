"""The learner's memory switches change memory, never the update: micro-batches capped by tokens,
activation checkpointing per decoder layer, the policy sharded before it reaches the device, and the KL
reference kept in the compute dtype. Tiny random Qwen2 (``test_learner.model_dir``), Learner in process.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from orchestrator.learner.micro_batches import local_chunks
from orchestrator.learner.worker import Learner, _Totals, sequences_from_table
from test_learner import make_batch, model_dir, random_batch, reference_grads  # noqa: F401  (fixture)


def captured_grads(learner: Learner, batch) -> dict[str, torch.Tensor]:
    """The gradient ``_update`` accumulates over the whole batch as one mini-batch (no optimizer step)."""
    seqs = sequences_from_table(batch)
    learner.optimizer.step = lambda: None
    learner.optimizer.zero_grad = lambda set_to_none=True: None
    learner._update(seqs, np.arange(len(seqs)), None, None, _Totals(), with_entropy=False)
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
            for n, p in learner.model.named_parameters()}


# ---- micro-batches capped by tokens ----------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 3])
def test_token_cap_packs_each_share_under_the_cap(world_size):
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 40, 50)
    lengths[7] = 90  # longer than the cap: a micro-batch of its own
    idx = rng.permutation(50)[:41]
    cap, rows = 100, 6
    per_rank = [local_chunks(lengths, idx, r, world_size, rows, cap) for r in range(world_size)]
    assert len({len(c) for c in per_rank}) == 1  # every rank runs the same number of forwards
    for r, chunks in enumerate(per_rank):
        got = np.concatenate(chunks)
        assert sorted(got.tolist()) == sorted(idx[r::world_size].tolist())  # each row of the share once
        for c in chunks:
            if len(c) > 1:
                assert len(c) <= rows and len(c) * lengths[c].max() <= cap, (c, lengths[c])
        assert sum(len(c) > 0 for c in chunks) > -(-len(idx[r::world_size]) // rows)  # the cap bound, not rows
    assert [7] in [c.tolist() for chunks in per_rank for c in chunks]
    # 0 = rows only: today's split, ceil(largest share / rows) nearly equal chunks
    assert [len(c) for c in local_chunks(lengths, idx, 0, 1, rows, 0)] == [6, 6, 6, 6, 6, 6, 5]


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_token_capped_gradient_equals_one_big_batch(model_dir, agg):  # noqa: F811
    prompts, responses, adv, masks = random_batch(n=9, seed=6)
    batch = make_batch(prompts, responses, adv, masks)
    learner = Learner(model_dir, device="cpu", micro_batch_size=4, micro_batch_tokens=30, loss_agg=agg,
                      grad_clip=None)
    lengths = np.array([len(p) + len(r) for p, r in zip(prompts, responses)])
    chunks = learner._local_chunks(sequences_from_table(batch), np.arange(9))
    sizes = sorted(len(c) for c in chunks)
    assert len(chunks) > 3 and sizes[0] < sizes[-1]  # the cap split unevenly: not the row split
    assert all(len(c) * lengths[c].max() <= 30 for c in chunks if len(c) > 1)
    expected = reference_grads(learner, prompts, responses, adv, masks, agg)
    got = captured_grads(learner, batch)
    for name, g in got.items():
        torch.testing.assert_close(g, expected[name], atol=1e-6, rtol=1e-4, msg=name)


def test_token_capped_steps_match_row_steps_with_kl_and_minibatches(model_dir):  # noqa: F811
    batch = make_batch(*random_batch(n=8, seed=7))
    kw = dict(device="cpu", lr=5e-3, ppo_epochs=2, mini_batches=2, kl_coef=0.1)
    rows, capped = Learner(model_dir, micro_batch_size=64, **kw), Learner(model_dir, micro_batch_size=64,
                                                                          micro_batch_tokens=25, **kw)
    for _ in range(2):
        m_rows, m_cap = rows.step(batch), capped.step(batch)
        for key in ("loss", "kl", "entropy", "grad_norm"):
            assert m_cap[key] == pytest.approx(m_rows[key], rel=1e-4, abs=1e-6), key
    w_rows, w_cap = rows.get_weights(), capped.get_weights()
    for name in w_rows:
        torch.testing.assert_close(w_cap[name], w_rows[name], atol=1e-5, rtol=0, msg=name)


def test_token_cap_refuses_a_negative_value(model_dir):  # noqa: F811
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        Learner(model_dir, device="cpu", micro_batch_tokens=-1)
