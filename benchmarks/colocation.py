"""A training run with the HF engine colocated in the learner's process vs in an actor of its own.

``rollout.colocate`` (``orchestrator/colocation.py``) saves a process (its imports of torch and
transformers) and turns each weight sync into a copy in memory, and gives up the overlap of the next
rollout with the update. This runs the same short training command both ways, alternating, each as
``python -m orchestrator train`` with its own local Ray runtime (what a user's run pays), and prints per
run: the wall time of the command, the CPU seconds of every process it started (driver, Ray's own
processes, the actors; sampled every 0.2 s), and the mean seconds per RL step after the first (MLflow's
``time/step``); then the separate / colocated ratios of the medians.

    .venv/bin/python benchmarks/colocation.py                     # 20 steps, 2 runs each way
    .venv/bin/python benchmarks/colocation.py --steps 40 --repeats 3 learner.num_threads=1
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(overrides: list[str], log: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the command and every process it started)."""
    import psutil

    seen: dict[tuple[int, float], float] = {}
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([sys.executable, "-m", "orchestrator", "train", *overrides], cwd=ROOT,
                                stdout=fh, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                family = [root, *root.children(recursive=True)]
            except psutil.Error:
                family = []
            for p in family:
                try:
                    ct = p.cpu_times()
                    seen[(p.pid, p.create_time())] = ct.user + ct.system
                except psutil.Error:
                    pass
            time.sleep(0.2)
    wall = time.perf_counter() - t0
    if proc.returncode:
        raise SystemExit(f"train failed (exit {proc.returncode}); see {log}:\n{log.read_text()[-3000:]}")
    return wall, sum(seen.values())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config (both arms)")
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be >= 3 (the first step is warm-up)")
    from mlflow import MlflowClient

    from orchestrator.config import ConfigError, load_config

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        base = [args.config, "rollout.engine=hf", "warmstart.steps=0", f"trainer.steps={args.steps}",
                "trainer.eval_every=0", "trainer.resume=never", "eval.num_prompts=1", 'eval.budgets=["8x8"]',
                f"trainer.output_dir={tmp}/out", f"tracking.tracking_uri={uri}", "tracking.experiment=bench-colocation",
                *args.overrides]
        try:
            for arm in ("false", "true"):
                load_config(base[0], base[1:] + [f"rollout.colocate={arm}"])
        except ConfigError as exc:  # a bad --config or override: say which, before any work
            ap.error(str(exc))
        client = MlflowClient(uri)
        for i in range(args.repeats):
            for arm in ("false", "true"):
                name = f"colocate-{arm}-{i}"
                wall, cpu = _run(base + [f"rollout.colocate={arm}", f"trainer.run_name={name}"], Path(tmp) / f"{name}.log")
                run = client.search_runs(client.get_experiment_by_name("bench-colocation").experiment_id,
                                         f"attributes.run_name = '{name}'")[0]
                steps = [m.value for m in client.get_metric_history(run.info.run_id, "time/step")][1:]
                rows.append((arm, wall, cpu, statistics.mean(steps)))
                print(f"{name}: wall {wall:.1f} s, CPU {cpu:.1f} s, {statistics.mean(steps):.3f} s/step", flush=True)
    print("\n| rollout.colocate | runs | wall s (median) | CPU s, all processes (median) | s/step after the first (median) |")
    print("|---|---|---|---|---|")
    med = {}
    for arm in ("false", "true"):
        mine = [r for r in rows if r[0] == arm]
        med[arm] = [statistics.median(r[k] for r in mine) for k in (1, 2, 3)]
        print(f"| {arm} | {len(mine)} | {med[arm][0]:.1f} | {med[arm][1]:.1f} | {med[arm][2]:.3f} |")
    ratios = [a / b for a, b in zip(med["false"], med["true"])]
    print(f"\nseparate / colocated: wall {ratios[0]:.2f}x, CPU {ratios[1]:.2f}x, step time {ratios[2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
