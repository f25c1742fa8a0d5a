"""The learner's side of the collective weight sync: the actor methods the driver calls on its ranks.

A mixin of ``Learner`` (``learner/worker.py`` holds the training step; this holds the export), so the
Ray actor has these methods while the module that trains stays one job. Rank 0 serves the rendezvous and
holds one group per engine (``weight_broadcast.Sender``); under FSDP every rank takes part in gathering
the full weights, and only rank 0 sends.
"""

from __future__ import annotations

from orchestrator import weight_broadcast
from orchestrator.learner import distributed as dist
from orchestrator.learner.checkpoint import resolve_dtype


class WeightSender:
    """Mixed into ``Learner``; uses its ``model``, ``sharded``, ``rank`` and ``_tied``."""

    _sender: weight_broadcast.Sender | None = None

    def sync_address(self) -> str:
        """``host:port`` that engines dial to join a weight-sync group (rank 0's node; served from the
        first call on, for the life of this actor)."""
        if self._sender is None:
            import ray

            self._sender = weight_broadcast.Sender(ray.util.get_node_ip_address())
        return self._sender.address

    def open_sync_groups(self, specs: list[tuple[int, str]], world_size: int, backend: str,
                         timeout_s: float) -> dict[int, str]:
        """Open one group per ``(engine slot, key)`` (rank 0); ``{slot: "ok" | the error}``."""
        self.sync_address()
        return self._sender.open([tuple(s) for s in specs], world_size, backend, timeout_s)

    def broadcast_weights(self, slots: list[int], version: int, dtype: str, bucket_mb: float) -> dict[int, str]:
        """Send the current weights, cast to the engines' ``dtype``, to the engines of ``slots``
        (``{slot: "ok" | the error}``; ``{}`` on ranks other than 0). A collective under FSDP: every rank
        calls it, the full weights are gathered to rank 0 (on its CPU), which sends them."""
        state = dist.full_model_state_dict(self.model, self.sharded)
        if self.rank != 0:
            return {}
        state = dict(state)
        if self._tied is not None:  # the output embedding is always sent (vllm-on-cpu.md: tied lm_head)
            out_key, in_key = self._tied
            if out_key not in state and in_key in state:
                state[out_key] = state[in_key]
        if self._sender is None:
            return {s: "no group" for s in slots}
        return self._sender.send(slots, state, version=version, dtype=resolve_dtype(dtype),
                                 bucket_bytes=max(1, int(bucket_mb * 2**20)))

    def close_sync_groups(self) -> None:
        if self._sender is not None:
            self._sender.close()
