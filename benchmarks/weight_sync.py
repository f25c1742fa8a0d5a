"""Weight sync time vs model size: learner actor -> object store -> vLLM rollout actor, in place.

For each size a random Qwen2 (tied embeddings, the tiny tokenizer) is built, a ``Learner`` and a vLLM
``RolloutWorker`` start as Ray actors, and the driver times what the training loop does after every
step: ``learner.get_weights()`` (full CPU state dict, lm_head included) and ``update_weights`` on the
worker (``collective_rpc`` -> ``reload_weights`` + prefix-cache reset), over ``--repeats`` syncs.
Prints parameters, bytes, median seconds per sync and bytes/s, one row per size.

    .venv/bin/python benchmarks/weight_sync.py                  # 0.8M, 3.4M, 25M, 101M parameters
    .venv/bin/python benchmarks/weight_sync.py --sizes tiny,small --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from shapes import SHAPES as SIZES, build


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="tiny,small,medium,large", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SIZES]
    if bad or not sizes:
        ap.error(f"--sizes: unknown {bad or sizes}; choose from {', '.join(SIZES)}")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    import ray

    from orchestrator.learner.worker import Learner
    from orchestrator.rollout.worker import RolloutWorker
    from orchestrator.runtime import VLLM_CPU_ENV, WORKER_ENV

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in sizes:
            path = build(name, tmp, max_position_embeddings=256)
            learner = ray.remote(Learner).options(num_cpus=1, runtime_env={"env_vars": WORKER_ENV}).remote(
                str(path), device="cpu")
            worker = ray.remote(RolloutWorker).options(
                num_cpus=1, runtime_env={"env_vars": {**VLLM_CPU_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}}).remote(
                str(path), engine="vllm", engine_kwargs=dict(dtype="float32", max_model_len=256, seed=0))
            ray.get([worker.ready.remote(), learner.version.remote()])
            weights = ray.get(learner.get_weights.remote())
            sent = sum(t.numel() * t.element_size() for t in weights.values())  # lm_head sent even when tied
            params = sum(t.numel() for t in {id(t): t for t in weights.values()}.values())
            del weights
            times = []
            for v in range(args.repeats + 1):
                t0 = time.perf_counter()
                ref = learner.get_weights.remote()
                ray.get(worker.update_weights.remote(ref, v))
                if v:  # the first sync warms up both sides
                    times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            rows.append((name, params, sent, med, sent / med))
            print(f"{name}: {params / 1e6:.1f}M parameters, sync {med * 1000:.0f} ms", flush=True)
            ray.kill(worker)
            ray.kill(learner)
    ray.shutdown()
    print(f"\n{'size':<8} {'params':>9} {'MB sent':>8} {'s/sync':>8} {'MB/s':>8}")
    for name, params, n_bytes, med, bps in rows:
        print(f"{name:<8} {params / 1e6:>8.1f}M {n_bytes / 1e6:>8.1f} {med:>8.3f} {bps / 1e6:>8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
