"""Checkpoint merge (linear and task arithmetic): exactness (identical models, one-hot weights), arithmetic, clear errors."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import TINY
from orchestrator.merge import MergeError, MergeSpec, effective_weights, load_state, merge_checkpoints
from orchestrator.tiny_model import build_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    a = build_tiny_model(root / "a", **TINY, seed=0)
    b = build_tiny_model(root / "b", **TINY, seed=1)
    c = build_tiny_model(root / "c", **TINY, seed=2)
    return Path(a), Path(b), Path(c)


def _equal(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) and x[k].dtype == y[k].dtype for k in x)


def test_identical_models_merge_to_the_same_model_bitwise(models, tmp_path):
    a = models[0]
    for normalize, weights in ((True, [1.0, 0.2, 0.1]), (False, [0.5, 0.25, 0.25])):
        out = merge_checkpoints(MergeSpec([str(a)] * 3, weights, normalize=normalize), tmp_path / f"m{normalize}")
        assert _equal(load_state(out), load_state(a))
        assert (Path(out) / "tokenizer.json").is_file() and (Path(out) / "config.json").is_file()


def test_one_hot_weights_return_that_model_bitwise(models, tmp_path):
    a, b, c = models
    for i, normalize in ((0, False), (1, True)):
        w = [0.0, 0.0, 0.0]
        w[i] = 1.0
        out = merge_checkpoints(MergeSpec([str(a), str(b), str(c)], w, normalize=normalize), tmp_path / f"hot{i}")
        assert _equal(load_state(out), load_state(models[i]))
    assert not _equal(load_state(a), load_state(b))


def test_two_model_arithmetic_and_normalization(models, tmp_path):
    a, b, _ = models
    sa, sb = load_state(a), load_state(b)
    assert effective_weights([1.0, 0.2, 0.1], True) == pytest.approx([1 / 1.3, 0.2 / 1.3, 0.1 / 1.3])
    assert effective_weights([3.0, 1.0], False) == [3.0, 1.0]
    out = merge_checkpoints(MergeSpec([str(a), str(b)], [3.0, 1.0], normalize=True), tmp_path / "n")
    merged = load_state(out)
    for k in sa:
        expected = (0.75 * sa[k].double() + 0.25 * sb[k].double()).float()
        assert torch.equal(merged[k], expected), k
    raw = load_state(merge_checkpoints(MergeSpec([str(a), str(b)], [3.0, 1.0], normalize=False), tmp_path / "r"))
    k = next(iter(sa))
    assert torch.allclose(raw[k], 3 * sa[k] + sb[k], atol=1e-6)
    info = json.loads((Path(out) / "budgetrl_merge.json").read_text())
    assert info["coefficients"] == [0.75, 0.25] and info["normalize"] is True
    # The result loads in transformers like any checkpoint.
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)


def test_task_arithmetic_adds_each_models_change_from_the_base(models, tmp_path):
    a, b, c = models
    sa, sb, sc = load_state(a), load_state(b), load_state(c)
    # Specialists identical to the base: the base, bit for bit, whatever the weights.
    same = merge_checkpoints(MergeSpec([str(a)] * 3, [1.0, 1.0, 0.5], normalize=False, base=str(a)), tmp_path / "s")
    assert _equal(load_state(same), sa)
    # Full weights keep both changes: a + (b - a) + (c - a).
    out = merge_checkpoints(MergeSpec([str(b), str(c)], [1.0, 1.0], normalize=False, base=str(a)), tmp_path / "t")
    merged = load_state(out)
    for k in sa:
        expected = (sb[k].double() + sc[k].double() - sa[k].double()).float()
        assert torch.equal(merged[k], expected), k
    info = json.loads((Path(out) / "budgetrl_merge.json").read_text())
    assert info["method"] == "task_arithmetic" and info["base_coefficient"] == -1.0
    assert info["models"] == [str(b.absolute()), str(c.absolute())] and info["base"] == str(a.absolute())
    # Normalized weights cancel the base: the same tensors as the linear merge.
    ta = load_state(merge_checkpoints(MergeSpec([str(b), str(c)], [3.0, 1.0], base=str(a)), tmp_path / "n"))
    lin = load_state(merge_checkpoints(MergeSpec([str(b), str(c)], [3.0, 1.0]), tmp_path / "l"))
    assert _equal(ta, lin)
    # A base of another architecture fails naming the key, and nothing is written.
    wide = build_tiny_model(tmp_path / "wide", **{**TINY, "intermediate_size": 256})
    with pytest.raises(MergeError, match="intermediate_size"):
        merge_checkpoints(MergeSpec([str(b)], [1.0], normalize=False, base=str(wide)), tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_mismatches_fail_naming_the_key(models, tmp_path):
    a, b, _ = models
    wide = build_tiny_model(tmp_path / "wide", **{**TINY, "intermediate_size": 256})
    with pytest.raises(MergeError, match="intermediate_size"):
        merge_checkpoints(MergeSpec([str(a), str(wide)], [1, 1]), tmp_path / "x")
    # Same config, a tensor of another shape: patch the config so only the weights differ.
    cfg = json.loads((Path(wide) / "config.json").read_text())
    cfg["intermediate_size"] = TINY["intermediate_size"]
    (Path(wide) / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(MergeError, match=r"shape mismatch for key 'model\.layers\.0\.mlp\.(down|gate|up)_proj"):
        merge_checkpoints(MergeSpec([str(a), str(wide)], [1, 1]), tmp_path / "x")
    # A missing key.
    from safetensors.torch import save_file
    less = tmp_path / "less"
    shutil.copytree(b, less)
    st = load_state(less)
    st.pop("model.norm.weight")
    save_file(st, str(less / "model.safetensors"))
    with pytest.raises(MergeError, match="'model.norm.weight' is in .* but missing from"):
        merge_checkpoints(MergeSpec([str(a), str(less)], [1, 1]), tmp_path / "x")
    # Pickled weights are refused, not loaded.
    pickled = tmp_path / "pickled"
    shutil.copytree(b, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(MergeError, match="no \\*.safetensors.*pytorch_model.bin"):
        merge_checkpoints(MergeSpec([str(a), str(pickled)], [1, 1]), tmp_path / "x")
    with pytest.raises(MergeError, match="sum to 0"):
        merge_checkpoints(MergeSpec([str(a), str(b)], [1, -1], normalize=True), tmp_path / "x")
    with pytest.raises(MergeError, match="2 models but 1 weights"):
        merge_checkpoints(MergeSpec([str(a), str(b)], [1]), tmp_path / "x")
    assert not (tmp_path / "x").exists()
