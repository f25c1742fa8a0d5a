"""The weight sync payload: exact round trips (bfloat16 included), tied tensors sent once, no copy on pack."""

from __future__ import annotations

import torch

from orchestrator.rollout.engine import deserialize_state_dict, serialize_chunks, serialize_state_dict
from orchestrator.weight_sync import WeightPayload, pack, unpack


def _state() -> dict[str, torch.Tensor]:
    emb = torch.randn(50, 8)
    return {"embed.weight": emb, "lm_head.weight": emb, "norm.weight": torch.randn(8),
            "mlp.weight": torch.randn(8, 16).to(torch.bfloat16), "step": torch.tensor([3], dtype=torch.int64)}


def test_round_trip_is_exact_and_keeps_dtypes():
    state = _state()
    back = unpack(pack(state))
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k], v), k


def test_pack_views_cpu_tensors_and_sends_a_tied_tensor_once():
    state = _state()
    p = pack(state)
    assert p.arrays["embed.weight"] is p.arrays["lm_head.weight"]  # one buffer through the object store
    assert p.nbytes == sum(v.numel() * v.element_size() for k, v in state.items() if k != "lm_head.weight")
    state["norm.weight"][0] = 123.0  # a view, not a copy: the learner's return value is the live tensor
    assert p.arrays["norm.weight"][0] == 123.0
    strided = {"t": torch.randn(6, 4).t()}  # not contiguous: copied once, still exact
    assert torch.equal(unpack(pack(strided))["t"], strided["t"])


def test_payload_through_the_object_store(ray_session):
    state = _state()
    got = ray_session.get(ray_session.put(pack(state)))
    assert isinstance(got, WeightPayload) and len(got) == len(state)
    back = unpack(got)
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_safetensors_bytes_carry_a_tied_output_embedding():
    """The multiprocess engine's path: safetensors refuses shared tensors unless one is copied."""
    state = _state()
    back = deserialize_state_dict(serialize_state_dict(state))
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_chunks_split_a_state_dict_and_keep_every_tensor():
    """The multiprocess engine's chunks (one collective_rpc each): under the cap, a larger tensor alone."""
    state = {**_state(), "big": torch.randn(1000)}
    blobs = serialize_chunks(state, chunk_bytes=300)
    assert len(blobs) >= 4 and max(len(b) for b in blobs) < 300 + 4000 + 1024
    back = {}
    for b in blobs:
        back.update(deserialize_state_dict(b))
    # Every tensor once, by name (safetensors orders a chunk's tensors by dtype; loading goes by name).
    assert sorted(back) == sorted(state) and all(torch.equal(back[k], v) for k, v in state.items())
