"""Meta-ability task generators (deduction, induction, abduction): one answer per instance, checked by an
independent brute force over the prompt TEXT; verifiers, parseability, levels, determinism, splits."""

from __future__ import annotations

import dataclasses
import itertools
import random
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from orchestrator.data.schema import PROMPT_SCHEMA
from orchestrator.rewards import RewardConfig, ScoreItem, get_format, get_verifier, score
from workloads.tasks import abduction, deduction, induction, logic

MODULES = {"deduction": deduction, "induction": induction, "abduction": abduction}
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**31)
levels = st.sampled_from((1, 2, 3, 4, 5))


def one(module, level: int, seed: int, split: str = "train") -> dict:
    return module.generate(1, difficulties=(level,), seed=seed, split=split).to_pylist()[0]


def tagged(answer: str, thinking: str = "x") -> str:
    return f"<think>{thinking}</think><answer>{answer}</answer>"


# ---- independent brute force over the prompt text -------------------------------------------------

_TOKEN = re.compile(r"\s*(<->|->|[A-Z]|[~&|^()])")
_BINARY = {"&": np.logical_and, "|": np.logical_or, "^": np.logical_xor,
           "->": lambda a, b: np.logical_or(~a, b), "<->": lambda a, b: a == b}


def parse_formula(text: str):
    """Tokens -> nested tuples; at most one binary connective per parenthesis level (as rendered)."""
    tokens, pos = [], 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        assert m, f"bad formula text at {pos}: {text!r}"
        tokens.append(m.group(1))
        pos = m.end()

    def unary(i):
        t = tokens[i]
        if t == "~":
            sub, i = unary(i + 1)
            return ("~", sub), i
        if t == "(":
            sub, i = expr(i + 1)
            assert tokens[i] == ")"
            return sub, i + 1
        assert t.isalpha(), t
        return t, i + 1

    def expr(i):
        left, i = unary(i)
        if i < len(tokens) and tokens[i] in _BINARY:
            op = tokens[i]
            right, i = unary(i + 1)
            assert i == len(tokens) or tokens[i] not in _BINARY, "ambiguous: two connectives at one level"
            return (op, left, right), i
        return left, i

    tree, end = expr(0)
    assert end == len(tokens)
    return tree


def evaluate(tree, columns):
    if isinstance(tree, str):
        return columns[tree]
    if tree[0] == "~":
        return ~evaluate(tree[1], columns)
    return _BINARY[tree[0]](evaluate(tree[1], columns), evaluate(tree[2], columns))


def deduction_solutions(prompt: str) -> list[str]:
    names = re.search(r"assignment of ([A-Z,]+) makes", prompt).group(1).split(",")
    formulas = [parse_formula(line.split(". ", 1)[1]) for line in prompt.splitlines() if re.match(r"\d+\. ", line)]
    grid = np.array(list(itertools.product([False, True], repeat=len(names))))
    columns = {v: grid[:, i] for i, v in enumerate(names)}
    ok = np.ones(len(grid), dtype=bool)
    for f in formulas:
        ok &= evaluate(f, columns)
    return [",".join(f"{v}={'T' if row[i] else 'F'}" for i, v in enumerate(names)) for row in grid[ok]]


def induction_predictions(prompt: str) -> set[int]:
    """Next terms over EVERY cycle of the stated length (11 operations each step) fitting the terms."""
    k = int(re.search(r"cycle of (\d+)", prompt).group(1))
    terms = [int(t) for t in prompt.splitlines()[-1].split(", ")[:-1]]
    ops = [(lambda x, a=a: x + a) for a in range(1, 5)] + [(lambda x, a=a: x - a) for a in range(1, 5)]
    ops += [(lambda x, c=c: x * c) for c in range(2, 5)]
    preds: set[int] = set()
    cycles = 0

    def walk(cycle):
        nonlocal cycles
        i = len(cycle)
        if i == k:
            x = terms[0]
            for j in range(len(terms) - 1):
                x = cycle[j % k](x)
                if x != terms[j + 1]:
                    return
            cycles += 1
            preds.add(cycle[(len(terms) - 1) % k](terms[-1]))
            return
        for op in ops:
            if op(terms[i]) == terms[i + 1]:  # prune: step i must fit (k + 1 terms shown)
                walk(cycle + [op])

    walk([])
    assert cycles >= 1
    return preds


def abduction_truth(prompt: str) -> str:
    lines = prompt.splitlines()
    facts = set(lines[0].removeprefix("Facts: ").split(", "))
    rules = []
    for line in lines[2:]:
        if "->" not in line:
            break
        lhs, rhs = line.split(" -> ")
        rules.append((set(lhs.split(" & ")), rhs))
    goals = re.findall(r"(G\d+): (\w+)", prompt)
    known = set(facts)
    changed = True
    while changed:  # naive fixed point
        changed = False
        for ps, c in rules:
            if ps <= known and c not in known:
                known.add(c)
                changed = True
    assert all(g not in facts for _, g in goals)
    return ",".join(f"{label}={'yes' if g in known else 'no'}" for label, g in goals)


# ---- one answer per instance ----------------------------------------------------------------------


@FAST
@given(seed=seeds, level=levels)
def test_deduction_has_exactly_one_solution(seed, level):
    row = one(deduction, level, seed)
    assert deduction_solutions(row["prompt"]) == [row["answer"]]
    p = deduction.LEVELS[level]
    formulas = [ln for ln in row["prompt"].splitlines() if re.match(r"\d+\. ", ln)]
    assert p.min_formulas <= len(formulas) <= p.max_formulas
    trees = [parse_formula(f.split(". ", 1)[1]) for f in formulas]

    def depth(t):
        return 0 if isinstance(t, str) else depth(t[1]) if t[0] == "~" else 1 + max(depth(t[1]), depth(t[2]))

    assert max(depth(t) for t in trees) == p.max_depth


@FAST
@given(seed=seeds, level=levels)
def test_induction_next_term_is_determined(seed, level):
    row = one(induction, level, seed)
    assert induction_predictions(row["prompt"]) == {int(row["answer"])}
    p = induction.LEVELS[level]
    terms = [int(t) for t in row["prompt"].splitlines()[-1].split(", ")[:-1]]
    assert len(terms) == p.shown and all(abs(t) <= p.max_abs for t in [*terms, int(row["answer"])])


@FAST
@given(seed=seeds, level=levels)
def test_abduction_answer_is_forward_chaining(seed, level):
    row = one(abduction, level, seed)
    assert abduction_truth(row["prompt"]) == row["answer"]
    p = abduction.LEVELS[level]
    values = [v for _, v in (pair.split("=") for pair in row["answer"].split(","))]
    assert len(values) == p.goals
    if p.goals >= 2:
        assert set(values) == {"yes", "no"}


def test_abduction_depth_and_cycles_follow_the_level():
    from workloads.tasks.abduction import LEVELS, forward_chain, graph

    for level, p in LEVELS.items():
        rng = random.Random(level)
        with_cycle = 0
        for _ in range(30):
            n, facts, rules, goals, labels, depths = graph(rng, p)
            derived = forward_chain(facts, rules)
            for g, want, d in zip(goals, labels, depths):
                assert p.min_depth <= d <= p.max_depth
                assert (g in derived) == want and (not want or derived[g] == d)
            edges = {(a, c) for ps, c in rules for a in ps}
            with_cycle += any((c, a) in edges for a, c in edges)
        assert with_cycle > 0


# ---- verifiers ------------------------------------------------------------------------------------


@FAST
@given(seed=seeds, level=st.sampled_from((1, 2, 3)), data=st.data())
def test_deduction_verifier(seed, level, data):
    answer = one(deduction, level, seed)["answer"]
    pairs = answer.split(",")
    assert deduction.verify(tagged(answer), answer)
    shuffled = data.draw(st.permutations(pairs))
    words = {"T": "true", "F": "False"}
    loose = ", ".join(f"{p[0].lower()} = {words[p[2]]}" for p in shuffled)
    assert deduction.verify(tagged(loose), answer)
    assert deduction.verify(tagged("A=F") + "\n" + tagged(answer), answer)  # the last tag counts
    i = data.draw(st.integers(0, len(pairs) - 1))
    flipped = pairs.copy()
    flipped[i] = flipped[i][:-1] + ("F" if flipped[i].endswith("T") else "T")
    assert not deduction.verify(tagged(",".join(flipped)), answer)
    assert deduction.is_parseable(tagged(",".join(flipped)))
    assert not deduction.verify(tagged(",".join(pairs[:-1])), answer)  # a variable missing
    assert not deduction.verify(tagged(answer + ",Z=T"), answer)  # an extra one
    assert not deduction.verify(tagged(answer) + "\n" + tagged(",".join(flipped)), answer)


@FAST
@given(seed=seeds, level=levels, delta=st.sampled_from((-1, 1)))
def test_induction_verifier(seed, level, delta):
    answer = one(induction, level, seed)["answer"]
    assert induction.verify(tagged(answer), answer)
    assert induction.verify(tagged(f"  {answer}.\n"), answer)
    assert induction.verify(tagged(answer.replace("-", "-00") if answer.startswith("-") else "+0" + answer), answer)
    assert not induction.verify(tagged("9" * 5000), answer) and induction.is_parseable(tagged("9" * 5000))
    assert not induction.verify(tagged(str(int(answer) + delta)), answer)
    assert induction.is_parseable(tagged(str(int(answer) + delta)))


@FAST
@given(seed=seeds, level=levels, data=st.data())
def test_abduction_verifier(seed, level, data):
    answer = one(abduction, level, seed)["answer"]
    pairs = answer.split(",")
    assert abduction.verify(tagged(answer), answer)
    loose = "; ".join(p.replace("=", ": ").upper() for p in data.draw(st.permutations(pairs)))
    assert abduction.verify(tagged(loose), answer)
    i = data.draw(st.integers(0, len(pairs) - 1))
    flipped = pairs.copy()
    flipped[i] = flipped[i].replace("yes", "NO") if "yes" in flipped[i] else flipped[i].replace("no", "yes")
    assert not abduction.verify(tagged(",".join(flipped)), answer)
    assert abduction.is_parseable(tagged(",".join(flipped)))


@pytest.mark.parametrize(
    "module, answer, text",
    [
        (deduction, "A=T,B=F", "A=T,B=F"),  # no tag at all
        (deduction, "A=T,B=F", "<answer></answer>"),
        (deduction, "A=T,B=F", "<answer>A=maybe,B=F</answer>"),
        (deduction, "A=T,B=F", "<answer>A=T,A=F,B=F</answer>"),  # contradicts itself
        (deduction, "A=T,B=F", "<answer>The answer is A=T,B=F</answer>"),
        (deduction, "A=T,B=F", "<answer>A=T,B=F"),  # unclosed
        (induction, "42", "<answer>forty-two</answer>"),
        (induction, "42", "<answer>42 or 43</answer>"),
        (induction, "42", "<answer>4 2</answer>"),
        (induction, "42", "<think>42</think>"),
        (induction, "42", "<answer>4.2</answer>"),
        (abduction, "G1=yes", "<answer>yes</answer>"),
        (abduction, "G1=yes", "<answer>G1=probably</answer>"),
        (abduction, "G1=yes,G2=no", "<answer>G1=yes G2</answer>"),
    ],
)
def test_unparseable_answers(module, answer, text):
    assert not module.is_parseable(text)
    assert not module.verify(text, answer)


def test_parse_pairs_forms():
    values = deduction.TRUE_WORDS
    assert logic.parse_pairs("A=T, b = false; C: 1. d is TRUE\nE=0", values) == {
        "A": True, "B": False, "C": True, "D": True, "E": False}
    assert logic.parse_pairs("A=T,A=T", values) == logic.parse_pairs("A=T,", values) == {"A": True}
    for bad in ("", " ", "A", "A=T B", "A==T", "x A=T", "A=yes", "A=T,A=F"):
        assert logic.parse_pairs(bad, values) is None, bad


# ---- rewards: the paper's scores through the orchestrator's registry --------------------------------


def test_meta_ability_reward_values():
    spec = RewardConfig(verifier=deduction.TASK.verifier, correct_reward=2.0, wrong_reward=-1.5,
                      format_weight=1.0, format_fn="workloads.tasks.logic:meta_ability_format")

    def item(thinking: str, solution: str) -> ScoreItem:
        return ScoreItem(task="deduction", thinking=thinking, solution=solution, answer="A=T,B=F",
                         thinking_tokens=1, solution_tokens=1, budget_thinking=8, budget_solution=8,
                         thinking_truncated=False)

    items = [
        item("<think>ok", "</think><answer>A=T,B=F</answer>"),  # format ok, correct: 1 + 2
        item("<think>ok", "</think><answer>A=T,B=T</answer>"),  # format ok, mismatch: 1 - 1.5
        item("<think>ok", "</think><answer>A=?</answer>"),  # format ok, unparseable: 1 - 2
        item("ok", "</think><answer>A=T,B=F</answer>"),  # no <think>: -1 + 2
        item("<think>ok", "</think>A=T,B=F"),  # no answer tag: -1 - 2
    ]
    assert score(items, spec).reward.tolist() == [3.0, -0.5, -1.0, 1.0, -3.0]
    prefilled = dataclasses.replace(spec, format_fn="workloads.tasks.logic:meta_ability_format_prefilled")
    assert score([item("ok", "</think><answer>A=T,B=F</answer>")], prefilled).reward.tolist() == [3.0]


def test_verifiers_resolve_by_name_and_dotted_path():
    for name, module in MODULES.items():
        assert get_verifier(name) is module.verify
        assert get_verifier(module.TASK.verifier) is module.verify
    assert get_format("meta_ability_format") is logic.meta_ability_format


def test_verifier_resolves_in_a_reward_worker_process():
    from orchestrator.rewards import RewardPool

    items = [ScoreItem(task="induction", thinking="", solution=tagged(s), answer="7", thinking_tokens=0,
                       solution_tokens=0, budget_thinking=1, budget_solution=1, thinking_truncated=False)
             for s in ("7", "8")]
    with RewardPool(num_workers=1) as pool:
        result = score(items, RewardConfig(verifier=induction.TASK.verifier), pool=pool)
    assert result.correct.tolist() == [True, False] and result.error == [None, None]


# ---- tables, levels, determinism, splits ----------------------------------------------------------


@pytest.mark.parametrize("name", sorted(MODULES))
def test_table_schema_determinism_and_splits(name):
    module = MODULES[name]
    kwargs = dict(difficulties=(1, 2), seed=5, concise_fraction=0.5)
    a = module.generate(40, **kwargs)
    assert a.schema.equals(PROMPT_SCHEMA)
    assert a.equals(module.generate(40, **kwargs))
    assert not a.equals(module.generate(40, **{**kwargs, "seed": 6}))
    rows = a.to_pylist()
    assert [r["difficulty"] for r in rows[:4]] == [1, 2, 1, 2]
    assert {(r["task"], r["domain"]) for r in rows} == {(name, f"logic/{name}")}
    assert len({r["prompt_id"] for r in rows}) == 40
    assert len({r["reasoning"] for r in rows}) == 40
    for r in rows:
        assert all(c == "\n" or " " <= c <= "~" for c in r["prompt"] + r["answer"] + r["reasoning"])
        assert module.verify(tagged(r["answer"], r["reasoning"]), r["answer"])
    ev = module.generate(20, difficulties=(1, 2), seed=5, split="eval")
    assert not {r["prompt"] for r in rows} & set(ev.column("prompt").to_pylist())
    assert all(logic.split_of(name, p) == "eval" for p in ev.column("prompt").to_pylist())
    assert all(logic.split_of(name, r["prompt"]) == "train" for r in rows)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_levels_are_monotone_in_size(name):
    module = MODULES[name]
    table = module.LEVELS
    assert module.TASK.levels == tuple(sorted(table)) == (1, 2, 3, 4, 5)
    assert module.TASK.level_params is table
    for lo, hi in zip(module.TASK.levels, module.TASK.levels[1:]):
        a, b = dataclasses.asdict(table[lo]), dataclasses.asdict(table[hi])
        assert all(b[k] >= a[k] for k in a), (lo, hi, a, b)
        assert any(b[k] > a[k] for k in a)
    sizes = [np.mean([len(r["prompt"]) for r in module.generate(12, difficulties=(lv,), seed=1).to_pylist()])
             for lv in module.TASK.levels]
    assert sizes == sorted(sizes)


def test_reasoning_reaches_the_answer():
    for r in induction.generate(10, difficulties=(1, 5), concise_fraction=0.5).to_pylist():
        assert r["reasoning"].endswith("=" + r["answer"])
    for r in abduction.generate(10, difficulties=(1, 5), concise_fraction=0.5).to_pylist():
        verdicts = re.findall(r"(G\d+) \w+ (yes|no)", r["reasoning"])
        assert ",".join(f"{g}={v}" for g, v in verdicts) == r["answer"]
    for r in deduction.generate(10, difficulties=(1, 4), concise_fraction=0.5).to_pylist():
        values = {}  # what each step settles, in order: "2: C=F, D=T", "try A=T", "if A=F: ...; so A=T"
        for step in r["reasoning"].rstrip(".").split(". "):
            if step.startswith("Check"):
                continue
            settled = step.split("; so ")[1] if step.startswith("if ") else step.split(" ", 1)[1]
            for pair in settled.split(", "):
                var, value = pair.split("=")
                assert var not in values
                values[var] = value
        assert ",".join(f"{k}={values[k]}" for k in sorted(values)) == r["answer"]


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize(
    "kwargs",
    [{"difficulties": (6,)}, {"difficulties": ()}, {"difficulties": (1, 1)}, {"split": "test"},
     {"concise_fraction": 1.5}, {"num": -1}],
)
def test_bad_arguments(name, kwargs):
    kwargs = {"num": 3, **kwargs}
    with pytest.raises(ValueError):
        MODULES[name].generate(kwargs.pop("num"), **kwargs)


def test_task_objects():
    for name, module in MODULES.items():
        task = module.TASK
        assert (task.name, task.verifier) == (name, f"workloads.tasks.{name}:verify")
        assert task.answer_format.format(answer="x") == "<answer>x</answer>"
        assert task.generate(2, difficulties=(1,)).num_rows == 2
        with pytest.raises(dataclasses.FrozenInstanceError):
            task.name = "x"
