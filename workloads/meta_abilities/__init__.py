"""Meta-ability alignment (arXiv 2505.10554): per-ability RL with a level curriculum, merge, domain RL, as one DAG."""

from .recipe import MetaConfig, load, main, run

__all__ = ["MetaConfig", "load", "main", "run"]
