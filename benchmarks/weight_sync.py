"""Weight sync time, the two ways side by side: object store vs collective, fp32 vs bf16 payloads.

For each size a random Qwen2 (tied embeddings, the tiny tokenizer) is built, a ``Learner`` (fp32
masters) starts as a Ray actor, and for each engine dtype a vLLM ``RolloutWorker`` starts beside it.
The driver times what the training loop does after each step, alternating the two ways sync by sync:

- ``object store`` (``rollout.weight_sync.method=object_store``): ``learner.sync_payload(dtype)`` (NumPy
  views of the weights, or bf16 copies; ``orchestrator/weight_sync.py``) through Ray's object store to
  ``worker.update_weights``, loaded in place;
- ``collective`` (``method=collective``): ``learner.broadcast_weights`` and ``worker.receive_weights``
  at once, over the gloo group the two opened beforehand (``orchestrator/weight_broadcast.py``), in
  ``--bucket-mb`` buckets, loaded in place.

Both load with ``rollout/cpu_reload.py`` and reset the prefix cache. The first sync of each way warms
up both sides; the medians of the next ``--repeats`` are printed, with the ratios object store /
collective and fp32 / bf16.

    .venv/bin/python benchmarks/weight_sync.py                       # 33.6M and 132M, fp32 and bf16
    .venv/bin/python benchmarks/weight_sync.py --sizes small --dtypes float32 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

from shapes import SHAPES as SIZES, build

DTYPES = ("float32", "bfloat16")
WAYS = ("object store", "collective")


def _sync_once(way: str, learner, worker, version: int, dtype: str, bucket_mb: float) -> float:
    import ray

    t0 = time.perf_counter()
    if way == "object store":
        ray.get(worker.update_weights.remote(learner.sync_payload.remote(dtype), version))
    else:
        received = worker.receive_weights.remote(version)
        status = ray.get(learner.broadcast_weights.remote([0], version, dtype, bucket_mb))
        ray.get(received)
        if status != {0: "ok"}:
            raise RuntimeError(f"broadcast failed: {status}")
    return time.perf_counter() - t0


def _measure(path: str, learner, dtype: str, args) -> dict[str, float]:
    """Median seconds per sync each way, for one engine dtype."""
    import ray

    from dataclasses import replace

    from orchestrator.rollout.engine import STANDALONE_VLLM
    from orchestrator.rollout.worker import RolloutWorker
    from orchestrator.runtime import VLLM_CPU_ENV

    env = {**VLLM_CPU_ENV, "VLLM_CPU_KVCACHE_SPACE": "1"}
    if args.multiprocess:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    worker = ray.remote(RolloutWorker).options(num_cpus=1, runtime_env={"env_vars": env}).remote(
        path, engine="vllm", engine_kwargs=dict(dtype=dtype, max_model_len=256, seed=0,
                                                vllm=replace(STANDALONE_VLLM, multiprocess=args.multiprocess,
                                                             budget_forcing=False)))
    ray.get(worker.ready.remote())
    key = f"bench-{dtype}"
    joined = worker.open_sync_group.remote(ray.get(learner.sync_address.remote()), key, 2, "gloo", 300.0)
    assert ray.get(learner.open_sync_groups.remote([(0, key)], 2, "gloo", 300.0)) == {0: "ok"}
    ray.get(joined)
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    for v in range(args.repeats + 1):
        for way in WAYS:
            seconds = _sync_once(way, learner, worker, v, dtype, args.bucket_mb)
            if v:
                times[way].append(seconds)
    ray.kill(worker)
    return {way: statistics.median(t) for way, t in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="medium,large", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--dtypes", default=",".join(DTYPES), help="engine dtypes: float32, bfloat16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--bucket-mb", type=float, default=64.0, help="rollout.weight_sync.bucket_mb")
    ap.add_argument("--multiprocess", action="store_true", help="vLLM's engine in its own process")
    args = ap.parse_args()
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not sizes or any(s not in SIZES for s in sizes):
        ap.error(f"--sizes: choose from {', '.join(SIZES)}")
    if not dtypes or any(d not in DTYPES for d in dtypes):
        ap.error(f"--dtypes: choose from {', '.join(DTYPES)}")
    if args.repeats < 1 or args.bucket_mb <= 0:
        ap.error("--repeats must be >= 1 and --bucket-mb > 0")

    import ray

    from orchestrator.learner.worker import Learner
    from orchestrator.runtime import WORKER_ENV

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in sizes:
            path = str(build(name, tmp, max_position_embeddings=256))
            learner = ray.remote(Learner).options(num_cpus=1, runtime_env={"env_vars": WORKER_ENV}).remote(
                path, device="cpu")
            params = ray.get(learner.__ray_call__.remote(
                lambda lr: sum(p.numel() for p in lr.model.parameters())))  # a tied head counted once
            for dtype in dtypes:
                med = _measure(path, learner, dtype, args)
                mb = params * (4 if dtype == "float32" else 2) / 1e6
                rows.append((name, params, dtype, mb, med))
                print(f"{name} {dtype}: {params / 1e6:.1f}M parameters, {mb:.1f} MB, "
                      + ", ".join(f"{w} {m * 1000:.0f} ms" for w, m in med.items()), flush=True)
            ray.kill(learner)
    ray.shutdown()
    _table(rows, args, os.getloadavg())
    return 0


def _table(rows, args, load) -> None:
    print(f"\nmedian of {args.repeats} syncs each, buckets {args.bucket_mb:g} MiB, "
          f"{'multiprocess' if args.multiprocess else 'in-process'} engine; load average {load[0]:.2f}")
    print(f"{'size':<8} {'params':>8} {'dtype':>9} {'MB sent':>8} {'object store s':>15} {'collective s':>13} "
          f"{'store/coll':>11} {'coll MB/s':>10}")
    by = {(r[0], r[2]): r for r in rows}
    for name, params, dtype, mb, med in rows:
        store, coll = med["object store"], med["collective"]
        print(f"{name:<8} {params / 1e6:>7.1f}M {dtype:>9} {mb:>8.1f} {store:>15.3f} {coll:>13.3f} "
              f"{store / coll:>10.2f}x {mb / coll:>10.0f}")
    for name in dict.fromkeys(r[0] for r in rows):
        if (name, "float32") in by and (name, "bfloat16") in by:
            f32, b16 = by[(name, "float32")][4], by[(name, "bfloat16")][4]
            print(f"{name}: fp32 / bf16 time, object store {f32['object store'] / b16['object store']:.2f}x, "
                  f"collective {f32['collective'] / b16['collective']:.2f}x")


if __name__ == "__main__":
    sys.exit(main())
