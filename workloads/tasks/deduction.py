"""Deduction: propositional formulas with exactly one satisfying assignment; name every variable's value.

A hidden assignment of ``n`` variables (``A``, ``B``, ...) is drawn; random formulas over not, and, or,
implies, iff and xor that are true under it are added while they rule out more assignments, until only
the hidden one is left. Every assignment is kept as a bit in a ``2**n``-bit integer (``n <= 12``: 4,096
bits), so counting the solutions is a brute-force check over all assignments, not an argument.

Depth counts nested binary connectives: a literal (``A`` or ``~A``) has depth 0, ``A & ~B`` depth 1,
``(A & ~B) -> C`` depth 2; ``~`` may also wrap a compound and adds no depth. Each formula has depth
``max_depth`` or ``max_depth - 1`` (at least 1), and at least one has ``max_depth``.

Answer: ``A=T,B=F,...`` in variable order. The verifier reads the last ``<answer>...</answer>`` and
accepts any order, case, ``=``/``:``/`` is `` and T/F, true/false or 1/0 values; every variable must be
given exactly once and no other key.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import pyarrow as pa

from orchestrator.rewards.registry import register_verifier
from workloads.tasks.logic import Instance, Task, answer_content, generate_table, parse_pairs

NAME = "deduction"
DOMAIN = "logic/deduction"
VERIFIER = "workloads.tasks.deduction:verify"
MAX_RESTARTS = 500  # hidden assignments tried per instance before giving up


@dataclass(frozen=True)
class Level:
    variables: int
    max_depth: int
    min_formulas: int
    max_formulas: int
    candidates: int  # random formulas drawn per added formula; the most constraining one is kept


LEVELS: dict[int, Level] = {
    1: Level(variables=4, max_depth=1, min_formulas=3, max_formulas=6, candidates=1),
    2: Level(variables=6, max_depth=2, min_formulas=3, max_formulas=6, candidates=4),
    3: Level(variables=8, max_depth=3, min_formulas=3, max_formulas=6, candidates=8),
    4: Level(variables=10, max_depth=4, min_formulas=3, max_formulas=6, candidates=16),
    5: Level(variables=12, max_depth=5, min_formulas=3, max_formulas=6, candidates=32),
}
DEFAULT_LEVELS = tuple(LEVELS)

OPS = ("and", "or", "implies", "iff", "xor")
SYMBOLS = {"and": "&", "or": "|", "implies": "->", "iff": "<->", "xor": "^"}
LEGEND = "~ not, ^ xor"  # &, |, -> and <-> are read as usual
TRUE_WORDS = {"t": True, "true": True, "1": True, "f": False, "false": False, "0": False}

# A formula: ("var", i) | ("not", f) | (op, f, g) with op in OPS.


def var_name(i: int) -> str:
    return chr(ord("A") + i)


@lru_cache(maxsize=16)
def var_masks(n: int) -> tuple[int, ...]:
    """Bit ``a`` of mask ``i`` is set when assignment ``a`` (bit i of a = variable i) makes variable i true."""
    size = 1 << n
    masks = []
    for i in range(n):
        half = 1 << i
        block = ((1 << half) - 1) << half  # half zeros then half ones
        period = 2 * half
        m = 0
        for k in range(size // period):
            m |= block << (k * period)
        masks.append(m)
    return tuple(masks)


def truth_mask(f: tuple, n: int) -> int:
    """The set of assignments (as bits) that make ``f`` true."""
    full = (1 << (1 << n)) - 1
    kind = f[0]
    if kind == "var":
        return var_masks(n)[f[1]]
    if kind == "not":
        return full ^ truth_mask(f[1], n)
    a, b = truth_mask(f[1], n), truth_mask(f[2], n)
    if kind == "and":
        return a & b
    if kind == "or":
        return a | b
    if kind == "implies":
        return (full ^ a) | b
    if kind == "iff":
        return full ^ (a ^ b)
    if kind == "xor":
        return a ^ b
    raise ValueError(f"unknown connective {kind!r}")


def evaluate(f: tuple, values: dict[int, bool]) -> bool:
    kind = f[0]
    if kind == "var":
        return values[f[1]]
    if kind == "not":
        return not evaluate(f[1], values)
    a, b = evaluate(f[1], values), evaluate(f[2], values)
    return {"and": a and b, "or": a or b, "implies": (not a) or b, "iff": a == b, "xor": a != b}[kind]


def depth(f: tuple) -> int:
    if f[0] == "var":
        return 0
    if f[0] == "not":
        return depth(f[1])
    return 1 + max(depth(f[1]), depth(f[2]))


def variables_of(f: tuple) -> set[int]:
    if f[0] == "var":
        return {f[1]}
    return set().union(*(variables_of(c) for c in f[1:]))


def render(f: tuple) -> str:
    """Fully parenthesized below the top level; ``~`` binds to a literal or a parenthesized compound."""

    def inner(g: tuple) -> str:
        return render(g) if g[0] in ("var", "not") else f"({render(g)})"

    if f[0] == "var":
        return var_name(f[1])
    if f[0] == "not":
        return "~" + inner(f[1])
    return f"{inner(f[1])} {SYMBOLS[f[0]]} {inner(f[2])}"


def random_formula(
    rng: random.Random, d: int, n: int, prefer: list[int] | None = None, avoid: int | None = None
) -> tuple:
    """A formula of depth exactly ``d`` over variables ``0..n-1``. Leaves come from ``prefer`` (when
    given and non-empty) with probability 0.75; a leaf never uses variable ``avoid``, and the two sides
    of a depth-1 node are different variables (no ``C & C`` or ``A ^ ~A``)."""
    if d == 0:
        pool = [i for i in (prefer or ()) if i != avoid]
        if not pool or rng.random() >= 0.75:
            pool = [i for i in range(n) if i != avoid]
        leaf = ("var", rng.choice(pool))
        return ("not", leaf) if rng.random() < 0.4 else leaf
    a = random_formula(rng, d - 1, n, prefer)
    if d == 1:
        b = random_formula(rng, 0, n, prefer, avoid=min(variables_of(a)))
    else:
        b = random_formula(rng, rng.randint(0, d - 1), n, prefer)
    if rng.random() < 0.5:
        a, b = b, a
    node = (rng.choice(OPS), a, b)
    return ("not", node) if d > 1 and rng.random() < 0.1 else node


def count(mask: int) -> int:
    return mask.bit_count()


def puzzle(rng: random.Random, level: Level) -> tuple[list[tuple], int]:
    """(formulas, hidden assignment) such that the hidden assignment is the only one satisfying all."""
    n, big = level.variables, level.max_depth
    full = (1 << (1 << n)) - 1
    for _ in range(MAX_RESTARTS):
        target = rng.getrandbits(n)
        sols, formulas = full, []
        stuck = 0
        while count(sols) > 1 and len(formulas) < level.max_formulas and stuck < 50:
            best = None
            xs = var_masks(n)
            open_vars = [i for i in range(n) if sols & xs[i] and sols & ~xs[i]]  # not yet determined
            for _ in range(level.candidates):
                f = random_formula(rng, rng.randint(max(1, big - 1), big), n, open_vars)
                m = truth_mask(f, n)
                if not (m >> target) & 1:
                    continue
                left = count(sols & m)
                if left < count(sols) and (best is None or left < best[0]):
                    best = (left, f, m)
            if best is None:
                stuck += 1
                continue
            formulas.append(best[1])
            sols &= best[2]
        if count(sols) != 1:
            continue
        while len(formulas) < level.min_formulas:  # true but redundant formulas, up to the minimum
            f = random_formula(rng, rng.randint(max(1, big - 1), big), n)
            if (truth_mask(f, n) >> target) & 1:
                formulas.append(f)
        if max(depth(f) for f in formulas) != big:
            continue
        rng.shuffle(formulas)
        return formulas, target
    raise RuntimeError(
        f"deduction: no puzzle over {n} variables with a unique solution in at most {level.max_formulas} "
        f"formulas of depth <= {big} after {MAX_RESTARTS} hidden assignments; raise max_formulas or candidates"
    )


def solutions(formulas: list[tuple], n: int) -> list[int]:
    """Every assignment (as an integer, bit i = variable i) satisfying all formulas."""
    sols = (1 << (1 << n)) - 1
    for f in formulas:
        sols &= truth_mask(f, n)
    return [a for a in range(1 << n) if (sols >> a) & 1]


def format_assignment(values: dict[int, bool]) -> str:
    return ",".join(f"{var_name(i)}={'T' if values[i] else 'F'}" for i in sorted(values))


def derivation(formulas: list[tuple], target: int, n: int) -> list[str]:
    """Steps that reach the solution: a formula forcing values given what is known ("2: C=F, D=T"),
    or a refuted guess ("if A=F: 3: B=T, 1 fails; A=T"), else a checked guess ("try A=T")."""
    masks = [truth_mask(f, n) for f in formulas]
    xs = var_masks(n)
    full = (1 << (1 << n)) - 1
    fvars = [sorted(variables_of(f)) for f in formulas]
    truth = {i: bool((target >> i) & 1) for i in range(n)}

    def fix(known_mask: int, i: int, v: bool) -> int:
        return known_mask & (xs[i] if v else full ^ xs[i])

    def forced(known: dict[int, bool], known_mask: int) -> tuple[int, list[tuple[int, bool]]] | None:
        """The first formula that forces unknown values, or (index, []) for a violated formula."""
        for j, m in enumerate(masks):
            left = m & known_mask
            if not left:
                return j, []
            new = [(i, True) for i in fvars[j] if i not in known and left & xs[i] == left]
            new += [(i, False) for i in fvars[j] if i not in known and not left & xs[i]]
            if new:
                return j, sorted(new)
        return None

    def show(pairs) -> str:
        return ", ".join(f"{var_name(i)}={'T' if v else 'F'}" for i, v in pairs)

    known: dict[int, bool] = {}
    known_mask = full
    steps: list[str] = []
    while len(known) < n:
        hit = forced(known, known_mask)
        if hit is not None:
            j, new = hit
            assert new, "the hidden assignment violates a formula"
            for i, v in new:
                known[i] = v
                known_mask = fix(known_mask, i, v)
            steps.append(f"{j + 1}: {show(new)}")
            continue
        refuted = None
        for i in range(n):  # failed literal: assume the wrong value, propagate until a formula fails
            if i in known:
                continue
            trial, trial_mask, chain = dict(known), fix(known_mask, i, not truth[i]), []
            trial[i] = not truth[i]
            while True:
                hit = forced(trial, trial_mask)
                if hit is None:
                    break
                j, new = hit
                if not new:
                    refuted = (i, chain + [f"{j + 1} fails"])
                    break
                for k, v in new:
                    trial[k] = v
                    trial_mask = fix(trial_mask, k, v)
                chain.append(f"{j + 1}: {show(new)}")
            if refuted:
                break
        if refuted:
            i, chain = refuted
            steps.append(f"if {show([(i, not truth[i])])}: {', '.join(chain)}; so {show([(i, truth[i])])}")
        else:
            i = min(k for k in range(n) if k not in known)
            steps.append(f"try {show([(i, truth[i])])}")
        known[i] = truth[i]
        known_mask = fix(known_mask, i, truth[i])
    return steps


def make_instance(rng: random.Random, level: Level) -> Instance:
    n = level.variables
    formulas, target = puzzle(rng, level)
    values = {i: bool((target >> i) & 1) for i in range(n)}
    names = ",".join(var_name(i) for i in range(n))
    lines = [f"{k}. {render(f)}" for k, f in enumerate(formulas, 1)]
    prompt = (
        f"Exactly one T/F assignment of {names} makes all true ({LEGEND}):\n"
        + "\n".join(lines) + "\nAnswer like A=T,B=F."
    )
    steps = derivation(formulas, target, n)
    answer = format_assignment(values)
    verbose = ". ".join(steps) + f". Check 1-{len(formulas)}: all true."
    concise = ". ".join(steps) + "."
    return Instance(prompt=prompt, answer=answer, reasoning=verbose, concise=concise)


def generate(
    num: int,
    *,
    difficulties: tuple[int, ...] = (1,),
    seed: int = 0,
    split: str = "train",
    concise_fraction: float = 0.0,
) -> pa.Table:
    """``num`` distinct puzzles (``PROMPT_SCHEMA``), stratified over ``difficulties``; ``concise_fraction``
    of the rows omit the final check from their reasoning."""
    return generate_table(
        name=NAME, domain=DOMAIN, id_prefix="ded", levels_table=LEVELS, make=make_instance, num=num,
        difficulties=difficulties, seed=seed, split=split, concise_fraction=concise_fraction,
    )


def parse(text: str) -> dict[str, bool] | None:
    """``{"A": True, ...}`` from an answer string, or None."""
    return parse_pairs(text, TRUE_WORDS)


def is_parseable(solution: str) -> bool:
    content = answer_content(solution)
    return content is not None and parse(content) is not None


@register_verifier(NAME)
def verify(solution: str, answer: str) -> bool:
    """The last ``<answer>`` gives exactly the reference assignment (any order/case/spelling)."""
    content = answer_content(solution)
    got = None if content is None else parse(content)
    return got is not None and got == parse(answer)


TASK = Task(
    name=NAME, generate=generate, verifier=VERIFIER, levels=DEFAULT_LEVELS, is_parseable=is_parseable,
    level_params=LEVELS,
)
