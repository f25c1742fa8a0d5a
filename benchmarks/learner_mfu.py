"""Learner step MFU: ``Learner.step`` (the GRPO update the trainer runs) on a random Qwen2 of a given
shape, as tokens/s and model FLOPs utilization against the accelerator's peak.

Needs only torch, transformers, numpy and pyarrow (no Ray, vLLM or MLflow), so it runs as it is on a
bare GPU machine. The model is built in a temporary directory from its shape; nothing is downloaded.

Model FLOPs per step count what the learner computes, forward = 1, backward = 2 (the PaLM convention):
- the policy's forward and backward: 3 x forward;
- the frozen reference's forward when ``--kl`` > 0: 1 x forward;
- a forward: 2 x (non-embedding parameters) per token over prompt + response, 2 x vocab x hidden per
  token whose logits are computed (the response and one before it: the learner keeps only those),
  and causal attention, 2 x layers x T^2 x hidden per sequence (QK^T and AV, half of the square).
Old logprobs are not recomputed (one update per batch), as in the trainer.

MFU is printed against the device's dense bf16 peak from the spec sheet (``--peak-tflops`` overrides;
H100/H200 SXM 989) and against a large bf16 matmul measured in the same run (what this device and
torch reach on one GEMM), so both readings are side by side. On a CPU give ``--peak-tflops`` or read
tokens/s only. Beside the measured peak GPU memory it prints what ``python -m orchestrator plan`` predicts
for the same shape and micro-batch (``orchestrator/plan.py``); ``scripts/gpu_check.py`` compares the two.

    python benchmarks/learner_mfu.py                                  # qwen2-0.5b shape, bf16, on CUDA
    python benchmarks/learner_mfu.py --strategy fsdp --activation-checkpointing   # FSDP2 on one GPU
    python benchmarks/learner_mfu.py --shape tiny --device cpu --batch 16 --prompt 16 --response 32 --steps 2
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages resolve from the checkout

# name: (hidden, layers, heads, kv_heads, ffn, vocab, tied). qwen2-0.5b is Qwen2.5-0.5B's shape.
SHAPES = {
    "tiny": (128, 3, 4, 4, 512, 128, True),
    "qwen2-0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "qwen2-1.5b": (1536, 28, 12, 2, 8960, 151936, True),
}
# Dense bf16 tensor-core peaks from the vendors' spec sheets, TFLOP/s (without sparsity).
PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 70.0}


def build(shape: str, out_dir: Path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    hidden, layers, heads, kv, ffn, vocab, tied = SHAPES[shape]
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=ffn, max_position_embeddings=4096,
                         tie_word_embeddings=tied, use_sliding_window=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def forward_flops(shape: str, batch: int, prompt: int, response: int) -> float:
    hidden, layers, heads, kv, ffn, vocab, _ = SHAPES[shape]
    head_dim = hidden // heads
    per_layer = hidden * hidden * 2 + hidden * kv * head_dim * 2 + 3 * hidden * ffn  # q, o; k, v; gate, up, down
    tokens = prompt + response
    dense = 2 * layers * per_layer * batch * tokens
    head = 2 * vocab * hidden * batch * (response + 1)
    attention = 2 * layers * tokens * tokens * hidden * batch
    return float(dense + head + attention)


def predicted_peak_bytes(args) -> float:
    """``orchestrator.plan``'s peak for this run: one rank, every row the same length (no padding mask)."""
    from orchestrator.plan import LearnerSetup, ModelShape, learner_memory

    hidden, layers, heads, kv, ffn, vocab, tied = SHAPES[args.shape]
    shape = ModelShape(hidden=hidden, layers=layers, heads=heads, kv_heads=kv, intermediate=ffn, vocab=vocab,
                       tied=tied)
    seq_len = args.prompt + args.response
    rows = min(args.micro_batch, args.batch)
    if args.micro_batch_tokens > 0:
        rows = max(1, min(rows, args.micro_batch_tokens // seq_len))
    setup = LearnerSetup(ranks=1, sharded=args.strategy == "fsdp", dtype=args.dtype, reference=args.kl > 0,
                         checkpointing=args.activation_checkpointing, rows=rows, seq_len=seq_len, padded=False)
    return learner_memory(shape, setup)["total"]


def matmul_tflops(device, dtype, n: int = 8192, repeats: int = 10) -> float:
    """TFLOP/s of an n x n x n matmul in ``dtype``, mean of ``repeats`` after 3 warm-ups."""
    import torch

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e12


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="qwen2-0.5b")
    ap.add_argument("--batch", type=int, default=64, help="sequences per step (one mini-batch)")
    ap.add_argument("--micro-batch", type=int, default=16, help="sequences per forward/backward")
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens per sequence")
    ap.add_argument("--response", type=int, default=512, help="response tokens per sequence")
    ap.add_argument("--steps", type=int, default=5, help="timed steps (after one warm-up)")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--kl", type=float, default=0.05, help="KL coefficient (> 0: a reference forward too)")
    ap.add_argument("--device", default="auto", help="auto (cuda when there is one) | cpu | cuda[:N]")
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="peak to report MFU against (0: from the GPU's name)")
    ap.add_argument("--no-matmul", action="store_true", help="skip the measured-matmul reference")
    ap.add_argument("--strategy", choices=["single", "fsdp"], default="single",
                    help="single: the model whole, bf16 autocast; fsdp: FSDP2 on one device (mixed precision)")
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute each decoder layer")
    ap.add_argument("--micro-batch-tokens", type=int, default=0, help="cap rows x tokens per micro-batch (0: off)")
    args = ap.parse_args()
    for name in ("batch", "micro_batch", "prompt", "response", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.kl < 0 or args.peak_tflops < 0 or args.micro_batch_tokens < 0:
        ap.error("--kl, --peak-tflops and --micro-batch-tokens must be >= 0")

    import numpy as np
    import pyarrow as pa
    import torch

    from orchestrator.learner.checkpoint import resolve_device
    from orchestrator.learner.worker import Learner

    device = resolve_device(args.device)
    if device.type == "cuda" and device.index is None:  # a process group (FSDP) needs the device's index
        device = torch.device("cuda", torch.cuda.current_device())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)
    vocab = SHAPES[args.shape][5]
    rng = np.random.default_rng(0)
    batch = pa.table({
        "prompt_token_ids": rng.integers(0, vocab, (args.batch, args.prompt)).tolist(),
        "response_token_ids": rng.integers(0, vocab, (args.batch, args.response)).tolist(),
        "loss_mask": np.ones((args.batch, args.response), dtype=np.float32).tolist(),
        "advantage": rng.standard_normal(args.batch).astype(np.float32),
    })
    with tempfile.TemporaryDirectory() as tmp:
        path = build(args.shape, Path(tmp))
        learner = Learner(str(path), lr=1e-6, algorithm={"kl_coef": args.kl}, micro_batch_size=args.micro_batch,
                          dtype=args.dtype, device=str(device), strategy="fsdp" if args.strategy == "fsdp" else "auto",
                          activation_checkpointing=args.activation_checkpointing,
                          micro_batch_tokens=args.micro_batch_tokens)
        params = sum(p.numel() for p in learner.model.parameters())
        learner.step(batch)  # warm-up: allocator, kernels, AdamW state
        _sync(device)
        times = []
        for _ in range(args.steps):
            t0 = time.perf_counter()
            learner.step(batch)
            _sync(device)
            times.append(time.perf_counter() - t0)
        peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        learner.shutdown()  # leaves a one-rank FSDP group
        del learner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    measured = None if args.no_matmul else matmul_tflops(device, dtype, n=8192 if device.type == "cuda" else 512)

    sec = statistics.median(times)
    flops = forward_flops(args.shape, args.batch, args.prompt, args.response) * (3 + (1 if args.kl > 0 else 0))
    achieved = flops / sec / 1e12
    tokens = args.batch * (args.prompt + args.response)
    ckpt = ", activation checkpointing" if args.activation_checkpointing else ""
    print(f"device {name}; shape {args.shape} ({params / 1e6:.1f}M parameters), {args.dtype}, {args.strategy}{ckpt}; "
          f"{args.batch} sequences x ({args.prompt} + {args.response}) tokens, micro-batch {args.micro_batch}, "
          f"kl {args.kl}; median of {args.steps} steps after a warm-up\n")
    plan = predicted_peak_bytes(args) / 2**30
    print(f"{'s/step':>8} {'tokens/s':>10} {'model TFLOP/step':>17} {'TFLOP/s':>9} {'peak GiB':>9} {'plan GiB':>9}")
    print(f"{sec:>8.4g} {tokens / sec:>10.0f} {flops / 1e12:>17.4g} {achieved:>9.4g} {peak_mem:>9.2f} {plan:>9.2f}")
    if measured is not None:
        print(f"measured {args.dtype} matmul on this device: {measured:.4g} TFLOP/s; "
              f"learner / matmul: {achieved / measured:.1%}")
    if peak:
        print(f"MFU against a {peak:.4g} TFLOP/s peak ({'--peak-tflops' if args.peak_tflops else 'dense bf16, spec sheet'}): "
              f"{achieved / peak:.1%}")
    else:
        print("MFU: no peak known for this device (give --peak-tflops)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
