"""Abduction: Horn rules, known facts and goals; say for each goal whether the rules derive it.

Atoms are short lowercase names; a rule ``a & b -> c`` derives ``c`` once ``a`` and ``b`` are known.
The instance is built around its goals: a derivable goal sits on top of a chain of rules ``depth``
steps above the facts (first derived in forward-chaining round ``depth``), an underivable goal on top
of a chain of the same shape whose bottom atom is neither a fact nor derivable. Side premises reuse
derivable atoms, so the chains share atoms. Distractor rules either fire but conclude fresh,
irrelevant atoms, or never fire (a premise is underivable) and may conclude anything, goals included;
with probability ``cycle_prob`` a chain rule gets a back rule (conclusion -> one of its premises),
which makes cycles (``x -> y``, ``y -> x`` among underivable atoms) without changing what is derivable.

Exactly one answer: derivability from the facts is the least fixed point of the rules, computed by
forward chaining; the generator recomputes it and keeps an instance only when it matches the intended
yes/no labels and depths, no goal is a fact, and with two or more goals both answers occur.

Answer: ``G1=yes,G2=no`` in goal order. The verifier reads the last ``<answer>...</answer>`` and
accepts any order, case, ``=``/``:``/`` is `` and yes/no, y/n, true/false or t/f; every goal must be
given exactly once and no other key.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

import pyarrow as pa

from orchestrator.rewards.registry import register_verifier
from workloads.tasks.logic import Instance, Task, answer_content, generate_table, parse_pairs

NAME = "abduction"
DOMAIN = "logic/abduction"
VERIFIER = "workloads.tasks.abduction:verify"
MAX_TRIES = 200  # graphs drawn per instance before giving up


@dataclass(frozen=True)
class Level:
    min_depth: int  # forward-chaining round of each goal's chain, drawn from min_depth..max_depth
    max_depth: int
    goals: int
    min_distractors: int  # distractor rules, drawn from min_distractors..max_distractors
    max_distractors: int
    cycle_prob: float  # chance that a chain rule gets a back rule (a cycle)
    max_premises: int  # premises per rule: 1..max_premises


LEVELS: dict[int, Level] = {
    1: Level(min_depth=2, max_depth=3, goals=1, min_distractors=3, max_distractors=5, cycle_prob=0.10,
             max_premises=2),
    2: Level(min_depth=3, max_depth=4, goals=2, min_distractors=5, max_distractors=7, cycle_prob=0.15,
             max_premises=2),
    3: Level(min_depth=4, max_depth=5, goals=2, min_distractors=6, max_distractors=9, cycle_prob=0.20,
             max_premises=2),
    4: Level(min_depth=5, max_depth=6, goals=3, min_distractors=8, max_distractors=10, cycle_prob=0.25,
             max_premises=2),
    5: Level(min_depth=6, max_depth=7, goals=3, min_distractors=10, max_distractors=12, cycle_prob=0.30,
             max_premises=3),
}
DEFAULT_LEVELS = tuple(LEVELS)

YES_WORDS = {"yes": True, "y": True, "true": True, "t": True, "no": False, "n": False, "false": False,
             "f": False}

Rule = tuple[tuple[int, ...], int]  # (premises, conclusion), atoms as integers


def forward_chain(facts: set[int], rules: list[Rule]) -> dict[int, int]:
    """Every derivable atom -> the round it is first derived in (facts: 0). Rules fire in parallel
    rounds, so an atom's round is its derivation depth."""
    known = dict.fromkeys(facts, 0)
    r = 0
    while True:
        r += 1
        new = {c for ps, c in rules if c not in known and all(p in known for p in ps)}
        if not new:
            return known
        for c in new:
            known[c] = r


class _Builder:
    def __init__(self, rng: random.Random, level: Level):
        self.rng, self.level = rng, level
        self.n = 0
        self.facts: set[int] = set()
        self.rules: list[Rule] = []
        self.chain_rules: list[Rule] = []
        self.round: dict[int, int] = {}  # derivable atoms (as built) -> round
        self.dead: list[int] = []  # atoms built to be underivable

    def atom(self) -> int:
        self.n += 1
        return self.n - 1

    def fact(self) -> int:
        facts = sorted(self.facts)
        if facts and self.rng.random() < 0.3:
            return self.rng.choice(facts)
        a = self.atom()
        self.facts.add(a)
        self.round[a] = 0
        return a

    def side_premises(self, below: int, exclude: int) -> list[int]:
        """0..max_premises-1 derivable atoms of round < ``below`` (reused, or new facts)."""
        out: list[int] = []
        for _ in range(self.rng.randint(0, self.level.max_premises - 1)):
            pool = [a for a, r in self.round.items() if r < below and a != exclude and a not in out]
            out.append(self.rng.choice(sorted(pool)) if pool and self.rng.random() < 0.6 else self.fact())
        return [a for i, a in enumerate(out) if a not in out[:i] and a != exclude]

    def rule(self, premises: list[int], conclusion: int, chain: bool) -> None:
        premises = list(premises)
        if conclusion in premises or any(set(ps) == set(premises) and c == conclusion for ps, c in self.rules):
            return  # no self-loops, no repeated rules
        self.rng.shuffle(premises)
        r = (tuple(premises), conclusion)
        self.rules.append(r)
        if chain:
            self.chain_rules.append(r)

    def chain(self, depth: int, derivable: bool) -> int:
        """An atom on top of a ``depth``-step chain; its bottom atom is a fact iff ``derivable``."""
        if depth == 0:
            if derivable:
                return self.fact()
            a = self.atom()
            self.dead.append(a)
            return a
        main = self.chain(depth - 1, derivable)
        top = self.atom()
        self.rule([main, *self.side_premises(depth, main)], top, chain=True)
        if derivable:
            self.round[top] = depth
        else:
            self.dead.append(top)
        return top

    def distractor(self) -> None:
        rng = self.rng
        k = rng.randint(1, self.level.max_premises)
        live = sorted(self.round)
        if rng.random() < 0.5:  # fires, concludes a fresh atom nothing else uses
            premises = rng.sample(live, min(k, len(live)))
            top = self.atom()
            self.round[top] = 1 + max(self.round[p] for p in premises)
            self.rule(premises, top, chain=False)
            return
        # never fires: one premise is underivable; the conclusion may be any non-fact atom
        if self.dead and rng.random() < 0.7:
            blocker = rng.choice(self.dead)
        else:
            blocker = self.atom()
            self.dead.append(blocker)
        others = rng.sample(live, min(k - 1, len(live)))
        candidates = [a for a in range(self.n) if a not in self.facts and a != blocker and a not in others]
        if candidates and rng.random() < 0.7:
            top = rng.choice(candidates)
        else:
            top = self.atom()
            self.dead.append(top)
        self.rule([blocker, *others], top, chain=False)

    def cycles(self) -> None:
        for premises, conclusion in list(self.chain_rules):
            if self.rng.random() < self.level.cycle_prob:
                self.rule([conclusion], self.rng.choice(premises), chain=False)


def atom_names(rng: random.Random, n: int) -> list[str]:
    pool = list(string.ascii_lowercase)
    if n > len(pool):
        pool += [a + b for a in string.ascii_lowercase for b in string.ascii_lowercase]
    return rng.sample(pool, n)


def graph(rng: random.Random, level: Level):
    """(facts, rules, goals, labels, depths) of a valid instance."""
    for _ in range(MAX_TRIES):
        b = _Builder(rng, level)
        if level.goals == 1:
            labels = [rng.random() < 0.5]
        else:
            labels = [True, False] + [rng.random() < 0.5 for _ in range(level.goals - 2)]
            rng.shuffle(labels)
        depths = [rng.randint(level.min_depth, level.max_depth) for _ in labels]
        goals = [b.chain(d, want) for d, want in zip(depths, labels)]
        for _ in range(rng.randint(1, 2)):  # facts no chain needs (and never an empty fact list)
            a = b.atom()
            b.facts.add(a)
            b.round[a] = 0
        for _ in range(rng.randint(level.min_distractors, level.max_distractors)):
            b.distractor()
        b.cycles()
        derived = forward_chain(b.facts, b.rules)
        ok = len(set(goals)) == len(goals) and all(
            g not in b.facts and (g in derived) == want and (not want or derived[g] == d)
            for g, want, d in zip(goals, labels, depths)
        )
        if ok:
            rules = list(b.rules)
            rng.shuffle(rules)
            return b.n, b.facts, rules, goals, labels, depths
    raise RuntimeError(f"abduction: no valid rule graph for {level} after {MAX_TRIES} tries")


def make_instance(rng: random.Random, level: Level) -> Instance:
    n, facts, rules, goals, labels, _ = graph(rng, level)
    names = atom_names(rng, n)
    fact_list = sorted(facts, key=lambda a: names[a])
    lines = [" & ".join(names[p] for p in ps) + " -> " + names[c] for ps, c in rules]
    goal_text = ", ".join(f"G{i}: {names[g]}" for i, g in enumerate(goals, 1))
    answer_hint = ",".join(f"G{i}=yes/no" for i in range(1, len(goals) + 1))
    prompt = (
        "Facts: " + ", ".join(names[a] for a in fact_list) + "\nRules:\n" + "\n".join(lines)
        + f"\nWhich goals can be derived? {goal_text}\nAnswer {answer_hint}"
    )
    answer = ",".join(f"G{i}={'yes' if want else 'no'}" for i, want in enumerate(labels, 1))

    derived = forward_chain(facts, rules)
    by_round: dict[int, list[str]] = {}
    for a, r in derived.items():
        if r:
            by_round.setdefault(r, []).append(names[a])
    rounds = [f"round {r}: {', '.join(sorted(by_round[r]))}" for r in sorted(by_round)]
    verdicts = ", ".join(
        f"G{i} {names[g]} {'yes' if want else 'no'}" for i, (g, want) in enumerate(zip(goals, labels), 1)
    )
    verbose = ". ".join(rounds + [f"round {len(rounds) + 1}: nothing new", verdicts])
    concise = " ".join(" ".join(sorted(by_round[r])) for r in sorted(by_round)) + f". {verdicts}"
    return Instance(prompt=prompt, answer=answer, reasoning=verbose, concise=concise)


def generate(
    num: int,
    *,
    difficulties: tuple[int, ...] = (1,),
    seed: int = 0,
    split: str = "train",
    concise_fraction: float = 0.0,
) -> pa.Table:
    """``num`` distinct rule graphs (``PROMPT_SCHEMA``), stratified over ``difficulties``;
    ``concise_fraction`` of the rows list derived atoms without round labels in their reasoning."""
    return generate_table(
        name=NAME, domain=DOMAIN, id_prefix="abd", levels_table=LEVELS, make=make_instance, num=num,
        difficulties=difficulties, seed=seed, split=split, concise_fraction=concise_fraction,
    )


def parse(text: str) -> dict[str, bool] | None:
    """``{"G1": True, ...}`` from an answer string, or None."""
    return parse_pairs(text, YES_WORDS)


def is_parseable(solution: str) -> bool:
    content = answer_content(solution)
    return content is not None and parse(content) is not None


@register_verifier(NAME)
def verify(solution: str, answer: str) -> bool:
    """The last ``<answer>`` gives exactly the reference yes/no for every goal (any order/case/spelling)."""
    content = answer_content(solution)
    got = None if content is None else parse(content)
    return got is not None and got == parse(answer)


TASK = Task(
    name=NAME, generate=generate, verifier=VERIFIER, levels=DEFAULT_LEVELS, is_parseable=is_parseable,
    level_params=LEVELS,
)
