"""benchmarks/: the fixed-length model never stops by itself; the learner MFU script counts FLOPs right."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def shapes(benchmark_module):
    return benchmark_module("shapes")


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


def test_learner_mfu_script_reports_throughput_and_mfu():
    import re
    import subprocess
    import sys

    cmd = [sys.executable, str(ROOT / "benchmarks" / "learner_mfu.py"), "--shape", "tiny", "--device", "cpu",
           "--dtype", "float32", "--batch", "8", "--prompt", "8", "--response", "16", "--steps", "2",
           "--peak-tflops", "0.5", "--no-matmul"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["s/step"])
    row = lines[header + 1].split()
    sec, tokens_per_s, tflop, plan = float(row[0]), float(row[1]), float(row[2]), float(row[5])
    assert sec > 0 and tokens_per_s == pytest.approx(8 * 24 / sec, rel=0.01)
    # 3 passes (forward + backward) + 1 reference forward of the tiny shape's model FLOPs
    assert tflop == pytest.approx(4 * _tiny_forward_flops(8, 8, 16) / 1e12, rel=1e-3)
    # the plan's prediction for the same run: the tiny shape, one rank, 8 rows of 24 tokens, a reference
    from orchestrator.plan import LearnerSetup, ModelShape, learner_memory

    tiny = ModelShape(hidden=128, layers=3, heads=4, kv_heads=4, intermediate=512, vocab=128, tied=True)
    want = learner_memory(tiny, LearnerSetup(dtype="float32", rows=8, seq_len=24, padded=False))["total"]
    assert plan == pytest.approx(want / 2**30, abs=0.005)
    mfu = re.search(r"MFU against a 0\.5 TFLOP/s peak \(--peak-tflops\): ([\d.]+)%", out.stdout)
    assert mfu and 0 < float(mfu.group(1)) < 100

    bad = subprocess.run([*cmd[:2], "--batch", "0"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--batch must be >= 1" in bad.stderr


def _tiny_forward_flops(batch: int, prompt: int, response: int) -> float:
    """The tiny shape's forward FLOPs written out: 3 layers of q/k/v/o (128^2 each) and a 512-wide
    SwiGLU, logits over 128 tokens for the response and one before it, causal attention."""
    tokens = prompt + response
    dense = 2 * 3 * (4 * 128 * 128 + 3 * 128 * 512) * batch * tokens
    return dense + 2 * 128 * 128 * batch * (response + 1) + 2 * 3 * tokens**2 * 128 * batch


def test_gpu_check_runs_its_checks_on_a_cpu():
    """scripts/gpu_check.sh's Python part on the tiny shape: the import, checkpointing and both learner_mfu
    runs pass; the memory checks skip (no CUDA counter on a CPU); the wrapper is valid bash."""
    import subprocess
    import sys

    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0
    cmd = [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--shape", "tiny", "--batch", "8",
           "--prompt", "8", "--response", "16", "--steps", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    status = {line.split()[1].rstrip(":"): line.split()[0] for line in out.stdout.splitlines()
              if line.split()[:1] in (["PASS"], ["FAIL"], ["SKIP"])}
    assert status == {"import": "PASS", "device": "SKIP", "checkpointing": "PASS", "mfu-single": "PASS",
                      "memory-single": "SKIP", "mfu-fsdp": "PASS", "memory-fsdp": "SKIP", "sync-nccl": "SKIP"}, out.stdout
    assert "largest relative gradient difference with/without checkpointing 0.00e+00" in out.stdout


def test_sync_check_runs_over_gloo():
    """scripts/sync_check.py (the NCCL check for two GPUs) on CPUs: every byte arrives in bf16, and a silent
    engine fails rank 0's send within the timeout while rank 0 lives on."""
    import subprocess
    import sys

    cmd = [sys.executable, str(ROOT / "scripts" / "sync_check.py"), "--backend", "gloo", "--params", "2e6",
           "--timeout", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "PASS sync-gloo:" in out.stdout and "every byte equal: True" in out.stdout
    assert "PASS sync-timeout-gloo: a silent engine failed the send after 1." in out.stdout, out.stdout


def test_gpu_check_memory_verdict():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    assert gpu_check.check_memory("m", 10.0, 9.0) and gpu_check.check_memory("m", 7.6, 10.0)
    assert not gpu_check.check_memory("m", 13.0, 10.0) and not gpu_check.check_memory("m", 7.4, 10.0)
    assert gpu_check.check_memory("m", float("nan"), 1.0)  # SKIP does not fail the run


def test_hf_engine_generate_keeps_no_scores(benchmark_module, tiny_model, tmp_path):
    """benchmarks/hf_memory.py's measurement, small: at a 64k vocabulary one HF-engine generate peaks far
    below the batch x tokens x vocabulary scores that generate(output_scores=True) keeps, which the same
    measurement sees (with the engine's old stacked log-softmax, about three times those bytes)."""
    hf_memory = benchmark_module("hf_memory")
    batch, tokens, vocab = 4, 64, 65536
    path = hf_memory.build_vocab(tiny_model, tmp_path / "64k", vocab)  # the session's tiny model, 64k entries
    r = hf_memory.measure(str(path), batch, tokens)
    assert r["engine"]["steps"] == r["output_scores"]["steps"] == tokens  # nothing stopped early
    kept = batch * tokens * vocab * 4
    assert r["output_scores"]["peak"] > 2 * kept
    assert r["engine"]["peak"] < kept / 4


def test_process_cpu_counts_a_busy_child_by_its_kind():
    """benchmarks/process_cpu.py: a command's busy child shows up with about the CPU it burnt."""
    import subprocess
    import sys

    busy = "import time; t = time.process_time(); exec('while time.process_time() - t < 3: pass')"
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "process_cpu.py"), "--top", "50", "--",
                          sys.executable, "-c", f"import subprocess, sys; subprocess.run([sys.executable, '-c', {busy!r}])"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # the busy child's row (its kind: its command line without the interpreter's folder, cut to 60 characters);
    # sampled once a second, so up to a second of its end can be missed
    name = f"{Path(sys.executable).name} -c {busy}"[:60]
    cpu = [float(line.split(" | ")[1]) for line in out.stdout.splitlines() if line.startswith(f"| {name} |")]
    assert len(cpu) == 1 and 1.8 <= cpu[0] <= 4.0, out.stdout
