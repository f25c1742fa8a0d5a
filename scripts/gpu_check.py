"""What a first GPU machine has to show for the learner, one line per check: PASS, FAIL or SKIP, with figures.

Needs torch, transformers (which brings numpy and safetensors) and pyarrow (the learner's batches are Arrow
tables): no Ray, vLLM or MLflow.
Run from the repository root (``bash scripts/gpu_check.sh`` does); exit status 0 when no check failed.

1. import: ``orchestrator.plan`` loads without Ray, vLLM, MLflow or torch (the sizing command's module).
2. device: a CUDA device, its name and memory.
3. checkpointing: one-rank FSDP2 in bf16, the same batch with and without activation checkpointing: the
   gradients agree (relative error per tensor), fp32 masters, a bf16 reference.
4. mfu-single / mfu-fsdp: ``benchmarks/learner_mfu.py`` as it is (bf16 autocast), then with ``--strategy fsdp
   --activation-checkpointing``: it runs, with its tokens/s and MFU.
5. memory-single / memory-fsdp: each run's ``torch.cuda.max_memory_allocated`` against what
   ``python -m orchestrator plan`` predicts for it; PASS within 25% (SKIP on a CPU, which has no such counter).
6. sync-nccl / sync-timeout-nccl: ``scripts/sync_check.py``, the collective weight sync over NCCL from
   cuda:0 to cuda:1 (every byte, GB/s, a silent engine failing within the timeout); SKIP with fewer than 2 GPUs.

    bash scripts/gpu_check.sh                                      # on the GPU machine
    python scripts/gpu_check.py --device cpu --shape tiny --batch 8 --prompt 8 --response 16   # on a CPU
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages resolve from the checkout
TOLERANCE = 0.25  # |measured / predicted - 1| that still passes the memory checks


def report(status: str, name: str, figures: str) -> bool:
    print(f"{status} {name}: {figures}", flush=True)
    return status != "FAIL"


def check_import() -> bool:
    code = ("import sys, orchestrator.plan; "
            "print(','.join(m for m in ('ray', 'vllm', 'mlflow', 'torch') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    pulled = out.stdout.strip()
    if out.returncode or pulled:
        return report("FAIL", "import", f"orchestrator.plan pulled [{pulled}] {out.stderr[-300:]}")
    return report("PASS", "import", "orchestrator.plan loads without ray, vllm, mlflow, torch")


def check_device(device) -> bool:
    import torch

    if device.type != "cuda":
        return report("SKIP", "device", f"{device}: no CUDA device asked for")
    props = torch.cuda.get_device_properties(device)
    return report("PASS", "device", f"{props.name}, {props.total_memory / 2**30:.1f} GiB, torch {torch.__version__}")


def _gradients(model_dir: str, device, batch, checkpointing: bool) -> dict:
    """One-rank FSDP2 bf16 learner's gradient on ``batch`` (one mini-batch, no optimizer step), on the CPU."""
    import numpy as np
    import torch

    from orchestrator.learner.worker import Learner, _Totals, sequences_from_table

    learner = Learner(model_dir, device=str(device), strategy="fsdp", dtype="bfloat16", algorithm={"kl_coef": 0.05},
                      micro_batch_size=4, activation_checkpointing=checkpointing)
    try:
        dtypes = ({p.dtype for p in learner.model.parameters()}, {p.dtype for p in learner.ref_model.parameters()})
        seqs = sequences_from_table(batch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        learner.optimizer.step = lambda: None  # keep the gradient: _update steps and zeroes otherwise
        learner.optimizer.zero_grad = lambda set_to_none=True: None
        learner._update(seqs, np.arange(len(seqs)), None, None, _Totals(), with_entropy=False)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        grads = {n: p.grad.full_tensor().float().cpu() for n, p in learner.model.named_parameters()}
        return {"grads": grads, "dtypes": dtypes, "peak": peak}
    finally:
        learner.shutdown()
        del learner
        if device.type == "cuda":
            torch.cuda.empty_cache()


def check_checkpointing(args, device) -> bool:
    import numpy as np
    import pyarrow as pa
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import learner_mfu

    vocab = learner_mfu.SHAPES[args.shape][5]
    rng = np.random.default_rng(0)
    rows = 8
    lengths = rng.integers(args.response // 2, args.response + 1, rows)  # uneven rows: a padding mask
    batch = pa.table({
        "prompt_token_ids": rng.integers(0, vocab, (rows, args.prompt)).tolist(),
        "response_token_ids": [rng.integers(0, vocab, n).tolist() for n in lengths],
        "loss_mask": [[1.0] * int(n) for n in lengths],
        "advantage": rng.standard_normal(rows).astype(np.float32),
    })
    with tempfile.TemporaryDirectory() as tmp:
        path = str(learner_mfu.build(args.shape, Path(tmp)))
        plain, ckpt = (_gradients(path, device, batch, c) for c in (False, True))
    worst, name = -1.0, ""
    for key, g in plain["grads"].items():
        err = float((ckpt["grads"][key] - g).norm() / g.norm().clamp(min=1e-30))
        if err > worst:
            worst, name = err, key
    ok_dtypes = ckpt["dtypes"] == ({torch.float32}, {torch.bfloat16})
    figures = (f"one-rank FSDP2 bf16 on {args.shape}, {rows} uneven rows: largest relative gradient difference "
               f"with/without checkpointing {worst:.2e} ({name}); peak {plain['peak']:.2f} GiB without, "
               f"{ckpt['peak']:.2f} GiB with; masters/reference {ckpt['dtypes']}")
    return report("PASS" if worst < 2e-2 and ok_dtypes else "FAIL", "checkpointing", figures)


def run_mfu(args, device, strategy: str) -> tuple[bool, float, float]:
    """``benchmarks/learner_mfu.py`` for ``strategy``; (ran, measured peak GiB, predicted GiB)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "learner_mfu.py"), "--shape", args.shape, "--device",
           str(device), "--dtype", args.dtype, "--batch", str(args.batch), "--micro-batch", str(args.micro_batch),
           "--prompt", str(args.prompt), "--response", str(args.response), "--steps", str(args.steps),
           "--strategy", strategy]
    if strategy == "fsdp":
        cmd.append("--activation-checkpointing")
    if device.type != "cuda":
        cmd += ["--peak-tflops", "0.5", "--no-matmul"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    name = f"mfu-{strategy}"
    if out.returncode:
        report("FAIL", name, f"exit {out.returncode}: {out.stderr.strip()[-500:]}")
        return False, float("nan"), float("nan")
    lines = out.stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:1] == ["s/step"])
    sec, tok_s, _, tflops, peak, plan = (float(x) for x in lines[header + 1].split())
    mfu = re.search(r"MFU against .*: ([\d.]+%)", out.stdout)
    report("PASS", name, f"{sec:.4g} s/step, {tok_s:,.0f} tokens/s, {tflops:.4g} TFLOP/s, "
                         f"MFU {mfu.group(1) if mfu else 'n/a'}, peak {peak:.2f} GiB ({' '.join(cmd[2:])})")
    return True, peak, plan


def check_memory(name: str, peak: float, plan: float) -> bool:
    if peak != peak:  # nan: no CUDA allocator counter
        return report("SKIP", name, f"no torch.cuda.max_memory_allocated on this device (plan {plan:.2f} GiB)")
    ratio = peak / plan
    status = "PASS" if abs(ratio - 1) <= TOLERANCE else "FAIL"
    return report(status, name, f"measured {peak:.2f} GiB, plan {plan:.2f} GiB, measured/plan {ratio:.2f}")


def check_sync(device) -> bool:
    """scripts/sync_check.py's lines, relayed (it needs two GPUs: rank 0 and an engine on one each)."""
    import torch

    if device.type != "cuda" or torch.cuda.device_count() < 2:
        n = torch.cuda.device_count() if device.type == "cuda" else 0
        return report("SKIP", "sync-nccl", f"{n} CUDA device(s); learner rank 0 and an engine need one each")
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "sync_check.py")], capture_output=True, text=True,
                         cwd=ROOT, timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.split()[:1] in (["PASS"], ["FAIL"], ["SKIP"])]
    print("\n".join(lines) or f"FAIL sync-nccl: {out.stderr[-500:]}", flush=True)
    return out.returncode == 0 and bool(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda:0", help="cuda:N (default cuda:0) or cpu")
    ap.add_argument("--shape", default="qwen2-0.5b", help="a benchmarks/learner_mfu.py shape")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--response", type=int, default=512)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()

    ok = check_import()
    try:
        import pyarrow  # noqa: F401
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:
        report("FAIL", "packages", f"{exc}: pip install torch transformers pyarrow")
        return 1

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        report("FAIL", "device", f"{args.device} asked for, torch {torch.__version__} sees no CUDA device")
        return 1
    ok &= check_device(device)
    ok &= check_checkpointing(args, device)
    for strategy in ("single", "fsdp"):
        ran, peak, plan = run_mfu(args, device, strategy)
        ok &= ran and check_memory(f"memory-{strategy}", peak, plan)
    ok &= check_sync(device)
    print("all checks passed" if ok else "some checks FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
