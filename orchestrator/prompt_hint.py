"""``budget.prompt_hint``: the token budget told to the model before its task prompt (as L1/LCPO does).

A model trained with budgets drawn per prompt can learn to be terse when told a tight budget and thorough
when told a loose one, but only if it is told. One format string, rendered here for every path that builds
a prompt: training rollouts (each prompt's own budget), the eval grid (each grid budget; ``unconstrained``
is ``eval.max_thinking`` x ``eval.max_solution``) and serving (the request's budget). "" turns it off.
"""

from __future__ import annotations

from .config_merge import bad

FIELDS = ("thinking", "solution", "total")


def budget_hint(fmt: str, budget) -> str:
    """The hint for one ``Budget`` ("" when ``fmt`` is ""), e.g. "<budget 16>" from "<budget {thinking}>"."""
    return fmt.format(thinking=budget.thinking, solution=budget.solution, total=budget.total) if fmt else ""


def check_prompt_hint(key: str, fmt: str) -> None:
    """A format that names anything but {thinking}, {solution}, {total} fails at config time, naming ``key``."""
    try:
        fmt.format(**{f: 1 for f in FIELDS})
    except (KeyError, IndexError, ValueError) as exc:
        bad(key, fmt, f"may use only {{thinking}}, {{solution}} and {{total}} ({type(exc).__name__}: {exc})")


def hint_messages(messages: list[dict], hint: str) -> list[dict]:
    """Chat ``messages`` with ``hint`` before the last user message (training's one user message is the task)."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not hint or not users:
        return messages
    out = [dict(m) for m in messages]
    out[users[-1]]["content"] = hint + (out[users[-1]].get("content") or "")
    return out
