"""How the learner's policy and KL reference reach their device without wasting its memory.

The policy is loaded on the CPU in fp32 (its master weights). Sharded (FSDP2), it never exists whole on
the accelerator: ``fully_shard`` moves each decoder layer's parameters to the device as it shards that
layer, and rank 0's weights are then loaded into every rank's shards (a broadcast, as ranks may read
different copies of the files). Unsharded, the model moves to the device whole (each rank holds it all
anyway), then rank 0's weights are broadcast. The frozen reference is a copy cast straight to the
compute dtype (bf16 when the learner computes in bf16): never a second fp32 model.

Activation checkpointing per decoder layer uses torch's composable ``checkpoint`` (non-reentrant), applied
before ``fully_shard`` as torch's own FSDP2 tests do (``torch/testing/_internal/common_fsdp.py``). FSDP2's
forward hooks are prepended/appended around it (``_fsdp_state.py``: ``prepend=True`` pre-hook), and its
``_pre_forward`` re-gathers the parameters when the recomputation runs in backward (the
``TrainingState.PRE_BACKWARD`` branch). Two alternatives do not fit this learner: Hugging Face's
``gradient_checkpointing_enable`` checkpoints only in training mode (``GradientCheckpointingLayer``:
``self.gradient_checkpointing and self.training``) and the learner keeps its model in eval mode (no
dropout, ratio exactly 1); ``checkpoint_wrapper`` inserts ``_checkpoint_wrapped_module`` into parameter
names, which the unsharded optimizer state (saved by parameter name) would then carry.
"""

from __future__ import annotations

import copy

import torch

from orchestrator.learner import distributed as dist


def frozen_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``model`` with every parameter cast to ``dtype`` and frozen, built without an intermediate
    full-precision copy (the casts are made first and handed to ``deepcopy``); tied weights stay tied.

    Buffers keep their dtype. The rotary frequencies (``inv_freq``) rounded to bf16, as ``.to(bfloat16)``
    on the whole model did before, move the reference's rotary angles away from the policy's by up to 2.3
    radians at position 2000 (Qwen2.5: head 128, theta 1e6)."""
    memo: dict[int, object] = {}
    for p in model.parameters():  # a tied parameter appears once
        memo[id(p)] = torch.nn.Parameter(p.detach().to(dtype=dtype, copy=True), requires_grad=False)
    ref = copy.deepcopy(model, memo)
    return ref.requires_grad_(False).eval()


def checkpoint_layers(model: torch.nn.Module) -> int:
    """Recompute each decoder layer's activations in backward instead of keeping them; returns the layer count.

    Parameter names and the module tree are unchanged (state dicts, optimizer state and checkpoints read
    the same with or without it). Under ``torch.no_grad`` the layers run as usual."""
    from torch.distributed._composable import checkpoint

    layers = dist.decoder_layers(model)
    for layer in layers:
        checkpoint(layer)
    return len(layers)


def place_models(policy: torch.nn.Module, *, device: torch.device, sharded: bool, compute_dtype: torch.dtype,
                 reference: bool, checkpointing: bool, world_size: int, rank: int):
    """(policy, reference or None) on ``device``: the CPU-loaded fp32 ``policy`` sharded or moved whole."""
    if not sharded:
        policy.to(device)
        if world_size > 1:
            dist.broadcast_parameters(policy)
        ref = frozen_copy(policy, compute_dtype) if reference else None
        if checkpointing:
            checkpoint_layers(policy)
        return policy, ref
    ref = frozen_copy(policy, compute_dtype) if reference else None  # on the CPU, before any hook
    if checkpointing:
        checkpoint_layers(policy)
    for model in (policy, ref):
        if model is None:
            continue
        # Rank 0's CPU tensors outlive the move to the device (the state dict holds them) for the broadcast.
        full = model.state_dict() if world_size > 1 and rank == 0 else {}
        dist.shard_fsdp(model, compute_dtype)
        if world_size > 1:
            dist.load_from_rank0(model, full)
        del full
    return policy, ref
