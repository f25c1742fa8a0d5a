"""Budget forcing inside one vLLM request: a logits processor that forces the end-of-thinking token
after ``t`` thinking tokens and end-of-sequence ``s`` tokens after the thinking closed.

Two-phase budgeting as two ``generate`` calls re-prefills prompt + thinking for phase 2 (vLLM's
prefix cache reuses only full KV blocks, 128 tokens on CPU). Forcing the marker in the running
request keeps its KV cache, so the budgeted rollout costs what one phase of the same tokens costs.

A request opts in with ``SamplingParams(extra_args={"budget_forcing": [think_end_id, t, eos_id, s]})``
and ``max_tokens >= t + s + 2``. Its output then reads ``thinking (+ forced marker at index t) +
solution (+ forced EOS at solution index s)``; ``rollout/budget.py`` splits it and strips the forced
EOS. A request that samples EOS before closing its thinking stops there, as phase 1 would, and
``budget.py`` finishes it with a second phase. Requests without the key are untouched.

This is the V1-interface processor (vLLM's V1 model runner, which this CPU build runs);
``budget_forcing_v2.py`` holds the same rule for Model Runner V2, and ``vllm_runner.py`` picks one.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

KEY = "budget_forcing"


def spec_error(spec) -> str | None:
    """Why ``spec`` is not ``[think_end_id, thinking_budget, eos_id, solution_budget]``, or None."""
    if not (isinstance(spec, (list, tuple)) and len(spec) == 4 and all(isinstance(x, int) for x in spec)):
        return f"extra_args[{KEY!r}]={spec!r}: expected [think_end_id, thinking_budget, eos_id, solution_budget]"
    if spec[1] < 1 or spec[3] < 1:
        return f"extra_args[{KEY!r}]={spec!r}: budgets must be >= 1"
    return None


class _Row:
    __slots__ = ("out", "think_end", "thinking", "eos", "solution", "seen", "closed_at")

    def __init__(self, out: list[int], think_end: int, thinking: int, eos: int, solution: int):
        self.out = out  # vLLM's live list of this request's output tokens
        self.think_end, self.eos = think_end, eos
        self.thinking, self.solution = thinking, solution  # the request's budget
        self.seen = 0  # output tokens already scanned for the marker
        self.closed_at = -1  # index of the end-of-thinking token, once there

    def forced_token(self) -> int | None:
        """The token the next step must produce, or None to sample freely."""
        out, n = self.out, len(self.out)
        if self.closed_at < 0:
            j = self.seen
            while j < n and out[j] >= 0:  # stop at a placeholder (async scheduling fills it in later)
                if out[j] == self.think_end:
                    self.closed_at = j
                    break
                j += 1
            self.seen = j
            if self.closed_at < 0:
                return self.think_end if n == self.thinking else None
        return self.eos if n == self.closed_at + 1 + self.solution else None


class BudgetForcing(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        spec = (sampling_params.extra_args or {}).get(KEY)
        if spec is not None and (err := spec_error(spec)):
            raise ValueError(err)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.rows: dict[int, _Row] = {}
        self.forced: tuple[list[int], list[int]] = ([], [])

    def is_argmax_invariant(self) -> bool:
        return False  # forcing a token changes the greedy choice

    @staticmethod
    def _new_row(params, _prompt_ids, output_ids: list[int]) -> _Row | None:
        spec = (params.extra_args or {}).get(KEY)
        return None if spec is None else _Row(output_ids, *spec)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.rows, batch_update, self._new_row)
        rows, tokens = [], []
        for index, row in self.rows.items():
            tok = row.forced_token()
            if tok is not None:
                rows.append(index)
                tokens.append(tok)
        self.forced = (rows, tokens)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        rows, tokens = self.forced
        if rows:
            r = torch.tensor(rows, dtype=torch.long, device=logits.device)
            t = torch.tensor(tokens, dtype=torch.long, device=logits.device)
            logits[r] = float("-inf")
            logits[r, t] = 0.0
        return logits
