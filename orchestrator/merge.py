"""Merge N Hugging Face checkpoints in parameter space: linear ``sum_i w_i * theta_i`` or, given the
base they were all fine-tuned from, task arithmetic ``theta_base + sum_i w_i * (theta_i - theta_base)``.

Reads safetensors only (single file or sharded; never pickle), checks that every model has the same
architecture, keys, shapes and dtypes (an error names the first bad key), and writes a ``save_pretrained``
directory (config, generation config, tokenizer of the first model) atomically. With
``normalize=True`` the weights are divided by their sum first (what common merge tools do by
default: 1.0 / 0.2 / 0.1 -> 0.769 / 0.154 / 0.077). Exactness: a term with weight 1.0 and all others
0.0 copies that model's tensors unchanged, so a one-hot merge (and a merge of identical models)
returns the source model bit for bit.

Task arithmetic (Ilharco et al., 2023) adds each specialist's *change* from the base with weight
``w_i``; it is the linear merge of ``[base] + models`` with coefficients ``[1 - sum(w)] + w``, so
with normalized weights it equals the linear merge, and with ``w_i = 1`` it keeps every
specialist's full update instead of diluting each to ``1/N``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

MERGE_INFO = "budgetrl_merge.json"
# Config keys that may differ between checkpoints of the same architecture (bookkeeping, not shape).
_CONFIG_IGNORED = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures_version"}


class MergeError(ValueError):
    """Checkpoints that cannot be merged; the message names the model and the offending key."""


@dataclass
class MergeSpec:
    """What to merge: model directories, one weight each, and whether weights are normalized to sum 1."""

    models: list[str] = field(default_factory=list)
    weights: list[float] = field(default_factory=list)
    normalize: bool = True
    dtype: str | None = None  # None: keep each tensor's dtype; else "float32" | "bfloat16" | "float16"
    base: str | None = None  # set: task arithmetic around this checkpoint (the models' common parent)


def effective_weights(weights: Sequence[float], normalize: bool) -> list[float]:
    """The coefficients actually applied: ``weights``, or ``weights / sum(weights)`` when normalizing."""
    w = [float(x) for x in weights]
    if not w:
        raise MergeError("merge: no weights given")
    if any(x != x or x in (float("inf"), float("-inf")) for x in w):
        raise MergeError(f"merge: weights must be finite, got {w}")
    if normalize:
        total = sum(w)
        if total == 0:
            raise MergeError(f"merge: weights {w} sum to 0 and cannot be normalized")
        w = [x / total for x in w]
    return w


def base_coefficient(coefficients: Sequence[float]) -> float:
    """The base's coefficient when task arithmetic is written as a linear merge: ``1 - sum(w)``."""
    return 1.0 - sum(coefficients)


def load_state(model_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (single file or sharded: ``checkpoint_files.load_tensors``), keyed by name."""
    from .checkpoint_files import CheckpointError, load_tensors

    if not (Path(model_dir) / "config.json").is_file():
        raise MergeError(f"merge: {model_dir} is not a Hugging Face model directory (no config.json)")
    try:
        return load_tensors(model_dir)
    except CheckpointError as exc:
        raise MergeError(f"merge: {exc}") from None


def _arch(model_dir: Path) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    return {k: v for k, v in cfg.items() if k not in _CONFIG_IGNORED}


def check_compatible(model_dirs: Sequence[str | os.PathLike], states: Sequence[dict[str, torch.Tensor]]) -> None:
    """Raise ``MergeError`` naming the first architecture field, key, shape or dtype that differs."""
    first_dir = Path(model_dirs[0])
    ref_arch, ref = _arch(first_dir), states[0]
    for d, st in zip(model_dirs[1:], states[1:]):
        d = Path(d)
        arch = _arch(d)
        for k in sorted(set(ref_arch) | set(arch)):
            if ref_arch.get(k) != arch.get(k):
                raise MergeError(f"merge: architecture mismatch in config key {k!r}: {first_dir} has "
                                 f"{ref_arch.get(k)!r}, {d} has {arch.get(k)!r}")
        missing, extra = sorted(set(ref) - set(st)), sorted(set(st) - set(ref))
        if missing:
            raise MergeError(f"merge: key {missing[0]!r} is in {first_dir} but missing from {d}")
        if extra:
            raise MergeError(f"merge: key {extra[0]!r} is in {d} but not in {first_dir}")
        for k in sorted(ref):
            if ref[k].shape != st[k].shape:
                raise MergeError(f"merge: shape mismatch for key {k!r}: {tuple(ref[k].shape)} in {first_dir}, "
                                 f"{tuple(st[k].shape)} in {d}")
            if ref[k].dtype != st[k].dtype:
                raise MergeError(f"merge: dtype mismatch for key {k!r}: {ref[k].dtype} in {first_dir}, "
                                 f"{st[k].dtype} in {d}")


def merge_states(states: Sequence[dict[str, torch.Tensor]], coefficients: Sequence[float],
                 dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """``sum_i c_i * state_i`` key by key, accumulated in float64 (float tensors only).

    Terms with coefficient 0 are left out; a single remaining term with coefficient 1 is copied
    unchanged (bitwise). Integer/bool tensors (buffers) must be equal across models and are copied.
    """
    out: dict[str, torch.Tensor] = {}
    terms = [(c, s) for c, s in zip(coefficients, states) if c != 0.0]
    for k, ref in states[0].items():
        target = dtype if (dtype is not None and ref.is_floating_point()) else ref.dtype
        if not ref.is_floating_point():
            for s in states[1:]:
                if not torch.equal(s[k], ref):
                    raise MergeError(f"merge: non-float tensor {k!r} differs between models and cannot be averaged")
            out[k] = ref.clone()
            continue
        if len(terms) == 1 and terms[0][0] == 1.0:
            out[k] = terms[0][1][k].to(target).clone()
            continue
        # Identical tensors under weights summing to 1 merge to themselves exactly.
        if all(torch.equal(s[k], ref) for _, s in terms) and abs(sum(c for c, _ in terms) - 1.0) < 1e-12:
            out[k] = ref.to(target).clone()
            continue
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for c, s in terms:
            acc.add_(s[k].to(torch.float64), alpha=c)
        out[k] = acc.to(target)
    return out


def merge_checkpoints(spec: MergeSpec, out_dir: str | os.PathLike) -> str:
    """Merge ``spec.models`` with ``spec.weights`` into ``out_dir``; returns its path.

    The merged tensors are loaded into the first model's architecture and written with
    ``learner.checkpoint.save_hf_checkpoint`` (safetensors + tokenizer, atomic rename), so the
    result is a checkpoint like any other; ``budgetrl_merge.json`` next to it records the recipe.
    """
    from .learner.checkpoint import load_policy, resolve_dtype, save_hf_checkpoint

    if len(spec.models) < 1:
        raise MergeError("merge: list at least one model")
    if len(spec.weights) != len(spec.models):
        raise MergeError(f"merge: {len(spec.models)} models but {len(spec.weights)} weights")
    coeffs = effective_weights(spec.weights, spec.normalize)
    dirs = [Path(m) for m in spec.models]
    terms, applied = dirs, coeffs
    if spec.base is not None:  # theta_base + sum c_i (theta_i - theta_base) as one linear merge
        terms, applied = [Path(spec.base)] + dirs, [base_coefficient(coeffs)] + coeffs
    states = [load_state(d) for d in terms]
    check_compatible(terms, states)
    dtype = resolve_dtype(spec.dtype) if spec.dtype else None
    merged = merge_states(states, applied, dtype)
    del states

    float_dtypes = {v.dtype for v in merged.values() if v.is_floating_point()}
    model_dtype = dtype or (float_dtypes.pop() if len(float_dtypes) == 1 else torch.float32)
    model, tokenizer = load_policy(str(terms[0]), dtype=model_dtype)
    missing, unexpected = model.load_state_dict(merged, strict=False)
    tied = {"lm_head.weight"} if getattr(model.config, "tie_word_embeddings", False) else set()
    if unexpected:
        raise MergeError(f"merge: key {unexpected[0]!r} of the checkpoints is not a parameter of the model")
    if set(missing) - tied:
        raise MergeError(f"merge: parameter {sorted(set(missing) - tied)[0]!r} is missing from the checkpoints")
    path = save_hf_checkpoint(model, tokenizer, out_dir)
    (Path(path) / MERGE_INFO).write_text(json.dumps(
        {"models": [str(d.absolute()) for d in dirs], "weights": [float(w) for w in spec.weights],
         "normalize": spec.normalize, "coefficients": coeffs, "dtype": spec.dtype,
         "method": "task_arithmetic" if spec.base is not None else "linear",
         "base": None if spec.base is None else str(Path(spec.base).absolute()),
         "base_coefficient": applied[0] if spec.base is not None else None}, indent=1))
    return path
