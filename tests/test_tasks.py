"""Addition task generator: determinism, disjoint splits, correct answers and reasoning."""

import dataclasses
from importlib import import_module

import pytest

from orchestrator.data.schema import PROMPT_SCHEMA
from workloads.tasks.arithmetic import TASK, answer_from_sums, generate, split_of, verify


def test_schema_determinism_and_ids():
    a = generate(60, seed=3, concise_fraction=0.5)
    assert a.schema.equals(PROMPT_SCHEMA)
    assert a.equals(generate(60, seed=3, concise_fraction=0.5))
    assert not a.equals(generate(60, seed=4, concise_fraction=0.5))
    ids = a.column("prompt_id").to_pylist()
    assert len(set(ids)) == len(ids)
    for row in a.to_pylist():
        assert row["prompt_id"] == "add-" + row["prompt"].rstrip("=")
        assert (row["task"], row["domain"]) == ("addition", "arithmetic")


def test_splits_are_disjoint():
    train = generate(3000, seed=0, split="train")
    evals = [generate(300, seed=s, split="eval") for s in (0, 1)]
    train_ids = set(train.column("prompt_id").to_pylist())
    for ev in evals:
        assert not train_ids & set(ev.column("prompt_id").to_pylist())
        assert all(
            split_of(*map(int, p.rstrip("=").split("+"))) == "eval" for p in ev.column("prompt").to_pylist()
        )


def test_answers_and_reasoning_are_consistent():
    table = generate(300, difficulties=(1, 2, 3, 4, 8), seed=1, concise_fraction=0.5)
    styles = set()
    for row in table.to_pylist():
        a, b = map(int, row["prompt"].rstrip("=").split("+"))
        assert len(str(a)) == len(str(b)) == row["difficulty"]
        assert row["answer"] == str(a + b) and verify(f" {a + b}\n", row["answer"])
        text = row["reasoning"]
        if text.startswith(f"{a}+{b}: "):
            styles.add("verbose")
            text = text[len(f"{a}+{b}: "):]
        else:
            styles.add("concise")
        steps = text.split(" ")
        assert len(steps) == row["difficulty"]
        sums = []
        for step in steps:
            lhs, rhs = step.split("=")
            assert sum(int(x) for x in lhs.split("+")) == int(rhs)
            sums.append(int(rhs))
        assert answer_from_sums(sums) == row["answer"]
    assert styles == {"verbose", "concise"}
    assert not verify("933", "934")


def test_examples_from_the_docs():
    from workloads.tasks.arithmetic import reasoning

    assert reasoning(347, 586, "concise") == "7+6=13 4+8+1=13 3+5+1=9"
    assert reasoning(347, 586) == "347+586: 7+6=13 4+8+1=13 3+5+1=9"
    assert reasoning(347, 586, "sums") == "13 13 9"


def test_stratified_and_concise_share():
    table = generate(31, difficulties=(2, 3, 4), concise_fraction=0.3)
    diffs = table.column("difficulty").to_pylist()
    assert [diffs.count(d) for d in (2, 3, 4)] == [11, 10, 10]
    assert diffs[:6] == [2, 3, 4, 2, 3, 4]
    concise = sum(":" not in r for r in table.column("reasoning").to_pylist())
    assert concise == round(0.3 * 31)
    assert all(":" in r for r in generate(30).column("reasoning").to_pylist())


@pytest.mark.parametrize(
    "kwargs",
    [
        {"difficulties": (9,)},
        {"difficulties": ()},
        {"split": "test"},
        {"concise_fraction": 1.5},
        {"difficulties": (1,), "split": "eval"},
    ],
)
def test_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        generate(30, **kwargs)


def test_task_object_for_the_registry():
    assert TASK is import_module("workloads.tasks.arithmetic").TASK
    assert (TASK.name, TASK.verifier, TASK.levels) == ("addition", "exact_match", (2, 3, 4))
    assert TASK.generate(3).num_rows == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        TASK.name = "x"
