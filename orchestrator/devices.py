"""Devices: the torch device an actor computes on.

Under Ray a GPU actor sees its GPU(s) through ``CUDA_VISIBLE_DEVICES`` renumbered from 0, so its device
is ``cuda:0``, not the bare ``cuda`` that ``torch.cuda.set_device`` refuses ("Expected a torch.device
with a specified index"), which every multi-rank GPU run would hit in ``init_process_group``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

AUTO = "auto"

def cuda_index(gpu_ids: Sequence[int | str], visible_devices: str | None) -> int:
    """The torch index of an actor's first GPU.

    ``gpu_ids``: what ``ray.get_gpu_ids()`` returns (ids in the node's numbering; empty outside a GPU
    actor). Ray sets ``CUDA_VISIBLE_DEVICES`` to them, so torch numbers them from 0 in that order; with
    ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` it leaves the variable alone and the id is the index.
    """
    if not gpu_ids:
        return 0  # no Ray assignment: the first visible GPU, what a bare "cuda" meant
    ids = [str(i) for i in gpu_ids]
    if not visible_devices:
        try:
            return min(int(i) for i in ids)
        except ValueError:
            raise RuntimeError(f"Ray assigned GPUs {ids} but CUDA_VISIBLE_DEVICES is not set") from None
    visible = [v.strip() for v in visible_devices.split(",")]
    positions = [visible.index(i) for i in ids if i in visible]
    if not positions:
        raise RuntimeError(f"Ray assigned GPUs {ids}, which CUDA_VISIBLE_DEVICES={visible_devices!r} does not list")
    return min(positions)


def actor_device(requested: str = AUTO):
    """The torch device of this process: ``cuda:N`` from Ray's assignment when CUDA is available
    (``auto``, or a bare ``cuda``), else the CPU; an explicit ``cuda:N`` or ``cpu`` as given."""
    import torch

    requested = str(requested)
    if requested not in (AUTO, "cuda"):
        return torch.device(requested)
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise RuntimeError("device 'cuda' requested but torch sees no CUDA device")
        return torch.device("cpu")
    ray = sys.modules.get("ray")  # a Ray worker has it imported; a bare process (learner_mfu.py) may lack Ray
    gpu_ids = ray.get_gpu_ids() if ray is not None and ray.is_initialized() else []
    return torch.device("cuda", cuda_index(gpu_ids, os.environ.get("CUDA_VISIBLE_DEVICES")))
