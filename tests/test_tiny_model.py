"""The embedded tiny model: character-level tokenizer, tied-embedding Qwen2, idempotent builds."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator.tiny_model import (
    CHARACTERS,
    MARKER_FILE,
    SPECIAL_TOKENS,
    build_tiny_model,
    build_tokenizer,
    padded_vocab_size,
)

SMALL = {
    "hidden_size": 32,
    "num_layers": 1,
    "num_heads": 2,
    "intermediate_size": 64,
    "max_position_embeddings": 64,
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", **SMALL)


def test_specials_are_single_ids_and_text_round_trips(model_dir):
    # AutoTokenizer is what vLLM uses; for qwen2 checkpoints it rebuilds the pipeline (Qwen2Tokenizer),
    # so check it as well as the tokenizer object we build.
    for tok in (build_tokenizer(), AutoTokenizer.from_pretrained(model_dir)):
        text = "<s>12+34=<think>4+2=6 3+1=4</think>46</s>"
        ids = tok.encode(text, add_special_tokens=False)
        n_specials = 4
        assert (
            len(ids) == len(text) - sum(len(s) for s in ("<s>", "<think>", "</think>", "</s>")) + n_specials
        )
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        for special in SPECIAL_TOKENS:
            assert len(tok.encode(special, add_special_tokens=False)) == 1
        assert tok.decode(ids, skip_special_tokens=False) == text
        assert tok.decode(ids, skip_special_tokens=True) == "12+34=4+2=6 3+1=446"
        every_char = "".join(CHARACTERS)
        char_ids = tok.encode(every_char, add_special_tokens=False)
        assert len(char_ids) == len(every_char) and len(set(char_ids)) == len(every_char)
        assert tok.decode(char_ids) == every_char
        assert tok.encode("  a b", add_special_tokens=True) == tok.encode("  a b", add_special_tokens=False)
        assert len(tok) == padded_vocab_size()


def test_model_loads_with_tied_embeddings(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert model.config.vocab_size == padded_vocab_size() and padded_vocab_size() % 64 == 0
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.hidden_size == SMALL["hidden_size"]
    gc = model.generation_config
    assert (gc.eos_token_id, gc.bos_token_id, gc.pad_token_id) == (
        tok.eos_token_id,
        tok.bos_token_id,
        tok.pad_token_id,
    )
    assert (model_dir / "model.safetensors").is_file()


def test_rebuild_is_idempotent_and_args_are_recorded(model_dir):
    weights = model_dir / "model.safetensors"
    before = weights.stat().st_mtime_ns
    assert build_tiny_model(model_dir, **SMALL) == model_dir
    assert weights.stat().st_mtime_ns == before
    assert json.loads((model_dir / MARKER_FILE).read_text())["hidden_size"] == SMALL["hidden_size"]


def test_different_args_rebuild(tmp_path):
    out = build_tiny_model(tmp_path / "m", **SMALL)
    build_tiny_model(out, **{**SMALL, "num_layers": 2})
    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


def test_bad_args():
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_model("/nonexistent/never-written", hidden_size=30, num_heads=4)
