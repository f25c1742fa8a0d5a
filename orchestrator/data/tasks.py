"""Task registry: synthetic task generators found through the ``budgetrl.tasks`` entry-point group.

``orchestrator`` never imports ``workloads``; a package (this one's ``workloads``, or a user's)
declares its tasks as entry points, and the registry loads them by name on first use.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

_EXTRA: dict[str, Any] = {}


def register_task(name: str, task: Any) -> None:
    """Register a task object in this process (tests, notebooks); entry points need no call."""
    _EXTRA[name] = task


def available_tasks() -> list[str]:
    return sorted(set(_EXTRA) | {ep.name for ep in entry_points(group="budgetrl.tasks")})


def get_task(name: str) -> Any:
    """The task object: fields ``name``, ``generate(num, *, difficulties, seed, split, ...)``,
    ``verifier`` (a reward-registry name) and ``levels``."""
    if name in _EXTRA:
        return _EXTRA[name]
    for ep in entry_points(group="budgetrl.tasks"):
        if ep.name == name:
            return ep.load()
    raise KeyError(f"data.task={name!r}: unknown task; available: {', '.join(available_tasks()) or 'none'}")
