"""Rollouts: generation engines, budgeted two-phase generation, and the RolloutWorker actor."""
