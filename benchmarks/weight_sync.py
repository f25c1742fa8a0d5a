"""Weight sync time vs model size: learner actor -> object store -> vLLM rollout actor, in place.

For each size a random Qwen2 (tied embeddings, the tiny tokenizer) is built, a ``Learner`` and a vLLM
``RolloutWorker`` start as Ray actors, and the driver times what the training loop does after every
step, four ways, alternating sync by sync:

- ``now`` (the trainer's way): ``learner.sync_payload()`` (NumPy views of the weights,
  ``orchestrator/weight_sync.py``), loaded in place (``orchestrator/rollout/cpu_reload.py``);
- ``tensor dict``: ``learner.get_weights()`` (a dict of torch tensor copies), loaded in place;
- ``reload_weights``: the payload, loaded by vLLM's ``reload_weights``;
- ``before``: a tensor dict and ``reload_weights`` (the way until 2026-12-01).

Each then resets the prefix cache. Prints parameters, bytes, median seconds per sync each way, the
current way's bytes/s and the ratio before / now last.

    .venv/bin/python benchmarks/weight_sync.py                  # 0.8M, 4.2M, 34M, 132M parameters
    .venv/bin/python benchmarks/weight_sync.py --sizes tiny,small --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time

from shapes import SHAPES as SIZES, build


# way: (learner method, in-place load on the worker). "now" is the trainer's; "before" the way until
# this change; the middle two change one part each.
WAYS = {"now": ("sync_payload", True), "tensor dict": ("get_weights", True),
        "reload_weights": ("sync_payload", False), "before": ("get_weights", False)}


def _set_inplace(worker, inplace: bool) -> None:  # runs in the rollout actor
    worker.engine.inplace_reload = inplace


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
            distinct = {id(t): t for t in weights.values()}.values()  # a tied lm_head travels once
            sent = sum(t.numel() * t.element_size() for t in distinct)
            params = sum(t.numel() for t in distinct)
            del weights
            times: dict[str, list[float]] = {way: [] for way in WAYS}
            for v in range(args.repeats + 1):
                for way, (send, inplace) in WAYS.items():
                    ray.get(worker.__ray_call__.remote(_set_inplace, inplace))
                    t0 = time.perf_counter()
                    ref = getattr(learner, send).remote()
                    ray.get(worker.update_weights.remote(ref, v))
                    if v:  # the first sync of each way warms up both sides
                        times[way].append(time.perf_counter() - t0)
            med = {way: statistics.median(t) for way, t in times.items()}
            rows.append((name, params, sent, med))
            print(f"{name}: {params / 1e6:.1f}M parameters, " + ", ".join(f"{w} {m * 1000:.0f} ms" for w, m in med.items()),
                  flush=True)
            ray.kill(worker)
            ray.kill(learner)
    ray.shutdown()
    print(f"\n{'size':<8} {'params':>9} {'MB sent':>8} {'s/sync':>8} {'MB/s':>8} {'tensor dict':>12} "
          f"{'reload_weights':>15} {'before':>8} {'before/now':>11}")
    for name, params, n_bytes, med in rows:
        now = med["now"]
        print(f"{name:<8} {params / 1e6:>8.1f}M {n_bytes / 1e6:>8.1f} {now:>8.3f} {n_bytes / now / 1e6:>8.0f} "
              f"{med['tensor dict']:>12.3f} {med['reload_weights']:>15.3f} {med['before']:>8.3f} "
              f"{med['before'] / now:>10.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
