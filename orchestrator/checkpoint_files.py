"""The one reader of checkpoint files: which safetensors files hold a directory's tensors, reading them, and
the checks a command runs on a checkpoint before Ray starts.

A checkpoint is a Hugging Face ``save_pretrained`` directory. Its tensors are in ``model.safetensors``, or
in the shards that ``model.safetensors.index.json`` names (transformers' index format: a ``weight_map`` from
tensor name to shard file). The learner's resumable states use the same layout for their optimizer moments
(``optimizer.safetensors`` or its index). Every path that opens weights goes through ``weight_files`` /
``load_tensors`` (learner state resume, journey, merge, registry, serve, eval, warm start); transformers'
``from_pretrained`` and vLLM read the same files. Nothing pickled is ever loaded.

``CheckpointError`` is a ``ConfigError``: the commands print it as one line and exit 2, before Ray starts.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from pathlib import Path

from .config import ConfigError

WEIGHTS = "model.safetensors"  # transformers' SAFE_WEIGHTS_NAME; shards: model-0000i-of-0000n.safetensors
INDEX_SUFFIX = ".index.json"  # model.safetensors.index.json: {"metadata": {...}, "weight_map": {name: shard}}
GENERATION_CONFIG = "generation_config.json"


class CheckpointError(ConfigError):
    """A checkpoint directory that cannot be used; the message names the key, the directory and the file,
    shard, tensor or token id at fault."""


def index_file(model_dir: str | os.PathLike, name: str = WEIGHTS) -> Path:
    """Where the index of ``name``'s shards would be (``model.safetensors.index.json``)."""
    return Path(model_dir) / f"{name}{INDEX_SUFFIX}"


def read_weight_map(model_dir: str | os.PathLike, name: str = WEIGHTS) -> dict[str, str] | None:
    """The index's ``weight_map`` (tensor name -> shard file), or None when ``name`` is not sharded."""
    index = index_file(model_dir, name)
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({type(exc).__name__}: {exc})") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: its weight_map names no tensors")
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(f"{index}: tensor {tensor!r} maps to {shard!r}, not a file name in {index.parent}")
    return weight_map


def _layout(d: Path, name: str, present: Collection[str] | None) -> tuple[list[Path], dict[str, str] | None]:
    """(the files holding ``name``'s tensors, the index's weight_map or None); reads the index once.

    ``present``: the names of the files the directory holds when ``d`` has only its small files (a registry
    artifact checked before it is downloaded); None: look at ``d`` itself."""
    has = (lambda f: f in present) if present is not None else (lambda f: (d / f).is_file())
    weight_map = read_weight_map(d, name)
    if weight_map is None:
        if has(name):
            return [d / name], None
        listed = present if present is not None else [p.name for p in d.iterdir()] if d.is_dir() else []
        pickled = sorted(f for f in listed if f.endswith((".bin", ".pt")))
        extra = f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
        raise CheckpointError(f"{d}: no {name} and no {index_file(d, name).name}: no *.safetensors weights{extra}")
    index = index_file(d, name)
    if has(name):
        raise CheckpointError(f"{d}: holds both {name} and {index.name}; remove the stale one")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not has(shard):
            first = next(t for t, s in weight_map.items() if s == shard)
            raise CheckpointError(f"{index}: names shard {shard!r} (tensor {first!r} and others), which is missing "
                                  f"from {d}")
    return [d / s for s in shards], weight_map


def weight_files(model_dir: str | os.PathLike, name: str = WEIGHTS) -> list[Path]:
    """The safetensors files holding a directory's tensors: ``name`` itself, or every shard its index names.

    Raises ``CheckpointError`` naming the missing shard, a directory that holds both layouts (transformers
    would read one, vLLM the other), or one without safetensors weights (pickled weights are never loaded)."""
    return _layout(Path(model_dir), name, None)[0]


def load_tensors(model_dir: str | os.PathLike, name: str = WEIGHTS, device: str = "cpu") -> dict:
    """Every tensor of ``name`` (single file or sharded), keyed by name, read with safetensors' ``load_file``.

    A sharded checkpoint must hold exactly the tensors its index names, each in one shard."""
    from safetensors.torch import load_file

    d = Path(model_dir)
    files, weight_map = _layout(d, name, None)
    state: dict = {}
    for f in files:
        part = load_file(str(f), device=device)
        twice = sorted(state.keys() & part.keys())
        if twice:
            raise CheckpointError(f"{d}: tensor {twice[0]!r} is in two files (the second: {f.name})")
        state.update(part)
    if weight_map is not None:
        missing = sorted(set(weight_map) - set(state))
        if missing:
            raise CheckpointError(f"{index_file(d, name)}: tensor {missing[0]!r} is not in its shard "
                                  f"{weight_map[missing[0]]!r}")
        extra = sorted(set(state) - set(weight_map))
        if extra:
            raise CheckpointError(f"{index_file(d, name)}: tensor {extra[0]!r} is in a shard but not in the index")
    return state


def save_tensors(tensors: dict, out_dir: str | os.PathLike, name: str, max_shard_size: int | str) -> None:
    """Write ``tensors`` as ``name`` (e.g. ``optimizer.safetensors``), sharded with an index above
    ``max_shard_size``: huggingface_hub's ``save_torch_state_dict``, the layout ``load_tensors`` reads."""
    from huggingface_hub import save_torch_state_dict

    stem = name.removesuffix(".safetensors")
    save_torch_state_dict(tensors, out_dir, filename_pattern=f"{stem}{{suffix}}.safetensors",
                          max_shard_size=max_shard_size)


def _vocab_size(conf: dict) -> int | None:
    for source in (conf, conf.get("text_config") or {}):
        value = source.get("vocab_size") if isinstance(source, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _check_eos_ids(d: Path, key: str, conf: dict) -> None:
    """Every EOS id of ``generation_config.json`` (an int or a list) is a token of the model's vocabulary."""
    path = d / GENERATION_CONFIG
    if not path.is_file():
        return
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"{key}={str(d)!r}: {GENERATION_CONFIG} is unreadable: {exc}") from None
    vocab = _vocab_size(conf)
    for tid in eos if isinstance(eos, list) else [] if eos is None else [eos]:
        if not isinstance(tid, int) or isinstance(tid, bool) or tid < 0 or (vocab is not None and tid >= vocab):
            raise CheckpointError(f"{key}={str(d)!r}: {GENERATION_CONFIG} eos_token_id {tid!r} is outside the "
                                  f"vocabulary (config.json vocab_size={vocab})")


def _check_tokenizer(d: Path, key: str, think_end: str | None, chat_template: bool) -> None:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(d))
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ... for a broken tokenizer
        raise CheckpointError(f"{key}={str(d)!r}: cannot load its tokenizer: {exc}") from None
    if think_end is not None:
        tid = tok.convert_tokens_to_ids(think_end)
        if tid is None or tid == tok.unk_token_id or tok.encode(think_end, add_special_tokens=False) != [tid]:
            raise CheckpointError(f"model.think_end={think_end!r}: is not a single token of the tokenizer at {d}")
    if tok.eos_token_id is None:
        from .rollout.end_ids import end_token_ids

        if not end_token_ids(str(d), None):  # the rollout worker ends a sample on either source's ids
            raise CheckpointError(f"{key}={str(d)!r}: nothing ends a sample: its tokenizer has no eos_token and "
                                  f"its {GENERATION_CONFIG} (or config.json) names no eos_token_id")
    if chat_template and not getattr(tok, "chat_template", None):
        raise CheckpointError(f"model.chat_template=True: the tokenizer at {d} has no chat template")


def check_model_dir(path: str | os.PathLike, *, key: str = "model.path", think_end: str | None = None,
                    chat_template: bool = False, hint: str = "", present: Collection[str] | None = None) -> dict:
    """The checks a command runs on a checkpoint before Ray starts; returns its ``config.json``.

    ``config.json`` is readable; the weights are there (every shard an index names); each EOS id of the
    generation config is inside the vocabulary; with ``think_end`` or ``chat_template`` the tokenizer loads,
    ``think_end`` is one token of it, something ends a sample (the tokenizer's EOS or the generation config's),
    and (when asked for) a chat template. ``present``: the file names of a directory of which ``path`` holds only
    the small files (weights listed, not downloaded). Each failure is a ``CheckpointError`` naming the key and the file, shard or id (``hint`` follows the
    message of a directory that is missing or holds no ``config.json``)."""
    d = Path(path).expanduser()
    if not (d / "config.json").is_file():
        why = "no such directory" if not d.exists() else "not a Hugging Face model directory (no config.json)"
        raise CheckpointError(f"{key}={str(path)!r}: {why}{hint}")
    try:
        conf = json.loads((d / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{key}={str(path)!r}: config.json is unreadable: {exc}") from None
    try:
        _layout(d, WEIGHTS, present)
    except CheckpointError as exc:
        raise CheckpointError(f"{key}={str(path)!r}: {exc}") from None
    _check_eos_ids(d, key, conf if isinstance(conf, dict) else {})
    if think_end is not None or chat_template:
        _check_tokenizer(d, key, think_end, chat_template)
    return conf


def require_checkpoint(path: str, key: str = "model.path", *, think_end: str | None = None,
                       chat_template: bool = False) -> str:
    """A command that reads a trained model (eval) never builds one, whatever ``model.build_if_missing``
    says: a typo in the path must not turn into a freshly built random model. Runs ``check_model_dir``;
    returns the path."""
    check_model_dir(path, key=key, think_end=think_end, chat_template=chat_template,
                    hint="; eval reads a checkpoint and never builds a model")
    return str(Path(path).expanduser())
