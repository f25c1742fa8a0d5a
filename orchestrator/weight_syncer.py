"""The driver's side of the weight sync: after each learner step, every engine gets the new weights.

Two methods (``rollout.weight_sync.method``; ``auto`` resolved in the driver, ``devices.py``):

- ``object_store``: the learner exports its weights with the step, in the engines' dtype, as one object
  (``weight_sync.py``) that every rollout worker reads and loads in place.
- ``collective``: once the step is done and the workers are free, learner rank 0 broadcasts the weights
  in the engines' dtype, in buckets, over a group it shares with each engine (``weight_broadcast.py``:
  NCCL on GPUs, gloo otherwise), and each engine loads them in place as they arrive (vLLM's worker:
  ``rollout/vllm_extension.py``).

Topology: one group per engine (rank 0 plus that engine's workers), not one group for all. A group is
opened when its engine needs one (the first sync, a replaced worker, a rebuilt learner: the syncer sees
that the actor it opened the group with is not the one there now), and only those two actors take part,
so a new worker joins without stopping or rebuilding the others, and an engine that cannot join changes
nothing for them (OpenRLHF's ``WorkerWrap.init_process_group`` and vLLM's own NCCL weight-transfer engine
open one group of rank 0 and every engine, with rank offsets, which must all be rebuilt together). The price: rank 0 sends each bucket once per engine (the broadcasts run side by
side), where one group could pipeline a single NCCL broadcast through every engine. With many engines
behind one NIC that is the change to make.

Failures never hang the driver and never lose a sync: joining a group and every broadcast on either
side time out after ``rollout.weight_sync.timeout_s`` (a dead peer fails at once); an engine whose
collective fails gets this sync through the object store and a new group at the next one; a worker that
died raises Ray's actor error for the trainer to replace it (``_Run._on_rollouts``), after the live ones
have their weights; a learner that died raises it for the trainer to rebuild the learner group.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import ray

from .config import Config
from .runtime import ACTOR_LOST


@dataclass
class Pending:
    """A sync under way (``WeightSyncer.start``), for ``finish`` to wait on."""

    version: int
    weights: object = None  # the object-store payload's ref, once one is used
    broadcast: list = field(default_factory=list)  # the learner ranks' broadcast refs, rank 0's first
    received: dict = field(default_factory=dict)  # worker slot -> receive_weights ref
    loaded: dict = field(default_factory=dict)  # worker slot -> update_weights ref


class WeightSyncer:
    """Sends the learner's weights to the rollout workers of a ``WorkerGroup`` (whose actors may be replaced)."""

    def __init__(self, cfg: Config, group, log: Callable[[str], None] = print):
        r, ws = cfg.rollout, cfg.rollout.weight_sync
        self.method, self.bucket_mb, self.timeout_s = ws.method, ws.bucket_mb, ws.timeout_s
        self.group, self.log = group, log
        # NCCL between GPUs of their own (it refuses two ranks on one GPU, which fractions allow); else gloo.
        self.backend = "nccl" if min(r.gpus_per_worker, cfg.learner.gpus_per_worker) >= 1 else "gloo"
        self.world_size = 1 + (r.vllm.tensor_parallel_size if r.engine == "vllm" else 1)  # rank 0 + the engine's
        self._keys = itertools.count(1)
        self._lead = None  # the learner rank 0 that the open groups belong to
        self._address = ""
        self._joined: dict[int, object] = {}  # slot -> the worker actor its group was opened with

    @property
    def with_step(self) -> bool:
        """True when the learner exports the weights with its step (object store), False when they are
        sent after it (collective: both sides must be free, or a broadcast would wait on a busy engine)."""
        return self.method == "object_store"

    def start(self, version: int, weights=None, slots: Iterable[int] | None = None) -> Pending:
        """Start sending the learner's current weights (``version``) to the workers of ``slots`` (all by
        default); ``weights``: an object-store payload ref already exported (``submit_step``)."""
        slots = list(range(len(self.group.rollout))) if slots is None else list(slots)
        p = Pending(version, weights)
        if self.method == "collective":
            joined = self._join(slots)
            if joined:
                p.received = {i: self.group.rollout[i].receive_weights.remote(version) for i in joined}
                p.broadcast = self.group.learner.broadcast_weights(joined, version, self.bucket_mb)
            slots = [i for i in slots if i not in joined]
        if slots:
            self._load(p, slots)
        return p

    def finish(self, p: Pending) -> None:
        """Wait for ``p``. An engine whose collective failed gets the weights through the object store;
        raises Ray's actor error when the learner, or a worker, died."""
        try:
            status = ray.get(p.broadcast)[0] if p.broadcast else {}  # a dead learner raises here
        except ray.exceptions.RayTaskError as exc:  # it raised instead: its engines time out and fall back
            status = {i: _short(exc) for i in p.received}
        failed, lost = [], None
        for i, ref in p.received.items():
            try:
                ray.get(ref)
            except ACTOR_LOST as exc:
                self._joined.pop(i, None)
                lost = exc
                continue
            except ray.exceptions.RayTaskError as exc:
                failed.append(i)
                self._joined.pop(i, None)
                self.log(f"weight sync: the broadcast to rollout worker {i} failed ({_short(exc)}; learner: "
                         f"{status.get(i, '?')}); it gets this sync through the object store, a new group next time")
                continue
            if status.get(i) != "ok":  # the worker has the weights; the learner dropped the group
                self._joined.pop(i, None)
        if failed:
            self._load(p, failed)
        try:
            ray.get(list(p.loaded.values()))
        except ACTOR_LOST as exc:
            lost = lost or exc
        if lost is not None:
            raise lost

    # ---- internals --------------------------------------------------------------------------------

    def _load(self, p: Pending, slots: list[int]) -> None:
        """The object-store way, for ``slots``."""
        if p.weights is None:
            p.weights = self.group.learner.get_weights()
        p.loaded.update({i: self.group.rollout[i].update_weights.remote(p.weights, p.version) for i in slots})

    def _join(self, slots: list[int]) -> list[int]:
        """The slots whose engines share a live group with learner rank 0, opening the groups missing."""
        lead = self.group.learner.lead
        if lead is not self._lead:  # a new learner: a new rendezvous, none of the old groups
            self._address = ray.get(lead.sync_address.remote())
            self._lead, self._joined = lead, {}
        need = [i for i in slots if self._joined.get(i) is not self.group.rollout[i]]
        if need:
            specs = [(i, f"{i}.{next(self._keys)}") for i in need]
            joins = {i: self.group.rollout[i].open_sync_group.remote(
                self._address, key, self.world_size, self.backend, self.timeout_s) for i, key in specs}
            status = ray.get(lead.open_sync_groups.remote(specs, self.world_size, self.backend, self.timeout_s))
            for i, ref in joins.items():
                try:
                    ray.get(ref)  # a worker that died raises its actor error: the caller replaces it
                except ray.exceptions.RayTaskError as exc:
                    status[i] = _short(exc)
                if status.get(i) == "ok":
                    self._joined[i] = self.group.rollout[i]
                else:
                    self.log(f"weight sync: rollout worker {i} could not join learner rank 0's group "
                             f"({status.get(i)}); it gets this sync through the object store")
        return [i for i in slots if i in self._joined]


def _short(exc: BaseException) -> str:
    """The last line of an actor's error (Ray's carry the remote traceback)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else type(exc).__name__
