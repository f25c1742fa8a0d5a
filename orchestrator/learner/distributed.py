"""Data-parallel plumbing for learner ranks: process group, gradient reduction, FSDP, full state dicts.

Ranks are Ray actors; rank 0's node hosts the TCP rendezvous (``rendezvous_address`` runs there).
Two strategies, one loss code path:
- ``ddp``: every rank holds the whole model; gradients are all-reduced (SUM) in one flat bucket.
  Gloo on CPU, NCCL on GPU.
- ``fsdp``: FSDP2 ``fully_shard`` per decoder layer and at the root; FSDP reduce-scatters gradients
  itself (as a mean, so the loss is scaled by the world size to keep SUM semantics).
Loss denominators are global token/sequence counts (``all_reduce`` of the counts), so the reduced
gradient equals the single-process gradient on the whole batch.
"""

from __future__ import annotations

import datetime as _dt
import socket

import torch
import torch.distributed as dist

STRATEGIES = ("auto", "ddp", "fsdp")


def rendezvous_address() -> str:
    """``tcp://IP:PORT`` on this node with a port free right now (run inside rank 0's bundle)."""
    import ray

    ip = ray.util.get_node_ip_address()
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{ip}:{port}"


def local_rendezvous() -> str:
    """``tcp://127.0.0.1:PORT`` with a port free right now: a one-process group (one-rank FSDP2)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def resolve_strategy(strategy: str, device: torch.device, world_size: int) -> str:
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: unknown value {strategy!r}; expected one of {STRATEGIES}")
    if world_size == 1:
        return "single"
    if strategy == "auto":
        return "fsdp" if device.type == "cuda" else "ddp"
    return strategy


def init_process_group(init_method: str, rank: int, world_size: int, device: torch.device,
                       timeout_s: float = 600.0) -> None:
    """Join the learner group: NCCL on CUDA, gloo otherwise."""
    if dist.is_initialized():
        return
    if device.type == "cuda":
        if device.index is None:  # torch.cuda.set_device raises "Expected a torch.device with a specified index"
            raise ValueError(f"device {device}: a rank needs its GPU's index (orchestrator.devices.actor_device)")
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=_dt.timedelta(seconds=timeout_s))


def broadcast_parameters(model: torch.nn.Module) -> None:
    """Make every rank start from rank 0's weights (they load the same files; this guards drift)."""
    for t in list(model.parameters()) + list(model.buffers()):
        dist.broadcast(t.data, src=0)


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """SUM of a few scalars over ranks, in one collective."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """SUM gradients over ranks in one flat bucket; a rank without a gradient contributes zeros."""
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks of a HF causal LM (``model.model.layers`` and the like)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
        except AttributeError:
            continue
        return list(obj)
    raise ValueError(f"fsdp: cannot find the decoder layers of {type(model).__name__}")


def shard_fsdp(model: torch.nn.Module, compute_dtype: torch.dtype) -> torch.nn.Module:
    """FSDP2: shard each decoder layer and the root; fp32 masters, ``compute_dtype`` in forward."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = None
    if compute_dtype != torch.float32:
        mp = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    kwargs = {"mp_policy": mp} if mp is not None else {}
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    return model


def load_from_rank0(model: torch.nn.Module, full: dict[str, torch.Tensor]) -> None:
    """Every rank's shards of ``model`` from rank 0's full (CPU) state dict ``full`` (other ranks pass ``{}``):
    a broadcast, tensor by tensor, over the group's device (``set_model_state_dict(broadcast_from_rank0)``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True,
                                                               strict=False))


def full_model_state_dict(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """Unsharded CPU state dict (collective under FSDP: every rank calls; rank 0 gets the tensors)."""
    if not sharded:
        return model.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state_dict(model, optimizer, sharded: bool) -> dict:
    """Optimizer state keyed by parameter name (FQN), unsharded on CPU; collective under FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    if not sharded:  # local: map the optimizer's parameter indices to names
        names = {id(p): n for n, p in model.named_parameters()}
        flat = [p for g in optimizer.param_groups for p in g["params"]]
        sd = optimizer.state_dict()
        state = {names[id(flat[i])]: {k: (v.detach().cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
                 for i, st in sd["state"].items()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(flat[i])] for i in g["params"]]}
                  for g in sd["param_groups"]]
        return {"state": state, "param_groups": groups}

    return get_optimizer_state_dict(model, optimizer,
                                    options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state_dict(model, optimizer, osd: dict, sharded: bool) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if not sharded:
        names = {id(p): n for n, p in model.named_parameters()}
        flat = [p for g in optimizer.param_groups for p in g["params"]]
        index = {names[id(p)]: i for i, p in enumerate(flat)}
        missing = sorted(set(index) - set(osd["state"]))
        if missing:
            raise ValueError(f"optimizer state: no moments for parameter(s) {missing[:5]}")
        groups, params = [], iter(range(len(flat)))
        for g, saved in zip(optimizer.param_groups, osd["param_groups"]):
            groups.append({**{k: v for k, v in saved.items() if k != "params"},
                           "params": [next(params) for _ in g["params"]]})
        optimizer.load_state_dict({"state": {index[n]: st for n, st in osd["state"].items() if n in index},
                                   "param_groups": groups})
        return

    set_optimizer_state_dict(model, optimizer, osd,
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))


def load_full_model_state_dict(model, sd: dict[str, torch.Tensor], sharded: bool) -> None:
    if not sharded:
        missing, unexpected = model.load_state_dict(sd, strict=False)
        real_missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if real_missing or unexpected:
            raise ValueError(f"state dict mismatch: missing {real_missing[:5]}, unexpected {unexpected[:5]}")
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, strict=False))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
