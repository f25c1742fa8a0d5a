"""The embedded default model: a tiny random-init Qwen2 with a character-level tokenizer.

Built locally in seconds so every command runs offline; the warm-start SFT then teaches it a task.
The directory is a plain ``save_pretrained`` checkpoint, so transformers and vLLM load it unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

PAD, BOS, EOS, UNK, THINK, END_THINK = "<pad>", "<s>", "</s>", "<unk>", "<think>", "</think>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, THINK, END_THINK)
# Printable ASCII plus newline and tab: enough for arithmetic, logic puzzles and tagged answers.
CHARACTERS = tuple(chr(c) for c in range(32, 127)) + ("\n", "\t")
VOCAB_MULTIPLE = 64
MARKER_FILE = "budgetrl_tiny_model.json"
_MARKER_VERSION = 1
_REQUIRED_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
)


def padded_vocab_size() -> int:
    n = len(SPECIAL_TOKENS) + len(CHARACTERS)
    return -(-n // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def build_tokenizer():
    """Character-level ``PreTrainedTokenizerFast``: one id per character, one per special token.

    It is written as a byte-level BPE with no merges (space is ``Ġ``, newline ``Ċ``) because
    transformers 5 loads any ``qwen2`` checkpoint through ``Qwen2Tokenizer``, which rebuilds a
    byte-level BPE pipeline from the saved vocabulary; in this form both pipelines give the same ids.
    The vocabulary fills the padded embedding matrix with ``<reserved_i>`` entries, so every id a
    model can sample decodes, yet text never encodes to them (a character is never merged).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = list(SPECIAL_TOKENS) + [_BYTE_TO_UNICODE[ord(c)] for c in CHARACTERS]
    tokens += [f"<reserved_{i}>" for i in range(padded_vocab_size() - len(tokens))]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        extra_special_tokens=[THINK, END_THINK],
        clean_up_tokenization_spaces=False,
        model_max_length=None,
        padding_side="right",
    )


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table, the alphabet of every byte-level BPE."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_TO_UNICODE = _bytes_to_unicode()


def _build_args(**kwargs) -> dict:
    return {"version": _MARKER_VERSION, "vocab_size": padded_vocab_size(), **kwargs}


def is_built(out_dir: str | os.PathLike, args: dict | None = None) -> bool:
    """True when ``out_dir`` holds a complete build (made with ``args``, if given)."""
    out = Path(out_dir)
    marker = out / MARKER_FILE
    if not marker.is_file() or not all((out / f).is_file() for f in _REQUIRED_FILES):
        return False
    if args is None:
        return True
    try:
        return json.loads(marker.read_text()) == args
    except (OSError, json.JSONDecodeError):
        return False


def build_tiny_model(
    out_dir: str | os.PathLike,
    *,
    hidden_size: int = 128,
    num_layers: int = 3,
    num_heads: int = 4,
    num_kv_heads: int | None = None,
    intermediate_size: int = 512,
    max_position_embeddings: int = 256,
    seed: int = 0,
) -> Path:
    """Write a random-init tied-embedding ``Qwen2ForCausalLM`` plus tokenizer to ``out_dir``.

    Idempotent: a complete build with the same arguments (recorded in a marker json) is reused.
    Files are built in a temporary sibling directory and moved in with the marker last, so an
    interrupted or concurrent build never leaves a directory that looks complete but is not.
    """
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    _check_shape(hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                 num_kv_heads=num_kv_heads, intermediate_size=intermediate_size,
                 max_position_embeddings=max_position_embeddings)
    out = Path(out_dir)
    args = _build_args(
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        seed=seed,
    )
    if is_built(out, args):
        return out

    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = build_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2Config(
        vocab_size=args["vocab_size"],
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        use_sliding_window=False,
    )
    config.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=ids[BOS], eos_token_id=ids[EOS], pad_token_id=ids[PAD]
    )

    _publish(model, tokenizer, args, out)
    return out


def _check_shape(**shape: int) -> None:
    for name, value in shape.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if shape["hidden_size"] % shape["num_heads"]:
        raise ValueError(f"hidden_size={shape['hidden_size']} is not divisible by num_heads={shape['num_heads']}")
    if shape["num_heads"] % shape["num_kv_heads"]:
        raise ValueError(
            f"num_heads={shape['num_heads']} is not divisible by num_kv_heads={shape['num_kv_heads']}")


def _publish(model, tokenizer, args: dict, out: Path) -> None:
    """Save into a temporary sibling, then move the files in with the marker last (never half-built)."""
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER_FILE).write_text(json.dumps(args, indent=1, sort_keys=True))
        (out / MARKER_FILE).unlink(missing_ok=True)
        for f in sorted(tmp.iterdir(), key=lambda p: p.name == MARKER_FILE):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
