"""Shaping terms added to the correctness reward: response format and length.

Format functions take a ScoreItem and return True/False (scored as FORMAT_OK/FORMAT_BAD, 1 and -1) or
a float. Plain-text helpers are exposed too, for analysis code and tests.
"""

from __future__ import annotations

import re

import numpy as np

from orchestrator.rewards.registry import register_format

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
ANSWER_OPEN, ANSWER_CLOSE = "<answer>", "</answer>"
_TAGS = (THINK_OPEN, THINK_CLOSE, ANSWER_OPEN, ANSWER_CLOSE)
_TAG_LAYOUT = re.compile(r"\s*<think>.*</think>\s*<answer>.*</answer>\s*", re.DOTALL)


def response_text(thinking: str, solution: str, marker: str = THINK_CLOSE) -> str:
    """The full response: thinking, the end-of-thinking marker once, then the solution.

    Rollouts split the response at the marker; whether the marker is kept on the thinking side is the
    rollout's choice, so it is added only when neither side carries it at the seam.
    """
    if thinking.rstrip().endswith(marker) or solution.lstrip().startswith(marker):
        return thinking + solution
    return thinking + marker + solution


def tags_well_formed(text: str) -> bool:
    """``<think>...</think><answer>...</answer>``: each tag exactly once, in order, nothing outside."""
    return all(text.count(tag) == 1 for tag in _TAGS) and _TAG_LAYOUT.fullmatch(text) is not None


def tag_format_score(text: str, ok: float = 1.0, bad: float = -1.0) -> float:
    return ok if tags_well_formed(text) else bad


def thinking_closed_once(thinking: str, solution: str, forced: bool, marker: str = THINK_CLOSE) -> bool:
    """The model itself closed its thinking (the marker was not ``forced``) and never emitted it again."""
    if forced:
        return False
    return response_text(thinking, solution, marker).count(marker) == 1


def length_fraction(thinking_tokens, solution_tokens, budget_thinking, budget_solution) -> np.ndarray:
    """(thinking + solution tokens) / (thinking + solution budget), elementwise; 0 where the budget is 0."""
    used = np.asarray(thinking_tokens, dtype=np.float64) + np.asarray(solution_tokens, dtype=np.float64)
    budget = np.asarray(budget_thinking, dtype=np.float64) + np.asarray(budget_solution, dtype=np.float64)
    return np.divide(used, budget, out=np.zeros(np.broadcast(used, budget).shape), where=budget > 0)


@register_format("think_format")
def think_format(item) -> bool:
    return thinking_closed_once(
        item.thinking, item.solution, item.thinking_truncated or item.forced_think_end
    )


@register_format("tag_format")
def tag_format(item) -> bool:
    return tags_well_formed(response_text(item.thinking, item.solution))


@register_format("tag_format_prefilled")
def tag_format_prefilled(item) -> bool:
    """tag_format for chat templates that put ``<think>`` in the prompt: the response must not repeat it."""
    return tags_well_formed(THINK_OPEN + response_text(item.thinking, item.solution))
