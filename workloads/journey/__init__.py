"""Journey learning (O1 Replication Journey, arXiv 2410.18982): step-level search trees over synthetic tasks,
shortcut vs journey trajectories, SFT on Ray Train from the same base, evaluation on held-out problems."""

from .recipe import JourneyConfig, main, run

__all__ = ["JourneyConfig", "main", "run"]
