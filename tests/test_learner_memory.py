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
    learner = Learner(model_dir, device="cpu", micro_batch_size=4, micro_batch_tokens=30, algorithm={"loss_agg": agg},
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
    kw = dict(device="cpu", lr=5e-3, algorithm={"ppo_epochs": 2, "mini_batches": 2, "kl_coef": 0.1})
    rows, capped = Learner(model_dir, micro_batch_size=64, **kw), Learner(model_dir, micro_batch_size=64,
                                                                          micro_batch_tokens=25, **kw)
    for _ in range(2):
        m_rows, m_cap = rows.step(batch), capped.step(batch)
        for key in ("loss", "kl", "entropy", "grad_norm"):
            assert m_cap[key] == pytest.approx(m_rows[key], rel=1e-4, abs=1e-6), key
    w_rows, w_cap = rows.get_weights(), capped.get_weights()
    # 5e-5: AdamW divides by the root of the second moment, so last-bit differences of the summation order turn
    # into weight differences up to 1.7e-5 on an AVX-512 Xeon (k_proj.bias, whose exact gradient is 0: softmax
    # ignores a bias added to every key); a mis-accumulated micro-batch moves weights by about lr = 5e-3.
    for name in w_rows:
        torch.testing.assert_close(w_cap[name], w_rows[name], atol=5e-5, rtol=0, msg=name)


def test_token_cap_refuses_a_negative_value(model_dir):  # noqa: F811
    with pytest.raises(ValueError, match="micro_batch_tokens"):
        Learner(model_dir, device="cpu", micro_batch_tokens=-1)


# ---- activation checkpointing ------------------------------------------------------------------------


def saved_activation_bytes(learner: Learner, batch) -> int:
    """Bytes autograd keeps for backward during one training forward (unique storages), as the hooks see them."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.device.type == "cpu" and not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    seqs = sequences_from_table(batch)
    packed = learner._pack(seqs, np.arange(len(seqs)))
    params = {p.untyped_storage().data_ptr() for p in learner.model.parameters()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        learner._forward(learner.model, packed).sum().backward()
    learner.model.zero_grad(set_to_none=True)
    return sum(n for ptr, n in seen.items() if ptr not in params)


def test_checkpointing_keeps_the_gradient_and_drops_the_saved_activations(model_dir):  # noqa: F811
    batch = make_batch(*random_batch(n=6, seed=8, resp_lengths=(20, 40)))
    plain = Learner(model_dir, device="cpu", micro_batch_size=2, algorithm={"kl_coef": 0.1})
    ckpt = Learner(model_dir, device="cpu", micro_batch_size=2, algorithm={"kl_coef": 0.1},
                   activation_checkpointing=True)
    # The switch is live (Hugging Face's own checkpointing would do nothing: the learner runs in eval mode).
    assert saved_activation_bytes(ckpt, batch) < 0.5 * saved_activation_bytes(plain, batch)
    g_plain, g_ckpt = captured_grads(plain, batch), captured_grads(ckpt, batch)
    for name, g in g_plain.items():
        torch.testing.assert_close(g_ckpt[name], g, atol=1e-7, rtol=1e-6, msg=name)
    # The parameter names, hence state dicts and saved optimizer state, do not change.
    assert [n for n, _ in ckpt.model.named_parameters()] == [n for n, _ in plain.model.named_parameters()]
    assert set(ckpt.get_weights()) == set(plain.get_weights())


def test_checkpointing_under_one_rank_fsdp_in_bf16(model_dir):  # noqa: F811
    """The GPU recipe's code path on a CPU: FSDP2 (gloo, one rank) with bf16 compute, fp32 masters, a bf16
    reference, checkpointed layers: the gradient, the second step's loss and KL, and the weights after it equal
    those without checkpointing."""
    batch = make_batch(*random_batch(n=6, seed=9))
    results = []
    for checkpointing in (False, True):
        learner = Learner(model_dir, device="cpu", strategy="fsdp", dtype="bfloat16", algorithm={"kl_coef": 0.1},
                          lr=1e-3,
                          micro_batch_size=4, activation_checkpointing=checkpointing)
        try:
            assert learner.sharded and learner.world_size == 1
            assert {p.dtype for p in learner.model.parameters()} == {torch.float32}
            assert {p.dtype for p in learner.ref_model.parameters()} == {torch.bfloat16}
            grads = captured_grads(learner, batch)
            del learner.optimizer.step, learner.optimizer.zero_grad  # back to the real AdamW methods
            learner.step(batch)
            results.append((grads, learner.step(batch), learner.get_weights()))  # the second step has a KL
        finally:
            learner.shutdown()
    (g0, m0, w0), (g1, m1, w1) = results
    assert m0["updates"] == m1["updates"] == 1 and m0["kl"] > 0 and m0["policy_version"] == 2
    for key in ("loss", "kl", "grad_norm"):
        assert m1[key] == pytest.approx(m0[key], rel=1e-6, abs=1e-9), key
    for name, g in g0.items():
        assert float(g.abs().max()) > 0, name
        torch.testing.assert_close(g1[name], g, atol=0, rtol=0, msg=name)
    for name, w in w0.items():
        torch.testing.assert_close(w1[name], w, atol=0, rtol=0, msg=name)


# ---- the policy sharded before it reaches the device; rank 0's weights everywhere -----------------------


LEARNER_KW = dict(device="cpu", algorithm={"kl_coef": 0.1, "mini_batches": 2}, lr=1e-2, micro_batch_size=3,
                  num_threads=1)


def _fsdp_rank(rank: int, paths: list[str], init: str, out: str, batch) -> None:
    """One rank of a 2-rank gloo FSDP2 group with checkpointed layers, each rank loading its own model copy."""
    learner = Learner(paths[rank], rank=rank, world_size=2, strategy="fsdp", dist_init=init,
                      activation_checkpointing=True, **LEARNER_KW)
    try:
        start = {n: p.to_local().clone() for n, p in learner.model.named_parameters()}
        ref = {n: p.to_local().clone() for n, p in learner.ref_model.named_parameters()}
        metrics = [learner.step(batch) for _ in range(2)]
        weights = learner.get_weights()  # collective: rank 0 gets the gathered weights
        torch.save({"start": start, "ref": ref, "metrics": metrics, "weights": weights}, out)
    finally:
        learner.shutdown()


def test_two_fsdp_ranks_with_checkpointing_start_from_rank_zero_and_match_one_rank(model_dir, tmp_path):  # noqa: F811
    """Rank 1 reads a different copy of the model (a node with other files): after sharding, its policy and
    reference shards are rank 0's; two steps with checkpointed layers then match one plain rank's."""
    import shutil

    import torch.multiprocessing as mp
    from safetensors.torch import load_file, save_file

    from orchestrator.learner.distributed import local_rendezvous

    other = tmp_path / "other"
    shutil.copytree(model_dir, other)
    state = load_file(str(other / "model.safetensors"))
    state["model.norm.weight"] = state["model.norm.weight"] + 1.0
    save_file(state, str(other / "model.safetensors"), metadata={"format": "pt"})
    batch = make_batch(*random_batch(n=10, seed=10))
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    init, paths = local_rendezvous(), [model_dir, str(other)]
    procs = [mp.get_context("spawn").Process(target=_fsdp_rank, args=(r, paths, init, outs[r], batch))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    r0, r1 = (torch.load(o) for o in outs)
    norm = load_file(f"{model_dir}/model.safetensors")["model.norm.weight"]
    half = norm.shape[0] // 2  # FSDP2 shards dim 0: rank 1 holds the second half
    torch.testing.assert_close(r1["start"]["model.norm.weight"], norm[half:], atol=0, rtol=0)
    torch.testing.assert_close(r1["ref"]["model.norm.weight"], norm[half:], atol=0, rtol=0)
    assert r1["weights"] == {}

    one = Learner(model_dir, **LEARNER_KW)
    start = one.get_weights()
    for m1, m2 in zip([one.step(batch) for _ in range(2)], r0["metrics"]):
        assert m2["updates"] == m1["updates"] == 2 and m2["world_size"] == 2.0
        for key in ("loss", "kl", "grad_norm"):
            assert m2[key] == pytest.approx(m1[key], rel=1e-3, abs=1e-6), key
    expected = one.get_weights()
    for name, w in expected.items():  # relative to the update's size, as tests/test_learner_ranks.py does
        d1, d2 = w - start[name], r0["weights"][name] - start[name]
        assert float(d1.norm()) > 1e-4, name
        assert float((d2 - d1).norm() / d1.norm()) < 2e-3, name


def test_reference_is_cast_while_copied_never_a_second_fp32_model(model_dir):  # noqa: F811
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM

    from orchestrator.learner.build import frozen_copy

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    n = sum(p.numel() for p in model.parameters())  # the tied embedding once
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        ref = frozen_copy(model, torch.bfloat16)
    allocated = sum(e.self_cpu_memory_usage for e in prof.events() if e.self_cpu_memory_usage > 0)
    # bf16 parameters plus small copies of the buffers; a deep copy, then a cast, would allocate 6n bytes
    assert 2 * n <= allocated <= 2 * n + 2 * buffers + 256, (allocated, 2 * n)
    assert {p.dtype for p in ref.parameters()} == {torch.bfloat16} and not any(p.requires_grad for p in ref.parameters())
    assert ref.lm_head.weight is ref.model.embed_tokens.weight  # tied weights stay tied
    assert {b.dtype for b in ref.buffers()} == {torch.float32}  # rotary frequencies keep their precision
    same = frozen_copy(model, torch.float32)  # fp32: a copy, not a view of the trained weights
    assert same.model.norm.weight.data_ptr() != model.model.norm.weight.data_ptr()
    torch.testing.assert_close(same.model.norm.weight, model.model.norm.weight, atol=0, rtol=0)


def test_learner_config_reaches_the_learner_and_validates():
    from orchestrator.config import ConfigError, LearnerConfig, load_config

    assert LearnerConfig().activation_checkpointing is False and LearnerConfig().micro_batch_tokens == 0
    with pytest.raises(ConfigError, match="learner.activation_checkpointing"):
        load_config(None, ["model.path=x", "learner.activation_checkpointing=maybe"], check_paths=False)


# ---- the sizing command's activation formula, against what autograd keeps ----------------------------------


def _kept_per_layer_and_token(tmp_path, mode: str, padded: bool) -> float:
    """Bytes autograd keeps for backward per decoder layer and token: (3 layers - 1 layer) / 2 / tokens, with
    the weights (and their casts, by shape) left out."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    rows, width = 3, 48
    lengths = [width - (i if padded else 0) for i in range(rows)]
    batch = make_batch([[5, 6]] * rows, [[7] * (n - 2) for n in lengths], [1.0] * rows)
    kept = []
    for layers in (1, 3):
        path = tmp_path / f"{mode}-{layers}"
        torch.manual_seed(0)
        Qwen2ForCausalLM(Qwen2Config(vocab_size=200, hidden_size=128, intermediate_size=256, num_hidden_layers=layers,
                                     num_attention_heads=4, num_key_value_heads=2)).save_pretrained(path)
        learner = Learner(str(path), device="cpu", dtype="float32" if mode == "fp32" else "bfloat16",
                          strategy="fsdp" if mode == "fsdp" else "auto")
        try:
            shapes = {tuple(p.shape) for p in learner.model.parameters()}
            shapes |= {tuple(p.full_tensor().shape) for p in learner.model.parameters() if hasattr(p, "full_tensor")}
            shapes |= {s[::-1] for s in shapes}
            seen: dict[int, int] = {}

            def pack(t, seen=seen, shapes=shapes):
                if tuple(t.shape) not in shapes:
                    seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
                return t

            packed = learner._pack(sequences_from_table(batch), np.arange(rows))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                learner._forward(learner.model, packed)
            kept.append(sum(seen.values()))
        finally:
            learner.shutdown()
    return (kept[1] - kept[0]) / 2 / (rows * width)


@pytest.mark.parametrize("mode", ["fsdp", "autocast", "fp32"])
@pytest.mark.parametrize("padded", [True, False], ids=["padded", "same-length"])
def test_plan_activation_formula_is_what_autograd_keeps(tmp_path, mode, padded):
    from orchestrator.plan import LearnerSetup, ModelShape, layer_activation_bytes

    shape = ModelShape(hidden=128, layers=1, heads=4, kv_heads=2, intermediate=256, vocab=200, tied=False)
    setup = LearnerSetup(sharded=mode == "fsdp", dtype="float32" if mode == "fp32" else "bfloat16", seq_len=48,
                         padded=padded)
    assert _kept_per_layer_and_token(tmp_path, mode, padded) == layer_activation_bytes(shape, setup)
