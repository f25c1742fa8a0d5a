"""Generation engines behind one small interface: vLLM (default) and Hugging Face ``generate``.

Both take token ids in and give token ids, sampled logprobs and a finish reason out, so budgeted
two-phase generation (``rollout/budget.py``) is written once. Ids always come from the tokenizer. Both
stop every request on every end-of-generation id (``end_token_ids``: the tokenizer's EOS and the
generation config's EOS list, ``rollout/end_ids.py``) besides the request's own stop ids; a sample that
ended on one has finish reason ``stop``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Protocol
from collections.abc import Sequence

import torch

from ..config import VllmConfig
from ..devices import AUTO
from .end_ids import end_token_ids
from .vllm_extension import EXTENSION


@dataclass
class GenRequest:
    prompt_token_ids: list[int]
    max_tokens: int
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None
    # (think_end_id, thinking budget, eos_id, solution budget): budget forcing inside this request
    # (engines with budget_forcing; vLLM's extra_args carry it as this list)
    budget_forcing: tuple[int, int, int, int] | None = None


@dataclass
class GenOutput:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str  # "stop" (a stop token or EOS ended it) | "length" (max_tokens reached)


class Engine(Protocol):
    eos_token_id: int  # the tokenizer's
    end_token_ids: tuple[int, ...]  # every id that ends a generation (rollout/end_ids.py), eos_token_id first
    budget_forcing: bool  # honours GenRequest.budget_forcing (one request per budgeted sample)

    def generate(self, requests: Sequence[GenRequest], temperature: float, top_p: float) -> list[GenOutput]: ...

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None: ...

    def prompt_logprobs(self, sequences: Sequence[list[int]]) -> list[list[float]]: ...

    # Collective weight sync (orchestrator/weight_broadcast.py): join learner rank 0's group, then take
    # each broadcast in place; receive_weights returns the policy version the learner sent.
    def open_sync_group(self, address: str, key: str, world_size: int, backend: str, timeout_s: float,
                        bind_host: str = "") -> None: ...

    def receive_weights(self) -> int: ...


def _dtype(name: str) -> torch.dtype:
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _finish(token_ids: list[int], max_tokens: int, stops: set[int]) -> str:
    return "stop" if token_ids and token_ids[-1] in stops else ("length" if len(token_ids) >= max_tokens else "stop")


# ---------------------------------------------------------------------------------------------- vLLM


# The vLLM settings of an engine built outside a config (tests, benchmarks, scripts): eager, half a GPU.
STANDALONE_VLLM = VllmConfig(enforce_eager=True, gpu_memory_utilization=0.5)


class VllmEngine:
    """vLLM ``LLM`` built in this process from a ``VllmConfig`` taken whole (``rollout.vllm``, serve's
    ``model.vllm``; its ``auto`` values resolved by the driver). ``multiprocess`` (default False) picks
    where vLLM's engine runs, on CPU and GPU alike: False keeps it in this process
    (``VLLM_ENABLE_V1_MULTIPROCESSING=0``, the ``uni`` executor), which starts in seconds and takes weights
    as tensors; True leaves vLLM its engine subprocess, and synced weights travel to it as safetensors bytes
    in chunks, or over a collective. Either way they reach vLLM's worker through methods called by name
    (``rollout/vllm_extension.py``). The device sets only the rest: on GPU ``gpu_memory_utilization`` and
    per-request seeds; on CPU whole-batch prefills, ``max_num_seqs`` 1024 when unset, and the in-place
    weight load. ``configs/gpu/deepscaler-1.5b.yaml`` sets ``multiprocess: true``."""

    def __init__(self, model_path: str, *, dtype: str = "float32", max_model_len: int = 4096, seed: int = 0,
                 vllm: VllmConfig | None = None):
        from ..devices import actor_device, check_dtype
        from .vllm_runner import BUDGET_FORCING, planned_model_runner, started_model_runner
        from .vllm_version import require_supported_vllm

        v = STANDALONE_VLLM if vllm is None else vllm
        if AUTO in (v.enforce_eager, v.gpu_memory_utilization):
            raise ValueError(f"vLLM settings with auto values left ({v}): resolve them first (devices.resolve_vllm)")
        on_gpu = torch.cuda.is_available()
        check_dtype(dtype, actor_device())
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(v.kv_cache_gib)))))
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        self.multiprocess = v.multiprocess
        if not v.multiprocess:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        require_supported_vllm()  # an older vLLM fails here, naming the release needed
        from vllm import LLM

        kwargs = dict(model=model_path, dtype=dtype, max_model_len=max_model_len, seed=seed,
                      enforce_eager=v.enforce_eager, enable_prefix_caching=v.enable_prefix_caching,
                      tensor_parallel_size=v.tensor_parallel_size)
        if not v.multiprocess and v.tensor_parallel_size == 1:  # several shards need vLLM's worker processes
            kwargs["distributed_executor_backend"] = "uni"
        max_num_seqs = v.max_num_seqs
        if on_gpu:
            kwargs["gpu_memory_utilization"] = v.gpu_memory_utilization
        else:
            # Whole rollout batches prefill in one step instead of being chunked (a prefill chunk split
            # across steps is also what trips vLLM-CPU's per-request generators, see below).
            kwargs["max_num_batched_tokens"] = max(16384, max_model_len)
            max_num_seqs = max_num_seqs or 1024  # vLLM's 256 splits a rollout batch into waves
        if max_num_seqs:
            kwargs["max_num_seqs"] = max_num_seqs
        # budget_forcing is a switch two_phase_generate reads (False: two calls); the processor is
        # registered once, here, so only an engine built with it can switch it on.
        budget_forcing = v.budget_forcing
        self.budget_forcing = self._forcing_registered = budget_forcing
        if budget_forcing:  # by name, so a multiprocess engine imports it in its own process
            planned = planned_model_runner(kwargs)  # each model runner loads only its own interface
            kwargs["logits_processors"] = [BUDGET_FORCING[planned]]
        # vLLM 0.32 on CPU crashes on per-request seeds when a prefill is chunked ("CPU Generator does
        # not use offset"): on CPU, sampling uses the engine's seeded generator instead.
        self.per_request_seed = on_gpu
        kwargs["worker_extension_cls"] = EXTENSION  # weight loads and syncs, called by name
        self.llm = LLM(**kwargs)
        self.model_runner = started_model_runner(self.llm)  # "v1" or "v2" (rollout/vllm_runner.py)
        if budget_forcing and self.model_runner != planned:  # its loader would have refused the processor
            raise RuntimeError(f"vLLM started model runner {self.model_runner}, not the planned {planned}")
        self.inplace_reload = v.inplace_reload
        self.load_chunk_bytes = 1 << 30  # multiprocess loads: one collective_rpc per chunk (msgpack: < 4 GiB)
        self.last_reload = ""  # the path the last weight load took (see _vllm_reload)
        tok = self.llm.get_tokenizer()
        self.eos_token_id = tok.eos_token_id
        # vLLM stops on these by itself too (its generation_config="auto"); listing them in every request
        # keeps that true whatever the engine's generation_config setting.
        self.end_token_ids = end_token_ids(model_path, tok.eos_token_id)

    def _params(self, r: GenRequest, temperature: float, top_p: float):
        from vllm import SamplingParams

        if r.budget_forcing is not None and not self._forcing_registered:  # vLLM would ignore extra_args
            raise ValueError("GenRequest.budget_forcing needs an engine built with budget_forcing=True")
        stops = list(dict.fromkeys([*r.stop_token_ids, *self.end_token_ids]))
        return SamplingParams(max_tokens=r.max_tokens, stop_token_ids=stops, temperature=temperature,
                              top_p=top_p if temperature > 0 else 1.0, seed=r.seed if self.per_request_seed else None,
                              logprobs=0, detokenize=False,
                              extra_args=None if r.budget_forcing is None else {"budget_forcing": list(r.budget_forcing)})

    @staticmethod
    def _output(out) -> GenOutput:
        c = out.outputs[0]
        ids = list(c.token_ids)
        lps = [float(step[t].logprob) if step is not None and t in step else float("nan")
               for t, step in zip(ids, c.logprobs or [None] * len(ids))]
        return GenOutput(ids, lps, "length" if c.finish_reason == "length" else "stop")

    def generate(self, requests: Sequence[GenRequest], temperature: float, top_p: float) -> list[GenOutput]:
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=r.prompt_token_ids) for r in requests]
        outs = self.llm.generate(prompts, [self._params(r, temperature, top_p) for r in requests], use_tqdm=False)
        return [self._output(out) for out in outs]

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        if self.multiprocess:  # msgpack carries tensors as lists and bytes up to 4 GiB: safetensors chunks
            for blob in serialize_chunks(state_dict, self.load_chunk_bytes):
                self.llm.collective_rpc("budgetrl_stage_weights", args=(blob,))
            state_dict = None  # load what was staged
        self.last_reload = self.llm.collective_rpc("budgetrl_load_weights", args=(state_dict, self.inplace_reload))[0]
        self.llm.reset_prefix_cache()

    def open_sync_group(self, address: str, key: str, world_size: int, backend: str, timeout_s: float,
                        bind_host: str = "") -> None:
        self.llm.collective_rpc("budgetrl_open_sync_group",
                                args=(address, key, world_size, backend, timeout_s, bind_host))

    def receive_weights(self) -> int:
        version, self.last_reload = self.llm.collective_rpc("budgetrl_receive_weights", args=(self.inplace_reload,))[0]
        self.llm.reset_prefix_cache()
        return version

    def prompt_logprobs(self, sequences: Sequence[list[int]]) -> list[list[float]]:
        """Logprob of every token after the first, under the engine's current weights."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0, detokenize=False)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in sequences], params, use_tqdm=False)
        result = []
        for seq, out in zip(sequences, outs):
            pl = out.prompt_logprobs or []
            result.append([float(d[t].logprob) for t, d in zip(seq[1:], pl[1:])])
        return result


# ------------------------------------------------------------------------------------------------ HF


class SampledLogprobs:
    """A ``generate`` logits processor that keeps the logprob of each step's sampled token, one float per
    row and step. It holds one step's log-softmax until the next call, whose ``input_ids`` end with the
    token that step sampled; ``finish`` takes the last step's token from the returned sequences.

    ``generate`` runs custom processors after its own (penalties) and before its sampling warpers
    (temperature, top-k, top-p), so these are the model's logprobs, as vLLM's default ``raw_logprobs``."""

    def __init__(self):
        self._steps: list[torch.Tensor] = []  # [batch, 1] per step whose token is known
        self._last: torch.Tensor | None = None  # the newest step's log-softmax, [batch, vocab]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self._last is not None:
            self._steps.append(self._last.gather(1, input_ids[:, -1:]))
        self._last = scores.float().log_softmax(-1)
        return scores

    def finish(self, new_tokens: torch.Tensor) -> torch.Tensor:
        """[batch, n] logprobs of the ``n`` generated columns ``new_tokens`` (a step ``generate`` ran and then
        undid, as its deferred stop check does on Apple's ``mps``, is dropped)."""
        n = new_tokens.shape[1]
        if len(self._steps) < n and self._last is not None:
            self._steps.append(self._last.gather(1, new_tokens[:, n - 1:n].to(self._last.device)))
        self._last = None
        if len(self._steps) < n:
            raise RuntimeError(f"generate returned {n} tokens a row but called its logits processors "
                               f"{len(self._steps)} times")
        return torch.cat(self._steps[:n], 1) if n else new_tokens.new_zeros((len(new_tokens), 0), dtype=torch.float32)


class HFEngine:
    """Hugging Face ``generate``: the fallback engine (no vLLM needed), same interface.

    Sampled logprobs come from a logits processor that keeps one number per sample and step
    (``SampledLogprobs``), never a step's whole score row: ``generate(output_scores=True)`` keeps batch x
    tokens x vocabulary floats. As vLLM's (``raw_logprobs``), they are the model's distribution before
    temperature and top-p. Synced weights load strictly (``load_weights``)."""

    budget_forcing = False  # budgeted samples take two generate calls

    def __init__(self, model_path: str, *, dtype: str = "float32", seed: int = 0, num_threads: int = 0, **_):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from ..devices import actor_device, check_dtype

        if num_threads:
            torch.set_num_threads(num_threads)
        self.device = actor_device()  # cuda:N from Ray's assignment, else the CPU
        check_dtype(dtype, self.device)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=_dtype(dtype), use_safetensors=True)
        self.model.to(self.device).eval()
        tok = AutoTokenizer.from_pretrained(model_path)
        self.eos_token_id = tok.eos_token_id
        self.end_token_ids = end_token_ids(model_path, tok.eos_token_id)
        self.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else (self.end_token_ids or (0,))[0]
        self.generator_seed = seed
        self._sync_group = None  # the collective weight sync's group (open_sync_group)

    @torch.no_grad()
    def generate(self, requests: Sequence[GenRequest], temperature: float, top_p: float) -> list[GenOutput]:
        from transformers import LogitsProcessorList

        # Batch requests sharing (max_tokens, stop ids); left-pad so every row continues at the end.
        results: list[GenOutput | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(requests):
            stops = tuple(sorted(set(r.stop_token_ids) | set(self.end_token_ids)))
            groups.setdefault((r.max_tokens, stops), []).append(i)
        for (max_tokens, stops), idx in groups.items():
            seed = requests[idx[0]].seed
            if seed is not None:
                torch.manual_seed(seed)
            ids, mask = self._left_padded([requests[i].prompt_token_ids for i in idx])
            sample = temperature > 0
            record = SampledLogprobs()
            out = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), max_new_tokens=max_tokens,
                do_sample=sample, temperature=temperature if sample else None, top_p=top_p if sample else None,
                top_k=0 if sample else None, eos_token_id=list(stops) or None, pad_token_id=self.pad_token_id,
                logits_processor=LogitsProcessorList([record]))
            new = out[:, ids.shape[1]:]
            logprobs = record.finish(new).cpu()
            stop_set = set(stops)
            for row, i in enumerate(idx):
                toks: list[int] = []
                for t in new[row].tolist():
                    toks.append(t)
                    if t in stop_set:
                        break
                results[i] = GenOutput(toks, logprobs[row, :len(toks)].tolist(), _finish(toks, max_tokens, stop_set))
        return results  # type: ignore[return-value]

    def _left_padded(self, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = torch.tensor(p)
            mask[row, width - len(p):] = 1
        return ids, mask

    def load_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a full state dict in place. Strict: a missing or unexpected name raises, naming it, before
        anything is loaded. Names that share one tensor in the model (a tied ``lm_head.weight`` and the
        input embedding) count as present when one of them is; both given must agree."""
        own = self.model.state_dict(keep_vars=True)
        aliases: dict[int, list[str]] = {}  # tensor -> its names in the model (tied weights share one)
        for name, tensor in own.items():
            aliases.setdefault(id(tensor), []).append(name)
        missing = [k for k in own if not any(a in state_dict for a in aliases[id(own[k])])]
        unexpected = [k for k in state_dict if k not in own]
        if missing or unexpected:
            raise ValueError(f"weights do not match the HF engine's model, nothing loaded: missing {missing}, "
                             f"unexpected {unexpected}")
        full = dict(state_dict)
        for names in aliases.values():
            given = [n for n in names if n in state_dict]
            first = state_dict[given[0]]
            for n in given[1:]:
                other = state_dict[n]
                if other.data_ptr() != first.data_ptr() and not torch.equal(other.to(first.dtype), first):
                    raise ValueError(f"weights: {n} differs from {given[0]}, which the HF engine's model ties "
                                     "to it; nothing loaded")
            full.update({n: first for n in names})
        self.model.load_state_dict(full, strict=True)

    def open_sync_group(self, address: str, key: str, world_size: int, backend: str, timeout_s: float,
                        bind_host: str = "") -> None:
        from ..weight_broadcast import open_group

        if self._sync_group is not None:
            self._sync_group.close()  # the group of a learner that was replaced
        self._sync_group = open_group(address, key, 1, world_size, backend, timeout_s, bind_host=bind_host)

    def receive_weights(self) -> int:
        from ..weight_broadcast import receive

        if self._sync_group is None:
            raise RuntimeError("no weight-sync group: open_sync_group first")
        try:
            header, stream = receive(self._sync_group)
            self.load_weights(dict(stream))
        except BaseException:
            self._sync_group.close()  # the sender sees a broken group at once and falls back
            self._sync_group = None
            raise
        return int(header["version"])

    @torch.no_grad()
    def prompt_logprobs(self, sequences: Sequence[list[int]]) -> list[list[float]]:
        result = []
        for s in sequences:
            ids = torch.tensor([s], device=self.device)
            logits = self.model(input_ids=ids).logits.float()
            lp = logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            result.append(lp.cpu().tolist())
        return result


def make_engine(kind: str, model_path: str, **kwargs) -> Engine:
    if kind == "vllm":
        kwargs.pop("num_threads", None)
        return VllmEngine(model_path, **kwargs)
    if kind == "hf":
        return HFEngine(model_path, **kwargs)
    raise ValueError(f"rollout.engine={kind!r}: must be 'vllm' or 'hf'")


def serialize_chunks(state_dict: dict[str, torch.Tensor], chunk_bytes: int = 1 << 30) -> list[bytes]:
    """``serialize_state_dict`` of consecutive parts of at most ``chunk_bytes`` (a larger tensor alone)."""
    parts: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state_dict.items():
        n = v.numel() * v.element_size()
        if parts[-1] and size + n > chunk_bytes:
            parts.append({})
            size = 0
        parts[-1][k] = v
        size += n
    return [serialize_state_dict(p) for p in parts]


def serialize_state_dict(state_dict: dict[str, torch.Tensor]) -> bytes:
    """Safetensors bytes (never pickle) for shipping weights between processes. Safetensors refuses
    tensors that share memory, so a tied output embedding (sent on purpose, see ``get_weights``) is
    written as its own copy."""
    from safetensors.torch import save

    flat, seen = {}, set()
    for k, v in state_dict.items():
        v = v.contiguous()
        if v.data_ptr() in seen:
            v = v.clone()
        seen.add(v.data_ptr())
        flat[k] = v
    return save(flat)


def deserialize_state_dict(blob: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(blob)

