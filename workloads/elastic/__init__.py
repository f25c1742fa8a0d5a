"""Elastic Reasoning (arXiv 2505.05315): GRPO with budget-constrained rollouts vs. an unconstrained baseline."""

from .recipe import ElasticConfig, main, run

__all__ = ["ElasticConfig", "main", "run"]
