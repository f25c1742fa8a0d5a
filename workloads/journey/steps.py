"""Step-level view of a task: reference steps, candidate next steps, and a step judge with reasons.

A search tree (``tree.py``) needs three things from a task, all pure functions of the problem:

- ``steps(problem)``: the reference steps, root to answer (their number is the tree depth);
- ``propose(problem, state, rng, width)``: up to ``width`` distinct candidate next steps (the correct
  one first, then plausible wrong ones), each with a proposer score;
- ``judge_step(problem, state, step) -> (ok, reason)``: whether ``step`` is the right next step after
  ``state`` (the steps written so far) and, when it is not, a one-line reason in words a reader (and
  the tiny model's printable-ASCII vocabulary) can take as a reflection;
- ``answer(problem, path)``: the final answer a path of steps implies.

Implemented for multi-digit addition (``ADDITION``): one step is one column, right to left, written
exactly as the task's concise reasoning (``7+6=13``, ``4+8+1=13`` with the carry as a third term), so a
shortcut is the concise reference reasoning. Wrong steps: a sum off by one, a dropped carry, a
carry that is not there, an operand digit off by one. The judge checks a step against the correct
column arithmetic (the digits of the column, the carry from the previous column, their sum), whatever
proposed it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from workloads.tasks import arithmetic

_STEP = re.compile(r"^(\d)\+(\d)(\+1)?=(\d{1,2})$")


@dataclass(frozen=True)
class Column:
    """The correct arithmetic of one column: digits, incoming carry, sum."""

    x: int
    y: int
    carry: int
    total: int

    def text(self) -> str:
        return f"{self.x}+{self.y}" + ("+1" if self.carry else "") + f"={self.total}"


def parse_problem(prompt: str) -> tuple[int, int]:
    """``"347+586="`` -> ``(347, 586)``."""
    m = re.fullmatch(r"\s*(\d+)\+(\d+)=\s*", prompt)
    if not m:
        raise ValueError(f"not an addition prompt: {prompt!r}")
    return int(m.group(1)), int(m.group(2))


def columns(problem: tuple[int, int]) -> list[Column]:
    a, b = problem
    xs, ys = str(a)[::-1], str(b)[::-1]
    out, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        x = int(xs[i]) if i < len(xs) else 0
        y = int(ys[i]) if i < len(ys) else 0
        out.append(Column(x, y, carry, x + y + carry))
        carry = (x + y + carry) // 10
    return out


class AdditionSteps:
    """Step-level interface for ``workloads.tasks.arithmetic`` (problem = the operand pair)."""

    name = arithmetic.NAME

    def parse(self, prompt: str) -> tuple[int, int]:
        return parse_problem(prompt)

    def steps(self, problem: tuple[int, int]) -> list[str]:
        return [c.text() for c in columns(problem)]

    def judge_step(self, problem: tuple[int, int], state: list[str], step: str) -> tuple[bool, str]:
        """(ok, reason): ``step`` against the correct arithmetic of column ``len(state)``."""
        cols = columns(problem)
        i = len(state)
        if i >= len(cols):
            return False, "all columns are done"
        col = cols[i]
        m = _STEP.match(step.strip())
        if not m:
            return False, f"a step looks like {col.text()}"
        x, y, has_carry, total = int(m.group(1)), int(m.group(2)), m.group(3) is not None, int(m.group(4))
        if (x, y) != (col.x, col.y):
            return False, f"the digits are {col.x} and {col.y}"
        if col.carry and not has_carry:
            return False, "the carry 1 was dropped"
        if has_carry and not col.carry:
            return False, "there is no carry here"
        if total != col.total:
            return False, f"{col.text().split('=')[0]} is {col.total}, not {total}"
        return True, "ok"

    def wrong_steps(self, problem: tuple[int, int], state: list[str]) -> list[str]:
        """Plausible wrong next steps: dropped/extra carry, sum off by one, an operand digit off by one."""
        col = columns(problem)[len(state)]
        terms = f"{col.x}+{col.y}"
        out = []
        if col.carry:
            out.append(f"{terms}={col.x + col.y}")  # dropped carry
        else:
            out.append(f"{terms}+1={col.total + 1}")  # carry that is not there
        plus = "+1" if col.carry else ""
        for t in (col.total + 1, col.total - 1):
            if 0 <= t <= 19:
                out.append(f"{terms}{plus}={t}")  # sum off by one
        for x in (col.x + 1, col.x - 1):
            if 0 <= x <= 9:
                out.append(f"{x}+{col.y}{plus}={x + col.y + col.carry}")  # misread digit, consistent sum
        return list(dict.fromkeys(s for s in out if s != col.text()))

    def propose(self, problem: tuple[int, int], state: list[str], rng: random.Random,
                width: int) -> list[tuple[str, float]]:
        """The correct step (score 1) plus ``width - 1`` wrong ones drawn at random (score 0)."""
        correct = columns(problem)[len(state)].text()
        wrong = self.wrong_steps(problem, state)
        rng.shuffle(wrong)
        return [(correct, 1.0)] + [(w, 0.0) for w in wrong[: max(0, width - 1)]]

    def answer(self, problem: tuple[int, int], path: list[str]) -> str | None:
        """The answer the written column sums imply (None if a step does not parse)."""
        sums = []
        for s in path:
            m = _STEP.match(s.strip())
            if not m:
                return None
            sums.append(int(m.group(4)))
        return arithmetic.answer_from_sums(sums) if sums else None

    def verify(self, answer: str | None, reference: str) -> bool:
        return answer is not None and arithmetic.verify(answer, reference)


ADDITION = AdditionSteps()
STEP_TASKS = {ADDITION.name: ADDITION}


def get_step_task(name: str) -> AdditionSteps:
    try:
        return STEP_TASKS[name]
    except KeyError:
        raise ValueError(f"no step-level interface for task {name!r}; available: {sorted(STEP_TASKS)}") from None
