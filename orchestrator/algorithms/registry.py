"""A named registry filled by a decorator, so adding an algorithm piece is one decorated function.

``get`` fails naming the config key and listing what is registered; ``docs`` is what the
``algorithms`` command prints (the first line of each function's docstring).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Entry:
    name: str
    fn: Callable
    doc: str
    meta: dict[str, Any] = field(default_factory=dict)


class Registry:
    """Names -> functions of one kind (e.g. advantage estimators), looked up under one config key."""

    def __init__(self, kind: str, key: str, title: str | None = None):
        self.kind, self.key, self.title = kind, key, title or f"{kind}s"
        self._entries: dict[str, Entry] = {}

    def register(self, name: str, **meta) -> Callable[[Callable], Callable]:
        """Decorator: ``@ADVANTAGES.register("grpo")``; ``meta`` holds facts callers check (e.g. per_token)."""

        def add(fn: Callable) -> Callable:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            doc = (fn.__doc__ or "").strip().splitlines()
            self._entries[name] = Entry(name, fn, doc[0] if doc else "", dict(meta))
            return fn

        return add

    def names(self) -> list[str]:
        return list(self._entries)

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            raise ValueError(f"{self.key}={name!r}: unknown {self.kind}; registered: {', '.join(self._entries)}")
        return self._entries[name]

    def get(self, name: str) -> Callable:
        return self.entry(name).fn

    def docs(self) -> list[tuple[str, str]]:
        return [(e.name, e.doc) for e in self._entries.values()]
