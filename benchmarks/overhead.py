"""Where a quickstart training step's time goes: generation and learning vs everything else.

Runs the quickstart config (``configs/quickstart.yaml``: its model, warm start, budget, batch; the warm
start is reused from ``outputs/warmstart/`` when it was already built) for ``--steps`` RL steps, with
evaluation reduced to one prompt (it is not step time), MLflow in a temporary SQLite file. From the
run's metrics, over the steps after the first:

- **engine**: seconds inside the vLLM engine's two-phase generation (the slowest rollout worker);
- **learner**: seconds inside ``Learner.step`` (forward, backward, optimizer);
- everything else, which is overhead: the wait for the rollout outside the engine (Ray scheduling,
  prompt rendering and tokenizing, building and shipping the Arrow records; each step's rollout is
  submitted during the step before, queued after its weight sync, so this row can be below zero
  when part of the engine's time fell in that step's tail), rewards, building the learner
  batch and shipping it, weight sync (``get_weights`` + ``update_weights`` on every worker), and the
  loop between steps (metrics, progress bar, state saves every ``trainer.state_every`` steps).

Prints mean seconds per step for each part and the overhead share of the wall time, last.

    .venv/bin/python benchmarks/overhead.py                  # 40 steps of the quickstart
    .venv/bin/python benchmarks/overhead.py --steps 60 trainer.state_every=0
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "quickstart.yaml"))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config")
    args = ap.parse_args()
    if args.steps < 3:
        ap.error("--steps must be >= 3 (the first step is warm-up)")
    os.chdir(ROOT)
    from mlflow import MlflowClient

    from orchestrator.config import ConfigError, load_config, validate
    from orchestrator.trainer import train

    with tempfile.TemporaryDirectory() as tmp:
        uri = f"sqlite:///{Path(tmp) / 'mlflow.db'}"
        try:
            cfg = load_config(args.config, [
                f"trainer.steps={args.steps}", "trainer.eval_every=0", "trainer.resume=never",
                "trainer.run_name=bench-overhead", "eval.num_prompts=1", 'eval.budgets=["8x8"]',
                f"tracking.tracking_uri={uri}", "tracking.experiment=bench-overhead", *args.overrides])
            validate(cfg)
        except ConfigError as exc:  # a bad --config or override: say which, before any work
            ap.error(str(exc))
        result = train(cfg)
        client = MlflowClient(uri)

        def series(name: str) -> dict[int, float]:
            return {m.step: m.value for m in client.get_metric_history(result.run_id, name)}

        wall = series("cost/wall_seconds")
        names = ["time/step", "time/generate", "time/generate_engine", "time/reward", "time/learn",
                 "learner/seconds", "time/sync"]
        m = {k: series(k) for k in names}
        shutil.rmtree(result.output_dir, ignore_errors=True)
    steps = sorted(s for s in wall if s > 1)
    first = min(wall)
    total = wall[steps[-1]] - wall[first]
    k = len(steps)

    def mean(name: str) -> float:
        return sum(m[name][s] for s in steps) / k

    rows = [
        ("engine: two-phase generation", mean("time/generate_engine")),
        ("learner: Learner.step", mean("learner/seconds")),
        # The wait for the rollout minus the engine's time: below zero when the rollout, queued after the
        # previous step's weight sync, ran partly during that step's tail (the between-steps row).
        ("rollout wait outside the engine", mean("time/generate") - mean("time/generate_engine")),
        ("rewards", mean("time/reward")),
        ("learner call outside the update", mean("time/learn") - mean("learner/seconds")),
        ("weight sync", mean("time/sync")),
        ("between steps (metrics, state saves)", total / k - mean("time/step")),
    ]
    per_step = total / k
    print(f"config {args.config}; {k} steps timed after the first; {os.cpu_count()} CPUs; "
          f"{per_step:.3f} s/step wall\n")
    print(f"{'part':<40} {'s/step':>8} {'share':>7}")
    for label, v in rows:
        print(f"{label:<40} {v:>8.4f} {v / per_step:>6.1%}")
    overhead = per_step - rows[0][1] - rows[1][1]
    print(f"overhead share of step time (outside generate and learn): {overhead / per_step:.1%} (goal <= 5%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
