"""Budgeted two-phase generation (Elastic Reasoning's separate budgeting).

Phase 1 thinks for at most ``budget.thinking`` tokens and stops at the end-of-thinking token. If it did not emit
that token (budget ran out, or the model ended early on an end-of-generation id, which is dropped),
the marker is appended: an *injected* token. Phase 2 continues from prompt + thinking + marker for at
most ``budget.solution`` tokens, up to an end-of-generation id (any of ``end_ids``: the tokenizer's EOS and the
generation config's EOS list, ``rollout/end_ids.py``), which stays in the solution.
On vLLM both phases run inside one request per sample (``budget_forcing.py``); otherwise each phase
is one batch on the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

from ..config import Budget
from .engine import Engine, GenRequest


@dataclass
class BudgetedSample:
    thinking_ids: list[int]  # generated in phase 1, a natural end marker included
    thinking_logprobs: list[float]
    forced_think_end: bool  # the marker was injected after the thinking
    thinking_truncated: bool  # phase 1 used its whole budget without closing the thinking
    solution_ids: list[int]
    solution_logprobs: list[float]
    finish_reason: str  # phase 2: "stop" (an end-of-generation id) or "length"

    def response(self, think_end_id: int) -> tuple[list[int], list[float], list[bool]]:
        """Response token ids, their sampled logprobs (NaN where injected), and injected flags."""
        ids = list(self.thinking_ids)
        lps = list(self.thinking_logprobs)
        inj = [False] * len(ids)
        if self.forced_think_end:
            ids.append(think_end_id)
            lps.append(float("nan"))
            inj.append(True)
        ids += self.solution_ids
        lps += self.solution_logprobs
        inj += [False] * len(self.solution_ids)
        return ids, lps, inj


def two_phase_generate(engine: Engine, prompts: Sequence[list[int]], budgets: Sequence[Budget], *,
                       think_end_id: int, end_ids: Sequence[int], temperature: float, top_p: float = 1.0,
                       seeds: Sequence[int | None] | None = None) -> list[BudgetedSample]:
    """Generate one budgeted response per prompt (repeat a prompt for a group of samples). A thinking
    budget of 0 means no thinking phase (a chat template with thinking off wrote an empty one): the solution only.

    ``end_ids`` are the ids that end a generation (an engine's ``end_token_ids``); the first is the one
    forced when a solution budget runs out. On an engine with ``budget_forcing`` each sample is one
    request whose budgets a logits processor enforces (``rollout/budget_forcing.py``: no second
    prefill); otherwise, and for samples that ended without closing their thinking, phase 2 is a
    second ``generate`` call.
    """
    if len(prompts) != len(budgets):
        raise ValueError(f"{len(prompts)} prompts but {len(budgets)} budgets")
    for b in budgets:
        if b.thinking < 0 or b.solution <= 0:
            raise ValueError(f"budgets must be positive (thinking 0: none), got thinking={b.thinking}, "
                             f"solution={b.solution}")
    ends = [e for e in dict.fromkeys(end_ids) if e != think_end_id]
    if not ends:
        raise ValueError(f"end_ids={list(end_ids)!r}: need an end-of-generation id besides think_end_id")
    eos_id, end_set = ends[0], set(ends)
    seeds = list(seeds) if seeds is not None else [None] * len(prompts)
    if off := [i for i, b in enumerate(budgets) if b.thinking == 0]:  # thinking off: the prompt closed it
        outs = engine.generate([GenRequest(list(prompts[i]), budgets[i].solution, ends, seeds[i]) for i in off],
                               temperature, top_p)
        done = {i: BudgetedSample([], [], False, False, list(o.token_ids), list(o.logprobs), o.finish_reason)
                for i, o in zip(off, outs)}
        on = [i for i in range(len(prompts)) if i not in done]
        done.update(zip(on, two_phase_generate(
            engine, [prompts[i] for i in on], [budgets[i] for i in on], think_end_id=think_end_id, end_ids=ends,
            temperature=temperature, top_p=top_p, seeds=[seeds[i] for i in on]) if on else []))
        return [done[i] for i in range(len(prompts))]
    forcing = bool(getattr(engine, "budget_forcing", False))
    if forcing:
        first = engine.generate(
            [GenRequest(list(p), b.total + 2, ends, seed, (think_end_id, b.thinking, eos_id, b.solution))
             for p, b, seed in zip(prompts, budgets, seeds)], temperature, top_p)
    else:
        first = engine.generate(
            [GenRequest(list(p), b.thinking, [think_end_id, *ends], seed)
             for p, b, seed in zip(prompts, budgets, seeds)],
            temperature, top_p)

    samples: list[BudgetedSample | None] = [None] * len(prompts)
    rest, partial = [], []  # samples that still need phase 2
    for i, (p, b, seed, out) in enumerate(zip(prompts, budgets, seeds, first)):
        ids, lps = list(out.token_ids), list(out.logprobs)
        if forcing and (done := _split_forced(ids, lps, out.finish_reason, b, think_end_id, eos_id)):
            samples[i] = done
            continue
        closed = bool(ids) and ids[-1] == think_end_id
        if not closed and ids and ids[-1] in end_set:  # ended before closing: drop the end id, force the marker
            ids, lps = ids[:-1], lps[:-1]
        truncated = not closed and len(ids) >= b.thinking
        forced = not closed
        cont = list(p) + ids + ([think_end_id] if forced else [])
        rest.append((i, GenRequest(cont, b.solution, ends, None if seed is None else seed + 1)))
        partial.append((ids, lps, forced, truncated))

    if rest:
        phase2 = engine.generate([r for _, r in rest], temperature, top_p)
        for (i, _), (ids, lps, forced, truncated), out in zip(rest, partial, phase2):
            samples[i] = BudgetedSample(ids, lps, forced, truncated, list(out.token_ids), list(out.logprobs),
                                        out.finish_reason)
    return samples  # type: ignore[return-value]


def _split_forced(ids: list[int], lps: list[float], finish: str, budget: Budget, think_end_id: int,
                  eos_id: int) -> BudgetedSample | None:
    """Split one budget-forced output into thinking and solution; None if its thinking never closed
    (it sampled an end-of-generation id, or hit the context length, first): that sample takes a second
    phase. ``eos_id`` is the id the processor forces when the solution budget runs out."""
    try:
        k = ids.index(think_end_id)
    except ValueError:
        return None
    if k > budget.thinking:
        return None
    forced = k == budget.thinking  # the marker there is always the processor's: a sampled one comes earlier
    n_think = k if forced else k + 1
    sol, sol_lps = ids[k + 1:], lps[k + 1:]
    if len(sol) == budget.solution + 1 and sol[-1] == eos_id:  # the processor's EOS: the solution budget ran out
        sol, sol_lps, finish = sol[:budget.solution], sol_lps[:budget.solution], "length"
    return BudgetedSample(ids[:n_think], lps[:n_think], forced, forced, sol, sol_lps, finish)
