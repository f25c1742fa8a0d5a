"""Budgeted two-phase generation (Elastic Reasoning's separate budgeting).

Phase 1 thinks for at most ``t`` tokens and stops at the end-of-thinking token. If it did not emit
that token (budget ran out, or the model ended early), the marker is appended: an *injected* token.
Phase 2 continues from prompt + thinking + marker for at most ``s`` tokens, up to end-of-sequence.
Both phases run as one batch each on the engine, so prefix caching reuses the phase-1 KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Sequence

from .engine import Engine, GenRequest


@dataclass
class BudgetedSample:
    thinking_ids: list[int]  # generated in phase 1, a natural end marker included
    thinking_logprobs: list[float]
    forced_think_end: bool  # the marker was injected after the thinking
    thinking_truncated: bool  # phase 1 used its whole budget without closing the thinking
    solution_ids: list[int]
    solution_logprobs: list[float]
    finish_reason: str  # phase 2: "stop" (EOS) or "length"

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


def two_phase_generate(engine: Engine, prompts: Sequence[list[int]], budgets: Sequence[tuple[int, int]], *,
                       think_end_id: int, eos_id: int, temperature: float, top_p: float = 1.0,
                       seeds: Sequence[int | None] | None = None) -> list[BudgetedSample]:
    """Generate one budgeted response per prompt (repeat a prompt for a group of samples)."""
    if len(prompts) != len(budgets):
        raise ValueError(f"{len(prompts)} prompts but {len(budgets)} budgets")
    for t, s in budgets:
        if t <= 0 or s <= 0:
            raise ValueError(f"budgets must be positive, got thinking={t}, solution={s}")
    seeds = list(seeds) if seeds is not None else [None] * len(prompts)
    phase1 = engine.generate(
        [GenRequest(list(p), t, [think_end_id, eos_id], seed) for p, (t, _), seed in zip(prompts, budgets, seeds)],
        temperature, top_p)

    requests2, partial = [], []
    for p, (t, s), seed, out in zip(prompts, budgets, seeds, phase1):
        ids, lps = list(out.token_ids), list(out.logprobs)
        closed = bool(ids) and ids[-1] == think_end_id
        if ids and ids[-1] == eos_id:  # ended without closing its thinking: drop EOS, force the marker
            ids, lps = ids[:-1], lps[:-1]
        truncated = not closed and len(ids) >= t
        forced = not closed
        cont = list(p) + ids + ([think_end_id] if forced else [])
        requests2.append(GenRequest(cont, s, [eos_id], None if seed is None else seed + 1))
        partial.append((ids, lps, forced, truncated))

    phase2 = engine.generate(requests2, temperature, top_p)
    samples = []
    for (ids, lps, forced, truncated), out in zip(partial, phase2):
        samples.append(BudgetedSample(ids, lps, forced, truncated, list(out.token_ids), list(out.logprobs),
                                      out.finish_reason))
    return samples
