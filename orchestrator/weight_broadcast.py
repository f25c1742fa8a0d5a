"""Weights over a collective: learner rank 0 broadcasts them, in buckets, straight into an engine's process.

The object-store sync (``weight_sync.py``) moves the learner's export through Ray: every byte is
copied into plasma and, across nodes, pulled over the object manager. Here rank 0 and one engine share a
``torch.distributed`` group of their own, NCCL between GPUs and gloo otherwise (the same code: gloo is
how it is tested on CPUs), and the weights go from rank 0's buffers to the engine's in one broadcast
per bucket. No Ray here: rank 0's ``Sender`` lives in the learner actor (``learner/sync_sender.py``),
``open_group`` and ``receive`` run inside the engine (vLLM's worker, ``rollout/vllm_extension.py``).

Groups are standalone backend objects (``ProcessGroupGloo``/``ProcessGroupNCCL`` over a ``PrefixStore``
of one ``TCPStore`` that rank 0 serves), built as torch's own ``_new_process_group_helper`` builds them
(torch 2.13, ``distributed_c10d.py``), so they never touch the default group that the learner's ranks, or
vLLM's workers, already hold. Every operation has a timeout: a dead peer fails a broadcast at once
(gloo: "Connection closed by peer"), a stuck one after ``timeout_s``.

Wire format of one sync: an int64 byte count, a JSON header (policy version, buckets, aliases), then
each bucket: one flat 1-D tensor of one dtype, its tensors end to end in the header's order, at most
``bucket_bytes`` long (a larger tensor gets a bucket of its own). Floating-point tensors travel in the
engine's dtype (cast while the bucket is filled); a tensor tied to another (the output embedding)
travels once and is named in ``aliases``. Both sides keep two buckets in flight: rank 0 fills the next
while the last is on the wire, the engine posts the next receive before it loads the last.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")


@dataclass
class Group:
    """One side's handle on a group: the backend, this side's rank, the device its buffers live on."""

    backend: object
    rank: int
    world_size: int
    device: torch.device
    timeout_s: float
    key: str
    store: object = None  # a client's TCPStore, kept alive with the group

    def broadcast(self, tensor: torch.Tensor):
        """Start a broadcast from rank 0 (returns the work to ``wait`` on)."""
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        opts.timeout = _dt.timedelta(seconds=self.timeout_s)
        if self.backend is None:
            raise RuntimeError(f"weight-sync group {self.key} is closed")
        return self.backend.broadcast([tensor], opts)

    def wait(self, work) -> None:
        """Block until ``work`` is done; raises after ``timeout_s`` (NCCL too: with a timeout its wait
        blocks the CPU thread, ``Work.wait``'s docstring, torch 2.13)."""
        work.wait(_dt.timedelta(seconds=self.timeout_s))

    def close(self) -> None:
        """Release the group: aborted (NCCL: ``ncclCommAbort``, which never waits on a peer that may be dead;
        nothing is in flight between syncs) and dropped: the backend's destructor closes the connections,
        which is what fails the peer's next broadcast at once (gloo's ``abort``/``shutdown`` alone leave
        them open until the timeout)."""
        backend, self.backend = self.backend, None
        if backend is None:
            return
        try:
            backend.abort()
        except Exception:  # noqa: BLE001 - a backend without the call, or one already torn down
            pass


def open_group(address: str, key: str, rank: int, world_size: int, backend: str, timeout_s: float, *,
               store=None, bind_host: str = "") -> Group:
    """Join group ``key`` at rank 0's rendezvous ``address`` (``host:port``); rank 0 passes its server
    ``store``. Returns when every rank has joined, or raises after ``timeout_s``. ``bind_host``: the
    address gloo listens on (this node's IP; default: what the host name resolves to)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown value {backend!r}; expected one of {BACKENDS}")
    timeout = _dt.timedelta(seconds=timeout_s)
    if store is None:
        host, port = address.rsplit(":", 1)
        store = dist.TCPStore(host, int(port), is_master=False, timeout=timeout)
    prefixed = dist.PrefixStore(f"budgetrl-sync/{key}/", store)
    if backend == "gloo":
        opts = dist.ProcessGroupGloo._Options()
        opts._timeout = timeout
        gloo = dist.ProcessGroupGloo
        opts._devices = [gloo.create_device(hostname=bind_host) if bind_host else gloo.create_default_device()]
        pg = gloo(prefixed, rank, world_size, opts)  # connects every pair now
        return Group(pg, rank, world_size, torch.device("cpu"), timeout_s, key, store)
    device = torch.device("cuda", torch.cuda.current_device())
    opts = dist.ProcessGroupNCCL.Options()
    opts.is_high_priority_stream = False
    # Twice ours: a stuck broadcast raises in Group.wait and is aborted before NCCL's watchdog acts on
    # its own timeout (which, with TORCH_NCCL_ASYNC_ERROR_HANDLING's default, tears the process down).
    opts._timeout = 2 * timeout
    opts.group_name = f"budgetrl-sync-{key}"
    pg = dist.ProcessGroupNCCL(prefixed, rank, world_size, opts)
    pg.eager_connect_single_device(device)  # the communicator now, not at the first broadcast
    return Group(pg, rank, world_size, device, timeout_s, key, store)


# ---------------------------------------------------------------------------------------------- plan


@dataclass
class _Bucket:
    dtype: torch.dtype
    names: list[str] = field(default_factory=list)
    shapes: list[list[int]] = field(default_factory=list)
    tensors: list[torch.Tensor] = field(default_factory=list)
    numel: int = 0


def plan(state: Mapping[str, torch.Tensor], dtype: torch.dtype, bucket_bytes: int
         ) -> tuple[list[_Bucket], dict[str, list[str]]]:
    """Buckets (one dtype each, filled in ``state``'s order) and aliases (name sent -> tied names)."""
    seen: dict[tuple, str] = {}
    aliases: dict[str, list[str]] = {}
    buckets: list[_Bucket] = []
    open_: dict[torch.dtype, _Bucket] = {}
    for name, t in state.items():
        key = (t.device, t.data_ptr(), tuple(t.shape), t.dtype)
        if key in seen and t.numel():
            aliases.setdefault(seen[key], []).append(name)
            continue
        seen[key] = name
        wire = dtype if t.is_floating_point() else t.dtype
        size = wire.itemsize
        b = open_.get(wire)
        if b is None or (b.numel and (b.numel + t.numel()) * size > bucket_bytes):
            b = open_[wire] = _Bucket(wire)
            buckets.append(b)
        b.names.append(name)
        b.shapes.append(list(t.shape))
        b.tensors.append(t)
        b.numel += t.numel()
    return buckets, aliases


def _header(buckets: list[_Bucket], aliases: dict[str, list[str]], version: int) -> bytes:
    return json.dumps({"version": version, "aliases": aliases, "buckets": [
        {"dtype": str(b.dtype).removeprefix("torch."), "numel": b.numel, "tensors": list(zip(b.names, b.shapes))}
        for b in buckets]}).encode()


# ---------------------------------------------------------------------------------------------- rank 0


class Sender:
    """Rank 0's side: a ``TCPStore`` server every engine dials (``address``), one group per engine slot."""

    def __init__(self, host: str, timeout_s: float = 120.0):
        self.host = host
        self.store = dist.TCPStore(host, 0, is_master=True, wait_for_workers=False,
                                   timeout=_dt.timedelta(seconds=timeout_s))
        self.groups: dict[int, Group] = {}

    @property
    def address(self) -> str:
        return f"{self.host}:{self.store.port}"

    def open(self, specs: list[tuple[int, str]], world_size: int, backend: str, timeout_s: float) -> dict[int, str]:
        """Open a group per ``(slot, key)``, all at once (each waits for its engine); a slot's old group
        is closed first. Returns ``{slot: "ok" | the error}``."""
        self.close([slot for slot, _ in specs])
        out: dict[int, str] = {}
        with ThreadPoolExecutor(max(1, len(specs))) as pool:
            futures = {slot: pool.submit(open_group, self.address, key, 0, world_size, backend, timeout_s,
                                         store=self.store, bind_host=self.host) for slot, key in specs}
            for slot, fut in futures.items():
                try:
                    self.groups[slot] = fut.result()
                    out[slot] = "ok"
                except Exception as exc:  # noqa: BLE001 - reported per slot; the caller falls back
                    out[slot] = f"{type(exc).__name__}: {exc}"
        return out

    def close(self, slots: list[int] | None = None) -> None:
        for slot in list(self.groups) if slots is None else slots:
            group = self.groups.pop(slot, None)
            if group is not None:
                group.close()

    def send(self, slots: list[int], state: Mapping[str, torch.Tensor], *, version: int, dtype: torch.dtype,
             bucket_bytes: int) -> dict[int, str]:
        """Broadcast ``state`` to the engines of ``slots``; ``{slot: "ok" | the error}``. A slot that fails
        is dropped (its group closed) and the others go on."""
        status = {s: "no group" for s in slots if s not in self.groups}
        live = {s: self.groups[s] for s in slots if s in self.groups}
        if not live:
            return status
        device = next(iter(live.values())).device
        buckets, aliases = plan(state, dtype, bucket_bytes)

        def start(tensor: torch.Tensor) -> dict:
            works = {}
            for s, g in list(live.items()):
                try:
                    works[s] = g.broadcast(tensor)
                except Exception as exc:  # noqa: BLE001
                    _drop(s, exc)
            return works

        def finish(works: dict) -> None:
            for s, work in works.items():
                if s in live:
                    try:
                        live[s].wait(work)
                    except Exception as exc:  # noqa: BLE001
                        _drop(s, exc)

        def _drop(s: int, exc: BaseException) -> None:
            status[s] = f"{type(exc).__name__}: {exc}"
            live.pop(s)
            self.close([s])

        blob = _header(buckets, aliases, version)
        finish(start(torch.tensor([len(blob)], dtype=torch.int64, device=device)))
        finish(start(torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)))
        pending: tuple[torch.Tensor, dict] | None = None
        for b in buckets:
            if not live:
                break
            flat = torch.empty(b.numel, dtype=b.dtype, device=device)
            offset = 0
            for t in b.tensors:  # cast to the wire dtype while copying
                flat[offset:offset + t.numel()].copy_(t.reshape(-1))
                offset += t.numel()
            if pending is not None:
                finish(pending[1])
            pending = (flat, start(flat))
        if pending is not None:
            finish(pending[1])
        status.update({s: "ok" for s in live})
        return status


# ---------------------------------------------------------------------------------------------- engines


def receive(group: Group) -> tuple[dict, Iterator[tuple[str, torch.Tensor]]]:
    """(header, stream): the header of the next sync, and its tensors as ``(name, tensor)`` (an alias right
    after the tensor it names). The stream receives bucket by bucket as it is read; its tensors are views
    of the received buckets (read-only by contract: loaders copy from them). Read it to the end."""
    n = torch.empty(1, dtype=torch.int64, device=group.device)
    group.wait(group.broadcast(n))
    blob = torch.empty(int(n.item()), dtype=torch.uint8, device=group.device)
    group.wait(group.broadcast(blob))
    header = json.loads(bytes(blob.cpu().numpy()))
    return header, _stream(group, header)


def _stream(group: Group, header: dict) -> Iterator[tuple[str, torch.Tensor]]:
    aliases = header["aliases"]
    buckets = header["buckets"]

    def post(b: dict):
        flat = torch.empty(b["numel"], dtype=getattr(torch, b["dtype"]), device=group.device)
        return flat, group.broadcast(flat)

    pending = post(buckets[0]) if buckets else None
    for i, b in enumerate(buckets):
        flat, work = pending
        group.wait(work)
        pending = post(buckets[i + 1]) if i + 1 < len(buckets) else None
        offset = 0
        for name, shape in b["tensors"]:
            n = math.prod(shape)
            t = flat[offset:offset + n].view(shape)
            offset += n
            yield name, t
            for alias in aliases.get(name, ()):
                yield alias, t
