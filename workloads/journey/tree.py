"""Step-level search trees and the two trajectories derived from each: shortcut and journey.

Tree: the root is the problem; each node on the beam expands to up to ``width`` children (candidate
next steps from a proposer); the task's step judge marks every child ok or wrong, with a reason;
per depth only the top ``beam`` children (ok path first, then proposer score) stay on the beam and
are expanded further, the rest are kept in the tree as pruned leaves. The depth is the number of
reference steps of the problem (one per column for addition).

Shortcut: the steps root -> a correct leaf (every step ok, the implied answer verified).

Journey: a constrained depth-first walk along the same path. At ``wrong_branches`` nodes of the path
(chosen at random among those that have a wrong child), the walk first tries up to
``trials_per_node`` wrong children, each down to where the judge rejects it (the wrong child itself:
the judge checks every step against the column arithmetic), writes the judge's reason as a
reflection and backtracks to the parent, then continues on the correct child. Text format
(printable ASCII, so the tiny character-level tokenizer represents it; the project's tokenizer has
every printable character)::

    7+6=13 4+8=12 wait: the carry 1 was dropped; back: 4+8+1=13 3+5+1=9

i.e. ``<wrong step> wait: <reason>; back: <right step>``. ``replay`` parses a trajectory back into
steps, wrong steps, reflections and backtracks and re-judges it.

Proposers: ``ProgrammaticProposer`` (the task's correct step plus plausible wrong ones) and
``PolicyProposer`` (samples next steps from a model through the project's rollout engines, vLLM or HF).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

WAIT, BACK = "wait:", "; back:"
_REFLECTION = re.compile(r" ?wait: (.*?); back: ?")


@dataclass
class Node:
    step: str | None  # None at the root
    depth: int
    ok: bool  # the judge accepted this step (the root counts as ok)
    reason: str
    score: float
    parent: int | None
    path_ok: bool  # every step root -> here is ok
    children: list[int] = field(default_factory=list)
    pruned: bool = False


@dataclass
class Tree:
    prompt: str
    answer: str  # the reference answer
    problem: tuple
    depth: int
    nodes: list[Node]

    def path(self, i: int) -> list[int]:
        """Node indices root (excluded) -> ``i``."""
        out = []
        while self.nodes[i].parent is not None:
            out.append(i)
            i = self.nodes[i].parent
        return out[::-1]

    def steps(self, i: int) -> list[str]:
        return [self.nodes[j].step for j in self.path(i)]

    def correct_leaves(self, task) -> list[int]:
        return [i for i, n in enumerate(self.nodes)
                if n.depth == self.depth and n.path_ok and task.verify(task.answer(self.problem, self.steps(i)),
                                                                      self.answer)]


class ProgrammaticProposer:
    """The task's own proposer: the correct step plus plausible wrong ones."""

    name = "programmatic"

    def propose(self, task, problem, prompt: str, state: list[str], rng: random.Random,
                width: int) -> list[tuple[str, float]]:
        return task.propose(problem, state, rng, width)


class PolicyProposer:
    """Next steps sampled from a model: ``width`` continuations of ``prompt<think>step step `` that stop
    at the next space (or ``</think>``/EOS), scored by mean token logprob.

    ``engine`` is a project rollout engine (``orchestrator.rollout.engine.make_engine``: vLLM or HF).
    With ``ensure_correct`` the task's reference step joins the candidates when no sample is right, so
    every tree keeps a correct path (a weak policy would otherwise yield no pair); it is counted in
    ``self.injected``.
    """

    name = "policy"

    def __init__(self, engine, tokenizer, *, prompt_template: str = "<s>{prompt}<think>", temperature: float = 1.0,
                 max_step_tokens: int = 12, ensure_correct: bool = True, think_end: str = "</think>"):
        self.engine, self.tok = engine, tokenizer
        self.prompt_template, self.temperature = prompt_template, temperature
        self.max_step_tokens, self.ensure_correct = max_step_tokens, ensure_correct
        space = tokenizer(" ", add_special_tokens=False)["input_ids"]
        if len(space) != 1:
            raise ValueError("PolicyProposer needs a tokenizer with a single token for ' '")
        # The engine stops on every end-of-generation id as well: none of them belongs in a step's text.
        ends = getattr(engine, "end_token_ids", None) or (tokenizer.eos_token_id,)
        self.stop_ids = [space[0], tokenizer.convert_tokens_to_ids(think_end), *ends]
        self.samples = self.injected = 0

    def propose(self, task, problem, prompt: str, state: list[str], rng: random.Random,
                width: int) -> list[tuple[str, float]]:
        from orchestrator.rollout.engine import GenRequest

        text = self.prompt_template.replace("{prompt}", prompt) + "".join(s + " " for s in state)
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        reqs = [GenRequest(ids, self.max_step_tokens, self.stop_ids, seed=rng.randrange(2**31 - 1))
                for _ in range(width)]
        outs = self.engine.generate(reqs, self.temperature, 1.0)
        self.samples += len(outs)
        cands: dict[str, float] = {}
        for o in outs:
            toks = [t for t in o.token_ids if t not in self.stop_ids]
            step = self.tok.decode(toks, skip_special_tokens=True).strip()
            lp = [x for x in o.logprobs if x == x]
            score = sum(lp) / len(lp) if lp else float("-inf")
            if step and score > cands.get(step, float("-inf")):
                cands[step] = score
        out = sorted(cands.items(), key=lambda kv: -kv[1])[:width]
        if self.ensure_correct and not any(task.judge_step(problem, state, s)[0] for s, _ in out):
            self.injected += 1
            out = out[: width - 1] + [(task.steps(problem)[len(state)], float("-inf"))]
        return out


def build_tree(task, prompt: str, answer: str, proposer, *, width: int = 3, beam: int = 2,
               rng: random.Random) -> Tree:
    """Expand the beam level by level to the problem's depth; judge every child."""
    if width < 1 or beam < 1:
        raise ValueError(f"width and beam must be >= 1, got width={width}, beam={beam}")
    problem = task.parse(prompt)
    depth = len(task.steps(problem))
    tree = Tree(prompt, answer, problem, depth, [Node(None, 0, True, "", 0.0, None, True)])
    frontier = [0]
    for d in range(1, depth + 1):
        level = []
        for i in frontier:
            state = tree.steps(i)
            for step, score in proposer.propose(task, problem, prompt, state, rng, width):
                ok, reason = task.judge_step(problem, state, step)
                tree.nodes.append(Node(step, d, ok, reason, score, i, tree.nodes[i].path_ok and ok))
                tree.nodes[i].children.append(len(tree.nodes) - 1)
                level.append(len(tree.nodes) - 1)
        # Beam pruning: correct-so-far paths first, then the proposer's score; stable on ties.
        ranked = sorted(level, key=lambda j: (not tree.nodes[j].path_ok, -tree.nodes[j].score))
        frontier = ranked[:beam]
        for j in ranked[beam:]:
            tree.nodes[j].pruned = True
    return tree


@dataclass
class Trajectory:
    kind: str  # shortcut | journey
    reasoning: str  # the text inside <think> ... </think>
    answer: str
    num_steps: int  # steps written, wrong ones included
    num_wrong: int


def shortcut(tree: Tree, task) -> Trajectory | None:
    leaves = tree.correct_leaves(task)
    if not leaves:
        return None
    steps = tree.steps(leaves[0])
    return Trajectory("shortcut", " ".join(steps), task.answer(tree.problem, steps), len(steps), 0)


def journey(tree: Tree, task, rng: random.Random, *, wrong_branches: int = 1,
            trials_per_node: int = 1) -> Trajectory | None:
    """The shortcut's path with wrong branches tried, reflected on and backtracked from (None if the
    tree has no correct leaf or no wrong child on the correct path)."""
    leaves = tree.correct_leaves(task)
    if not leaves:
        return None
    path = tree.path(leaves[0])
    parents = [0] + path[:-1]
    wrong_of = {p: [c for c in tree.nodes[p].children if not tree.nodes[c].ok] for p in parents}
    candidates = [p for p in parents if wrong_of[p]]
    if not candidates:
        return None
    chosen = set(rng.sample(candidates, min(max(1, wrong_branches), len(candidates))))
    parts, n_wrong = [], 0
    for p, c in zip(parents, path):
        if p in chosen:
            tries = list(wrong_of[p])
            rng.shuffle(tries)
            for w in tries[:max(1, trials_per_node)]:
                parts.append(f"{tree.nodes[w].step} {WAIT} {tree.nodes[w].reason}{BACK}")
                n_wrong += 1
        parts.append(tree.nodes[c].step)
    steps = tree.steps(path[-1])
    return Trajectory("journey", " ".join(parts), task.answer(tree.problem, steps), len(path) + n_wrong, n_wrong)


@dataclass
class Replay:
    path: list[str]  # the steps kept (the backtracked-from wrong ones excluded)
    wrong: list[tuple[str, str]]  # (wrong step, its reflection)
    backtracks: list[str]  # the step written right after each "back:"
    all_ok: bool  # every kept step accepted by the judge, every reflected step rejected
    answer: str | None


def replay(task, prompt: str, reasoning: str) -> Replay:
    """Parse a trajectory and re-judge it step by step (what the tests check journeys with)."""
    problem = task.parse(prompt)
    pieces = _REFLECTION.split(reasoning)  # [steps, reason, steps, reason, ..., steps]
    state: list[str] = []
    wrong, backs, all_ok = [], [], True
    for k in range(0, len(pieces), 2):
        steps = pieces[k].split()
        if k:
            backs.append(steps[0] if steps else "")
        reflected = k + 1 < len(pieces)
        kept, last = (steps[:-1], steps[-1]) if reflected and steps else (steps, None)
        for s in kept:
            all_ok &= task.judge_step(problem, state, s)[0]
            state.append(s)
        if reflected:
            if last is None:
                all_ok = False
                continue
            ok, reason = task.judge_step(problem, state, last)
            all_ok &= (not ok) and reason == pieces[k + 1]
            wrong.append((last, pieces[k + 1]))
    return Replay(state, wrong, backs, all_ok, task.answer(problem, state))
