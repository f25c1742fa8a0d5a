"""A model's measured frontier, and the rules that turn a request's effort or target accuracy into a budget.

A ``Frontier`` is plain data: one point per evaluated budget (thinking, solution, label), with the accuracy and
mean generated tokens measured there, and a cost when the tokens were priced. It is built from a run's final eval
summary table (``evaluation.summarize``), stored with a registered model version (``registry.py``) and read back
by the server, which maps a request onto it (``choose``):

- explicit ``thinking_budget`` / ``solution_budget`` (or vLLM's ``thinking_token_budget``): source ``request``;
- ``reasoning_effort`` low | medium | high: the cheapest point whose accuracy reaches ``EFFORT_SHARE`` of the
  best measured accuracy (0.5, 0.9, 1.0): source ``effort``;
- ``target_accuracy`` in (0, 1]: the cheapest point whose accuracy is >= the target: source ``target``;
- none of them: the server's default budget, source ``default``.

"Cheapest" is the fewest measured mean tokens (ties: the smaller budget). An ``unconstrained`` point is served at
the server's largest budget, and any point is capped at it. Two of {an explicit budget, reasoning_effort,
target_accuracy} in one request are a conflict, as are ``thinking_budget`` and ``thinking_token_budget`` with
different values: ``BudgetRequestError`` names both fields (the server answers 400).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from .config import Budget

# reasoning_effort -> the share of the best measured accuracy its point must reach (the cheapest such point).
EFFORT_SHARE = {"low": 0.5, "medium": 0.9, "high": 1.0}
UNCONSTRAINED = "unconstrained"
_EPS = 1e-9  # accuracies are means of 0/1 samples: a float-noise margin, far below 1/samples


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class BudgetRequestError(ValueError):
    """A request whose budget fields cannot be served: ``param`` and ``code`` as in OpenAI's error shape."""

    def __init__(self, message: str, param: str, code: str):
        super().__init__(message)
        self.param, self.code = param, code


@dataclass(frozen=True)
class FrontierPoint:
    """One evaluated budget: what it bought (accuracy) and what it spent (mean tokens, cost if priced)."""

    label: str  # the eval grid's name for it: "16x8", "unconstrained"
    thinking: int
    solution: int
    accuracy: float
    mean_tokens: float
    cost: float | None = None  # mean cost of one answer (mean_tokens x token price), when a price was given
    samples: int = 0

    @property
    def unconstrained(self) -> bool:
        return self.label == UNCONSTRAINED

    def served(self, most: Budget) -> Budget:
        """The budget a server with largest budget ``most`` serves this point at."""
        if self.unconstrained:
            return Budget(most.thinking, most.solution)
        return Budget(min(self.thinking, most.thinking), min(self.solution, most.solution))

    def describe(self) -> str:
        return f"{self.label} (accuracy {self.accuracy:.3f}, {self.mean_tokens:.1f} mean tokens)"


@dataclass(frozen=True)
class Frontier:
    """The measured points of one model, cheapest first; ``source`` says which eval table they came from."""

    points: tuple[FrontierPoint, ...]
    source: str = ""

    def __post_init__(self) -> None:
        pts = [p for p in self.points if is_number(p.accuracy) and is_number(p.mean_tokens)]
        if not pts:
            raise ValueError(f"a frontier needs at least one point with a finite accuracy and mean_tokens "
                             f"(source {self.source or 'not given'})")
        pts.sort(key=lambda p: (p.mean_tokens, p.thinking + p.solution, p.label))
        object.__setattr__(self, "points", tuple(pts))

    @classmethod
    def from_summary(cls, summary, source: str = "", token_price: float | None = None) -> Frontier:
        """From an eval summary table (Arrow or rows: budget_label, budget_thinking, budget_solution, accuracy,
        mean_tokens, samples); ``token_price`` (per 1000 generated tokens) fills ``cost``."""
        rows = summary.to_pylist() if hasattr(summary, "to_pylist") else list(summary)
        missing = {"budget_label", "budget_thinking", "budget_solution", "accuracy", "mean_tokens"} - set(
            rows[0] if rows else ())
        if missing:
            raise ValueError(f"eval summary {source or ''}: no column(s) {sorted(missing)}")
        return cls(tuple(FrontierPoint(
            label=str(r["budget_label"]), thinking=int(r["budget_thinking"]), solution=int(r["budget_solution"]),
            accuracy=float(r["accuracy"]), mean_tokens=float(r["mean_tokens"]),
            cost=None if token_price is None else float(r["mean_tokens"]) * token_price / 1000.0,
            samples=int(r.get("samples") or 0)) for r in rows), source)

    # ------------------------------------------------------------------ storage (JSON, tag summary)

    def to_dict(self) -> dict:
        return {"format": 1, "source": self.source, "points": [asdict(p) for p in self.points]}

    @classmethod
    def from_dict(cls, d: dict) -> Frontier:
        return cls(tuple(FrontierPoint(**p) for p in d["points"]), d.get("source", ""))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def summary(self) -> str:
        """One line for a model-version tag: ``label:accuracy@mean_tokens`` per point, cheapest first."""
        return " ".join(f"{p.label}:{p.accuracy:.3f}@{p.mean_tokens:.1f}" for p in self.points)

    # ------------------------------------------------------------------ lookups

    @property
    def best(self) -> FrontierPoint:
        """The cheapest point with the highest measured accuracy."""
        top = max(p.accuracy for p in self.points)
        return next(p for p in self.points if p.accuracy >= top - _EPS)

    def cheapest_reaching(self, accuracy: float) -> FrontierPoint | None:
        return next((p for p in self.points if p.accuracy >= accuracy - _EPS), None)

    def for_effort(self, effort: str) -> tuple[FrontierPoint, str]:
        """The point of ``reasoning_effort`` (``EFFORT_SHARE``) and why."""
        share, best = EFFORT_SHARE[effort], self.best
        point = self.cheapest_reaching(share * best.accuracy)
        assert point is not None  # the best point reaches any share <= 1 of itself
        return point, (f"reasoning_effort={effort}: the cheapest measured budget reaching {share:g} x the best "
                       f"accuracy ({best.accuracy:.3f}): {point.describe()}")

    def for_target(self, target: float) -> tuple[FrontierPoint, str]:
        """The cheapest point with accuracy >= ``target``; ``BudgetRequestError`` naming the best when none."""
        point = self.cheapest_reaching(target)
        if point is None:
            best = self.best
            raise BudgetRequestError(
                f"target_accuracy={target:g}: no measured budget reaches it; the best accuracy available is "
                f"{best.accuracy:.3f} (budget {best.label}, {best.mean_tokens:.1f} mean tokens)",
                "target_accuracy", "target_unreachable")
        return point, f"target_accuracy={target:g}: the cheapest measured budget reaching it: {point.describe()}"

    def efforts(self) -> dict[str, str]:
        """reasoning_effort -> the label of its point (shown by ``/v1/models``)."""
        return {e: self.for_effort(e)[0].label for e in EFFORT_SHARE}


@dataclass(frozen=True)
class BudgetChoice:
    """The budget a request gets and why: ``source`` request | effort | target | default."""

    budget: Budget
    source: str
    reason: str
    point: FrontierPoint | None = None

    def response_fields(self, used: Budget) -> dict:
        """The response's ``budget`` (``used``: after max_tokens and enable_thinking) and where it came from."""
        out = {"budget": {"thinking": used.thinking, "solution": used.solution}, "budget_source": self.source,
               "budget_reason": self.reason}
        if self.point is not None:
            out["frontier_point"] = asdict(self.point)
        return out


_EXPLICIT = ("thinking_budget", "thinking_token_budget", "solution_budget")


def _given(asked: dict[str, int | None], effort: Any, target: Any) -> list[str]:
    """The budget-choosing fields a request set, one per kind (explicit budget, effort, target)."""
    kinds = [next((k for k in _EXPLICIT if asked.get(k) is not None), None),
             "reasoning_effort" if effort is not None else None, "target_accuracy" if target is not None else None]
    return [k for k in kinds if k]


def choose(asked: dict[str, int | None], effort: Any, target: Any, frontier: Frontier | None, most: Budget,
           default: Budget, model: str = "this model") -> BudgetChoice:
    """The budget for a request: ``asked`` holds its validated integer budget fields (None: not sent), ``effort``
    and ``target`` its raw ``reasoning_effort`` and ``target_accuracy``. Raises ``BudgetRequestError``."""
    t, tt = asked.get("thinking_budget"), asked.get("thinking_token_budget")
    if t is not None and tt is not None and t != tt:
        raise BudgetRequestError(f"thinking_budget={t} and thinking_token_budget={tt} disagree; they are the same "
                                 "budget (thinking_token_budget is vLLM's name): send one",
                                 "thinking_budget", "conflicting_fields")
    given = _given(asked, effort, target)
    if len(given) > 1:
        a, b = given[:2]
        raise BudgetRequestError(f"{a} and {b} both choose the budget; send one of them (an explicit budget, "
                                 "reasoning_effort or target_accuracy)", a, "conflicting_fields")
    if not given:
        return BudgetChoice(default, "default", "no budget field: the server's default (budget.thinking, "
                                                "budget.solution)")
    if given[0] in _EXPLICIT:
        thinking = t if t is not None else tt
        b = Budget(default.thinking if thinking is None else thinking,
                   default.solution if asked.get("solution_budget") is None else asked["solution_budget"])
        return BudgetChoice(b, "request", "the request's budget fields (unset ones: the server's default)")
    key = given[0]
    if key == "reasoning_effort" and effort not in EFFORT_SHARE:
        raise BudgetRequestError(f"reasoning_effort must be one of {', '.join(EFFORT_SHARE)}, got {json.dumps(effort)}",
                                 key, "invalid_value")
    if key == "target_accuracy" and not (is_number(target) and 0 < target <= 1):
        raise BudgetRequestError(f"target_accuracy must be a number in (0, 1], got {json.dumps(target)}", key,
                                 "invalid_value" if is_number(target) else "invalid_type")
    if frontier is None:
        raise BudgetRequestError(f"{key}: {model} has no measured frontier (it was registered without eval "
                                 "results); send thinking_budget/solution_budget instead", key, "no_frontier")
    point, reason = frontier.for_effort(effort) if key == "reasoning_effort" else frontier.for_target(float(target))
    served = point.served(most)
    if (served.thinking, served.solution) != (point.thinking, point.solution):
        reason += f", served at {served.thinking}x{served.solution} (the server's largest budget)"
    return BudgetChoice(served, "effort" if key == "reasoning_effort" else "target", reason, point)
