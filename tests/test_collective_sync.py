"""Weight sync into real vLLM engines, both ways: the object store and a gloo broadcast (the code NCCL runs).

After a learner step and a sync, vLLM's logprobs of fixed sequences equal the learner's on its new
weights (fp32), with a tied output embedding (the suite's shared in-process engine, Qwen2) and an untied
one (one multiprocess engine, ``VLLM_ENABLE_V1_MULTIPROCESSING=1``, started here on a Llama-architecture
model: its weights cross a process boundary through vLLM's msgpack channel, which refuses pickled
functions). Both loads vLLM can take: in place (the CPU default) and ``reload_weights`` with an iterator
(the GPU path: vLLM's layerwise reload), over the object store and over the collective.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from orchestrator.config import Budget
from orchestrator.rollout.worker import SamplingSpec

TOL = 1e-4  # fp32 engine vs fp32 learner


def _untied_llama(tiny_model: str, out) -> str:
    """A Llama-architecture model of the tiny model's shape and tokenizer, whose output head is its own
    (random) matrix: another architecture than the suite's Qwen2, and an untied head."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    q = AutoConfig.from_pretrained(tiny_model)
    cfg = LlamaConfig(vocab_size=q.vocab_size, hidden_size=q.hidden_size, intermediate_size=q.intermediate_size,
                      num_hidden_layers=q.num_hidden_layers, num_attention_heads=q.num_attention_heads,
                      num_key_value_heads=q.num_key_value_heads, max_position_embeddings=q.max_position_embeddings,
                      rms_norm_eps=q.rms_norm_eps, tie_word_embeddings=False, bos_token_id=q.bos_token_id,
                      eos_token_id=q.eos_token_id, pad_token_id=q.pad_token_id)
    torch.manual_seed(1)
    model = LlamaForCausalLM(cfg).float()
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def untied_model(tiny_model, tmp_path_factory) -> str:
    return _untied_llama(tiny_model, tmp_path_factory.mktemp("untied") / "model")


@pytest.fixture(scope="module")
def mp_worker(ray_session, untied_model):
    """A rollout worker whose vLLM engine runs in its own subprocess (the GPU configs' setting)."""
    from dataclasses import replace

    from orchestrator.rollout.engine import STANDALONE_VLLM
    from orchestrator.rollout.worker import RolloutWorker
    from orchestrator.runtime import VLLM_CPU_ENV

    env = {k: v for k, v in VLLM_CPU_ENV.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(VLLM_CPU_KVCACHE_SPACE="1", VLLM_ENABLE_V1_MULTIPROCESSING="1")
    actor = ray_session.remote(RolloutWorker).options(num_cpus=1, runtime_env={"env_vars": env}).remote(
        untied_model, engine="vllm", prompt_template="<s>{prompt}<think>",
        engine_kwargs=dict(dtype="float32", max_model_len=256, seed=0,
                           vllm=replace(STANDALONE_VLLM, multiprocess=True, budget_forcing=False)))
    ray_session.get(actor.ready.remote())
    yield actor
    ray_session.kill(actor)


def _prompts(n=4):
    rows = [{"prompt_id": f"p{i}", "task": "addition", "difficulty": 2, "domain": "arithmetic",
             "prompt": f"{10 + i}+{20 + i}=", "answer": str(30 + 2 * i), "reasoning": None} for i in range(n)]
    return pa.Table.from_pylist(rows)


def _stepped_learner(worker, model_path: str):
    """A learner that took one large step on the worker's own samples, and those samples' sequences."""
    import ray

    from orchestrator.learner.worker import Learner

    learner = Learner(model_path, lr=5e-2, micro_batch_size=64, seed=0)
    spec = SamplingSpec(group_size=4, budget=Budget(10, 4), temperature=1.0, seed=5)
    recs = ray.get(worker.generate.remote(_prompts(4), spec))
    adv = np.tile([1.0, -1.0, 0.5, -0.5], 4).astype(np.float32)
    learner.step(recs.select(["prompt_token_ids", "response_token_ids", "loss_mask"]).append_column(
        "advantage", pa.array(adv)))
    return learner, recs["prompt_token_ids"].to_pylist()[:3], recs["response_token_ids"].to_pylist()[:3]


def _assert_engine_matches(worker, learner, prompts, responses, before=None) -> None:
    import ray

    got = ray.get(worker.prompt_logprobs.remote([p + r for p, r in zip(prompts, responses)]))
    want = learner.sequence_logprobs(prompts, responses)
    for p, g, w in zip(prompts, got, want):
        assert len(g[len(p) - 1:]) == len(w)
        assert max(abs(x - y) for x, y in zip(g[len(p) - 1:], w)) < TOL
    if before is not None:  # ...and the sync really changed the engine's scores
        assert max(abs(x - y) for a, b in zip(got, before) for x, y in zip(a, b)) > 1e-2


def _collective_sync(worker, learner, version: int, key: str) -> None:
    """What the trainer's WeightSyncer does for one engine, with the learner in this process."""
    import ray

    joined = worker.open_sync_group.remote(learner.sync_address(), key, 2, "gloo", 60.0)
    assert learner.open_sync_groups([(0, key)], 2, "gloo", 60.0) == {0: "ok"}
    ray.get(joined)
    received = worker.receive_weights.remote(version)
    assert learner.broadcast_weights([0], version, "float32", 0.05) == {0: "ok"}  # 50 KB buckets: several
    ray.get(received)


def _set_reload(worker, inplace: bool) -> None:
    """In place (the CPU default) or vLLM's ``reload_weights`` with an iterator (what a GPU engine runs)."""
    import ray

    def set_(w):
        w.engine.inplace_reload = inplace

    ray.get(worker.__ray_call__.remote(set_))


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "reload_weights"])
def test_multiprocess_engine_takes_object_store_weights(mp_worker, untied_model, inplace):
    """The GPU configs' multiprocess engine: the payload reaches vLLM's worker by method name, in
    safetensors chunks staged one call each (a pickled function here failed in vLLM's msgpack encoder),
    and is loaded in place or through vLLM's ``reload_weights`` (the GPU path)."""
    import ray

    def small_chunks(worker):  # several collective_rpc calls, as a model over 1 GiB would take
        worker.engine.load_chunk_bytes = 64 << 10

    learner, prompts, responses = _stepped_learner(mp_worker, untied_model)
    before = ray.get(mp_worker.prompt_logprobs.remote([p + r for p, r in zip(prompts, responses)]))
    ray.get(mp_worker.__ray_call__.remote(small_chunks))
    _set_reload(mp_worker, inplace)
    try:
        ray.get(mp_worker.update_weights.remote(ray.put(learner.sync_payload("float32")), 1))
        assert ray.get(mp_worker.stats.remote())["last_reload"] == ("inplace" if inplace else "reload_weights")
        _assert_engine_matches(mp_worker, learner, prompts, responses, before)
    finally:
        _set_reload(mp_worker, True)


@pytest.mark.parametrize("inplace", [True, False], ids=["inplace", "reload_weights"])
def test_collective_sync_into_multiprocess_engine(mp_worker, untied_model, inplace):
    """Learner rank 0 -> vLLM's worker in the engine subprocess over gloo, in several buckets, loaded in
    place or streamed into ``reload_weights`` as the buckets arrive (the GPU path): an untied output head
    (its own matrix in the payload)."""
    import ray

    learner, prompts, responses = _stepped_learner(mp_worker, untied_model)
    before = ray.get(mp_worker.prompt_logprobs.remote([p + r for p, r in zip(prompts, responses)]))
    _set_reload(mp_worker, inplace)
    try:
        _collective_sync(mp_worker, learner, 7, f"mp-{inplace}")
        stats = ray.get(mp_worker.stats.remote())
        path = "inplace" if inplace else "reload_weights"
        assert (stats["last_sync"], stats["last_reload"], stats["policy_version"]) == ("collective", path, 7)
        _assert_engine_matches(mp_worker, learner, prompts, responses, before)
    finally:
        learner.close_sync_groups()
        _set_reload(mp_worker, True)


def test_collective_sync_into_shared_engine_tied_head(vllm_worker, tiny_model):
    """The suite's in-process engine (tied embeddings: the learner sends lm_head once, as an alias, and the
    engine re-packs it); then the base weights are restored for the tests that share the engine."""
    import ray

    from orchestrator.learner.worker import Learner

    learner, prompts, responses = _stepped_learner(vllm_worker, tiny_model)
    before = ray.get(vllm_worker.prompt_logprobs.remote([p + r for p, r in zip(prompts, responses)]))
    try:
        _collective_sync(vllm_worker, learner, 3, "shared-1")
        assert ray.get(vllm_worker.stats.remote())["last_sync"] == "collective"
        _assert_engine_matches(vllm_worker, learner, prompts, responses, before)
    finally:
        learner.close_sync_groups()
        ray.get(vllm_worker.update_weights.remote(Learner(tiny_model).get_weights(), 0))
    restored = ray.get(vllm_worker.prompt_logprobs.remote([p + r for p, r in zip(prompts, responses)]))
    assert max(abs(x - y) for a, b in zip(restored, before) for x, y in zip(a, b)) < TOL
