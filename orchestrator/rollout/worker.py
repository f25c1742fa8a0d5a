"""RolloutWorker: a Ray actor that owns one engine and turns prompt tables into rollout records.

The driver sends an Arrow prompt table and gets an Arrow rollout table back (``ROLLOUT_SCHEMA``,
reward columns left empty for the reward stage). Weights arrive in place through ``update_weights`` (an
object-store payload) or ``receive_weights`` (a broadcast over the group ``open_sync_group`` joined).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pyarrow as pa

from ..budget_schedule import COLUMNS as SCHEDULE_COLUMNS
from ..config import Budget
from ..prompt_hint import budget_hint
from ..data.schema import ROLLOUT_SCHEMA
from ..weight_sync import WeightPayload, unpack
from .budget import two_phase_generate
from .end_ids import end_token_ids
from .engine import make_engine

ENGINE_SECONDS = b"budgetrl.engine_seconds"  # schema metadata of a generate() result


def engine_seconds(table: pa.Table) -> float:
    """Seconds the engine spent producing ``table`` (0.0 when it does not say)."""
    return float((table.schema.metadata or {}).get(ENGINE_SECONDS, 0.0))


@dataclass(frozen=True)
class SamplingSpec:
    group_size: int
    budget: Budget
    temperature: float
    top_p: float = 1.0
    seed: int = 0
    train_forced_think_end: bool = True
    prompt_hint: str = ""  # budget.prompt_hint: each sample's budget told before its prompt ("" = off)


def row_budgets(prompts: pa.Table, default: Budget) -> list[Budget]:
    """Each prompt's budget: its ``budget_thinking``/``budget_solution`` columns (a training budget
    schedule sets them, orchestrator/budget_schedule.py), else ``default`` (the spec's)."""
    if not set(SCHEDULE_COLUMNS) <= set(prompts.column_names):
        return [default] * prompts.num_rows
    return [Budget(t, s) if t is not None and s is not None else default
            for t, s in zip(*(prompts[n].to_pylist() for n in SCHEDULE_COLUMNS))]


def render_prompt(template: str, prompt: str, tokenizer=None, chat_template: bool = False, hint: str = "") -> str:
    """Task prompt -> model input text, by a format template or the tokenizer's chat template; ``hint``
    (the rendered ``budget.prompt_hint``) goes before the task prompt."""
    prompt = hint + prompt
    if chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return template.replace("{prompt}", prompt)


class RolloutWorker:
    def __init__(self, model_path: str, *, engine: str = "vllm", prompt_template: str = "{prompt}",
                 chat_template: bool = False, think_end: str = "</think>", worker_index: int = 0,
                 engine_kwargs: dict | None = None, truncate_prompts: bool = False):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        ids = self.tokenizer.convert_tokens_to_ids(think_end)
        if ids is None or ids == self.tokenizer.unk_token_id:
            raise ValueError(f"model.think_end={think_end!r} is not a single token of the tokenizer at {model_path}")
        self.think_end_id = int(ids)
        # Every id that ends a generation: the tokenizer's EOS (first) and the generation config's EOS list.
        self.end_ids = end_token_ids(model_path, self.tokenizer.eos_token_id)
        if not self.end_ids:
            raise ValueError(f"the model at {model_path} names no end of generation: its tokenizer has no "
                             "eos_token and its generation config no eos_token_id")
        self.prompt_template = prompt_template
        self.chat_template = chat_template
        self.worker_index = worker_index
        # Overlong prompts keep their last tokens (the question and the thinking marker) when asked.
        self.truncate_prompts = truncate_prompts
        self.max_model_len = int((engine_kwargs or {}).get("max_model_len", 0)) or None
        self.engine = make_engine(engine, model_path, **(engine_kwargs or {}))
        self.policy_version = 0
        self.counters = {"generate_calls": 0, "prompts": 0, "samples": 0, "weight_syncs": 0}
        self.last_sync = ""  # how the last weights came: "object_store" or "collective"

    def ready(self) -> int:
        return self.worker_index

    def generate(self, prompts: pa.Table, spec: SamplingSpec, *, step: int = 0) -> pa.Table:
        """Rollout records for every prompt x ``group_size`` samples (rewards not yet filled)."""
        rows = prompts.to_pylist()
        budgets = row_budgets(prompts, spec.budget)  # one per prompt, shared by its group
        texts = [render_prompt(self.prompt_template, r["prompt"], self.tokenizer, self.chat_template,
                               budget_hint(spec.prompt_hint, b)) for r, b in zip(rows, budgets)]
        enc = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        # A curriculum's response prefix (e.g. the start of the reference reasoning): generation continues
        # after it; its tokens are injected (loss weight 0) and do not use the thinking budget.
        prefixes = [self.tokenizer(r.get("response_prefix") or "", add_special_tokens=False)["input_ids"]
                    if r.get("response_prefix") else [] for r in rows]
        if self.truncate_prompts and self.max_model_len:
            limits = [self.max_model_len - b.total - 1 for b in budgets]
            enc = [ids[-(lim - len(pre)):] if len(ids) + len(pre) > lim else ids
                   for ids, pre, lim in zip(enc, prefixes, limits)]
        g = spec.group_size
        flat_prompts = [ids for ids in enc for _ in range(g)]
        flat_prefix = [pre for pre in prefixes for _ in range(g)]
        base = (spec.seed * 1_000_003 + step * 10_007 + self.worker_index * 7_919) % (2**31 - 1)
        seeds = [(base + i * 2) % (2**31 - 1) for i in range(len(flat_prompts))] if spec.temperature > 0 else None
        t0 = time.perf_counter()
        samples = two_phase_generate(
            self.engine, [p + pre for p, pre in zip(flat_prompts, flat_prefix)],
            [b for b in budgets for _ in range(g)],
            think_end_id=self.think_end_id, end_ids=self.end_ids, temperature=spec.temperature, top_p=spec.top_p,
            seeds=seeds)
        t_engine = time.perf_counter() - t0

        self.counters["generate_calls"] += 1
        self.counters["prompts"] += len(rows)
        self.counters["samples"] += len(samples)
        cols: dict[str, list] = {name: [] for name in ROLLOUT_SCHEMA.names}
        think_texts, sol_texts = self._texts(samples, flat_prefix)
        for k, smp in enumerate(samples):
            row = rows[k // g]
            resp, lps, inj = smp.response(self.think_end_id)
            mask = [0 if (f and not spec.train_forced_think_end) else 1 for f in inj]
            pre = flat_prefix[k]
            if pre:
                resp, lps, inj, mask = pre + resp, [float("nan")] * len(pre) + lps, [True] * len(pre) + inj, \
                    [0] * len(pre) + mask
            values = {
                "prompt_id": row["prompt_id"], "sample_index": k % g, "step": step,
                "policy_version": self.policy_version, "task": row.get("task"), "difficulty": row.get("difficulty"),
                "domain": row.get("domain"), "prompt": row["prompt"], "answer": row.get("answer"),
                "thinking": think_texts[k], "solution": sol_texts[k],
                "thinking_tokens": len(smp.thinking_ids), "solution_tokens": len(smp.solution_ids),
                "thinking_truncated": smp.thinking_truncated, "finish_reason": smp.finish_reason,
                "budget_thinking": budgets[k // g].thinking, "budget_solution": budgets[k // g].solution,
                "reward": None, "correct": None, "reward_error": None,
                "prompt_token_ids": flat_prompts[k], "response_token_ids": resp,
                "response_logprobs": [x if not math.isnan(x) else None for x in lps],
                "injected": inj, "loss_mask": mask,
            }
            for name in cols:
                cols[name].append(values[name])
        # Time inside the engine, so the trainer can tell generation from the loop's own overhead.
        return pa.table(cols, schema=ROLLOUT_SCHEMA.with_metadata({ENGINE_SECONDS: str(t_engine)}))

    def _texts(self, samples, prefixes) -> tuple[list[str], list[str]]:
        """Thinking texts (an injected response prefix first, a natural end marker dropped) and solution
        texts (the end-of-generation id that ended them dropped), decoded as two batches."""
        think, sol = [], []
        for smp, pre in zip(samples, prefixes):
            ids = smp.thinking_ids
            if ids and ids[-1] == self.think_end_id and not smp.forced_think_end:
                ids = ids[:-1]
            think.append(list(pre) + list(ids) if pre else ids)
            sol.append(smp.solution_ids[:-1] if smp.solution_ids and smp.solution_ids[-1] in self.end_ids
                       else smp.solution_ids)
        return (self.tokenizer.batch_decode(think, skip_special_tokens=False),
                self.tokenizer.batch_decode(sol, skip_special_tokens=True))

    def update_weights(self, state_dict, version: int) -> float:
        """Load new weights in place (a ``WeightPayload``, a dict of tensors or safetensors bytes); returns
        seconds taken."""
        t0 = time.perf_counter()
        if isinstance(state_dict, WeightPayload):
            state_dict = unpack(state_dict)
        elif isinstance(state_dict, (bytes, bytearray)):
            from .engine import deserialize_state_dict

            state_dict = deserialize_state_dict(bytes(state_dict))
        self.engine.load_weights(state_dict)
        self.policy_version, self.last_sync = version, "object_store"
        self.counters["weight_syncs"] += 1
        return time.perf_counter() - t0

    def open_sync_group(self, address: str, key: str, world_size: int, backend: str, timeout_s: float) -> None:
        """Join learner rank 0's weight-sync group ``key`` (orchestrator/weight_broadcast.py)."""
        import ray

        self.engine.open_sync_group(address, key, world_size, backend, timeout_s, ray.util.get_node_ip_address())

    def receive_weights(self, version: int) -> float:
        """Take the learner's next broadcast and load it in place; returns seconds taken (waiting included)."""
        t0 = time.perf_counter()
        got = self.engine.receive_weights()
        if got != version:
            raise RuntimeError(f"weight sync: expected policy version {version}, the learner sent {got}")
        self.policy_version, self.last_sync = version, "collective"
        self.counters["weight_syncs"] += 1
        return time.perf_counter() - t0

    def version(self) -> int:
        return self.policy_version

    def stats(self) -> dict:
        """What this worker did since it started: calls, prompts, samples, weight syncs, policy version, the
        path the last weight load took (vLLM: ``inplace`` or ``reload_weights``), how the weights came
        (``last_sync``: ``object_store`` or ``collective``) and vLLM's model runner (``v1``/``v2``; empty for
        the HF engine)."""
        return {**self.counters, "policy_version": self.policy_version, "worker_index": self.worker_index,
                "last_reload": getattr(self.engine, "last_reload", ""), "last_sync": self.last_sync,
                "model_runner": getattr(self.engine, "model_runner", "")}

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        return self.engine.prompt_logprobs(sequences)
