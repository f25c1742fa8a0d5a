"""Hugging Face checkpoints for the policy: load with safetensors only, save atomically.

Checkpoints are plain ``save_pretrained`` directories (tokenizer included) so vLLM, transformers and
Ray Serve load them unchanged; model state is never pickled. Above ``MAX_SHARD_SIZE`` the weights are
sharded with an index; ``orchestrator/checkpoint_files.py`` reads either layout.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch

from orchestrator.checkpoint_files import load_tensors, save_tensors, weight_files

log = logging.getLogger(__name__)
# The Hub's usual shard size (transformers' own default is 50GB): a 7B model in fp32 is 6 shards, a tensor is
# never split. Optimizer moments in a resumable state shard the same way.
MAX_SHARD_SIZE = "5GB"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map a config string ("bfloat16", "bf16", ...) to a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"dtype: unknown value {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def resolve_device(device: str | torch.device) -> torch.device:
    """ "auto" (or a bare "cuda"): this actor's GPU with its index (``cuda:0`` under Ray, which renumbers
    an actor's GPUs from 0), else the CPU; ``torch.cuda.set_device`` refuses a device without an index."""
    from orchestrator.devices import actor_device

    return actor_device(str(device))


def load_policy(model_path: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` from a local HF directory; tokenizer is None when the path has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if Path(model_path).is_dir():  # a missing shard fails here, named, not deep inside transformers
        weight_files(model_path)
    model = AutoModelForCausalLM.from_pretrained(
        model_path, dtype=resolve_dtype(dtype), use_safetensors=True
    ).to(resolve_device(device))
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError) as exc:  # a bare weights directory is still a usable policy
        log.warning("no tokenizer loaded from %s (%s); checkpoints will lack one", model_path, exc)
        tokenizer = None
    return model, tokenizer


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def save_hf_checkpoint(model, tokenizer, out_dir: str | os.PathLike, *, state_dict: dict | None = None,
                       architectures: list[str] | None = None, max_shard_size: int | str = MAX_SHARD_SIZE) -> str:
    """Write ``save_pretrained`` (safetensors, sharded above ``max_shard_size``) + tokenizer to ``out_dir``
    atomically; returns its path.

    ``state_dict`` saves gathered weights of a wrapped (FSDP) model; ``architectures`` keeps the
    config naming the HF class, not the wrapper's.

    The files go to a hidden sibling temp directory first and are renamed into place, so a crash never
    leaves a half-written checkpoint at ``out_dir``. An existing ``out_dir`` is replaced: it is moved
    aside, the new one renamed in, then the old one deleted (POSIX cannot rename over a non-empty dir).
    """
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp, state_dict=state_dict, max_shard_size=max_shard_size)
        if architectures:
            cfg_path = tmp / "config.json"
            cfg = json.loads(cfg_path.read_text())
            cfg["architectures"] = list(architectures)
            cfg_path.write_text(json.dumps(cfg, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _fsync_tree(tmp)
        old = None
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.rename(out, old)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return str(out)


# ---- resumable training state ------------------------------------------------------------------
# A state directory holds everything a killed run needs to continue: ``model/`` (a save_pretrained
# checkpoint of the policy), the optimizer moments as safetensors (sharded like the model above
# ``max_shard_size``) with their param groups as JSON,
# the learner's RNG and step counters as JSON, and the driver's ``trainer_state.json``, written last
# as the completion marker. Nothing is pickled.

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_GROUPS = "optimizer.json"
LEARNER_STATE = "learner.json"


def save_optimizer_state(osd: dict, out_dir: str | os.PathLike, max_shard_size: int | str = MAX_SHARD_SIZE) -> None:
    """Name-keyed optimizer state (``get_optimizer_state_dict`` layout) -> safetensors (sharded above
    ``max_shard_size``) + JSON."""
    tensors, scalars = {}, {}
    for fqn, state in osd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}::{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{fqn}::{key}"] = value
    out = Path(out_dir)
    save_tensors(tensors, out, OPTIMIZER_TENSORS, max_shard_size)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in osd["param_groups"]]
    (out / OPTIMIZER_GROUPS).write_text(json.dumps({"param_groups": groups, "scalars": scalars}))


def load_optimizer_state(state_dir: str | os.PathLike) -> dict:
    d = Path(state_dir)
    meta = json.loads((d / OPTIMIZER_GROUPS).read_text())
    state: dict[str, dict] = {}
    for name, t in load_tensors(d, OPTIMIZER_TENSORS).items():
        fqn, key = name.rsplit("::", 1)
        state.setdefault(fqn, {})[key] = t
    for name, v in meta["scalars"].items():
        fqn, key = name.rsplit("::", 1)
        state.setdefault(fqn, {})[key] = v
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}
