"""Reward package: verifiers, shaping, the score() formula, and the worker pool's error/timeout handling."""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.rewards import (
    RewardConfig,
    RewardPool,
    ScoreItem,
    UnknownRewardError,
    get_verifier,
    items_from_table,
    register_verifier,
    score,
)
from orchestrator.rewards.shaping import (
    length_fraction,
    response_text,
    tag_format_score,
    tags_well_formed,
    thinking_closed_once,
)
from orchestrator.rewards.verifiers import exact_match, last_boxed, math_verify

TESTING = "orchestrator.rewards.testing"


def item(solution="", answer="", thinking="", t_tok=0, s_tok=0, bt=100, bs=20, truncated=False, task="t"):
    return ScoreItem(task, thinking, solution, answer, t_tok, s_tok, bt, bs, truncated)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def children() -> set[int]:
    pids: set[int] = set()
    for tid in os.listdir(f"/proc/{os.getpid()}/task"):
        try:
            with open(f"/proc/{os.getpid()}/task/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
        except OSError:
            pass
    return pids


@pytest.fixture(scope="module")
def pool():
    with RewardPool(num_workers=1) as p:
        yield p


# ---- verifiers ----------------------------------------------------------------------------------------


def test_exact_match_strips_whitespace():
    assert exact_match("  42\n", "42")
    assert not exact_match("42.0", "42")


@pytest.mark.parametrize(
    "solution, answer, expected",
    [
        ("\\boxed{\\frac{1}{2}}", "0.5", True),
        ("so the answer is \\boxed{0.5}", "\\frac{1}{2}", True),
        ("\\boxed{3}", "4", False),
        ("first \\boxed{2}, no wait: \\boxed{3}", "3", True),  # only the last box counts
        ("first \\boxed{2}, no wait: \\boxed{3}", "2", False),
        ("The final answer is 3", "3", True),  # no box: the final expression
        ("\\boxed{1+x^2}", "x^2+1", True),
        ("\\boxed{\\{1, 2\\}}", "\\{1,2\\}", True),
        ("no answer here", "3", False),  # parse failures are wrong, not errors
        ("\\boxed{", "3", False),
        ("", "3", False),
        ("\\boxed{3}", "", False),
    ],
)
def test_math_verifier(solution, answer, expected):
    assert math_verify(solution, answer) is expected


def test_math_verifier_works_off_the_main_thread():
    # math-verify's own timeouts need signal.alarm (main thread only); the verifier must not break.
    out = []
    t = threading.Thread(target=lambda: out.append(math_verify("\\boxed{\\frac{1}{2}}", "0.5")))
    t.start()
    t.join()
    assert out == [True]


def test_last_boxed():
    assert last_boxed("\\boxed{2} and \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{2} then truncated \\boxed{3") == "2"
    assert last_boxed("nothing") is None


def test_correctness_only_looks_at_the_solution():
    spec = RewardConfig(verifier="math")
    right_thinking = item(thinking="it is \\boxed{7}", solution="\\boxed{8}", answer="7")
    right_solution = item(thinking="it is \\boxed{8}", solution="\\boxed{7}", answer="7")
    result = score([right_thinking, right_solution], spec)
    assert result.correct.tolist() == [False, True]
    assert result.reward.tolist() == [0.0, 1.0]


# ---- shaping ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, ok",
    [
        ("<think>a</think><answer>b</answer>", True),
        ("\n<think>\na\n</think>\n<answer> b </answer>\n", True),
        ("<answer>b</answer><think>a</think>", False),  # misordered
        ("<think>a</answer><answer>b</think>", False),  # closes crossed
        ("<think>a</think><think>c</think><answer>b</answer>", False),  # duplicated
        ("<think>a</think><answer>b</answer><answer>c</answer>", False),
        ("<think>a</think>b", False),  # missing answer
        ("<think>a</think><answer>b</answer> trailing", False),
    ],
)
def test_tag_format(text, ok):
    assert tags_well_formed(text) is ok
    assert tag_format_score(text) == (1.0 if ok else -1.0)
    assert tag_format_score(text, ok=0.5, bad=-2.0) == (0.5 if ok else -2.0)


def test_tag_format_on_split_response():
    # Rollouts split at </think>; the item-level check puts the marker back once.
    good = item(thinking="<think>a", solution="<answer>b</answer>")
    dup = item(thinking="<think>a</think><answer>x</answer>", solution="<answer>b</answer>")
    spec = RewardConfig(verifier="exact_match", format_weight=1.0, format_fn="tag_format")
    assert score([good, dup], spec).format_score.tolist() == [1.0, -1.0]
    prefilled = item(thinking="a", solution="<answer>b</answer>")
    spec = RewardConfig(verifier="exact_match", format_weight=1.0, format_fn="tag_format_prefilled")
    assert score([prefilled, good], spec).format_score.tolist() == [1.0, -1.0]


def test_think_format():
    assert response_text("a", "b") == "a</think>b" and response_text("a</think>", "b") == "a</think>b"
    assert thinking_closed_once("reasoning", "answer", forced=False)
    assert not thinking_closed_once("reasoning", "answer", forced=True)
    assert not thinking_closed_once("reasoning", "more</think>answer", forced=False)
    assert not thinking_closed_once("a</think>b", "answer", forced=False)
    closed, eos_first = (
        item(thinking="a", solution="b"),
        ScoreItem("t", "a", "b", "", 1, 1, 8, 8, False, True),
    )
    spec = RewardConfig(verifier="exact_match", format_weight=1.0, format_fn="think_format")
    assert score([closed, eos_first], spec).format_score.tolist() == [1.0, -1.0]


def test_length_penalty_math():
    assert length_fraction(100, 20, 200, 40) == pytest.approx(0.5)
    assert length_fraction([0, 10], [0, 0], [0, 10], [0, 0]).tolist() == [0.0, 1.0]  # zero budget: no penalty
    spec = RewardConfig(verifier="exact_match", length_penalty=0.5, format_weight=0.2, wrong_reward=-1.0)
    items = [
        item(solution="7", answer="7", t_tok=100, s_tok=20, bt=200, bs=40),
        item(solution="8", answer="7", t_tok=200, s_tok=40, bt=200, bs=40, truncated=True),
    ]
    result = score(items, spec)
    # correct + 0.2 * (+1 think closed) - 0.5 * 0.5 ; wrong + 0.2 * (-1 forced marker) - 0.5 * 1
    assert result.reward.tolist() == pytest.approx([1 + 0.2 - 0.25, -1 - 0.2 - 0.5])
    assert result.reward.dtype == np.float32 and result.correct.dtype == bool
    assert result.length_fraction.tolist() == pytest.approx([0.5, 1.0])


def test_length_penalty_on_correct_only():
    """length_penalty_on=correct prices only correct samples: a wrong answer gains nothing by being short (priced on
    every sample, an all-wrong group would rank its shortest sample first)."""
    spec = RewardConfig(verifier="exact_match", length_penalty=0.5, length_penalty_on="correct")
    items = [item(solution="7", answer="7", t_tok=100, s_tok=20, bt=200, bs=40),
             item(solution="8", answer="7", t_tok=1, s_tok=0, bt=200, bs=40),
             item(solution="8", answer="7", t_tok=200, s_tok=40, bt=200, bs=40)]
    assert score(items, spec).reward.tolist() == pytest.approx([1 - 0.25, 0.0, 0.0])
    everywhere = score(items, RewardConfig(verifier="exact_match", length_penalty=0.5)).reward.tolist()
    assert everywhere[1] > everywhere[2]  # the default: the short wrong answer beats the long wrong one
    from orchestrator.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="reward.length_penalty_on='wrong'"):
        load_config("configs/quickstart.yaml", ["reward.length_penalty_on=wrong"], check_paths=False)


@settings(max_examples=50, deadline=None)
@given(
    correct=st.booleans(),
    used=st.tuples(st.integers(0, 500), st.integers(0, 100)),
    budget=st.tuples(st.integers(1, 500), st.integers(0, 100)),
    penalty=st.floats(0, 2),
)
def test_reward_formula(correct, used, budget, penalty):
    spec = RewardConfig(verifier="exact_match", correct_reward=2.0, wrong_reward=-0.5, length_penalty=penalty)
    it = item(
        solution="a" if correct else "b", answer="a", t_tok=used[0], s_tok=used[1], bt=budget[0], bs=budget[1]
    )
    expected = (2.0 if correct else -0.5) - penalty * sum(used) / sum(budget)
    assert score([it], spec).reward[0] == pytest.approx(expected, rel=1e-5, abs=1e-5)


# ---- registry -----------------------------------------------------------------------------------------


def test_auto_verifier_must_be_resolved_first():
    """The config section is what score takes; its "auto" names no verifier until the task resolves it."""
    with pytest.raises(ValueError, match="for_verifier"):
        score([item()], RewardConfig())
    section = RewardConfig(correct_reward=2.0, num_workers=3)
    resolved = section.for_verifier("exact_match")
    assert (resolved.verifier, resolved.correct_reward, resolved.num_workers, section.verifier) == (
        "exact_match", 2.0, 3, "auto")
    assert score([item(solution="7", answer="7")], resolved).reward.tolist() == [2.0]


def test_unknown_verifier_names_it_and_lists_known():
    with pytest.raises(KeyError) as err:
        score([item()], RewardConfig(verifier="no_such_verifier"))
    msg = str(err.value)
    assert "no_such_verifier" in msg and "exact_match" in msg and "math" in msg
    with pytest.raises(ValueError, match="not_a_module"):
        get_verifier("not_a_module.sub:fn")
    with pytest.raises(UnknownRewardError, match="missing_fn"):
        get_verifier(f"{TESTING}:missing_fn")


def test_register_and_dotted_path():
    @register_verifier("test_case_insensitive")
    def case_insensitive(solution: str, answer: str) -> bool:
        return solution.strip().lower() == answer.strip().lower()

    assert get_verifier("test_case_insensitive") is case_insensitive
    assert get_verifier("orchestrator.rewards.verifiers:exact_match") is exact_match
    assert score([item(solution="ABC", answer="abc")], RewardConfig(verifier="test_case_insensitive")).correct[
        0
    ]
    with pytest.raises(ValueError, match="already registered"):
        register_verifier("exact_match")(case_insensitive)


def test_items_from_table():
    table = pa.table(
        {
            "task": ["t", "t"],
            "thinking": ["x", None],
            "solution": ["1", "2"],
            "answer": ["1", "1"],
            "thinking_tokens": pa.array([3, 4], pa.int32()),
            "solution_tokens": pa.array([1, 1], pa.int32()),
            "budget_thinking": pa.array([8, 8], pa.int32()),
            "budget_solution": pa.array([2, 2], pa.int32()),
            "thinking_truncated": [False, True],
            "reward": [0.0, 0.0],
        }
    )
    items = items_from_table(table)
    assert items[1].thinking == "" and items[1].thinking_truncated
    assert score(items, RewardConfig(verifier="exact_match")).correct.tolist() == [True, False]
    assert not items[0].forced_think_end  # optional column absent
    forced = items_from_table(table.append_column("forced_think_end", pa.array([True, None])))
    assert [it.forced_think_end for it in forced] == [True, False]
    with pytest.raises(ValueError, match="solution"):
        items_from_table(table.drop(["solution"]))


# ---- errors, timeouts, the pool -----------------------------------------------------------------------


def mixed(bad_word: str) -> list[ScoreItem]:
    return [
        item(solution="1", answer="1"),
        item(solution=bad_word, answer="1"),
        item(solution="2", answer="2"),
        item(solution="3", answer="4"),
    ]


@pytest.mark.parametrize("use_pool", [False, True])
def test_raising_verifier_fails_only_its_sample(use_pool, pool):
    spec = RewardConfig(verifier=f"{TESTING}:raises_on_raise", wrong_reward=-1.0, length_penalty=0.1)
    result = score(mixed("RAISE"), spec, pool if use_pool else None)
    assert result.reward.tolist() == pytest.approx([1 - 0.0, 0.0, 1.0, -1.0])
    assert result.correct.tolist() == [True, False, True, False]
    assert result.error[0] is None and result.error[2] is None and result.error[3] is None
    assert result.error[1].startswith("error: ValueError: bad sample 'RAISE'")
    assert (result.num_errors, result.num_timeouts) == (1, 0)


def test_hanging_verifier_times_out_and_pool_recovers(pool):
    spec = RewardConfig(verifier=f"{TESTING}:hangs_on_hang", timeout_s=1.0)
    before = set(pool.pids)
    start = time.monotonic()
    result = score(mixed("HANG"), spec, pool)
    elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 5.0
    assert result.error == [None, "timeout", None, None]
    assert result.correct.tolist() == [True, False, True, False]
    assert result.reward.tolist() == [1.0, 0.0, 1.0, 0.0]
    assert (result.num_errors, result.num_timeouts) == (0, 1)
    assert not any(alive(pid) for pid in before)  # the hung worker was killed and reaped
    # the replacement serves the next call
    again = score(mixed("fine"), RewardConfig(verifier="exact_match"), pool)
    assert again.error == [None] * 4 and again.correct.tolist() == [True, False, True, False]


def test_slow_verifier_is_judged_per_sample(pool):
    from orchestrator.rewards.testing import SLOW_S

    items = [item(solution=str(i), answer=str(i % 2)) for i in range(6)]
    assert len(items) * SLOW_S > 1.0  # the batch takes longer than timeout_s; no sample does
    result = score(items, RewardConfig(verifier=f"{TESTING}:slow", timeout_s=1.0), pool)
    assert result.num_timeouts == 0 and result.num_errors == 0
    assert result.correct.tolist() == [True, True, False, False, False, False]


def test_crashing_worker_fails_only_its_sample(pool):
    result = score(mixed("CRASH"), RewardConfig(verifier=f"{TESTING}:crashes_on_crash"), pool)
    assert result.error[1] == "error: RewardWorkerDied: exit code 3"
    assert result.correct.tolist() == [True, False, True, False]
    assert result.num_errors == 1


def test_multi_worker_pool_with_hangs_and_close_leaves_no_children():
    items = [item(solution="HANG" if i in (3, 17) else str(i % 3), answer="0") for i in range(24)]
    with RewardPool(num_workers=2) as pool:
        started = set(pool.pids)
        assert started <= children()
        result = score(items, RewardConfig(verifier=f"{TESTING}:hangs_on_hang", timeout_s=1.0), pool)
        assert [i for i, e in enumerate(result.error) if e] == [3, 17]
        assert result.num_timeouts == 2
        expected = [i % 3 == 0 and i not in (3, 17) for i in range(24)]
        assert result.correct.tolist() == expected
        started |= set(pool.pids)
    assert not any(alive(pid) for pid in started)
    assert not (children() & started)
    with pytest.raises(RuntimeError, match="closed"):
        pool.evaluate(items, "exact_match", None, timeout_s=1.0)


def test_pool_format_and_math_in_workers(pool):
    items = [
        item(thinking="<think>a", solution="<answer>\\boxed{0.5}</answer>", answer="\\frac{1}{2}"),
        item(thinking="<think>a", solution="\\boxed{3}", answer="4"),
    ]
    spec = RewardConfig(verifier="math", format_weight=0.5, format_fn="tag_format")
    result = score(items, spec, pool)
    assert result.error == [None, None]
    assert result.reward.tolist() == [1.5, -0.5]
    assert score(items, spec).reward.tolist() == result.reward.tolist()  # same as in-process


def test_worker_killed_while_idle_is_replaced(pool):
    score(mixed("x"), RewardConfig(verifier="exact_match"), pool)  # make sure a worker is up
    for pid in pool.pids:
        os.kill(pid, 9)  # no wait: whether dispatch sees it dead or the send/recv fails, it is retried
    result = score(mixed("x"), RewardConfig(verifier="exact_match"), pool)
    assert result.error == [None] * 4 and result.correct.tolist() == [True, False, True, False]


def test_worker_that_cannot_start_fails_the_batch_without_hanging():
    with RewardPool(num_workers=1, preload=["no_such_module_for_rewards"]) as broken:
        result = score(mixed("x"), RewardConfig(verifier="exact_match"), broken)
    assert result.num_errors == 4 and all(e.startswith("error: RewardWorkerDied") for e in result.error)
