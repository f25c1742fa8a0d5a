"""What a training run costs: accelerator-hours (GPU runs) or CPU-hours (CPU runs) times a price.

A run holds its placement group (every rollout worker and learner rank) for its whole wall-clock
time, so that reservation is what it pays for. On accelerators the instance price is charged per
accelerator-hour (the CPUs come with it); a run without accelerators is charged per CPU-hour.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CostModel:
    currency: str = "USD"
    accelerator_hour_price: float = 2.5  # per accelerator (GPU) and hour
    cpu_hour_price: float = 0.05  # per logical CPU and hour; only for runs without accelerators


def reserved_resources(cfg) -> dict[str, float]:
    """Accelerators and CPUs a training run reserves (rollout workers + learner ranks)."""
    r, le = cfg.rollout, cfg.learner
    return {
        "accelerators": r.num_workers * r.gpus_per_worker + le.num_workers * le.gpus_per_worker,
        "cpus": r.num_workers * r.cpus_per_worker + le.num_workers * le.cpus_per_worker,
    }


def run_cost(cfg, wall_seconds: float, model: CostModel, extra_cpus: float = 0.0) -> dict[str, float]:
    """``cost/*`` metrics of a run that held its resources for ``wall_seconds``.

    ``extra_cpus`` counts what the run's driver holds besides its workers (e.g. a sweep trial's own CPU).
    """
    res = reserved_resources(cfg)
    hours = max(0.0, float(wall_seconds)) / 3600.0
    accelerator_hours = res["accelerators"] * hours
    cpu_hours = (res["cpus"] + extra_cpus) * hours
    if res["accelerators"] > 0:
        total = accelerator_hours * model.accelerator_hour_price
    else:
        total = cpu_hours * model.cpu_hour_price
    return {"cost/run_wall_seconds": float(wall_seconds), "cost/accelerator_hours": accelerator_hours,
            "cost/cpu_hours": cpu_hours, "cost/total": total}
