"""Induction: a sequence made by a hidden cycle of k operations; predict the next (masked) term.

Operations are ``+a`` and ``-b`` (a, b in 1..4) and ``*c`` (c in 2..4): 11 in all. A cycle
``(op_0, ..., op_{k-1})`` and a start term ``t_0`` give ``t_{i+1} = op_{i mod k}(t_i)``. The prompt
states the operation class and the cycle length k, shows ``t_0 .. t_k`` (k + 1 terms, each of the k
operations used once) and asks for ``t_{k+1} = op_0(t_k)``.

Uniqueness: under that hypothesis class (cycles of length k over the 11 operations) an instance is
kept only when exactly ONE cycle is consistent with the shown terms, so the masked term is a function
of what is shown. Consistency decomposes over positions (op_i must map t_i to t_{i+1}), so the check
counts the operations consistent with each shown step and requires 1 everywhere; ambiguity happens
only around small terms (``1*3 = 1+2``, ``-1*2 = -1-1``, ``0*c = 0``), and such sequences are redrawn.
All terms, the masked one included, stay within ``+-max_abs``.

Answer: the integer. The verifier reads the last ``<answer>...</answer>``; surrounding whitespace, a
leading ``+`` and a trailing period are tolerated.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import pyarrow as pa

from orchestrator.rewards.registry import register_verifier
from workloads.tasks.logic import Instance, Task, answer_content, generate_table

NAME = "induction"
DOMAIN = "logic/induction"
VERIFIER = "workloads.tasks.induction:verify"
MAX_TRIES = 10_000  # sequences drawn per instance before giving up


@dataclass(frozen=True)
class Level:
    cycle: int  # k, the number of operations in the hidden cycle
    shown: int  # terms shown (k + 1)
    start_max: int  # t_0 is drawn from 1..start_max
    max_abs: int  # every term, the masked one included, has |t| <= max_abs

    def __post_init__(self) -> None:
        if self.shown < self.cycle + 1:  # every operation of the cycle must be seen once
            raise ValueError(f"induction level: shown={self.shown} must be >= cycle + 1 = {self.cycle + 1}")


LEVELS: dict[int, Level] = {
    1: Level(cycle=6, shown=7, start_max=9, max_abs=99),
    2: Level(cycle=7, shown=8, start_max=12, max_abs=199),
    3: Level(cycle=8, shown=9, start_max=15, max_abs=499),
    4: Level(cycle=9, shown=10, start_max=20, max_abs=999),
    5: Level(cycle=10, shown=11, start_max=25, max_abs=1999),
}
DEFAULT_LEVELS = tuple(LEVELS)

OPS: tuple[tuple[str, int], ...] = (
    *(("+", a) for a in range(1, 5)),
    *(("-", b) for b in range(1, 5)),
    *(("*", c) for c in range(2, 5)),
)


def apply(op: tuple[str, int], x: int) -> int:
    sign, v = op
    return x + v if sign == "+" else x - v if sign == "-" else x * v


def op_text(op: tuple[str, int]) -> str:
    return f"{op[0]}{op[1]}"


def consistent_ops(x: int, y: int) -> list[tuple[str, int]]:
    """Every operation of the class that maps ``x`` to ``y``."""
    return [op for op in OPS if apply(op, x) == y]


def sequence(rng: random.Random, level: Level) -> tuple[list[int], list[tuple[str, int]]]:
    """(shown terms + the masked term, the cycle), redrawn until the cycle is the only consistent one."""
    k = level.cycle
    for _ in range(MAX_TRIES):
        cycle = [rng.choice(OPS) for _ in range(k)]
        if len({o[0] for o in cycle}) < 2:  # all additions (or all products): too regular
            continue
        terms = [rng.randint(1, level.start_max)]
        for i in range(level.shown):  # shown - 1 steps, then the masked term
            terms.append(apply(cycle[i % k], terms[-1]))
        if any(abs(t) > level.max_abs for t in terms):
            continue
        shown = terms[: level.shown]
        if all(len(consistent_ops(shown[i], shown[i + 1])) == 1 for i in range(len(shown) - 1)):
            return terms, cycle
    raise RuntimeError(f"induction: no unambiguous bounded sequence for {level} after {MAX_TRIES} tries")


def make_instance(rng: random.Random, level: Level) -> Instance:
    terms, cycle = sequence(rng, level)
    k, shown = level.cycle, terms[: level.shown]
    answer = terms[level.shown]
    prompt = (
        f"Steps +a, -a (a=1..4) or *c (c=2..4) repeat in a cycle of {k}. Next term?\n"
        + ", ".join(str(t) for t in shown) + ", ?"
    )
    nxt = cycle[(len(shown) - 1) % k]  # the operation that makes the masked term
    steps = [f"{shown[i]}{op_text(cycle[i % k])}={shown[i + 1]}" for i in range(len(shown) - 1)]
    last = f"{shown[-1]}{op_text(nxt)}={answer}"
    verbose = ", ".join(steps) + f". Cycle of {k} repeats {op_text(nxt)}: {last}"
    concise = " ".join(op_text(o) for o in cycle) + f"; {last}"
    return Instance(prompt=prompt, answer=str(answer), reasoning=verbose, concise=concise)


def generate(
    num: int,
    *,
    difficulties: tuple[int, ...] = (1,),
    seed: int = 0,
    split: str = "train",
    concise_fraction: float = 0.0,
) -> pa.Table:
    """``num`` distinct sequences (``PROMPT_SCHEMA``), stratified over ``difficulties``; ``concise_fraction``
    of the rows list only the operations instead of every step in their reasoning."""
    return generate_table(
        name=NAME, domain=DOMAIN, id_prefix="ind", levels_table=LEVELS, make=make_instance, num=num,
        difficulties=difficulties, seed=seed, split=split, concise_fraction=concise_fraction,
    )


_INT = re.compile(r"\s*([+-]?)(\d+)\s*\.?\s*")


def parse(text: str) -> str | None:
    """The integer in canonical decimal form ("-0042" -> "-42", "+0" -> "0"), or None. Kept a string:
    ``int()`` refuses very long digit strings, and model output can be anything."""
    m = _INT.fullmatch(text)
    if not m:
        return None
    digits = m.group(2).lstrip("0") or "0"
    return digits if digits == "0" or m.group(1) != "-" else "-" + digits


def is_parseable(solution: str) -> bool:
    content = answer_content(solution)
    return content is not None and parse(content) is not None


@register_verifier(NAME)
def verify(solution: str, answer: str) -> bool:
    """The last ``<answer>`` holds the reference integer."""
    content = answer_content(solution)
    got = None if content is None else parse(content)
    return got is not None and got == parse(answer)


TASK = Task(
    name=NAME, generate=generate, verifier=VERIFIER, levels=DEFAULT_LEVELS, is_parseable=is_parseable,
    level_params=LEVELS,
)
