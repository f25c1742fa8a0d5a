"""Data-parallel learner ranks as Ray actors: N ranks apply the update one rank would on the same batch.

Real torch.distributed groups (gloo) across Ray actors, both strategies (all-reduce and FSDP2), with
mini-batches, PPO epochs and a KL reference (whose logprobs are all-gathered), then the resumable
state: save_state on 2 ranks, a fresh group, load_state, and the run continues on the same path.
"""

from __future__ import annotations

import pytest
import torch

from conftest import TINY
from orchestrator.config import load_config
from orchestrator.weight_sync import unpack

from test_learner import make_batch, random_batch

ALGO = {"algorithm.ppo_epochs": 2, "algorithm.mini_batches": 2, "algorithm.kl_coef": 0.1,
        "trainer.prompts_per_step": 11, "rollout.group_size": 2}


def _cfg(tiny_model, **over):
    items = {"model.path": tiny_model, "learner.lr": 1e-2, "learner.micro_batch_size": 3,
             "learner.num_threads": 1, "learner.cpus_per_worker": 0.5, **ALGO, **over}
    return load_config(None, [f"{k}={v}" for k, v in items.items()] + [f"model.tiny.{k}={v}" for k, v in TINY.items()]
                       + ["eval.max_thinking=16", "eval.max_solution=8", "budget.thinking=16", "budget.solution=8",
                          "model.max_model_len=256",
                          "model.dtype=float32"])  # on every host: ranks must match one rank to 1e-4 (bf16 would not)


class _Group:
    def __init__(self, ray_session, cfg):
        from ray.util.placement_group import placement_group

        from orchestrator.runtime import LearnerGroup

        le = cfg.learner
        self.ray = ray_session
        self.pg = placement_group([{"CPU": le.cpus_per_worker}] * le.num_workers, strategy="PACK")
        ray_session.get(self.pg.ready())
        self.group = LearnerGroup(cfg, cfg.model.path, self.pg, first_bundle=0)

    def __enter__(self):
        return self.group

    def __exit__(self, *exc):
        from ray.util.placement_group import remove_placement_group

        self.group.shutdown()
        remove_placement_group(self.pg)


def _batch(tiny_model):
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(tiny_model))
    prompts, responses, adv, masks = random_batch(n=11, seed=3)
    clip = lambda rows: [[min(t, vocab - 1) for t in r] for r in rows]  # noqa: E731
    return make_batch(clip(prompts), clip(responses), adv, masks)


def _step(group, batch):
    """The trainer's call: the step's metrics and a ref to the weights the step exported."""
    metric_refs, weights = group.submit_step(batch)
    return group.step_result(metric_refs), weights


@pytest.fixture(scope="module")
def reference(ray_session, tiny_model):
    """One rank, two steps: metrics per step, start weights and final weights."""
    from orchestrator.learner.worker import Learner

    start = Learner(tiny_model, device="cpu").get_weights()
    with _Group(ray_session, _cfg(tiny_model)) as one:
        metrics = [_step(one, _batch(tiny_model))[0] for _ in range(2)]
        weights = unpack(ray_session.get(one.get_weights()))  # the sync payload on its own
    return start, metrics, weights


def _assert_same_update(start, expected, got):
    assert set(got) == set(expected) and "lm_head.weight" in got
    for name in expected:
        # Compare the updates relative to their size: AdamW's first steps are ~lr * sign(grad), so a
        # gradient entry that cancels to ~0 can flip with summation order in a handful of elements.
        d1, d2 = expected[name] - start[name], got[name] - start[name]
        assert float(d1.norm()) > 1e-4, name  # the update did something: not trivially equal
        rel = float((d2 - d1).norm() / d1.norm())
        assert rel < 2e-3, (name, rel)


def _assert_same_metrics(m1, m2):
    assert m2["world_size"] == 2.0 and m2["updates"] == m1["updates"] == 4  # 2 epochs x 2 mini-batches
    assert abs(m1["loss"] - m2["loss"]) < 1e-4 * max(1.0, abs(m1["loss"])), (m1["loss"], m2["loss"])
    assert abs(m1["grad_norm"] - m2["grad_norm"]) < 1e-3 * max(1.0, m1["grad_norm"])
    assert abs(m1["kl"] - m2["kl"]) < 1e-5 + 1e-3 * abs(m1["kl"])


def test_two_fsdp_ranks_match_one_rank(ray_session, tiny_model, reference, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    start, ref_metrics, ref_weights = reference
    with _Group(ray_session, _cfg(tiny_model, **{"learner.num_workers": 2, "learner.strategy": "fsdp"})) as two:
        assert two.world_size == 2 and two.strategy == "fsdp"
        exported = []
        for m1 in ref_metrics:
            m2, ref = _step(two, _batch(tiny_model))
            _assert_same_metrics(m1, m2)
            exported.append(unpack(ray_session.get(ref)))  # the weights the step sent, as the trainer does
        weights = unpack(ray_session.get(two.get_weights()))
        path = two.save(str(tmp_path / "ckpt"))
    _assert_same_update(start, ref_weights, weights)
    _assert_same_update(start, ref_weights, exported[1])
    # each step's export is a snapshot: the next update did not change what the first one sent
    name = "model.layers.0.mlp.down_proj.weight"
    assert float((exported[0][name] - exported[1][name]).abs().max()) > 0, name
    # gathered FSDP weights make a plain HF checkpoint, named by the HF class
    assert AutoConfig.from_pretrained(path).architectures == ["Qwen2ForCausalLM"]
    model = AutoModelForCausalLM.from_pretrained(path, use_safetensors=True)
    for name, t in model.state_dict().items():
        torch.testing.assert_close(t, weights[name], msg=name)


def test_two_ddp_ranks_match_one_rank_across_a_state_roundtrip(ray_session, tiny_model, reference, tmp_path):
    """step, save_state, new group, load_state, step == one rank's two steps straight (optimizer moments
    included): per-step metrics and the final weights match."""
    start, ref_metrics, ref_weights = reference
    assert len(ref_metrics) == 2
    cfg = _cfg(tiny_model, **{"learner.num_workers": 2, "learner.strategy": "ddp"})
    with _Group(ray_session, cfg) as first:
        assert first.world_size == 2 and first.strategy == "ddp"
        _assert_same_metrics(ref_metrics[0], _step(first, _batch(tiny_model))[0])
        first.save_state(str(tmp_path / "state"))
    with _Group(ray_session, cfg) as second:
        assert second.load_state(str(tmp_path / "state")) == 1
        m2, ref = _step(second, _batch(tiny_model))
        _assert_same_metrics(ref_metrics[1], m2)
        assert second.version() == 2
        weights = unpack(ray_session.get(ref))  # rank 0's export; rank 1 sent none
    _assert_same_update(start, ref_weights, weights)
    state = tmp_path / "state"
    assert (state / "model" / "model.safetensors").is_file() and (state / "optimizer.safetensors").is_file()
    assert not [p for p in state.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
