"""Warm-start SFT: loss falls on a handful of examples and the result is a loadable checkpoint."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from orchestrator.learner.sft import IGNORE_INDEX, METRICS_FILE, _collate, lr_factor, sft_train
from orchestrator.tiny_model import build_tiny_model

EXAMPLES = [
    ("<s>12+34=<think>", "4+2=6 3+1=4</think>46</s>"),
    ("<s>5+7=<think>", "12</think>12</s>"),
    ("<s>99+1=<think>", "9+1=10 9+0+1=10</think>100</s>"),
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return build_tiny_model(
        tmp_path_factory.mktemp("sft") / "base",
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )


def test_sft_reduces_loss_and_saves_checkpoint(base, tmp_path):
    logs = []
    out = tmp_path / "sft"
    result = sft_train(
        base,
        out,
        EXAMPLES,
        steps=30,
        batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        log_every=10,
        progress=False,
        on_log=lambda step, m: logs.append((step, m)),
    )
    assert [s for s, _ in logs] == [10, 20, 30]
    assert result["loss"] < 0.5 * result["initial_loss"]
    assert result["steps"] == 30 and result["seconds"] > 0 and result["tokens_per_s"] > 0
    assert (out / "model.safetensors").is_file() and json.loads((out / METRICS_FILE).read_text())["metrics"]
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    # the trained model prefers the target continuation over the base model
    ids = torch.tensor([tok.encode("".join(EXAMPLES[1]), add_special_tokens=False)])
    with torch.no_grad():
        trained = model(ids, labels=ids).loss
        before = AutoModelForCausalLM.from_pretrained(base)(ids, labels=ids).loss
    assert trained < before


def test_labels_cover_only_target_tokens():
    input_ids, attention, labels = _collate([([5, 6, 7, 8], 2), ([9, 10, 11], 1)], pad_id=0)
    assert input_ids.tolist() == [[5, 6, 7, 8], [9, 10, 11, 0]]
    assert attention.tolist() == [[1, 1, 1, 1], [1, 1, 1, 0]]
    assert labels.tolist() == [[IGNORE_INDEX, IGNORE_INDEX, 7, 8], [IGNORE_INDEX, 10, 11, IGNORE_INDEX]]


def test_lr_schedule():
    assert lr_factor(0, steps=100, warmup_steps=10, schedule="cosine") == pytest.approx(0.1)
    assert lr_factor(10, steps=100, warmup_steps=10, schedule="cosine") == pytest.approx(1.0)
    assert lr_factor(99, steps=100, warmup_steps=10, schedule="linear") < 0.02
    assert lr_factor(50, steps=100, warmup_steps=0, schedule="constant") == 1.0


@pytest.mark.parametrize(
    "examples,kwargs,match",
    [
        ([], {}, "empty"),
        ([("a", "")], {}, "empty target"),
        ([("a", "b")], {"steps": 0}, "steps"),
        ([("a", "b")], {"batch_size": 0}, "batch_size"),
        ([("a", "b")], {"lr": -1.0}, "lr"),
        ([("a", "b")], {"schedule": "step"}, "schedule"),
        ([("a", "b")], {"dtype": "float16"}, "dtype"),
        (["ab"], {}, "pair"),
    ],
)
def test_bad_arguments(base, tmp_path, examples, kwargs, match):
    with pytest.raises(ValueError, match=match):
        sft_train(base, tmp_path / "x", examples, **{"steps": 1, **kwargs})


def test_too_long_example(base, tmp_path):
    with pytest.raises(ValueError, match="max_position_embeddings"):
        sft_train(base, tmp_path / "x", [("a" * 60, "b" * 10)], steps=1)
