"""``learner.compile``: ``Learner.step`` eager vs ``torch.compile(dynamic=True)``, side by side in one run.

For each model shape (random Qwen2s of ``benchmarks/shapes.py``, the tiny tokenizer) and compute dtype, two
learners start from the same weights and step on the same batches: rows of RL-like lengths (a prompt of
``--prompt`` tokens, responses drawn between half and all of ``--response``, so every step has new
shapes, as in training). Prints per shape: the first step of each (the compiled one compiles there),
the median of the next ``--steps``, the ratio compiled/eager, after how many steps compiling has paid for
itself, and the largest difference between the two learners' losses on the first step (the compiled
forward computes the same function; it may round differently).

This is where ``devices.py``'s ``learner.compile=auto`` threshold comes from (docs/performance.md, section 10).

    .venv/bin/python benchmarks/learner_compile.py                          # tiny, small, medium; fp32
    .venv/bin/python benchmarks/learner_compile.py --shapes small --dtypes float32,bfloat16 --steps 5
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

from shapes import SHAPES, build  # noqa: E402


def batches(n: int, rows: int, prompt: int, response: int, vocab: int, seed: int = 0):
    """``n`` learner batches of ``rows`` sequences with response lengths in [response / 2, response]."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        lengths = rng.integers(max(1, response // 2), response + 1, rows)
        out.append(pa.table({
            "prompt_token_ids": pa.array(rng.integers(3, vocab, (rows, prompt)).tolist(), pa.list_(pa.int32())),
            "response_token_ids": pa.array([rng.integers(3, vocab, k).tolist() for k in lengths],
                                           pa.list_(pa.int32())),
            "loss_mask": pa.array([[1] * int(k) for k in lengths], pa.list_(pa.int8())),
            "advantage": pa.array(rng.standard_normal(rows).astype("float32")),
        }))
    return out


def timed_steps(learner, work) -> tuple[float, list[float], float]:
    """(first step's seconds, the other steps' seconds, the first step's loss)."""
    times, first_loss = [], None
    for batch in work:
        t0 = time.perf_counter()
        metrics = learner.step(batch)
        times.append(time.perf_counter() - t0)
        first_loss = metrics["loss"] if first_loss is None else first_loss
    return times[0], times[1:], first_loss


def measure(path: str, dtype: str, args) -> dict:
    import torch

    from orchestrator.learner.worker import Learner

    work = batches(args.steps + 1, args.rows, args.prompt, args.response, vocab=128)
    row = {}
    for name, compile_ in (("eager", False), ("compiled", True)):
        # Dynamo's cache is per process and per code object (transformers' forward wrapper is one for every
        # model): without a reset the measurements before this one count towards its recompile limit (8), and
        # past it dynamo runs the frame eagerly. One training run holds one learner, as each row here does.
        torch._dynamo.reset()
        learner = Learner(path, lr=1e-5, algorithm={"kl_coef": 0.05}, micro_batch_size=args.rows, dtype=dtype,
                          num_threads=args.threads, device="cpu", compile=compile_)
        first, rest, loss = timed_steps(learner, work)
        row[name] = {"first": first, "median": statistics.median(rest), "loss": loss}
        row["params"] = sum(p.numel() for p in learner.model.parameters())
        del learner
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,small,medium", help=f"comma-separated, of {sorted(SHAPES)}")
    ap.add_argument("--dtypes", default="float32", help="comma-separated: float32, bfloat16")
    ap.add_argument("--rows", type=int, default=128, help="sequences per step (the quickstart: 16 x 8)")
    ap.add_argument("--prompt", type=int, default=12, help="prompt tokens per sequence")
    ap.add_argument("--response", type=int, default=32, help="longest response; each row draws [half, all]")
    ap.add_argument("--steps", type=int, default=8, help="timed steps after the first")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    shapes = [s for s in args.shapes.split(",") if s]
    dtypes = [d for d in args.dtypes.split(",") if d]
    for bad in [s for s in shapes if s not in SHAPES]:
        ap.error(f"--shapes: unknown shape {bad!r}; known: {sorted(SHAPES)}")
    for bad in [d for d in dtypes if d not in ("float32", "bfloat16")]:
        ap.error(f"--dtypes: {bad!r} is not float32 or bfloat16")
    if min(args.rows, args.prompt, args.response, args.steps) < 1:
        ap.error("--rows, --prompt, --response and --steps must be >= 1")

    print(f"Learner.step, {args.rows} rows x ({args.prompt} + up to {args.response}) tokens, KL 0.05, "
          f"{args.threads} threads; median of {args.steps} steps after the first\n")
    print(f"{'shape':>7} {'params':>8} {'dtype':>9} {'eager 1st':>10} {'eager s':>8} {'comp 1st':>9} "
          f"{'comp s':>8} {'comp/eager':>10} {'pays after':>10} {'|d loss|':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for shape in shapes:
            path = str(build(shape, tmp, max_position_embeddings=max(256, args.prompt + args.response)))
            for dtype in dtypes:
                r = measure(path, dtype, args)
                e, c = r["eager"], r["compiled"]
                saving = e["median"] - c["median"]
                extra = c["first"] - e["first"]
                pays = "never" if saving <= 0 else "at once" if extra <= 0 else f"{extra / saving:.0f} steps"
                print(f"{shape:>7} {r['params'] / 1e6:>7.1f}M {dtype:>9} {e['first']:>10.2f} {e['median']:>8.3f} "
                      f"{c['first']:>9.1f} {c['median']:>8.3f} {c['median'] / e['median']:>9.2f}x {pays:>10} "
                      f"{abs(e['loss'] - c['loss']):>9.2e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
