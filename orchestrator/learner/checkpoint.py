"""Hugging Face checkpoints for the policy: load with safetensors only, save atomically.

Checkpoints are plain ``save_pretrained`` directories (tokenizer included) so vLLM, transformers and
Ray Serve load them unchanged; model state is never pickled.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from pathlib import Path

import torch

log = logging.getLogger(__name__)

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
    """ "auto" means the first CUDA device when there is one, else the CPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_policy(model_path: str, dtype: str | torch.dtype = "float32", device: str | torch.device = "cpu"):
    """Load ``(model, tokenizer)`` from a local HF directory; tokenizer is None when the path has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

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


def save_hf_checkpoint(model, tokenizer, out_dir: str | os.PathLike) -> str:
    """Write ``save_pretrained`` (safetensors) + tokenizer to ``out_dir`` atomically; returns its path.

    The files go to a hidden sibling temp directory first and are renamed into place, so a crash never
    leaves a half-written checkpoint at ``out_dir``. An existing ``out_dir`` is replaced: it is moved
    aside, the new one renamed in, then the old one deleted (POSIX cannot rename over a non-empty dir).
    """
    out = Path(out_dir).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp)
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
