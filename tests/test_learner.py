"""GRPO learner: loss math, gradient accumulation, loss masks, weight export and checkpoints.

Runs on a tiny random tied-embedding Qwen2 built here (no downloads), Learner used directly (no Ray).
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest
import torch

from orchestrator.algorithms import kl_penalty, masked_aggregate
from orchestrator.algorithms.advantages import dr_grpo, grpo as group_advantages
from orchestrator.algorithms.losses import ppo_clip as policy_loss
from orchestrator.learner.losses import token_logprobs
from orchestrator.learner.worker import Learner

VOCAB = 64


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    specials = ["<pad>", "<unk>", "<eos>"]
    chars = [chr(c) for c in range(32, 32 + VOCAB - len(specials))]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>"
    )
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=2,
    )
    model = Qwen2ForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_qwen2")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def make_batch(prompts, responses, advantages, masks=None) -> pa.Table:
    masks = masks if masks is not None else [[1] * len(r) for r in responses]
    return pa.table(
        {
            "prompt_token_ids": pa.array(prompts, pa.list_(pa.int32())),
            "response_token_ids": pa.array(responses, pa.list_(pa.int32())),
            "loss_mask": pa.array(masks, pa.list_(pa.int8())),
            "advantage": pa.array(advantages, pa.float32()),
        }
    )


def random_batch(n=8, seed=0, agg_lengths=(2, 9), resp_lengths=(1, 12)):
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(3, VOCAB, rng.integers(*agg_lengths)).tolist() for _ in range(n)]
    responses = [rng.integers(3, VOCAB, rng.integers(*resp_lengths)).tolist() for _ in range(n)]
    masks = [(rng.random(len(r)) < 0.8).astype(int).tolist() for r in responses]
    adv = rng.normal(size=n).astype(np.float32).tolist()
    return prompts, responses, adv, masks


ALGORITHM_KEYS = ("clip_low", "clip_high", "kl_coef", "kl_estimator", "kl_mode", "loss_agg", "ppo_epochs",
                  "mini_batches", "name", "advantage", "policy_loss", "norm_length")


def make_learner(model_dir, **kw):
    """A Learner on the CPU; algorithm keys (clip_low, kl_coef, ...) go into its ``algorithm`` section."""
    kw.setdefault("device", "cpu")
    algorithm = {k: kw.pop(k) for k in ALGORITHM_KEYS if k in kw}
    return Learner(model_dir, algorithm=algorithm, **kw)


# ---- losses ---------------------------------------------------------------------------------------


def test_group_advantages_known_values_and_constant_groups():
    rewards = np.array([1.0, 0.0, 1.0, 0.0, 0.5, 0.5, 0.5, 2.0])
    groups = np.array(["a", "a", "a", "a", "b", "b", "b", "c"])
    adv = group_advantages(rewards, groups)
    std = np.std([1, 0, 1, 0], ddof=1)
    np.testing.assert_allclose(adv[:4], np.array([0.5, -0.5, 0.5, -0.5]) / (std + 1e-6), rtol=1e-6)
    assert np.all(adv[4:] == 0.0)  # constant group and singleton group carry no signal
    np.testing.assert_allclose(
        dr_grpo(rewards, groups)[:4], [0.5, -0.5, 0.5, -0.5]
    )
    assert np.all(group_advantages(np.full(3, 0.1), np.zeros(3)) == 0.0)
    with pytest.raises(ValueError, match="group_index"):
        group_advantages(rewards, groups[:3])


def test_policy_loss_ratio_one_and_clipping():
    torch.manual_seed(0)
    lp = torch.randn(3, 5)
    adv = torch.tensor([1.0, -2.0, 0.5])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    loss, m = policy_loss(lp, lp, adv, mask)
    expected = -(adv[:, None] * mask).sum() / mask.sum()
    assert torch.allclose(loss, expected) and m["clip_frac"] == 0.0 and abs(m["ratio_mean"] - 1) < 1e-6
    loss_seq, _ = policy_loss(lp, lp, adv, mask, agg="seq_mean_token_mean")
    assert torch.allclose(loss_seq, -adv.mean())
    loss_sum, _ = policy_loss(lp, lp, adv, mask, agg="seq_mean_token_sum")
    assert torch.allclose(loss_sum, -(adv * mask.sum(-1)).mean())

    # One token, ratio e^0.5 ~ 1.65: positive advantage clips at 1 + clip_high, negative does not.
    new, old, one = torch.tensor([[0.5]]), torch.tensor([[0.0]]), torch.ones(1, 1)
    loss_pos, m_pos = policy_loss(new, old, torch.tensor([1.0]), one, clip_low=0.2, clip_high=0.28)
    assert torch.allclose(loss_pos, torch.tensor(-1.28)) and m_pos["clip_frac"] == 1.0
    loss_neg, m_neg = policy_loss(new, old, torch.tensor([-1.0]), one)
    assert torch.allclose(loss_neg, torch.exp(torch.tensor(0.5))) and m_neg["clip_frac"] == 0.0
    # Ratio e^-0.5 ~ 0.61 with negative advantage clips at 1 - clip_low; the clipped branch has no gradient.
    new = torch.tensor([[-0.5]], requires_grad=True)
    loss_low, m_low = policy_loss(new, old, torch.tensor([-1.0]), one, clip_low=0.2)
    assert torch.allclose(loss_low, torch.tensor(0.8)) and m_low["clip_frac"] == 1.0
    loss_low.backward()
    assert new.grad.abs().item() == 0.0
    assert m_low["approx_kl"] > 0


def test_clip_frac_counts_the_masked_tokens_that_took_the_clipped_branch():
    """Half the counted tokens clip (3 of 6); the two masked tokens would clip too and must not count."""
    log_ratio = torch.tensor([[0.5, 0.1, -0.5, 0.3], [-0.5, 0.5, -1.0, -0.7]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.float32)
    old = torch.full_like(log_ratio, -2.0)
    loss, m = policy_loss(old + log_ratio, old, adv, mask, clip_low=0.2, clip_high=0.2)
    # A > 0 clips where the ratio > 1.2 (e^0.5, e^0.3); A < 0 where it is < 0.8 (e^-0.5, and the masked e^-1, e^-0.7).
    assert m["clip_frac"] == pytest.approx(3 / 6) and m["tokens"] == 6.0
    r = np.exp([0.5, 0.1, -0.5, 0.3, -0.5, 0.5])
    per_token = [-1.2, -r[1], -r[2], -1.2, 0.8, r[5]]  # max(-A r, -A clip(r)) per counted token
    assert loss.item() == pytest.approx(sum(per_token) / 6, rel=1e-6)


def test_learner_clip_frac_over_two_epochs(model_dir):
    """Epoch 1 runs at ratio 1 (nothing clips); a large step raises the one positive-advantage token past
    1 + clip_high, so epoch 2 clips it and only it (zero-advantage tokens never clip): 1 of 4 x 2 updates."""
    learner = make_learner(model_dir, lr=5e-2, ppo_epochs=2, micro_batch_size=8)
    m = learner.step(make_batch([[5, 6, 7], [8, 9]], [[10], [20, 21, 22]], [1.0, 0.0]))
    assert m["updates"] == 2 and m["clip_frac"] == pytest.approx(1 / 8)


def test_kl_penalty_values_and_gradients_by_hand():
    """lp - ref = (1, -1, 0): each estimator's value and d/d(lp), worked out on paper."""
    e = float(np.e)
    ref = torch.tensor([-2.0, -1.0, -0.5])
    cases = {  # kind: (value, gradient with respect to lp)
        "k1": ([1.0, -1.0, 0.0], [1.0, 1.0, 1.0]),  # lp - ref
        "k2": ([0.5, 0.5, 0.0], [1.0, -1.0, 0.0]),  # (lp - ref)^2 / 2
        # exp(ref - lp) - (ref - lp) - 1; gradient 1 - exp(ref - lp)
        "k3": ([1 / e, e - 2.0, 0.0], [1.0 - 1 / e, 1.0 - e, 0.0]),
    }
    for kind, (value, grad) in cases.items():
        lp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
        out = kl_penalty(lp, ref, kind)
        out.sum().backward()
        torch.testing.assert_close(out.detach(), torch.tensor(value), msg=kind)
        torch.testing.assert_close(lp.grad, torch.tensor(grad), msg=kind)
    # k3 saturates: log-ratio clamped to -20 gives 19, capped at 10, and past the cap no gradient.
    lp = torch.tensor([0.0], requires_grad=True)
    out = kl_penalty(lp, torch.tensor([-1e4]), "k3")
    out.backward()
    assert out.item() == 10.0 and lp.grad.item() == 0.0
    with pytest.raises(ValueError, match="kl_estimator"):
        kl_penalty(lp, ref, "k9")


def test_kl_loss_expected_gradient_per_estimator():
    """Exact expectation over a categorical policy, samples treated as constants (as in the loss).

    k1's expected gradient is 0 (sum_x pi grad log pi = grad sum_x pi = 0), so it cannot be a loss;
    k2's is the gradient of KL(pi || ref); k3's the gradient of KL(ref || pi).
    """
    torch.manual_seed(0)
    ref = torch.log_softmax(torch.randn(5), -1)

    def expected_grad(kind):
        theta = torch.randn(5, generator=torch.Generator().manual_seed(1)).requires_grad_()
        logp = torch.log_softmax(theta, -1)
        (logp.exp().detach() * kl_penalty(logp, ref, kind)).sum().backward()
        return theta.grad

    def exact_grad(kl):
        theta = torch.randn(5, generator=torch.Generator().manual_seed(1)).requires_grad_()
        kl(torch.log_softmax(theta, -1)).backward()
        return theta.grad

    assert expected_grad("k1").abs().max() < 1e-6
    reverse = exact_grad(lambda logp: (logp.exp() * (logp - ref)).sum())
    forward = exact_grad(lambda logp: (ref.exp() * (ref - logp)).sum())
    assert reverse.abs().max() > 0.05 and forward.abs().max() > 0.05
    torch.testing.assert_close(expected_grad("k2"), reverse)
    torch.testing.assert_close(expected_grad("k3"), forward)


def test_learner_refuses_k1_kl_as_a_loss(model_dir):
    with pytest.raises(ValueError, match="kl_estimator.*'k1'.*k2 or k3"):
        make_learner(model_dir, kl_coef=0.1, kl_estimator="k1")


# ---- learner --------------------------------------------------------------------------------------


def reference_grads(learner, prompts, responses, adv, masks, agg):
    """Gradient of the loss on the whole batch in one padded forward pass, independent of packing."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    seq_len = max(lengths)
    ids = torch.zeros(len(prompts), seq_len, dtype=torch.long)
    attn = torch.zeros_like(ids)
    mask = torch.zeros(len(prompts), seq_len - 1)
    for i, (p, r, m) in enumerate(zip(prompts, responses, masks)):
        ids[i, : lengths[i]] = torch.tensor(p + r)
        attn[i, : lengths[i]] = 1
        mask[i, len(p) - 1 : len(p) - 1 + len(r)] = torch.tensor(m, dtype=torch.float32)
    learner.model.zero_grad(set_to_none=True)
    lp = token_logprobs(learner.model, ids, attn)
    loss, _ = policy_loss(lp, lp.detach(), torch.tensor(adv), mask, agg=agg)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in learner.model.named_parameters()}
    learner.model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"])
def test_micro_batch_gradient_equals_full_batch(model_dir, agg):
    prompts, responses, adv, masks = random_batch(n=7, seed=1)
    learner = make_learner(model_dir, micro_batch_size=2, loss_agg=agg, grad_clip=None)
    expected = reference_grads(learner, prompts, responses, adv, masks, agg)
    from orchestrator.learner.worker import _Totals, sequences_from_table

    seqs = sequences_from_table(make_batch(prompts, responses, adv, masks))
    learner.optimizer.step = lambda: None  # capture gradients instead of applying them
    learner.optimizer.zero_grad = lambda set_to_none=True: None
    learner._update(seqs, np.arange(len(seqs)), None, None, _Totals(), with_entropy=False)
    for name, p in learner.model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], atol=1e-6, rtol=1e-4, msg=name)


def test_micro_batch_update_equals_big_batch(model_dir):
    batch = make_batch(*random_batch(n=9, seed=2))
    small = make_learner(model_dir, micro_batch_size=2, lr=1e-3)
    big = make_learner(model_dir, micro_batch_size=64, lr=1e-3)
    m_small, m_big = small.step(batch), big.step(batch)
    w_small, w_big = small.get_weights(), big.get_weights()
    for name in w_big:
        torch.testing.assert_close(w_small[name], w_big[name], atol=1e-5, rtol=0, msg=name)
    assert abs(m_small["loss"] - m_big["loss"]) < 1e-5
    assert abs(m_small["grad_norm"] - m_big["grad_norm"]) < 1e-4 * max(1.0, m_big["grad_norm"])


def test_step_moves_logprobs_with_advantage_sign(model_dir):
    prompts = [[5, 6, 7], [5, 6, 7]]
    responses = [[10, 11, 12, 13], [20, 21, 22, 23]]
    learner = make_learner(model_dir, lr=1e-2, micro_batch_size=1)
    before = [sum(x) for x in learner.sequence_logprobs(prompts, responses)]
    metrics = learner.step(make_batch(prompts, responses, [1.0, -1.0]))
    after = [sum(x) for x in learner.sequence_logprobs(prompts, responses)]
    assert after[0] > before[0] and after[1] < before[1]
    assert learner.version() == 1 == learner.policy_version
    for key in ("loss", "pg_loss", "kl", "clip_frac", "grad_norm", "lr", "entropy", "tokens", "seconds"):
        assert key in metrics and np.isfinite(metrics[key]), key
    assert metrics["tokens"] == 14 and metrics["entropy"] > 0


def test_masked_tokens_get_no_gradient(model_dir):
    prompts = [[5, 6, 7], [8, 9]]
    responses = [[10, 11, 12, 13, 14], [20, 21, 22]]
    masks = [[1, 1, 1, 0, 0], [1, 1, 0]]  # trailing injected tokens
    changed = [[10, 11, 12, 40, 41], [20, 21, 50]]
    a, b = make_learner(model_dir, lr=1e-2), make_learner(model_dir, lr=1e-2)
    a.step(make_batch(prompts, responses, [1.0, -0.5], masks))
    b.step(make_batch(prompts, changed, [1.0, -0.5], masks))
    wa, wb = a.get_weights(), b.get_weights()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=1e-6, rtol=0, msg=name)
    assert not torch.equal(
        wa["model.norm.weight"], make_learner(model_dir).get_weights()["model.norm.weight"]
    )


def test_multi_epoch_minibatches_and_kl(model_dir):
    batch = make_batch(*random_batch(n=8, seed=3))
    learner = make_learner(
        model_dir,
        lr=5e-3,
        ppo_epochs=2,
        mini_batches=2,
        kl_coef=0.1,
        clip_high=0.28,
        lr_warmup_steps=2,
        micro_batch_size=3,
    )
    m1 = learner.step(batch)
    assert m1["updates"] == 4 and m1["lr"] == pytest.approx(2.5e-3)
    assert m1["kl"] > 0  # the policy moved away from the reference within the step
    m2 = learner.step(batch)
    assert m2["lr"] == pytest.approx(5e-3) and m2["kl"] > 0 and learner.version() == 2


def test_get_weights_includes_tied_lm_head(model_dir):
    learner = make_learner(model_dir)
    assert learner.model.config.tie_word_embeddings
    w = learner.get_weights()
    assert "lm_head.weight" in w and torch.equal(w["lm_head.weight"], w["model.embed_tokens.weight"])
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in w.values())
    w["model.norm.weight"].add_(1.0)  # a copy: mutating it leaves the model alone
    assert not torch.equal(w["model.norm.weight"], learner.model.model.norm.weight)
    assert learner.get_weights(dtype="bfloat16")["lm_head.weight"].dtype == torch.bfloat16


def test_save_roundtrip(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    learner = make_learner(model_dir, lr=1e-2)
    learner.step(make_batch([[5, 6]], [[7, 8, 9]], [1.0]))
    out = learner.save(str(tmp_path / "ckpt"))
    assert os.path.exists(os.path.join(out, "model.safetensors"))
    out2 = learner.save(str(tmp_path / "ckpt"))  # overwriting an existing checkpoint works
    assert out2 == out and sorted(os.listdir(tmp_path)) == ["ckpt"]  # no temp dirs left behind
    loaded = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    AutoTokenizer.from_pretrained(out)
    mine = learner.get_weights()
    for name, t in loaded.state_dict().items():
        torch.testing.assert_close(t, mine[name], msg=name)


@pytest.mark.parametrize(
    "table, column",
    [
        (make_batch([[1, 2]], [[3]], [1.0]).drop_columns(["advantage"]), "advantage"),
        (make_batch([[1, 2]], [[3, 4]], [1.0], masks=[[1]]), "loss_mask"),
        (make_batch([[1, 2]], [[3]], [1.0]).slice(0, 0), "empty"),
        (make_batch([[1, 2]], [[3, 999]], [1.0]), "response_token_ids"),
        (make_batch([[]], [[3]], [1.0]), "prompt_token_ids"),
        (make_batch([[1, 2]], [[3]], [float("nan")]), "advantage"),
    ],
)
def test_bad_batch_raises_naming_column(model_dir, table, column):
    learner = make_learner(model_dir)
    with pytest.raises(ValueError, match=column):
        learner.step(table)
    assert learner.version() == 0


def test_bad_arguments(model_dir):
    with pytest.raises(ValueError, match="loss_agg"):
        make_learner(model_dir, loss_agg="mean")
    with pytest.raises(ValueError, match="micro_batch_size"):
        make_learner(model_dir, micro_batch_size=0)


def test_masked_aggregate_denominator_splits_exactly():
    values, mask = torch.randn(6, 4), (torch.rand(6, 4) > 0.3).float()
    for agg in ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean"):
        whole = masked_aggregate(values, mask, agg)
        denom = mask.sum() if agg == "token_mean" else 6
        parts = sum(masked_aggregate(values[i : i + 2], mask[i : i + 2], agg, denom) for i in (0, 2, 4))
        assert torch.allclose(whole, parts, atol=1e-6), agg


def test_sequence_logprobs_match_plain_forward(model_dir):
    learner = make_learner(model_dir, micro_batch_size=2)
    prompts, responses, _, _ = random_batch(n=5, seed=4)
    got = learner.sequence_logprobs(prompts, responses)
    with torch.no_grad():
        for p, r, lps in zip(prompts, responses, got):
            logits = learner.model(torch.tensor([p + r])).logits[0].float()
            want = torch.log_softmax(logits, -1)[len(p) - 1 : -1].gather(-1, torch.tensor(r)[:, None])
            np.testing.assert_allclose(lps, want[:, 0].numpy(), atol=1e-5)


def test_recomputed_old_logprobs_give_ratio_one(model_dir):
    # Two mini-batches and lr=0: the old-logprob pass and the training pass must line up exactly.
    learner = make_learner(model_dir, lr=0.0, mini_batches=2, micro_batch_size=3)
    m = learner.step(make_batch(*random_batch(n=8, seed=5)))
    assert m["updates"] == 2 and m["clip_frac"] == 0.0
    assert abs(m["ratio_mean"] - 1.0) < 1e-5 and m["approx_kl"] < 1e-8 and m["entropy"] > 0


def test_bf16_autocast_keeps_fp32_masters(model_dir):
    learner = make_learner(model_dir, dtype="bfloat16", lr=1e-2, kl_coef=0.1)
    m = learner.step(make_batch([[5, 6, 7]], [[8, 9, 10]], [1.0]))
    assert np.isfinite(m["loss"]) and m["updates"] == 1
    assert all(p.dtype == torch.float32 for p in learner.model.parameters())
    assert next(learner.ref_model.parameters()).dtype == torch.bfloat16
