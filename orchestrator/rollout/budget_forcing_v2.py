"""Budget forcing for vLLM's Model Runner V2 (``vllm/v1/worker/gpu/``), the runner vLLM 0.32 uses
whenever Triton has a backend (CUDA GPUs; not this CPU build). Same request contract and same tokens as the V1
processor in ``budget_forcing.py``; only the interface differs, and V2's loader refuses V1 classes.

V2 hands a processor no token lists, only the model runner's per-slot buffers
(``LogitsProcRequestState``): the token history ``all_token_ids`` and ``prompt_len``/``total_len``,
which the runner updates on the device after each sample (``post_update``). With asynchronous
scheduling the host never sees the sampled tokens without a sync, so the per-slot state lives on the
device too and ``apply`` reads the history there: no host-device sync per step.

Per slot: the request's ``[think_end, t, eos, s]``, the output index of its end-of-thinking token
once there (``closed_at``, -1 before) and how many output tokens were checked for it (``scanned``).
Each step checks the outputs in ``[scanned, min(n, t + 1))`` (``n`` = outputs so far; a marker past
index ``t`` cannot exist, the processor forces it at ``t``), then forces ``think_end`` where the thinking
is open and ``n == t``, and EOS where ``n == closed_at + 1 + s``: the rule of the V1 processor. Without
speculative decoding a request gains one token per step, so the window is one token wide, except at a
slot's first step after (re)admission: a request resumed after preemption arrives with part of its
output, which that step scans whole (its length is ``prefill_len - prompt_len``, known on the host).
"""

from __future__ import annotations

import numpy as np
import torch
from vllm.utils.torch_utils import async_tensor_h2d
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext, LogitsProcessor, LogitsProcRequestState

from .budget_forcing import KEY, spec_error


class BudgetForcingV2(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        spec = (sampling_params.extra_args or {}).get(KEY)
        if spec is not None and (err := spec_error(spec)):
            raise ValueError(err)

    def __init__(self, vllm_config, req_states: LogitsProcRequestState) -> None:
        if getattr(vllm_config, "speculative_config", None) is not None:
            # Draft rows would need the draft tokens' own forcing; V1 refuses custom processors there too.
            raise ValueError("budget forcing does not support speculative decoding: set "
                             "rollout.vllm.budget_forcing=false (two generate calls)")
        self.req = req_states
        n, dev = req_states.max_num_reqs, req_states.device
        self.active = np.zeros(n, dtype=bool)  # host: slots whose request forces budgets
        self.cold = np.zeros(n, dtype=np.int64)  # host: scan width of the slot's first step, 0 once done
        self.thinking = np.zeros(n, dtype=np.int64)  # host: each slot's thinking budget t
        self.spec = torch.zeros(n, 4, dtype=torch.int64, device=dev)  # think_end, t, eos, s
        self.on = torch.zeros(n, dtype=torch.bool, device=dev)
        self.closed_at = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.scanned = torch.zeros(n, dtype=torch.int64, device=dev)
        self.staged: dict[int, list[int] | None] = {}

    def add_request(self, req_idx: int, sampling_params) -> bool:
        spec = (sampling_params.extra_args or {}).get(KEY)
        self.active[req_idx] = spec is not None
        self.thinking[req_idx] = spec[1] if spec is not None else 0
        self.staged[req_idx] = None if spec is None else [int(x) for x in spec]
        return spec is not None  # False lets vLLM skip logits processing for this request

    def apply_staged_writes(self) -> None:
        if not self.staged:
            return
        slots = list(self.staged)
        # Called after the runner flushed its request state: prefill_len is this occupant's.
        resumed = self.req.prefill_len.np[slots].astype(np.int64) - self.req.prompt_len.np[slots]
        self.cold[slots] = 1 + np.minimum(resumed, self.thinking[slots] + 1)
        specs = [s if s is not None else [0, 0, 0, 0] for s in self.staged.values()]
        dev = self.spec.device  # copies through pinned memory, as vLLM's own states do: no host sync
        idx = async_tensor_h2d(slots, device=dev, dtype=torch.int64)
        self.spec[idx] = async_tensor_h2d(specs, device=dev, dtype=torch.int64)
        self.on[idx] = async_tensor_h2d([s is not None for s in self.staged.values()], device=dev, dtype=torch.bool)
        self.closed_at[idx] = -1
        self.scanned[idx] = 0
        self.staged.clear()

    def apply(self, logits: torch.Tensor, ctx: LogitsContext) -> torch.Tensor:
        batch = ctx.idx_mapping_np
        if not self.active[batch].any():
            return logits
        width = int(max(1, self.cold[batch].max()))  # host-side: no device sync
        self.cold[batch] = 0
        slot = ctx.expanded_idx_mapping.long()
        tokens = self._forced_tokens(slot, width)
        forced = tokens >= 0
        col = tokens.clamp(min=0).unsqueeze(1)
        logits.masked_fill_(forced.unsqueeze(1), float("-inf"))
        logits.scatter_(1, col, torch.where(forced.unsqueeze(1), 0.0, logits.gather(1, col)))
        return logits

    def _forced_tokens(self, slot: torch.Tensor, width: int) -> torch.Tensor:
        """Per logits row: the token this step must produce, or -1 to sample freely. Updates the rows'
        ``closed_at``/``scanned`` from the outputs committed since the last step."""
        history = self.req.all_token_ids.gpu
        prompt = self.req.prompt_len.gpu[slot].long()
        n = self.req.total_len.gpu[slot].long() - prompt  # outputs committed so far
        think_end, t, eos, s = self.spec[slot].unbind(1)
        scanned, closed = self.scanned[slot], self.closed_at[slot]
        limit = torch.minimum(n, t + 1)
        pos = scanned.unsqueeze(1) + torch.arange(width, device=slot.device)
        valid = pos < limit.unsqueeze(1)
        col = (prompt.unsqueeze(1) + pos).clamp(0, history.shape[1] - 1)
        hit = valid & (history[slot.unsqueeze(1), col].long() == think_end.unsqueeze(1))
        first = torch.where(hit.any(1), scanned + hit.int().argmax(1), -1)
        closed = torch.where(closed < 0, first, closed)
        self.closed_at[slot] = closed
        self.scanned[slot] = torch.minimum(scanned + width, limit).clamp(min=scanned)
        on = self.on[slot]
        think = on & (closed < 0) & (n == t)
        end = on & (closed >= 0) & (n == closed + 1 + s)
        return torch.where(think, think_end, torch.where(end, eos, -1))
