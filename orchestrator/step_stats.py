"""What one training step measured: its records' means (``step_metrics``) and its phases' wall time (``StepTimer``).

The trainer logs both every step under ``train/`` and ``time/``; ``generated_tokens`` is what
``trainer.max_generated_tokens`` counts (thinking + solution tokens of every sample).
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def generated_tokens(records: pa.Table) -> float:
    return float(pc.sum(records["thinking_tokens"]).as_py() or 0) + float(pc.sum(records["solution_tokens"]).as_py() or 0)


def step_metrics(records: pa.Table) -> dict[str, float]:
    correct = np.asarray(records["correct"].to_numpy(zero_copy_only=False), dtype=float)
    think = np.asarray(records["thinking_tokens"].to_numpy(), dtype=float)
    sol = np.asarray(records["solution_tokens"].to_numpy(), dtype=float)
    trunc = np.asarray(records["thinking_truncated"].to_numpy(zero_copy_only=False), dtype=float)
    reward = np.asarray(records["reward"].to_numpy(zero_copy_only=False), dtype=float)
    return {"reward": reward.mean(), "accuracy": correct.mean(), "thinking_tokens": think.mean(),
            "solution_tokens": sol.mean(), "truncation_rate": trunc.mean(),
            "generated_tokens": generated_tokens(records)}


class StepTimer:
    """Wall seconds of a step's phases: ``lap(name)`` adds the time since the previous lap to ``name``."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now

    def metrics(self, engine_s: float, learner_s: float, off_policy: bool) -> dict[str, float]:
        """``time/*``: the phases, and the overhead: what the step spends outside the engine's generation
        and the learner's update (scheduling, serialization, reward, batching, weight sync; issue 9).
        Off-policy the engine runs beside the learner: only the waits for it count. A synchronous rollout
        started in the previous step's tail counts only the engine time this step waited for."""
        s, total = self.seconds, self.last - self.start
        waited = s.get("generate", 0.0)
        t_compute = learner_s + (waited if off_policy else min(engine_s, waited))
        return {"time/generate": waited, "time/reward": s.get("reward", 0.0), "time/learn": s.get("learn", 0.0),
                "time/sync": s.get("sync", 0.0), "time/step": total, "time/generate_engine": engine_s,
                "time/overhead": total - t_compute, "time/overhead_share": (total - t_compute) / max(total, 1e-9)}
