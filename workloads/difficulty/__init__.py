"""Preview difficulty-aware intervention: a curriculum over per-prompt pass rates, and its recipe."""

from .recipe import main

__all__ = ["main"]
