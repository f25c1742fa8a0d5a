"""Multi-digit addition: a synthetic, self-verifiable task whose difficulty is the number of digits.

Prompts are bare ("347+586=", no model template). The reference reasoning walks the columns right to
left. Two styles carry exactly the same arithmetic: verbose restates the problem first
("347+586: 7+6=13 4+8+1=13 3+5+1=9"), concise does not ("7+6=13 4+8+1=13 3+5+1=9"). A policy
warm-started on both has a shorter, equally accurate style that RL under a thinking budget can select,
as a real model can drop restatement and filler. A third style, ``sums`` ("13 13 9"), writes only
the column sums (hard for a tiny model to learn; not used by default). Train and eval problems are disjoint by construction: a hash of the
operand pair, independent of the seed, decides the split.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

import pyarrow as pa

from orchestrator.data.schema import PROMPT_SCHEMA

NAME = "addition"
DOMAIN = "arithmetic"
DEFAULT_LEVELS = (2, 3, 4)
MIN_LEVEL, MAX_LEVEL = 1, 8
EVAL_FRACTION = 0.1  # share of operand pairs (per level) reserved for the eval split
SPLITS = ("train", "eval")
_ENUMERATE_LIMIT = 2_000_000  # levels with at most this many pairs are enumerated when sampled densely


def operand_range(digits: int) -> tuple[int, int]:
    """Inclusive range of ``digits``-digit operands (1 digit includes 0)."""
    return (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1


def split_of(a: int, b: int) -> str:
    """The split an operand pair belongs to; a stable hash, so it never depends on the seed."""
    h = int.from_bytes(hashlib.sha256(f"{a}+{b}".encode()).digest()[:8], "big")
    return "eval" if h % 1_000_000 < EVAL_FRACTION * 1_000_000 else "train"


def column_sums(a: int, b: int) -> list[int]:
    """Per-column sums right to left, each including the carry from the previous column."""
    sums, carry = [], 0
    xs, ys = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(xs), len(ys))):
        s = int(xs[i] if i < len(xs) else 0) + int(ys[i] if i < len(ys) else 0) + carry
        sums.append(s)
        carry = s // 10
    return sums


STYLES = ("verbose", "concise", "sums")


def reasoning(a: int, b: int, style: str = "verbose") -> str:
    """Reference reasoning: ``concise`` writes each column's addition, ``verbose`` restates the
    problem before the same steps, ``sums`` writes only each column's sum."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    sums = column_sums(a, b)
    if style == "sums":
        return " ".join(str(s) for s in sums)
    if style == "verbose":
        return f"{a}+{b}: " + reasoning(a, b, "concise")
    xs, ys = str(a)[::-1], str(b)[::-1]
    steps = []
    for i, s in enumerate(sums):
        terms = [xs[i] if i < len(xs) else "0", ys[i] if i < len(ys) else "0"]
        if i and sums[i - 1] >= 10:
            terms.append("1")
        steps.append("+".join(terms) + f"={s}")
    return " ".join(steps)


def answer_from_sums(sums: list[int]) -> str:
    """The answer the column sums imply: last digits reversed, plus the final carry."""
    digits = "".join(str(s % 10) for s in reversed(sums))
    return (str(sums[-1] // 10) if sums and sums[-1] >= 10 else "") + digits


def _sample_pairs(rng: random.Random, digits: int, split: str, n: int) -> list[tuple[int, int]]:
    lo, hi = operand_range(digits)
    total = (hi - lo + 1) ** 2
    capacity = total * (EVAL_FRACTION if split == "eval" else 1 - EVAL_FRACTION)
    if n > 0.5 * capacity and total <= _ENUMERATE_LIMIT:
        pool = [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1) if split_of(a, b) == split]
        if n > len(pool):
            raise ValueError(
                f"only {len(pool)} distinct {digits}-digit problems exist in the {split!r} split, "
                f"{n} requested"
            )
        return rng.sample(pool, n)
    seen: set[tuple[int, int]] = set()
    pairs = []
    while len(pairs) < n:
        pair = (rng.randint(lo, hi), rng.randint(lo, hi))
        if pair not in seen and split_of(*pair) == split:
            seen.add(pair)
            pairs.append(pair)
    return pairs


def generate(
    num: int,
    *,
    difficulties: tuple[int, ...] = DEFAULT_LEVELS,
    seed: int = 0,
    split: str = "train",
    concise_fraction: float = 0.0,
) -> pa.Table:
    """``num`` distinct problems as a ``PROMPT_SCHEMA`` table, stratified evenly over ``difficulties``.

    Rows cycle through the levels (d1, d2, d3, d1, ...) so every prefix stays stratified; a
    ``concise_fraction`` share of rows (chosen at random) carries the concise reasoning style.
    Deterministic given the arguments.
    """
    if not isinstance(num, int) or num < 0:
        raise ValueError(f"num must be a non-negative integer, got {num!r}")
    levels = tuple(difficulties)
    if not levels or len(set(levels)) != len(levels):
        raise ValueError(f"difficulties must be a non-empty tuple of distinct levels, got {difficulties!r}")
    for d in levels:
        if not isinstance(d, int) or not MIN_LEVEL <= d <= MAX_LEVEL:
            raise ValueError(f"difficulty levels must be integers in {MIN_LEVEL}..{MAX_LEVEL}, got {d!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= concise_fraction <= 1.0:
        raise ValueError(f"concise_fraction must be in [0, 1], got {concise_fraction!r}")

    per_level = [num // len(levels) + (i < num % len(levels)) for i in range(len(levels))]
    by_level = [
        _sample_pairs(random.Random(f"{NAME}/{seed}/{split}/{d}"), d, split, n)
        for d, n in zip(levels, per_level)
    ]
    rows: list[tuple[int, int, int]] = []
    for i in range(max(per_level, default=0)):
        rows += [(d, *pairs[i]) for d, pairs in zip(levels, by_level) if i < len(pairs)]

    style_rng = random.Random(f"{NAME}/{seed}/{split}/style")
    n_concise = round(concise_fraction * len(rows))
    concise = set(style_rng.sample(range(len(rows)), n_concise))
    return pa.Table.from_pydict(
        {
            "prompt_id": [f"add-{a}+{b}" for _, a, b in rows],
            "task": [NAME] * len(rows),
            "difficulty": [d for d, _, _ in rows],
            "domain": [DOMAIN] * len(rows),
            "prompt": [f"{a}+{b}=" for _, a, b in rows],
            "answer": [str(a + b) for _, a, b in rows],
            "reasoning": [
                reasoning(a, b, "concise" if i in concise else "verbose") for i, (_, a, b) in enumerate(rows)
            ],
        },
        schema=PROMPT_SCHEMA,
    )


def verify(solution: str, answer: str) -> bool:
    """Exact match after stripping whitespace."""
    return solution.strip() == answer.strip()


@dataclass(frozen=True)
class Task:
    """What the orchestrator's task registry needs from a task module (entry point "budgetrl.tasks")."""

    name: str
    generate: Callable[..., pa.Table]
    verifier: str  # name in the orchestrator's reward registry
    levels: tuple[int, ...]


TASK = Task(name=NAME, generate=generate, verifier="exact_match", levels=DEFAULT_LEVELS)
