"""The collective's wire: buckets, dtypes, aliases and timeouts, over real gloo groups in one process
(rank 0 in this thread, the engine's rank 1 in another)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from orchestrator.weight_broadcast import Sender, open_group, plan, receive


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    emb = torch.randn(300, 16)
    return {"embed.weight": emb, "layer.w": torch.randn(64, 16), "layer.b": torch.randn(64),
            "big": torch.randn(4000), "steps": torch.tensor([7, 8], dtype=torch.int64), "lm_head.weight": emb}


def _engine(address: str, key: str, into: dict, after=None) -> threading.Thread:
    """Rank 1 in a thread: join, then receive one sync into ``into`` (or the error)."""

    def run():
        try:
            group = open_group(address, key, 1, 2, "gloo", 10.0, bind_host="127.0.0.1")
            if after is not None:
                after(group)
            header, stream = receive(group)
            into["header"], into["tensors"] = header, {k: v.clone() for k, v in stream}
        except Exception as exc:  # noqa: BLE001 - the test reads it
            into["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_plan_groups_by_dtype_caps_buckets_and_sends_a_tied_tensor_once():
    buckets, aliases = plan(_state(), torch.bfloat16, bucket_bytes=8192)
    assert aliases == {"embed.weight": ["lm_head.weight"]}
    sent = [n for b in buckets for n in b.names]
    assert sorted(sent) == sorted(set(_state()) - {"lm_head.weight"})
    for b in buckets:
        assert b.dtype == (torch.int64 if b.names == ["steps"] else torch.bfloat16)  # ints keep their dtype
        assert b.numel * 2 <= 8192 or len(b.names) == 1  # a tensor larger than a bucket goes alone
    assert len(buckets) >= 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_sync_arrives_exactly_in_the_engine_dtype(dtype):
    state = _state()
    sender, got = Sender("127.0.0.1", timeout_s=10.0), {}
    engine = _engine(sender.address, "k1", got)
    assert sender.open([(0, "k1")], 2, "gloo", 10.0) == {0: "ok"}
    assert sender.send([0], state, version=5, dtype=dtype, bucket_bytes=4096) == {0: "ok"}
    engine.join(20)
    assert "error" not in got, got.get("error")
    assert got["header"]["version"] == 5 and len(got["header"]["buckets"]) > 3
    assert list(got["tensors"]) == ["embed.weight", "lm_head.weight", "layer.w", "layer.b", "big", "steps"]
    for name, t in state.items():
        want = t.to(dtype) if t.is_floating_point() else t
        assert got["tensors"][name].dtype == want.dtype and torch.equal(got["tensors"][name], want), name
    sender.close()


def test_a_dead_or_silent_engine_fails_its_slot_not_the_others():
    """Slot 0's engine leaves before the sync (its group closed): it fails at once. Slot 1 still gets
    everything. A slot whose engine never receives fails after the timeout, not later."""
    state = _state()
    sender = Sender("127.0.0.1", timeout_s=10.0)
    gone, ok = {}, {}
    _engine(sender.address, "a", gone, after=lambda g: (g.close(), 1 / 0))  # joins, then leaves
    second = _engine(sender.address, "b", ok)
    assert sender.open([(0, "a"), (1, "b")], 2, "gloo", 10.0) == {0: "ok", 1: "ok"}
    t0 = time.monotonic()
    status = sender.send([0, 1], state, version=1, dtype=torch.float32, bucket_bytes=4096)
    assert time.monotonic() - t0 < 5
    assert status[1] == "ok" and status[0] != "ok", status
    second.join(20)
    assert torch.equal(ok["tensors"]["big"], state["big"])
    assert set(sender.groups) == {1}  # the failed group is dropped: the next sync opens a new one

    silent = {}
    _engine(sender.address, "c", silent, after=lambda g: time.sleep(30))
    assert sender.open([(2, "c")], 2, "gloo", 2.0) == {2: "ok"}
    t0 = time.monotonic()
    status = sender.send([2], state, version=2, dtype=torch.float32, bucket_bytes=4096)
    assert status[2] != "ok" and 1.5 < time.monotonic() - t0 < 10, (status, time.monotonic() - t0)
    sender.close()


def test_joining_times_out_when_rank_0_never_comes():
    server = Sender("127.0.0.1")
    t0 = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - gloo's or the store's timeout error
        open_group(server.address, "nobody", 1, 2, "gloo", 2.0, bind_host="127.0.0.1")
    assert time.monotonic() - t0 < 10
