"""The collective weight sync between two devices, torch only: what NCCL has to show on a GPU machine.

Two processes, as learner rank 0 and one engine (``orchestrator/weight_broadcast.py``, the code the
trainer runs): rank 0 holds fp32 weights of a Qwen2-like shape on its device and sends them in the
engine's dtype; the engine checks every byte against rank 0's own cast (a SHA-256 of each tensor).
Then the failure path: the engine joins a second group and never receives; rank 0's send must fail
within the timeout and rank 0 must still be alive well after twice the timeout (NCCL's watchdog, whose
default is to tear the process down, never acts: the broadcast is aborted first). Prints one line
per check (PASS/FAIL with figures); exit 0 when both pass.

    python scripts/sync_check.py                                   # NCCL, cuda:0 -> cuda:1 (2 GPUs)
    python scripts/sync_check.py --backend gloo --params 2e6       # the same on CPUs (gloo)
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _state(params: float, device) -> dict:
    """fp32 weights: an embedding, then layers of four square matrices and a norm, about ``params`` in all."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    hidden = 1024
    state = {"model.embed_tokens.weight": torch.randn(8192, hidden, generator=g)}
    layer = 0
    while sum(t.numel() for t in state.values()) < params:
        for part in ("q", "k", "v", "o"):
            state[f"model.layers.{layer}.{part}.weight"] = torch.randn(hidden, hidden, generator=g)
        state[f"model.layers.{layer}.norm.weight"] = torch.ones(hidden)
        layer += 1
    state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied: travels once
    return {k: v.to(device) for k, v in state.items()}


def _digest(t) -> str:
    import torch

    return hashlib.sha256(t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()).hexdigest()


def engine(address: str, args, results) -> None:
    """Rank 1: receive one sync and report digests; then join the silent group and sleep."""
    import torch

    from orchestrator.weight_broadcast import open_group, receive

    if args.backend == "nccl":
        torch.cuda.set_device(1)
    group = open_group(address, "check", 1, 2, args.backend, 120.0, bind_host="127.0.0.1")  # rank 0 starts us
    header, stream = receive(group)
    results.put({name: _digest(t) for name, t in stream})
    silent = open_group(address, "silent", 1, 2, args.backend, args.timeout, bind_host="127.0.0.1")
    time.sleep(3 * args.timeout + 10)  # joined, never receiving (dropping the group would close its connections)
    silent.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["nccl", "gloo"], default="nccl")
    ap.add_argument("--params", type=float, default=5e8, help="parameters sent (default 500M: 1 GB in bf16)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--timeout", type=float, default=10.0)
    args = ap.parse_args()
    import torch
    import torch.multiprocessing as mp

    from orchestrator.weight_broadcast import Sender

    if args.backend == "nccl":
        if torch.cuda.device_count() < 2:
            print(f"SKIP sync-nccl: {torch.cuda.device_count()} CUDA device(s); rank 0 and an engine need one each")
            return 0
        torch.cuda.set_device(0)
    device = torch.device("cuda", 0) if args.backend == "nccl" else torch.device("cpu")
    dtype = getattr(torch, args.dtype)
    state = _state(args.params, device)
    sender = Sender("127.0.0.1", timeout_s=args.timeout)
    results = mp.get_context("spawn").Queue()
    proc = mp.get_context("spawn").Process(target=engine, args=(sender.address, args, results), daemon=True)
    proc.start()
    assert sender.open([(0, "check")], 2, args.backend, 120.0) == {0: "ok"}  # the engine's process is starting
    t0 = time.perf_counter()
    status = sender.send([0], state, version=1, dtype=dtype, bucket_bytes=int(args.bucket_mb * 2**20))
    if args.backend == "nccl":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    got = results.get(timeout=600)
    want = {k: _digest(v.to(dtype)) for k, v in state.items()}
    nbytes = sum(v.numel() for k, v in state.items() if k != "lm_head.weight") * dtype.itemsize
    ok = status == {0: "ok"} and got == want
    print(f"{'PASS' if ok else 'FAIL'} sync-{args.backend}: {nbytes / 1e9:.2f} GB in {args.dtype}, {seconds:.3f} s "
          f"({nbytes / seconds / 1e9:.2f} GB/s, first sync, connection included), every byte equal: {got == want}",
          flush=True)

    assert sender.open([(1, "silent")], 2, args.backend, args.timeout) == {1: "ok"}
    t0 = time.perf_counter()
    status = sender.send([1], state, version=2, dtype=dtype, bucket_bytes=int(args.bucket_mb * 2**20))
    failed_after = time.perf_counter() - t0
    time.sleep(2 * args.timeout + 5)  # NCCL's own timeout is twice ours: its watchdog would have acted by now
    silent_ok = status[1] != "ok" and failed_after < 3 * args.timeout
    print(f"{'PASS' if silent_ok else 'FAIL'} sync-timeout-{args.backend}: a silent engine failed the send after "
          f"{failed_after:.1f} s (timeout {args.timeout:g} s): {status[1][:120]}; rank 0 still alive "
          f"{2 * args.timeout + 5:g} s later", flush=True)
    proc.kill()
    return 0 if ok and silent_ok else 1


if __name__ == "__main__":
    sys.exit(main())
