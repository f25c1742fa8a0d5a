"""Synthetic, self-verifiable task generators with difficulty levels, found through the "budgetrl.tasks" entry points."""
