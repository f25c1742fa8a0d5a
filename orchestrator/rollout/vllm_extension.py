"""The weight-sync entry points inside vLLM's worker, called by name: nothing is pickled.

``VllmEngine`` builds ``LLM(worker_extension_cls=EXTENSION)``. vLLM 0.32 resolves that class by name in
the worker's process and appends it to the worker class's bases (``vllm/v1/worker/worker_base.py``,
``WorkerWrapperBase.init_worker``), for the CPU worker (``CPUWorker``) and the GPU worker (``Worker``)
alike, in-process or in the engine's subprocess. ``llm.collective_rpc("budgetrl_...", args=...)`` then
runs the method by name (``vllm/v1/serial_utils.py``, ``run_method``: a ``str`` is looked up with
``getattr``). With the multiprocess engine the name, the arguments and the result cross to the engine
process through vLLM's msgpack encoder (``MsgpackEncoder.enc_hook``), which carries ``str``, numbers,
``bytes``, lists and dicts but refuses a function unless ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``, and
whose ``bin`` type stops at 4 GiB: so only such values go in and out, weights in chunks
(``budgetrl_stage_weights``) or over a collective (``budgetrl_receive_weights``). Every name has a
``budgetrl_`` prefix: vLLM asserts that no extension attribute shadows one of the worker's.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

EXTENSION = "orchestrator.rollout.vllm_extension.WeightSyncExtension"


def load_into_worker(worker, weights: Iterable[tuple[str, torch.Tensor]], inplace: bool = True) -> str:
    """Load new weights in place, no restart; returns the path taken: ``inplace`` (CPU,
    ``rollout/cpu_reload.py``) or ``reload_weights`` (vLLM's layerwise reload, which consumes ``weights``
    as a stream: on GPU one bucket at a time is held beside the model)."""
    if inplace and not torch.cuda.is_available():
        from .cpu_reload import load_inplace

        weights = dict(weights)
        if load_inplace(worker.get_model(), weights):
            return "inplace"
        weights = weights.items()
    worker.reload_weights(weights_iterator=iter(weights))
    return "reload_weights"


class WeightSyncExtension:
    """Methods vLLM adds to its worker; ``self`` is that worker (``get_model``, ``reload_weights``, ``rank``)."""

    def budgetrl_stage_weights(self, blob: bytes) -> int:
        """Keep one chunk of safetensors bytes (a multiprocess engine's load, under msgpack's 4 GiB) until
        ``budgetrl_load_weights(None)``; returns the tensors staged so far."""
        from safetensors.torch import load

        staged = self.__dict__.setdefault("_budgetrl_staged", {})
        staged.update(load(bytes(blob)))
        return len(staged)

    def budgetrl_load_weights(self, weights: dict | None = None, inplace: bool = True) -> str:
        """Load ``weights`` (a dict of tensors, in-process) or, given None, the staged chunks."""
        if weights is None:
            weights = self.__dict__.pop("_budgetrl_staged", {})
            if not weights:
                raise RuntimeError("budgetrl_load_weights(None): no weights were staged")
        return load_into_worker(self, weights.items(), inplace)

    def budgetrl_open_sync_group(self, address: str, key: str, world_size: int, backend: str, timeout_s: float,
                                 bind_host: str = "") -> int:
        """Join learner rank 0's group ``key`` (as rank 1 + this worker's rank); a previous group (of a
        learner that was replaced) is closed first. Returns this side's rank."""
        from .. import weight_broadcast

        self.budgetrl_close_sync_group()
        rank = 1 + int(getattr(self, "rank", 0) or 0)
        with _unpinned_nccl(backend):
            self._budgetrl_group = weight_broadcast.open_group(address, key, rank, world_size, backend, timeout_s,
                                                               bind_host=bind_host)
        return rank

    def budgetrl_receive_weights(self, inplace: bool = True) -> list:
        """Receive the next broadcast and load it; returns ``[policy version, load path]``."""
        from .. import weight_broadcast

        group = getattr(self, "_budgetrl_group", None)
        if group is None:
            raise RuntimeError("no weight-sync group: budgetrl_open_sync_group first")
        header, stream = weight_broadcast.receive(group)
        try:
            path = load_into_worker(self, stream, inplace)
            for _ in stream:  # a loader that stopped early: keep step with the sender
                pass
        except BaseException:
            self.budgetrl_close_sync_group()  # the sender sees a broken group and falls back
            raise
        return [int(header["version"]), path]

    def budgetrl_close_sync_group(self) -> bool:
        group = self.__dict__.pop("_budgetrl_group", None)
        if group is not None:
            group.close()
        return group is not None


def _unpinned_nccl(backend: str):
    """vLLM may pin NCCL variables for its own communicators; a communicator shared with the learner is
    created without them (``vllm/utils/nccl.py``, ``unpinned_nccl_env``), or NCCL can hang."""
    import contextlib

    if backend != "nccl":
        return contextlib.nullcontext()
    try:
        from vllm.utils.nccl import unpinned_nccl_env
    except ImportError:
        return contextlib.nullcontext()
    return unpinned_nccl_env()
