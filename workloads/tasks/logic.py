"""Shared parts of the meta-ability tasks (deduction, induction, abduction; arXiv 2505.10554).

Each task module (``deduction``, ``induction``, ``abduction``) makes one instance at a time from a
``random.Random`` and a level's parameters; this module turns that into a ``PROMPT_SCHEMA`` table
(stratified over levels, deterministic given the seed, train/eval disjoint by a hash of the prompt
text), extracts the model's answer from the LAST ``<answer>...</answer>``, parses ``KEY=VALUE`` lists
tolerantly, and provides the paper's reward as a format term:

    reward = (+2 if correct else -1.5) + meta_ability_format(item)
    meta_ability_format = (+1 if <think>...</think><answer>...</answer> is well formed else -1)
                          + (-0.5 if the answer is missing or unparseable else 0)

which is exactly format +-1 plus answer +2 / -1.5 (mismatch) / -2 (unparseable) with
``RewardConfig(correct_reward=2.0, wrong_reward=-1.5, format_weight=1.0,
format_fn="workloads.tasks.logic:meta_ability_format")`` (``..._prefilled`` when the prompt template
already ends in ``<think>``).
"""

from __future__ import annotations

import hashlib
import importlib
import random
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pyarrow as pa

from orchestrator.data.schema import PROMPT_SCHEMA
from orchestrator.rewards.registry import register_format
from orchestrator.rewards.shaping import THINK_OPEN, response_text, tags_well_formed

SPLITS = ("train", "eval")
EVAL_FRACTION = 0.1  # share of instances (by prompt hash) reserved for the eval split
STYLES = ("verbose", "concise")
MAX_ATTEMPTS_PER_ROW = 200  # instances tried per requested row before giving up (duplicates, wrong split)
ANSWER_FORMAT = "<answer>{answer}</answer>"  # how the answer column appears in a model response
FORMAT_INSTRUCTION = (
    "Think inside <think></think>, then give only the final answer inside <answer></answer>."
)
UNPARSEABLE_PENALTY = -0.5  # -1.5 (mismatch) - 0.5 = -2 (unparseable), the paper's answer scores

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_PAIR = re.compile(r"([A-Za-z][A-Za-z0-9]*)\s*(?:=|:|\s+is\s+)\s*([A-Za-z0-9]+)")
_PAIR_GAP = re.compile(r"[\s,;.]*")


@dataclass(frozen=True)
class Instance:
    """One generated problem: prompt text, canonical answer, reference reasoning in both styles."""

    prompt: str
    answer: str
    reasoning: str  # verbose
    concise: str


@dataclass(frozen=True)
class Task:
    """What the task registry needs (``name``, ``generate``, ``verifier``, ``levels``), plus the
    meta-ability extras: ``is_parseable`` (unparseable vs mismatch), ``answer_format`` (how the answer
    column is written in a response, for warm-start SFT targets) and the ``level_params`` table."""

    name: str
    generate: Callable[..., pa.Table]
    verifier: str  # dotted path "module:function", resolvable in any reward worker process
    levels: tuple[int, ...]
    is_parseable: Callable[[str], bool]
    level_params: Mapping[int, object]
    answer_format: str = ANSWER_FORMAT


def answer_content(text: str) -> str | None:
    """Content of the last ``<answer>...</answer>`` in ``text``, or None."""
    found = _ANSWER_TAG.findall(text)
    return found[-1] if found else None


def parse_pairs(content: str, values: Mapping[str, bool]) -> dict[str, bool] | None:
    """``KEY=VALUE`` pairs separated by commas, semicolons, periods or whitespace -> {KEY upper: bool}.

    ``=``, ``:`` and `` is `` all separate a key from its value; values are looked up lower-cased in
    ``values``. Returns None when anything else is in the text, a value is unknown, no pair is found,
    or a key is given two different values.
    """
    out: dict[str, bool] = {}
    pos = 0
    for m in _PAIR.finditer(content):
        if not _PAIR_GAP.fullmatch(content, pos, m.start()):
            return None
        key, raw = m.group(1).upper(), m.group(2).lower()
        if raw not in values or out.get(key, values[raw]) != values[raw]:
            return None
        out[key] = values[raw]
        pos = m.end()
    if not out or not _PAIR_GAP.fullmatch(content, pos):
        return None
    return out


def split_of(task: str, prompt: str) -> str:
    """The split an instance belongs to: a stable hash of its prompt text, independent of the seed."""
    h = int.from_bytes(hashlib.sha256(f"{task}\n{prompt}".encode()).digest()[:8], "big")
    return "eval" if h % 1_000_000 < EVAL_FRACTION * 1_000_000 else "train"


def prompt_id(prefix: str, prompt: str) -> str:
    return f"{prefix}-{hashlib.sha256(prompt.encode()).hexdigest()[:16]}"


def generate_table(
    *,
    name: str,
    domain: str,
    id_prefix: str,
    levels_table: Mapping[int, object],
    make: Callable[[random.Random, object], Instance],
    num: int,
    difficulties: tuple[int, ...],
    seed: int,
    split: str,
    concise_fraction: float,
) -> pa.Table:
    """``num`` distinct instances, stratified evenly over ``difficulties`` (rows cycle d1, d2, d1, ...),
    as a ``PROMPT_SCHEMA`` table; deterministic given the arguments."""
    if not isinstance(num, int) or isinstance(num, bool) or num < 0:
        raise ValueError(f"num must be a non-negative integer, got {num!r}")
    levels = tuple(difficulties)
    if not levels or len(set(levels)) != len(levels):
        raise ValueError(f"difficulties must be a non-empty tuple of distinct levels, got {difficulties!r}")
    for d in levels:
        if isinstance(d, bool) or d not in levels_table:
            raise ValueError(f"{name}: difficulty levels must be one of {sorted(levels_table)}, got {d!r}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if not 0.0 <= concise_fraction <= 1.0:
        raise ValueError(f"concise_fraction must be in [0, 1], got {concise_fraction!r}")

    per_level = [num // len(levels) + (i < num % len(levels)) for i in range(len(levels))]
    by_level: list[list[Instance]] = []
    for d, n in zip(levels, per_level):
        rng = random.Random(f"{name}/{seed}/{split}/{d}")
        seen: set[str] = set()
        found: list[Instance] = []
        budget = MAX_ATTEMPTS_PER_ROW * n
        while len(found) < n:
            if budget == 0:
                raise ValueError(
                    f"{name} level {d}: found only {len(found)} distinct {split!r} instances of {n} "
                    f"requested after {MAX_ATTEMPTS_PER_ROW * n} attempts"
                )
            budget -= 1
            inst = make(rng, levels_table[d])
            if inst.prompt in seen or split_of(name, inst.prompt) != split:
                continue
            seen.add(inst.prompt)
            found.append(inst)
        by_level.append(found)
    rows: list[tuple[int, Instance]] = []
    for i in range(max(per_level, default=0)):
        rows += [(d, insts[i]) for d, insts in zip(levels, by_level) if i < len(insts)]

    style_rng = random.Random(f"{name}/{seed}/{split}/style")
    concise = set(style_rng.sample(range(len(rows)), round(concise_fraction * len(rows))))
    return pa.Table.from_pydict(
        {
            "prompt_id": [prompt_id(id_prefix, inst.prompt) for _, inst in rows],
            "task": [name] * len(rows),
            "difficulty": [d for d, _ in rows],
            "domain": [domain] * len(rows),
            "prompt": [inst.prompt for _, inst in rows],
            "answer": [inst.answer for _, inst in rows],
            "reasoning": [inst.concise if i in concise else inst.reasoning for i, (_, inst) in enumerate(rows)],
        },
        schema=PROMPT_SCHEMA,
    )


# ---- the paper's reward as a format term ----------------------------------------------------------

_TASK_MODULES = {
    "deduction": "workloads.tasks.deduction",
    "induction": "workloads.tasks.induction",
    "abduction": "workloads.tasks.abduction",
}


def is_parseable_for(task: str, solution: str) -> bool:
    """The task's own parser for the three meta-ability tasks; for any other task, an answer tag."""
    module = _TASK_MODULES.get(task)
    if module is None:
        return answer_content(solution) is not None
    return importlib.import_module(module).is_parseable(solution)


def meta_ability_format_score(thinking: str, solution: str, task: str, prefilled: bool = False) -> float:
    """+1/-1 for the tag layout, plus ``UNPARSEABLE_PENALTY`` when the answer cannot be parsed."""
    text = response_text(thinking, solution)
    ok = tags_well_formed(THINK_OPEN + text if prefilled else text)
    return (1.0 if ok else -1.0) + (0.0 if is_parseable_for(task, solution) else UNPARSEABLE_PENALTY)


@register_format("meta_ability_format")
def meta_ability_format(item) -> float:
    """Format term for ``RewardConfig(correct_reward=2, wrong_reward=-1.5, format_weight=1)``."""
    return meta_ability_format_score(item.thinking, item.solution, item.task)


@register_format("meta_ability_format_prefilled")
def meta_ability_format_prefilled(item) -> float:
    """``meta_ability_format`` for prompt templates that end in ``<think>`` (the response must not repeat it)."""
    return meta_ability_format_score(item.thinking, item.solution, item.task, prefilled=True)
