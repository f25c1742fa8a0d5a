"""The collective weight sync under faults: real Ray actors, real gloo groups, HF engines (engine-agnostic
here; tests/test_collective_sync.py loads into vLLM).

Per-engine groups survive a replaced worker and a rebuilt learner (new groups, only where needed); an
engine whose group breaks gets that sync through the object store and a new group the next time; a
training run whose rollout worker and learner are killed mid-run ends with every step once and every
engine on the final weights, synced over the collective.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
SEQ = ([5, 9, 14, 3, 22, 7], [11, 4, 30, 2, 8, 6, 19])  # prompt, response: scored on both sides


def _config(tiny_model: str, tmp_path: Path, *extra: str):
    from orchestrator.config import load_config

    return load_config(ROOT / "configs" / "quickstart.yaml", [
        f"model.path={tiny_model}", "model.build_if_missing=none", "warmstart.steps=0", "rollout.engine=hf",
        "rollout.num_workers=2", "rollout.cpus_per_worker=0.5", "learner.cpus_per_worker=0.5",
        "rollout.weight_sync.method=collective", "rollout.weight_sync.timeout_s=20", "rollout.weight_sync.bucket_mb=0.05",
        "learner.num_threads=1", "learner.micro_batch_size=8", f"trainer.output_dir={tmp_path / 'out'}",
        "model.dtype=float32",  # on every host: engines must score as the learner does to 1e-5 (_in_step)
        *[f"model.tiny.{k}={v}" for k, v in TINY.items()], *extra])


def _step(group, lr_batch_seed: int) -> None:
    """One learner update on a few random sequences (the weights move; nothing else matters here)."""
    import ray

    rng = np.random.default_rng(lr_batch_seed)
    rows = 8
    batch = pa.table({
        "prompt_token_ids": pa.array([rng.integers(3, 60, 5).tolist() for _ in range(rows)], pa.list_(pa.int32())),
        "response_token_ids": pa.array([rng.integers(3, 60, 6).tolist() for _ in range(rows)], pa.list_(pa.int32())),
        "loss_mask": pa.array([[1] * 6] * rows, pa.list_(pa.int8())),
        "advantage": pa.array(rng.standard_normal(rows).astype(np.float32))})
    refs, _ = group.learner.submit_step(batch, export=False)
    ray.get(refs)


def _in_step(group, slots=(0, 1)) -> dict:
    """Each worker's (policy version, how the weights came), and whether it scores SEQ as the learner does."""
    import ray

    want = ray.get(group.learner.lead.sequence_logprobs.remote([SEQ[0]], [SEQ[1]]))[0]
    out = {}
    for i in slots:
        stats = ray.get(group.rollout[i].stats.remote())
        got = ray.get(group.rollout[i].prompt_logprobs.remote([SEQ[0] + SEQ[1]]))[0][len(SEQ[0]) - 1:]
        out[i] = (stats["policy_version"], stats["last_sync"], max(abs(a - b) for a, b in zip(got, want)) < 1e-5)
    return out


@pytest.mark.timeout(600)
def test_groups_follow_replaced_workers_rebuilt_learner_and_broken_groups(ray_session, tiny_model, tmp_path):
    import ray

    from orchestrator.runtime import ACTOR_LOST, WorkerGroup
    from orchestrator.weight_syncer import WeightSyncer

    cfg = _config(tiny_model, tmp_path)
    group = WorkerGroup(cfg, tiny_model)
    logs: list[str] = []
    syncer = WeightSyncer(cfg, group, logs.append)
    try:
        _step(group, 1)
        syncer.finish(syncer.start(1))
        assert _in_step(group) == {0: (1, "collective", True), 1: (1, "collective", True)}

        # A worker dies between syncs: the next sync raises its actor error (after the live worker has the
        # weights, promptly: a dead peer fails the broadcast at once); its replacement joins a new group.
        ray.kill(group.rollout[1])
        _step(group, 2)
        t0 = time.monotonic()
        with pytest.raises(ACTOR_LOST):
            syncer.finish(syncer.start(2))
        assert time.monotonic() - t0 < 15
        assert _in_step(group, [0]) == {0: (2, "collective", True)}
        group.replace_rollouts([1])
        syncer.finish(syncer.start(2, slots=[1]))
        assert _in_step(group) == {0: (2, "collective", True), 1: (2, "collective", True)}

        # A live worker whose group broke: this sync through the object store, a new group the next time.
        def drop_group(worker):
            worker.engine._sync_group.close()
            worker.engine._sync_group = None

        ray.get(group.rollout[0].__ray_call__.remote(drop_group))
        _step(group, 3)
        syncer.finish(syncer.start(3))
        assert _in_step(group) == {0: (3, "object_store", True), 1: (3, "collective", True)}
        assert any("rollout worker 0 failed" in line for line in logs), logs
        _step(group, 4)
        syncer.finish(syncer.start(4))
        assert _in_step(group) == {0: (4, "collective", True), 1: (4, "collective", True)}

        # The learner is rebuilt (from the start checkpoint): every engine joins the new learner's groups.
        before = ray.get(group.rollout[0].prompt_logprobs.remote([SEQ[0] + SEQ[1]]))
        group.replace_learner(tiny_model)
        syncer.finish(syncer.start(0))
        assert _in_step(group) == {0: (0, "collective", True), 1: (0, "collective", True)}
        assert ray.get(group.rollout[0].prompt_logprobs.remote([SEQ[0] + SEQ[1]])) != before  # back at the start
    finally:
        group.shutdown()


def test_object_store_payload_is_in_the_engine_dtype(tiny_model):
    """fp32 engines get the learner's own tensors (views: what the quickstart always got, bit for bit);
    bf16 engines get bf16, half the bytes, rounded as the engine's own cast would."""
    import torch

    from orchestrator.learner.worker import Learner
    from orchestrator.weight_sync import unpack

    learner = Learner(tiny_model, seed=0)
    params = dict(learner.model.named_parameters())
    fp32, bf16 = learner.sync_payload("float32"), learner.sync_payload("bfloat16")
    assert set(fp32.dtypes.values()) == {"float32"} and set(bf16.dtypes.values()) == {"bfloat16"}
    assert bf16.nbytes * 2 == fp32.nbytes
    for name, t in unpack(fp32).items():
        if name in params:
            assert t.data_ptr() == params[name].data_ptr()  # no copy, no cast
    back = unpack(bf16)
    assert all(torch.equal(back[n], p.detach().to(torch.bfloat16)) for n, p in params.items())
