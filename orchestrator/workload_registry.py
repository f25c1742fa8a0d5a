"""Workload registry: method recipes found through the ``budgetrl.workloads`` entry-point group.

``python -m orchestrator workload NAME CONFIG [key=value ...]`` runs ``main(config, overrides)`` of the
recipe registered as NAME. ``orchestrator`` never imports ``workloads`` directly.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any


def available_workloads() -> list[str]:
    return sorted(ep.name for ep in entry_points(group="budgetrl.workloads"))


def get_workload(name: str) -> Any:
    for ep in entry_points(group="budgetrl.workloads"):
        if ep.name == name:
            return ep.load()
    raise KeyError(f"workload {name!r} is not registered; available: {', '.join(available_workloads()) or 'none'}")
