"""The measured frontier and the request -> budget rule (orchestrator/effort.py): pure, no Ray or engine."""

from __future__ import annotations

import pytest

from orchestrator.config import Budget
from orchestrator.effort import EFFORT_SHARE, BudgetRequestError, Frontier, choose

MOST, DEFAULT = Budget(128, 64), Budget(16, 8)


@pytest.fixture
def frontier(eval_summary):
    return Frontier.from_summary(eval_summary, "runs:/r/eval/step_0004_summary.parquet", token_price=2.0)


def _choose(frontier, asked=None, effort=None, target=None, most=MOST):
    return choose(asked or {}, effort, target, frontier, most, DEFAULT)


def test_frontier_from_an_eval_summary_round_trips(frontier, eval_summary):
    assert [p.label for p in frontier.points] == ["4x2", "8x4", "16x8", "32x16", "64x32", "unconstrained"]
    p = frontier.points[2]
    assert (p.thinking, p.solution, p.accuracy, p.mean_tokens, p.samples) == (16, 8, 0.5, 20.0, 100)
    assert p.cost == pytest.approx(20.0 * 2.0 / 1000)
    assert Frontier.from_dict(frontier.to_dict()) == frontier
    assert frontier.summary().startswith("4x2:0.100@5.0 8x4:0.350@10.0")
    assert frontier.best.label == "unconstrained"
    with pytest.raises(ValueError, match="no column"):
        Frontier.from_summary(eval_summary.drop_columns(["accuracy"]))


def test_effort_rule(frontier):
    """low / medium / high: the cheapest point reaching 0.5 / 0.9 / 1.0 x the best accuracy (0.62)."""
    assert EFFORT_SHARE == {"low": 0.5, "medium": 0.9, "high": 1.0}
    assert frontier.efforts() == {"low": "8x4", "medium": "32x16", "high": "unconstrained"}
    c = _choose(frontier, effort="medium")
    assert (c.budget, c.source, c.point.label) == (Budget(32, 16), "effort", "32x16")
    assert "0.9 x the best accuracy (0.620)" in c.reason
    # The unconstrained point is the server's largest budget; other points are capped at it.
    assert _choose(frontier, effort="high").budget == MOST
    c = _choose(frontier, effort="high", most=Budget(100, 50))
    assert c.budget == Budget(100, 50) and "served at 100x50" in c.reason
    assert _choose(frontier, target=0.59, most=Budget(50, 20)).budget == Budget(50, 20)  # 64x32, capped
    # A tie on accuracy goes to the cheaper point; an all-zero frontier maps every effort to its cheapest point.
    flat = Frontier.from_summary([{"budget_label": lb, "budget_thinking": t, "budget_solution": 4, "accuracy": 0.0,
                                   "mean_tokens": t} for lb, t in (("32x4", 32), ("8x4", 8))])
    assert flat.efforts() == {"low": "8x4", "medium": "8x4", "high": "8x4"}


def test_target_accuracy(frontier):
    c = _choose(frontier, target=0.5)
    assert (c.budget, c.source, c.point.label) == (Budget(16, 8), "target", "16x8")
    assert _choose(frontier, target=0.59).point.label == "64x32"
    assert _choose(frontier, target=1e-6).point.label == "4x2"
    with pytest.raises(BudgetRequestError) as err:
        _choose(frontier, target=0.63)
    assert (err.value.param, err.value.code) == ("target_accuracy", "target_unreachable")
    assert "best accuracy available is 0.620 (budget unconstrained" in str(err.value)
    for bad, code in ((0, "invalid_value"), (1.5, "invalid_value"), ("0.5", "invalid_type"), (True, "invalid_type")):
        with pytest.raises(BudgetRequestError) as err:
            _choose(frontier, target=bad)
        assert err.value.code == code and "target_accuracy must be a number in (0, 1]" in str(err.value)


def test_explicit_default_and_conflicts(frontier):
    c = _choose(frontier, {"thinking_token_budget": 7})
    assert (c.budget, c.source, c.point) == (Budget(7, 8), "request", None)
    assert _choose(frontier, {"thinking_budget": 7, "thinking_token_budget": 7}).budget == Budget(7, 8)
    assert _choose(frontier, {"solution_budget": 3}).budget == Budget(16, 3)
    c = _choose(frontier)
    assert (c.budget, c.source) == (DEFAULT, "default")
    cases = [({"thinking_budget": 7, "thinking_token_budget": 9}, None, None, ("thinking_budget", "thinking_token_budget")),
             ({"thinking_budget": 7}, "low", None, ("thinking_budget", "reasoning_effort")),
             ({"solution_budget": 3}, None, 0.5, ("solution_budget", "target_accuracy")),
             ({"thinking_token_budget": 3}, "low", None, ("thinking_token_budget", "reasoning_effort")),
             ({}, "high", 0.5, ("reasoning_effort", "target_accuracy"))]
    for asked, effort, target, (a, b) in cases:
        with pytest.raises(BudgetRequestError) as err:
            _choose(frontier, asked, effort, target)
        assert err.value.code == "conflicting_fields" and err.value.param == a
        assert a in str(err.value) and b in str(err.value)
    with pytest.raises(BudgetRequestError, match="reasoning_effort must be one of low, medium, high, got \"max\""):
        _choose(frontier, effort="max")


def test_no_frontier_only_explicit_budgets(frontier):
    assert choose({"thinking_budget": 5}, None, None, None, MOST, DEFAULT).budget == Budget(5, 8)
    for effort, target, param in (("low", None, "reasoning_effort"), (None, 0.5, "target_accuracy")):
        with pytest.raises(BudgetRequestError) as err:
            choose({}, effort, target, None, MOST, DEFAULT, model='model "m"')
        assert (err.value.param, err.value.code) == (param, "no_frontier")
        assert 'model "m" has no measured frontier' in str(err.value)
