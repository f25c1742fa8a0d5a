"""benchmarks/shapes.py: the fixed-length model never stops by itself, and still samples freely."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes():
    spec = importlib.util.spec_from_file_location("shapes", ROOT / "benchmarks" / "shapes.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_never_stopping_model_runs_to_its_limit(shapes, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = shapes.never_stopping(shapes.build("tiny", tmp_path), tmp_path / "fixed")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert not model.config.tie_word_embeddings
    eos, think_end = tok.eos_token_id, tok.convert_tokens_to_ids("</think>")
    ids = tok(["<s>12+34=<think>"] * 8, return_tensors="pt").input_ids
    torch.manual_seed(0)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=96, do_sample=True, top_k=0,
                         temperature=1.0)
    new = out[:, ids.shape[1]:]
    assert new.shape[1] == 96  # nobody stopped early
    assert not (new == eos).any() and not (new == think_end).any()
    assert len(set(new.flatten().tolist())) > 20  # the other tokens are still sampled, near-uniformly
    # A forced </think> as input must not make EOS likely (with tied embeddings it made EOS certain).
    forced = torch.cat([ids, torch.full((8, 1), think_end)], dim=1)
    with torch.no_grad():
        logprobs = model(forced).logits[:, -1].log_softmax(-1)
    assert logprobs[:, [eos, think_end]].max() < -15
