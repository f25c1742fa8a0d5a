"""The token ids that end a generation: the tokenizer's EOS plus every id of the generation config's EOS list.

A checkpoint's ``generation_config.json`` may give ``eos_token_id`` as a list (Qwen2.5's instruct models list
``<|im_end|>`` and ``<|endoftext|>``, Llama 3.1's three ids), beside the tokenizer's one EOS. vLLM stops on
all of them by itself; the HF engine and the budget accounting must know them too, so every engine and the
rollout worker take them from here. The config is read the way vLLM reads it
(``vllm/transformers_utils/config.py: try_get_generation_config``): ``generation_config.json``, else the
generation defaults of ``config.json``.
"""

from __future__ import annotations


def end_token_ids(model_path: str, eos_token_id: int | None) -> tuple[int, ...]:
    """The tokenizer's ``eos_token_id`` first (the one forced when a solution budget runs out), then the
    generation config's EOS ids in their order, each once; empty when neither names one."""
    ids = [] if eos_token_id is None else [int(eos_token_id)]
    ids += _generation_config_eos(model_path)
    return tuple(dict.fromkeys(ids))


def _generation_config_eos(model_path: str) -> list[int]:
    from transformers import AutoConfig, GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model_path)
    except OSError:  # no generation_config.json: the defaults config.json carries
        try:
            config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_path))
        except (OSError, ValueError):
            return []
    eos = config.eos_token_id
    if eos is None:
        return []
    return [int(eos)] if isinstance(eos, int) else [int(x) for x in eos]
