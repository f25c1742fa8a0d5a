"""Rollout throughput, side by side in one run: the orchestrator's vLLM rollout worker vs plain HF
``generate``, and budgeted two-phase generation vs one phase of the same total tokens.

Each engine runs in its own subprocess (vLLM's in-process mode replaces torch.set_num_threads in its
process, so it must not share one with HF), on the same model, prompts and lengths, one after the
other, with a warm-up batch first. Prints two tables with the ratio last:

1. generated tokens/s: ``RolloutWorker`` (vLLM, two-phase t x s) vs HF ``model.generate`` of t+s new
   tokens per sample (sampling, batched, left-padded);
2. seconds: two-phase budgeted rollout vs a single vLLM ``generate`` that produces exactly as many
   tokens per sample (``ignore_eos``, max_tokens = that sample's two-phase total), for both ways of
   budgeting: forced inside one request (``rollout.vllm.budget_forcing``, the default) and two
   ``generate`` calls (the second re-prefills), alternating batch by batch.

Both tables have a row per compute dtype of ``--dtypes``: ``default`` (the worker: ``model.dtype=auto`` as
``orchestrator/devices.py`` resolves it on this machine; HF: ``from_pretrained``'s own, float32), ``float32``,
``bfloat16``.

    .venv/bin/python benchmarks/rollout.py                      # random tiny model (the quickstart's shape)
    .venv/bin/python benchmarks/rollout.py --dtypes float32     # one dtype
    .venv/bin/python benchmarks/rollout.py --model outputs/quickstart/checkpoint --prompts 64 --samples 8
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script: the project's packages resolve from the checkout

from shapes import add_model_arguments, resolve_model  # noqa: E402


def _prompts(n: int) -> list[str]:
    from workloads.tasks.arithmetic import TASK

    return TASK.generate(n, difficulties=(2, 3, 4), seed=123, split="eval")["prompt"].to_pylist()


DTYPES = ("default", "float32", "bfloat16")


def _dtype(requested: str, engine: str) -> str:
    """The dtype an engine runs: ``default`` is the worker's ``model.dtype=auto`` on this machine's CPU, HF's own
    (float32) for ``generate``."""
    if requested != "default":
        return requested
    if engine == "hf":
        return "float32"
    from orchestrator.devices import DeviceFacts, cpu_bf16_flags, resolve

    return resolve("dtype", DeviceFacts.of(0, cpu_bf16_flags())).value


def run_vllm(args) -> dict:
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
                       "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING"})
    import pyarrow as pa
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from dataclasses import replace

    from orchestrator.rollout.engine import STANDALONE_VLLM
    from orchestrator.config import Budget
    from orchestrator.rollout.worker import RolloutWorker, SamplingSpec, engine_seconds

    worker = RolloutWorker(args.model, engine="vllm", prompt_template="<s>{prompt}<think>",
                           engine_kwargs=dict(dtype=_dtype(args.dtype, "vllm"), max_model_len=args.max_model_len, seed=0,
                                              vllm=replace(STANDALONE_VLLM, max_num_seqs=args.max_num_seqs)))
    table = pa.table({"prompt_id": [str(i) for i in range(args.prompts)], "prompt": _prompts(args.prompts),
                      "answer": ["0"] * args.prompts})
    spec = SamplingSpec(group_size=args.samples, budget=Budget(args.thinking, args.solution),
                        temperature=1.0)
    worker.generate(table, spec)  # warm-up
    llm = worker.engine.llm

    def single_phase(prompts, n) -> float:  # one phase, exactly the same number of tokens per sample
        params = [SamplingParams(max_tokens=max(1, k), ignore_eos=True, temperature=1.0, logprobs=0, detokenize=False)
                  for k in n]
        t0 = time.perf_counter()
        llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return time.perf_counter() - t0

    res = {m: {"seconds": 0.0, "engine_seconds": 0.0, "tokens": 0, "single_phase_seconds": 0.0}
           for m in ("forced", "two_calls")}
    for r in range(args.repeats):  # the modes alternate, so drift on the machine hits both alike
        for mode in res:
            worker.engine.budget_forcing = mode == "forced"
            t0 = time.perf_counter()
            out = worker.generate(table, spec, step=r + 1)
            res[mode]["seconds"] += time.perf_counter() - t0
            res[mode]["engine_seconds"] += engine_seconds(out)
            n = [a + b for a, b in zip(out["thinking_tokens"].to_pylist(), out["solution_tokens"].to_pylist())]
            res[mode]["tokens"] += sum(n)
            res[mode]["single_phase_seconds"] += single_phase(out["prompt_token_ids"].to_pylist(), n)
    return {"engine": "vllm", **res["forced"], "two_calls": res["two_calls"], "dtype": _dtype(args.dtype, "vllm")}


def run_hf(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    dtype = _dtype(args.dtype, "hf")
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, dtype), use_safetensors=True).eval()
    texts = [f"<s>{p}<think>" for p in _prompts(args.prompts) for _ in range(args.samples)]
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    inp = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros_like(inp)
    for i, row in enumerate(ids):
        inp[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    new = args.thinking + args.solution

    def once():
        with torch.no_grad():
            out = model.generate(input_ids=inp, attention_mask=mask, max_new_tokens=new, do_sample=True,
                                 temperature=1.0, top_k=0, pad_token_id=pad, eos_token_id=tok.eos_token_id)
        gen = out[:, width:]
        return int((gen != pad).sum())

    once()  # warm-up
    tokens, seconds = 0, 0.0
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        tokens += once()
        seconds += time.perf_counter() - t0
    return {"engine": "hf", "tokens": tokens, "seconds": seconds, "dtype": dtype}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--thinking", type=int, default=48)
    ap.add_argument("--solution", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="torch threads for HF generate")
    ap.add_argument("--max-model-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=0, help="vLLM max_num_seqs (0: the engine's default)")
    ap.add_argument("--dtypes", default="default,float32,bfloat16",
                    help="comma-separated compute dtypes, a row each: default (each engine's own), float32, bfloat16")
    ap.add_argument("--dtype", default="default", help=argparse.SUPPRESS)  # the worker's one
    ap.add_argument("--worker", choices=["vllm", "hf"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    for name in ("prompts", "samples", "thinking", "solution", "repeats", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.worker:
        print("RESULT " + json.dumps(run_vllm(args) if args.worker == "vllm" else run_hf(args)), flush=True)
        return 0
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        ap.error(f"--dtypes {args.dtypes!r}: each must be one of {', '.join(DTYPES)}")
    with tempfile.TemporaryDirectory() as tmp:
        args.model = resolve_model(ap, args, tmp)
        results = {(engine, dtype): _run_engine(args, engine, dtype) for dtype in dtypes for engine in ("vllm", "hf")}
    n = args.prompts * args.samples
    print(f"model {args.model}; {args.prompts} prompts x {args.samples} samples, budget {args.thinking}x"
          f"{args.solution}, {args.repeats} timed batches each after a warm-up; {os.cpu_count()} CPUs\n")
    print(f"{'engine':<34} {'dtype':<19} {'tokens':>9} {'seconds':>8} {'tokens/s':>9}")
    for dtype in dtypes:
        for label, r in (("RolloutWorker (vLLM, budgeted)", results["vllm", dtype]),
                         ("HF generate (one call, t+s new)", results["hf", dtype])):
            shown = f"default -> {r['dtype']}" if dtype == "default" else dtype
            print(f"{label:<34} {shown:<19} {r['tokens']:>9d} {r['seconds']:>8.2f} {r['tokens'] / r['seconds']:>9.0f}")
    for dtype in dtypes:
        v, h = results["vllm", dtype], results["hf", dtype]
        print(f"ratio vLLM/HF tokens/s, {dtype}: {(v['tokens'] / v['seconds']) / (h['tokens'] / h['seconds']):.2f}x "
              f"(goal >= 3x)")
    if "float32" in dtypes and "bfloat16" in dtypes:
        r32, r16 = (results["vllm", d]["tokens"] / results["vllm", d]["seconds"] for d in ("float32", "bfloat16"))
        print(f"ratio vLLM bfloat16/float32 tokens/s: {r16 / r32:.2f}x")
    print(f"\n{'generation (seconds)':<34} {'dtype':<9} {'worker':>7} {'engine':>7} {'one phase':>10} "
          f"{'engine/one phase':>17}")
    for dtype in dtypes:
        v = results["vllm", dtype]
        for label, r in (("two-phase, two generate calls", v["two_calls"]), ("two-phase, forced in one request", v)):
            print(f"{label:<34} {v['dtype']:<9} {r['seconds']:>7.2f} {r['engine_seconds']:>7.2f} "
                  f"{r['single_phase_seconds']:>10.2f} {r['engine_seconds'] / r['single_phase_seconds']:>16.3f}x")
    print("(worker = RolloutWorker.generate wall time, with tokenizing and building the rollout table; engine = "
          "the budgeted generate inside it; one phase = the same tokens per sample in one bare generate)")
    for dtype in dtypes:
        v = results["vllm", dtype]
        print(f"ratio two-phase/one-phase generate time (budget forced in one request, the default), {dtype}: "
              f"{v['engine_seconds'] / v['single_phase_seconds']:.3f}x (goal <= 1.10x); {n * args.repeats} samples")
    return 0


def _run_engine(args, engine: str, dtype: str) -> dict:
    """One engine at one dtype in its own subprocess: its RESULT."""
    cmd = [sys.executable, __file__, "--worker", engine, "--model", args.model, f"--dtype={dtype}",
           *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
             ("prompts", "samples", "thinking", "solution", "repeats", "threads", "max_model_len", "max_num_seqs")]]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        print(out.stdout[-2000:], out.stderr[-4000:], file=sys.stderr)
        raise SystemExit(f"{engine} run ({dtype}) failed ({out.returncode})")
    return json.loads(line[0][7:])


if __name__ == "__main__":
    sys.exit(main())
