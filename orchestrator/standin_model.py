"""A realistic stand-in checkpoint, built offline in seconds: shaped like the chat reasoning models users bring.

What it holds, as Qwen-style chat models have it:

- a byte-level BPE tokenizer (GPT-2's pre-tokenizer split) trained with Hugging Face ``tokenizers`` on the
  project's task generators' text (prompts, reasoning, answers; ``vocab_size`` entries, 8,192 by default);
- special tokens ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` and the thinking markers ``<think>``,
  ``</think>`` (added tokens, not special, as in Qwen3), each one token;
- a Jinja chat template with a thinking switch: ``enable_thinking`` (default on) opens ``<think>`` in the
  generation prompt, off writes an empty ``<think>\\n\\n</think>\\n\\n`` block;
- ``generation_config.json`` with two EOS ids (``<|im_end|>``, ``<|endoftext|>``);
- a random-init ``LlamaForCausalLM`` with an untied output head (vLLM's CPU attention wants a head size
  that is a multiple of 32), saved with a small ``max_shard_size``: several ``model-0000i-of-0000n``
  shards and ``model.safetensors.index.json``.

Deterministic: the same arguments give byte-identical files. ``python -m orchestrator build-standin OUT``.
The model is random (it has learned nothing); it stands in for the *files* of a real checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

ENDOFTEXT, IM_START, IM_END, THINK, END_THINK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)  # special: dropped by skip_special_tokens
THINKING_TOKENS = (THINK, END_THINK)  # added tokens that decode as text, as in Qwen3
# The tokenizer's training text: (task, rows, levels) of the project's generators, fixed so that tasks another
# package registers do not change the build. Long additions supply most merges (digit runs stay together, as in
# GPT-2's split; about 6,400 of the 8,192 entries are numbers): with single digits, as Qwen splits them, the
# tasks' few words stop the trainer near 1,800 entries. This corpus could fill about 12,700. Deduction is by far
# the slowest generator, so it gives few rows.
CORPUS = (("addition", 7000, (3, 4, 5, 6, 7, 8)), ("deduction", 50, (1, 2, 3, 4, 5)),
          ("induction", 500, (1, 2, 3, 4, 5)), ("abduction", 500, (1, 2, 3, 4, 5)))
MARKER_FILE = "budgetrl_standin_model.json"
_MARKER_VERSION = 1
VOCAB_MULTIPLE = 64  # the embedding rows are padded to a multiple of this (Qwen pads to 128 x 1187)

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and not enable_thinking %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}"
    "{%- else %}"
    "{{- '<think>\\n' }}"
    "{%- endif %}"
    "{%- endif %}"
)


def corpus(seed: int = 0) -> list[str]:
    """Text of the project's tasks (``CORPUS``, found through ``budgetrl.tasks``), both reasoning styles: one
    string per example (prompt, reasoning, answer) in a fixed order."""
    from .data.tasks import get_task

    texts = []
    for name, rows, levels in CORPUS:
        task = get_task(name)
        table = task.generate(rows, difficulties=levels, seed=seed, split="train", concise_fraction=0.5)
        answer_format = getattr(task, "answer_format", "{answer}")
        for row in table.select(["prompt", "reasoning", "answer"]).to_pylist():
            answer = answer_format.format(answer=row["answer"])
            texts.append(f"user\n{row['prompt']}\nassistant\n{row['reasoning'] or ''}\n{answer}\n")
    return texts


def build_tokenizer(texts: list[str], vocab_size: int, model_max_length: int = 2048):
    """Byte-level BPE trained on ``texts`` to ``vocab_size`` entries (special and thinking tokens included),
    as a ``PreTrainedTokenizerFast`` with the chat template; eos ``<|im_end|>``, pad ``<|endoftext|>``."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split, then bytes
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    added = len(SPECIAL_TOKENS) + len(THINKING_TOKENS)
    trainer = BpeTrainer(vocab_size=vocab_size - added, min_frequency=2, show_progress=False,
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer)
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    backend.add_tokens([AddedToken(t, special=False, normalized=False) for t in THINKING_TOKENS])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=IM_END, pad_token=ENDOFTEXT, chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=model_max_length, padding_side="right",
    )


def _is_built(out: Path, args: dict) -> bool:
    try:
        return json.loads((out / MARKER_FILE).read_text()) == args
    except (OSError, ValueError):
        return False


def _write(out: Path, args: dict) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(corpus(args["seed"]), args["vocab_size"], args["max_position_embeddings"])
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = LlamaConfig(
        vocab_size=-(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE, hidden_size=args["hidden_size"],
        intermediate_size=args["intermediate_size"], num_hidden_layers=args["num_layers"],
        num_attention_heads=args["num_heads"], num_key_value_heads=args["num_kv_heads"],
        max_position_embeddings=args["max_position_embeddings"], tie_word_embeddings=False,
        bos_token_id=ids[ENDOFTEXT], eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT],
    )
    config.dtype = torch.float32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args["seed"])
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=ids[ENDOFTEXT], pad_token_id=ids[ENDOFTEXT],
                                               eos_token_id=[ids[IM_END], ids[ENDOFTEXT]])
    model.save_pretrained(out, max_shard_size=args["max_shard_size"])
    tokenizer.save_pretrained(out)


def build_standin_model(
    out_dir: str | os.PathLike,
    *,
    vocab_size: int = 8192,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int = 1,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    max_shard_size: str = "1MB",
    seed: int = 0,
) -> Path:
    """Write the stand-in checkpoint to ``out_dir``; returns it. Idempotent: a build with the same arguments
    (recorded in ``MARKER_FILE``) is reused. Built in a temporary sibling and renamed into place; an existing
    ``out_dir`` is replaced only when it is empty or an earlier stand-in build."""
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError(f"hidden_size={hidden_size}, num_heads={num_heads}, num_kv_heads={num_kv_heads}: heads "
                         "must divide the hidden size and KV heads the heads")
    args = {"version": _MARKER_VERSION, "vocab_size": vocab_size, "hidden_size": hidden_size,
            "num_layers": num_layers, "num_heads": num_heads, "num_kv_heads": num_kv_heads,
            "intermediate_size": intermediate_size, "max_position_embeddings": max_position_embeddings,
            "max_shard_size": max_shard_size, "seed": seed}
    out = Path(out_dir)
    if _is_built(out, args):
        return out
    if out.exists() and any(out.iterdir()) and not (out / MARKER_FILE).is_file():
        raise FileExistsError(f"{out}: not empty and not a stand-in build; choose another directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.build-", dir=out.parent))
    try:
        _write(tmp, args)
        (tmp / MARKER_FILE).write_text(json.dumps(args, indent=1, sort_keys=True))
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
