"""``python -m orchestrator plan``: figures against hand computations for the Qwen2.5-1.5B and 7B shapes,
the fit verdict and the setting it suggests, the command's exit status, and an import without Ray."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from orchestrator.config import load_config
from orchestrator.plan import PRESETS, LearnerSetup, layer_activation_bytes, learner_fix, learner_memory, plan_config

ROOT = Path(__file__).resolve().parents[1]
GPU_CONFIG = ROOT / "configs" / "gpu" / "deepscaler-1.5b.yaml"
GiB = 2**30


def gpu_cfg(*overrides: str):
    return load_config(GPU_CONFIG, list(overrides), check_paths=False)


def test_parameter_counts_by_hand():
    # Qwen2.5-1.5B: per layer q (1536 x 1536 + bias 1536), k and v (1536 x 256 + 256 each: 2 KV heads of 128),
    # o (1536 x 1536), SwiGLU 3 x 1536 x 8960, two norms 2 x 1536; 28 layers, embeddings 151936 x 1536 (tied),
    # the final norm 1536.
    layer = (1536 * 1536 + 1536) + 2 * (1536 * 256 + 256) + 1536 * 1536 + 3 * 1536 * 8960 + 2 * 1536
    assert layer == 46_797_824
    assert PRESETS["qwen2.5-1.5b"].params() == 28 * layer + 151936 * 1536 + 1536 == 1_543_714_304
    # DeepScaleR-1.5B's base unties the head: one more 151936 x 1536 matrix.
    assert PRESETS["r1-distill-qwen-1.5b"].params() == 1_543_714_304 + 151936 * 1536 == 1_777_088_000
    # Qwen2.5-7B: hidden 3584, 28 heads of 128, 4 KV heads (512 wide), FFN 18944, vocabulary 152064, untied.
    layer7 = (3584 * 3584 + 3584) + 2 * (3584 * 512 + 512) + 3584 * 3584 + 3 * 3584 * 18944 + 2 * 3584
    assert PRESETS["qwen2.5-7b"].params() == 28 * layer7 + 2 * 152064 * 3584 + 3584 == 7_615_616_512


def test_shape_from_config_json(tmp_path):
    """A model directory's config.json (the public Qwen2.5-1.5B values) gives the preset's shape."""
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen2", "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12,
        "num_key_value_heads": 2, "intermediate_size": 8960, "vocab_size": 151936, "tie_word_embeddings": True}))
    from orchestrator.plan import shape_from_config_json

    assert shape_from_config_json(tmp_path) == PRESETS["qwen2.5-1.5b"]


def test_deepscaler_learner_gpu_by_hand():
    """configs/gpu/deepscaler-1.5b.yaml on DeepScaleR's shape: 4 FSDP ranks, bf16, KL reference, micro-batches of
    8 rows; a row is prompt 256 + thinking 1024 + 1 forced </think> + solution 1024 = 2305 tokens."""
    shape = PRESETS["r1-distill-qwen-1.5b"]
    plan = plan_config(gpu_cfg("learner.activation_checkpointing=false"), shape, prompt_tokens=256)
    s, m = plan.setup, plan.learner
    assert (s.ranks, s.sharded, s.dtype, s.reference, s.rows, s.seq_len) == (4, True, "bfloat16", True, 8, 2305)
    P, h, f, heads, V, L = 1_777_088_000, 1536, 8960, 12, 151936, 28
    layer, root = 46_797_824, 2 * V * h + h
    assert m["weights"] == m["gradients"] == 4 * P / 4 and m["optimizer"] == 8 * P / 4
    assert m["reference"] == 2 * P / 4
    assert m["compute_copies"] == 2 * root + 2 * 2 * layer + 2 * layer + 4 * layer  # root, 2 gathered, grads
    # per token and layer: norms 2 x (fp32 input 4h + bf16 copy 2h + 1/rms 4); attention: the q/k/v input 2h,
    # q, K, V 3 x 2h (K and V repeated to 12 heads: rows are padded), its output 2h, logsumexp 4 x 12; SwiGLU:
    # input 2h, gate/SiLU/up/product 4 x 2f; the padding mask as a bf16 bias, 2 x 2305.
    per_layer = 2 * (4 * h + 2 * h + 4) + (2 * h + 3 * 2 * h + 2 * h + 4 * heads) + (2 * h + 4 * 2 * f) + 2 * 2305
    assert layer_activation_bytes(shape, s) == per_layer == 113_210
    tokens, final = 8 * 2305, (4 + 2 * 2) * h
    assert m["activations"] == tokens * (L * per_layer + final)
    inputs = tokens * (L * 2 * h + final)  # checkpointed: each layer's bf16 input
    assert m["activations_checkpointed"] == inputs + tokens * per_layer
    # logits: fp32 copy 4 B + bf16 gradient 2 B per token and vocabulary entry; one row per log-softmax chunk
    # (2305 x 151936 > 64Mi elements), 16 B per chunk element.
    logits = tokens * V * (4 + 2) + 16 * 2305 * V
    assert m["logits"] == logits
    static = 4 * P / 4 * 2 + 8 * P / 4 + m["compute_copies"] + 2 * P / 4
    assert m["total"] == static + m["activations"] + logits  # checkpointing off
    assert m["total"] / GiB == pytest.approx(84.28, abs=0.01) and not plan.learner_fits  # limit 0.9 x 80 GiB
    assert plan.learner_fixes == ["set learner.activation_checkpointing=true"]

    on = plan_config(gpu_cfg(), shape, prompt_tokens=256)  # as shipped: checkpointing on
    assert on.setup.checkpointing and on.setup.rows == 8  # the 32768-token cap leaves 8 rows of 2305
    assert on.learner["total"] == static + inputs + max(logits, tokens * per_layer)
    assert on.learner["total"] / GiB == pytest.approx(31.32, abs=0.01) and on.fits


def test_token_cap_keeps_the_elastic_baseline_in_memory():
    """configs/elastic/deepscaler-1.5b.yaml's baseline thinks up to 8192 tokens: rows of 9473. The shipped
    32768-token cap gives micro-batches of 3 such rows (32768 // 9473); 8 rows would not fit."""
    shape = PRESETS["r1-distill-qwen-1.5b"]
    capped = plan_config(gpu_cfg("budget.thinking=8192"), shape)
    assert capped.setup.rows == 3 and capped.setup.seq_len == 256 + 8192 + 1 + 1024 and capped.fits
    rows = plan_config(gpu_cfg("budget.thinking=8192", "learner.micro_batch_tokens=0"), shape)
    assert rows.setup.rows == 8 and not rows.fits
    assert rows.learner_fixes == ["lower learner.micro_batch_size to 4 (or set learner.micro_batch_tokens=37892)"]


def test_deepscaler_rollout_gpu_and_sync_by_hand():
    shape = PRESETS["r1-distill-qwen-1.5b"]
    plan = plan_config(gpu_cfg(), shape, gpu_memory_gib=80)
    P = 1_777_088_000
    assert plan.rollout["weights"] == 2 * P  # bf16
    kv = 0.85 * 80 * GiB - 2 * P - 2 * GiB  # gpu_memory_utilization x GPU - weights - the 2 GiB allowance
    per_token = 2 * 28 * 2 * 128 * 2  # K and V, 28 layers, 2 KV heads of 128, bf16
    assert plan.rollout["kv_cache"] == pytest.approx(kv) and plan.rollout["kv_tokens"] == pytest.approx(kv / per_token)
    assert plan.seqs_per_worker == 128 * 8 / 4 and plan.rollout_fits  # a 34816-token sequence fits
    assert plan.sync_bytes == 2 * P  # bf16, each parameter once
    small = plan_config(gpu_cfg(), shape, gpu_memory_gib=7)
    assert not small.rollout_fits  # 0.85 x 7 GiB - 3.31 GiB - 2 GiB holds about 24,000 tokens, not 34816
    assert small.rollout_fixes[-1] == f"lower model.max_model_len to {int(small.rollout['kv_tokens'])} " \
        f"(the KV cache holds {int(small.rollout['kv_tokens'])} tokens)"


def test_7b_variant_by_hand_and_the_settings_it_suggests():
    """The same config on Qwen2.5-7B: 4 ranks fit with checkpointing; 2 ranks need a third and smaller micro-batches."""
    shape = PRESETS["qwen2.5-7b"]
    P, h, f, heads, V, L = 7_615_616_512, 3584, 18944, 28, 152064, 28
    plan = plan_config(gpu_cfg(), shape)
    per_layer = 2 * (4 * h + 2 * h + 4) + (2 * h + 3 * 2 * h + 2 * h + 4 * heads) + (2 * h + 4 * 2 * f) + 2 * 2305
    layer = 2 * h * h + h + 2 * (h * 512 + 512) + 3 * h * f + 2 * h
    copies = 2 * (2 * V * h + h) + 10 * layer
    tokens, final = 8 * 2305, 8 * h
    inputs = tokens * (L * 2 * h + final)
    logits = tokens * V * 6 + 16 * 2305 * V
    assert logits > tokens * per_layer  # backward's logits outweigh one recomputed layer
    total = 4 * P / 4 * 2 + 8 * P / 4 + copies + 2 * P / 4 + inputs + logits
    assert plan.learner["total"] == total and total / GiB == pytest.approx(60.95, abs=0.01) and plan.fits
    assert plan.sync_bytes == 2 * P and plan.rollout["weights"] == 2 * P

    two = plan_config(gpu_cfg("learner.num_workers=2"), shape)
    assert not two.fits
    assert two.learner_fixes == ["raise learner.num_workers to 3 (FSDP shards the model over them)"]

    def fits(setup, **kw):
        return learner_memory(shape, replace(setup, **kw))["total"] <= two.limit  # 90% of 80 GiB

    assert fits(two.setup, ranks=3) and not any(fits(two.setup, rows=r) for r in range(1, 9))  # none on 2 ranks
    wide = plan_config(gpu_cfg("learner.micro_batch_size=16"), shape)
    assert wide.learner_fixes == ["lower learner.micro_batch_size to 12 (or set learner.micro_batch_tokens=27660)"]
    assert fits(wide.setup, rows=12) and not fits(wide.setup, rows=13)  # the largest micro-batch that fits
    small = plan_config(gpu_cfg(), shape, gpu_memory_gib=40)
    assert small.learner_fixes == ["raise learner.num_workers to 6 (FSDP shards the model over them)",
                                   "lower learner.micro_batch_size to 2 (or set learner.micro_batch_tokens=4610)"]
    off = plan_config(gpu_cfg("learner.num_workers=2", "learner.activation_checkpointing=false"), shape)
    assert off.learner_fixes[0] == "set learner.activation_checkpointing=true"


def test_fix_is_empty_when_nothing_fits():
    s = LearnerSetup(ranks=1, sharded=False, checkpointing=True, rows=1, seq_len=2305)
    assert learner_fix(PRESETS["qwen2.5-7b"], s, 8 * GiB, max_ranks=1) == []


def _plan(*args):
    return subprocess.run([sys.executable, "-m", "orchestrator", "plan", *map(str, args)], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)


def test_plan_command_exit_status_and_lines():
    out = _plan(GPU_CONFIG, "--shape", "r1-distill-qwen-1.5b", "learner.activation_checkpointing=false")
    assert out.returncode == 1, out.stderr
    assert "verdict: DOES NOT FIT; change: set learner.activation_checkpointing=true" in out.stdout
    assert "84.28  DOES NOT FIT (limit 72.0 GiB = 90% of 80)" in out.stdout
    ok = _plan(GPU_CONFIG, "--shape", "r1-distill-qwen-1.5b", "--gpu-memory-gib", "80")
    assert ok.returncode == 0 and "verdict: fits the declared GPUs" in ok.stdout
    assert ("weight sync per step: 3.31 GiB to each engine in bfloat16 (broadcast from learner rank 0: "
            "rollout.weight_sync.method=collective)") in ok.stdout
    missing = _plan(GPU_CONFIG)  # the config's model is not on this machine
    assert missing.returncode == 2 and f"model.path={gpu_cfg().model.path!r}" in missing.stderr
    assert "--shape" in missing.stderr
    bad = _plan(GPU_CONFIG, "learner.micro_batch_tokens=-5", "--shape", "qwen2.5-7b")
    assert bad.returncode == 2 and "learner.micro_batch_tokens=-5" in bad.stderr


def test_plan_imports_without_ray_vllm_mlflow_or_torch():
    code = ("import sys, orchestrator.plan; "
            "print([m for m in ('ray', 'vllm', 'mlflow', 'torch', 'omegaconf') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stdout + out.stderr
