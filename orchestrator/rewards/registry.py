"""Name -> function tables for verifiers and format terms.

Configs and reward worker processes refer to reward code by name, never by pickled callables: a name is
a registered entry (``"math"``) or a dotted path to user code (``"my_pkg.rewards:check"``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

Verifier = Callable[[str, str], bool]  # (solution, answer) -> correct
FormatFn = Callable[..., "bool | float"]  # (item: ScoreItem) -> ok? or a float score

_VERIFIERS: dict[str, Verifier] = {}
_FORMATS: dict[str, FormatFn] = {}


class UnknownRewardError(KeyError, ValueError):
    """A reward name that is neither registered nor an importable dotted path."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def _register(table: dict, kind: str, name: str) -> Callable:
    def decorator(fn: Callable) -> Callable:
        old = table.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (fn.__module__, fn.__qualname__):
            raise ValueError(f"{kind} {name!r} is already registered to {old.__module__}.{old.__qualname__}")
        table[name] = fn
        return fn

    return decorator


def register_verifier(name: str) -> Callable[[Verifier], Verifier]:
    """Register ``fn(solution, answer) -> bool`` under ``name``."""
    return _register(_VERIFIERS, "verifier", name)


def register_format(name: str) -> Callable[[FormatFn], FormatFn]:
    """Register ``fn(item) -> bool | float`` (bool maps to FORMAT_OK/FORMAT_BAD, 1 and -1)."""
    return _register(_FORMATS, "format function", name)


def _import_dotted(path: str) -> Callable | None:
    module_name, sep, attr = path.partition(":")
    if not sep:
        module_name, _, attr = path.rpartition(".")
    if not module_name or not attr:
        return None
    module = importlib.import_module(module_name)
    obj = module
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def _resolve(table: dict, kind: str, name: str, module_hint: str | None = None) -> Callable:
    if name in table:
        return table[name]
    if module_hint and module_hint != "__main__":
        importlib.import_module(module_hint)  # a module that registers the name on import
        if name in table:
            return table[name]
    error = None
    if "." in name or ":" in name:
        try:
            fn = _import_dotted(name)
        except (ImportError, AttributeError) as e:
            fn, error = None, e
        if fn is not None and callable(fn):
            return fn
    known = ", ".join(sorted(table)) or "(none)"
    why = f" ({type(error).__name__}: {error})" if error else ""
    raise UnknownRewardError(
        f"unknown {kind} {name!r}{why}; registered: {known}; or give a dotted path 'package.module:function'"
    )


def get_verifier(name: str, module_hint: str | None = None) -> Verifier:
    """Look up a verifier by registered name or dotted path; raises UnknownRewardError naming it."""
    return _resolve(_VERIFIERS, "verifier", name, module_hint)


def get_format(name: str, module_hint: str | None = None) -> FormatFn:
    """Look up a format function by registered name or dotted path."""
    return _resolve(_FORMATS, "format function", name, module_hint)


def list_verifiers() -> list[str]:
    return sorted(_VERIFIERS)


def list_formats() -> list[str]:
    return sorted(_FORMATS)
