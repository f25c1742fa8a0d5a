"""Sizing a GPU run before it starts: memory per learner and rollout GPU, weight-sync bytes, fit or not.

Pure arithmetic over a model's shape (its ``config.json``, or a preset for a path that is not here) and
the run's config; it imports nothing beyond the standard library, so ``scripts/gpu_check.py`` can compare
it with a measured peak on a GPU machine without Ray, vLLM or MLflow.

What it counts per learner GPU (N = learner ranks when FSDP shards, else 1; c = compute dtype bytes):
- fp32 master weights 4P/N, fp32 gradients 4P/N, AdamW moments 8P/N (P = parameters);
- compute-dtype copies of the weights (bf16 only): under FSDP the root's parameters (embeddings, head),
  unsharded for the whole step, two gathered layers and one layer's unsharded gradients (bf16, then fp32 for
  the reduce-scatter); under autocast every weight's cast, kept for backward (cP);
- the KL reference in the compute dtype, cP/N;
- the AdamW step's temporary (one more fp32 tensor per parameter, 4P/N) and, without FSDP on several ranks,
  the flat gradient copy the all-reduce sends (4P); the step comes after backward, so the total is the larger
  of the step and the training peak;
- activations kept for backward, per token and decoder layer (``layer_activation_bytes``): the tensors each
  op saves, counted as Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
  Models", section 4.1: 34sbh + 5as^2b for GPT) count them, adapted to Qwen2: RMSNorm in fp32, no dropout,
  SDPA's fused kernels (no s^2 scores, but the padding mask as an additive bias), K and V repeated to all
  heads when a padding mask is present (transformers' ``repeat_kv``), SwiGLU's four f-wide tensors. Checked
  on a CPU with ``torch.autograd.graph.saved_tensors_hooks`` (docs/performance.md, "Sizing a GPU run");
  with checkpointing only each layer's input stays, plus one layer recomputed in backward;
- logits: the learner's log-softmax keeps an fp32 copy of the micro-batch's logits for backward (4 B per
  token and vocabulary entry), its backward holds c-byte gradients of them, and one log-softmax chunk's
  temporaries (about 16 B per element of the chunk: as many rows as fit in 64Mi elements, at least one).
Per rollout GPU: the weights in the engine's dtype and the KV cache vLLM gets from
``gpu_memory_utilization`` (minus a fixed allowance for its activations, CUDA graphs and non-torch memory).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM = 0.90  # a device fits when the estimate stays under 90%: CUDA context, NCCL, fragmentation
VLLM_ALLOWANCE_GIB = 2.0  # vLLM's profiled activation peak, CUDA graphs, non-torch memory (not modeled)
LOGIT_CHUNK_ELEMENTS = 64 * 1024 * 1024  # orchestrator/learner/losses.py: _LOGIT_CHUNK_ELEMENTS


@dataclass(frozen=True)
class ModelShape:
    """What memory depends on, as a causal LM's ``config.json`` names it."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool
    head_dim: int = 0  # 0: hidden // heads
    qkv_bias: bool = True  # Qwen2: q/k/v projections have biases

    @property
    def dim(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def layer_params(self) -> int:
        h, kvd, f = self.hidden, self.kv_heads * self.dim, self.intermediate
        q_o = 2 * h * self.heads * self.dim
        bias = (self.heads * self.dim + 2 * kvd) if self.qkv_bias else 0
        return q_o + 2 * h * kvd + bias + 3 * h * f + 2 * h  # attention, SwiGLU, two RMSNorms

    def root_params(self) -> int:
        """Embeddings, the output head when untied, the final norm: what is not in a decoder layer."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.hidden

    def params(self) -> int:
        return self.layers * self.layer_params() + self.root_params()


# Public config.json values: huggingface.co/Qwen/Qwen2.5-1.5B/blob/main/config.json,
# huggingface.co/Qwen/Qwen2.5-7B/blob/main/config.json, and DeepScaleR-1.5B's base,
# huggingface.co/deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B/blob/main/config.json (Qwen2.5-1.5B untied).
PRESETS = {
    "qwen2.5-1.5b": ModelShape(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960, vocab=151936,
                               tied=True),
    "qwen2.5-7b": ModelShape(hidden=3584, layers=28, heads=28, kv_heads=4, intermediate=18944, vocab=152064,
                             tied=False),
    "r1-distill-qwen-1.5b": ModelShape(hidden=1536, layers=28, heads=12, kv_heads=2, intermediate=8960,
                                       vocab=151936, tied=False),
}


def shape_from_config_json(path: str | Path) -> ModelShape:
    """A model directory's (or a ``config.json``'s) shape; KeyError names a missing key."""
    p = Path(path)
    c = json.loads((p / "config.json" if p.is_dir() else p).read_text())
    c = c.get("text_config", c)
    heads = int(c["num_attention_heads"])
    return ModelShape(hidden=int(c["hidden_size"]), layers=int(c["num_hidden_layers"]), heads=heads,
                      kv_heads=int(c.get("num_key_value_heads") or heads), intermediate=int(c["intermediate_size"]),
                      vocab=int(c["vocab_size"]), tied=bool(c.get("tie_word_embeddings", False)),
                      head_dim=int(c.get("head_dim") or 0),
                      qkv_bias=c.get("model_type") == "qwen2" or bool(c.get("attention_bias", False)))


# ---- the learner --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LearnerSetup:
    """One learner rank's work: how it holds the model and the largest micro-batch it runs."""

    ranks: int = 1
    sharded: bool = False  # FSDP2 (the model's state divided by the ranks)
    dtype: str = "bfloat16"  # compute dtype; master weights are fp32 whatever it is
    reference: bool = True  # a KL reference model
    checkpointing: bool = False
    rows: int = 8  # rows in the largest micro-batch
    seq_len: int = 2048  # tokens of its longest row (the micro-batch is padded to it)
    padded: bool = True  # rows of different lengths: a padding mask, K/V repeated to all heads


def layer_activation_bytes(shape: ModelShape, setup: LearnerSetup) -> float:
    """Bytes one decoder layer keeps for backward, per token of the micro-batch (see the module doc)."""
    h, f, c = shape.hidden, shape.intermediate, DTYPE_BYTES[setup.dtype]
    kvw = shape.heads * shape.dim if setup.padded else shape.kv_heads * shape.dim  # K and V widths
    autocast = not setup.sharded and c < 4  # fp32 weights: each linear casts its input itself
    norms = 2 * (4 * h + (4 if autocast else c) * h + 4)  # fp32 input, normalized copy, 1/rms
    qkv_in = 3 * c * h if autocast else (c * h if c < 4 else 4 * h)
    attention = qkv_in + c * (h + 2 * kvw) + c * h + 4 * shape.heads  # q, K, V; output; logsumexp
    mlp = (2 * c * h if autocast else c * h) + 4 * c * f  # input(s), gate, SiLU, up, product
    mask = c * setup.seq_len if setup.padded else 0  # SDPA's additive bias [b, 1, s, s], per layer
    return norms + attention + mlp + mask


def learner_memory(shape: ModelShape, setup: LearnerSetup) -> dict[str, float]:
    """Bytes per learner GPU, by part (``total`` = the sum with the checkpointing setting ``setup`` has)."""
    p, c = shape.params(), DTYPE_BYTES[setup.dtype]
    n = setup.ranks if setup.sharded else 1
    tokens = setup.rows * setup.seq_len
    if c == 4:
        copies = 0.0
    elif setup.sharded:
        copies = c * shape.root_params() + (2 * c + c + 4) * shape.layer_params()
    else:  # autocast keeps each weight's cast for backward; checkpointed layers recast theirs when recomputed
        copies = c * (shape.root_params() + shape.layer_params()) if setup.checkpointing else c * p
    residual = c if setup.sharded or c == 4 else 4  # the stream between layers (fp32 under autocast)
    per_layer = layer_activation_bytes(shape, setup)
    final = (4 + 2 * c) * shape.hidden  # final norm and the head's input
    full = tokens * (shape.layers * per_layer + final)
    inputs = tokens * (shape.layers * residual * shape.hidden + final)  # what checkpointed layers keep
    chunk_rows = max(1, LOGIT_CHUNK_ELEMENTS // (setup.seq_len * shape.vocab))
    chunk = min(setup.rows, chunk_rows) * setup.seq_len * shape.vocab
    logits = tokens * shape.vocab * (4 + c) + 16 * chunk
    parts = {
        "weights": 4 * p / n,
        "gradients": 4 * p / n,
        "optimizer": 8 * p / n,
        "compute_copies": copies,
        "reference": c * p / n if setup.reference else 0.0,
        "activations": full,
        "activations_checkpointed": inputs + tokens * per_layer,  # layer inputs + one layer recomputed
        "logits": logits,
    }
    static = sum(parts[k] for k in ("weights", "gradients", "optimizer", "compute_copies", "reference"))
    # Backward meets the logits first, with every activation still held; a checkpointed layer is recomputed
    # later, once the logits are gone.
    peak = full + logits if not setup.checkpointing else inputs + max(logits, tokens * per_layer)
    # The AdamW step (foreach) holds one more fp32 tensor per parameter; all-reduce (ddp) a flat gradient copy.
    bucket = 4 * p if setup.ranks > 1 and not setup.sharded else 0
    parts["optimizer_step"] = 4 * p / n * 5 + parts["reference"] + bucket
    parts["total"] = max(static + peak, parts["optimizer_step"])
    return parts


def learner_fix(shape: ModelShape, setup: LearnerSetup, limit: float, max_ranks: int = 64) -> list[str]:
    """Settings that bring a learner GPU under ``limit`` bytes, the gentlest first; [] when none does."""

    def fits(s: LearnerSetup) -> bool:
        return learner_memory(shape, s)["total"] <= limit

    fixes: list[str] = []
    base = setup
    if not setup.checkpointing:
        base = replace(setup, checkpointing=True)
        if fits(base):
            return ["set learner.activation_checkpointing=true"]
        fixes.append("set learner.activation_checkpointing=true")
    # Fewest GPUs first, then the largest micro-batch that fits on them.
    for ranks in range(base.ranks, max_ranks + 1):
        on = base if ranks == base.ranks else replace(base, sharded=True, ranks=ranks)
        rows = next((r for r in range(on.rows, 0, -1) if fits(replace(on, rows=r))), 0)
        if not rows:
            continue
        if ranks > base.ranks:
            if setup.ranks > 1 and not setup.sharded:
                fixes.append("set learner.strategy=fsdp")
            fixes.append(f"raise learner.num_workers to {ranks} (FSDP shards the model over them)")
        if rows < base.rows:
            fixes.append(f"lower learner.micro_batch_size to {rows} (or set learner.micro_batch_tokens="
                         f"{rows * base.seq_len})")
        return fixes
    return []


# ---- rollout and weight sync -----------------------------------------------------------------------------


def kv_bytes_per_token(shape: ModelShape, dtype: str) -> int:
    """K and V of every layer for one token, in the engine's dtype."""
    return 2 * shape.layers * shape.kv_heads * shape.dim * DTYPE_BYTES[dtype]


def rollout_memory(shape: ModelShape, dtype: str, gpu_bytes: float, utilization: float, tp: int = 1) -> dict:
    """Bytes per rollout GPU: weights (split over ``tp`` GPUs) and the KV cache vLLM would allocate."""
    weights = shape.params() * DTYPE_BYTES[dtype] / tp
    kv = utilization * gpu_bytes - weights - VLLM_ALLOWANCE_GIB * GiB
    return {"weights": weights, "kv_cache": kv, "kv_tokens": max(0.0, kv) * tp / kv_bytes_per_token(shape, dtype)}


def weight_sync_bytes(shape: ModelShape, dtype: str) -> int:
    """One step's weight update to one engine: every parameter once (a tied head travels once)."""
    return shape.params() * DTYPE_BYTES[dtype]


# ---- a run's config -----------------------------------------------------------------------------------


@dataclass
class Plan:
    """Everything ``format_plan`` prints; figures in bytes."""

    shape: ModelShape
    shape_source: str
    gpu_bytes: float
    setup: LearnerSetup
    learner: dict[str, float]
    learner_gpus: float
    learner_fixes: list[str]
    prompt_tokens: int
    rollout: dict[str, float]
    rollout_gpus: float
    rollout_dtype: str
    utilization: float
    tp: int
    max_model_len: int
    seqs_per_worker: int
    rollout_fixes: list[str]
    sync_bytes: int
    sync_method: str = "object_store"  # rollout.weight_sync.method

    @property
    def limit(self) -> float:
        return HEADROOM * self.gpu_bytes

    @property
    def learner_fits(self) -> bool:
        return self.learner_gpus <= 0 or self.learner["total"] <= self.limit

    @property
    def rollout_fits(self) -> bool:
        return self.rollout_gpus <= 0 or self.rollout["kv_tokens"] >= self.max_model_len

    @property
    def fits(self) -> bool:
        return self.learner_fits and self.rollout_fits


def _dtype(value: str, on_gpu: bool) -> str:
    """The config's dtype; ``auto`` (or anything unknown) is bf16 on GPUs, fp32 elsewhere."""
    return value if value in DTYPE_BYTES else ("bfloat16" if on_gpu else "float32")


def _longest_train_budget(b) -> int:
    """thinking + solution of the longest budget ``budget.schedule`` gives (config.largest_train_budget,
    restated here: this module imports only the standard library)."""
    s = getattr(b, "schedule", None)
    kind = getattr(s, "kind", "fixed")
    if kind == "stages":
        return max(x.thinking + x.solution for x in s.stages)
    if kind == "curriculum":  # the ladder goes from loose to tight: its first budget is the largest
        t, _, sol = s.ladder[0].lower().replace(":", "x").partition("x")
        return int(t) + int(sol)
    if kind == "mixture":
        return sum(max(d.values or d.range or [dflt]) for d, dflt in ((s.thinking, b.thinking), (s.solution, b.solution)))
    return b.thinking + b.solution


def learner_setup(cfg, prompt_tokens: int) -> LearnerSetup:
    """The largest micro-batch a learner rank runs under ``cfg``: every row at its longest (prompt, the
    thinking budget, a forced ``</think>``, the solution budget)."""
    le, a, t = cfg.learner, cfg.algorithm, cfg.trainer
    seq_len = prompt_tokens + _longest_train_budget(cfg.budget) + 1
    per_rank = math.ceil(t.prompts_per_step * cfg.rollout.group_size / a.mini_batches / le.num_workers)
    rows = min(le.micro_batch_size, per_rank)
    if le.micro_batch_tokens > 0:
        rows = max(1, min(rows, le.micro_batch_tokens // seq_len))
    strategy = le.strategy if le.strategy != "auto" else ("fsdp" if le.gpus_per_worker > 0 else "ddp")
    return LearnerSetup(ranks=le.num_workers, sharded=strategy == "fsdp" and le.num_workers > 1,
                        dtype=_dtype(cfg.model.dtype, le.gpus_per_worker > 0), reference=a.kl_coef > 0,
                        checkpointing=le.activation_checkpointing, rows=rows, seq_len=seq_len)


def plan_config(cfg, shape: ModelShape, *, gpu_memory_gib: float = 80.0, prompt_tokens: int = 256,
                shape_source: str = "") -> Plan:
    """``cfg`` (a validated ``orchestrator.config.Config``) sized on GPUs of ``gpu_memory_gib`` each."""
    setup = learner_setup(cfg, prompt_tokens)
    gpu = gpu_memory_gib * GiB
    learner = learner_memory(shape, setup)
    r, v = cfg.rollout, cfg.rollout.vllm
    util = v.gpu_memory_utilization if isinstance(v.gpu_memory_utilization, (int, float)) \
        and v.gpu_memory_utilization > 0 else 0.85
    tp = int(getattr(v, "tensor_parallel_size", 1) or 1)
    dtype = _dtype(cfg.model.dtype, r.gpus_per_worker > 0)
    rollout = rollout_memory(shape, dtype, gpu, util, tp)
    plan = Plan(shape=shape, shape_source=shape_source, gpu_bytes=gpu, setup=setup, learner=learner,
                learner_gpus=cfg.learner.gpus_per_worker, learner_fixes=[], prompt_tokens=prompt_tokens,
                rollout=rollout, rollout_gpus=r.gpus_per_worker, rollout_dtype=dtype, utilization=util, tp=tp,
                max_model_len=cfg.model.max_model_len,
                seqs_per_worker=math.ceil(cfg.trainer.prompts_per_step * r.group_size / r.num_workers),
                rollout_fixes=[], sync_bytes=weight_sync_bytes(shape, dtype),
                sync_method=getattr(getattr(r, "weight_sync", None), "method", "object_store"))
    if not plan.learner_fits:
        plan.learner_fixes = learner_fix(shape, setup, plan.limit)
    if not plan.rollout_fits:
        plan.rollout_fixes = _rollout_fix(plan)
    return plan


def _rollout_fix(plan: Plan) -> list[str]:
    need = plan.max_model_len * kv_bytes_per_token(plan.shape, plan.rollout_dtype) / plan.tp
    util = (plan.rollout["weights"] + VLLM_ALLOWANCE_GIB * GiB + need) / plan.gpu_bytes
    fixes = [f"raise rollout.vllm.gpu_memory_utilization to {math.ceil(util * 100) / 100:.2f}"] if util <= 0.95 else []
    tokens = int(plan.rollout["kv_tokens"])
    if tokens > 0:
        fixes.append(f"lower model.max_model_len to {tokens} (the KV cache holds {tokens} tokens)")
    return fixes


# ---- printing -----------------------------------------------------------------------------------------


def _row(label: str, n: float, note: str = "") -> str:
    return f"  {label:<60}{n / GiB:8.2f}" + (f"  {note}" if note else "")


def _learner_lines(plan: Plan) -> list[str]:
    s, m = plan.setup, plan.learner
    part = f"1/{s.ranks} shard" if s.sharded else "whole model"
    way = "FSDP2" if s.sharded else ("bf16 autocast" if DTYPE_BYTES[s.dtype] < 4 else "fp32")
    on, off = ("  <- on", "") if s.checkpointing else ("", "  <- on")
    copies = "root + gathered layers" if s.sharded else "casts kept for backward"
    verdict = "fits" if plan.learner_fits else "DOES NOT FIT"
    return [
        f"learner: {s.ranks} rank(s) x {plan.learner_gpus:g} GPU, {way}, {s.dtype} compute; micro-batch {s.rows} "
        f"rows x {s.seq_len} tokens (prompt {plan.prompt_tokens} + thinking + 1 forced </think> + solution) = "
        f"{s.rows * s.seq_len:,} tokens",
        f"  {'per learner GPU':<60}{'GiB':>8}",
        _row(f"fp32 master weights ({part})", m["weights"]),
        _row(f"fp32 gradients ({part})", m["gradients"]),
        _row(f"AdamW moments, 2 x fp32 ({part})", m["optimizer"]),
        _row(f"{s.dtype} weight copies ({copies})", m["compute_copies"]),
        _row(f"KL reference ({s.dtype}, {part})", m["reference"]),
        _row("activations, no checkpointing", m["activations"]) + off,
        _row("activations, checkpointing per layer", m["activations_checkpointed"]) + on,
        _row("logits (fp32 log-softmax copy, its gradients, one chunk)", m["logits"]),
        _row("AdamW step (state, reference, one fp32 temporary)", m["optimizer_step"]),
        _row(f"total (checkpointing {'on' if s.checkpointing else 'off'})", m["total"],
             f"{verdict} (limit {plan.limit / GiB:.1f} GiB = {HEADROOM:.0%} of {plan.gpu_bytes / GiB:g})"),
    ]


def _rollout_lines(plan: Plan) -> list[str]:
    r, seq = plan.rollout, plan.setup.seq_len
    kv_tok = kv_bytes_per_token(plan.shape, plan.rollout_dtype)
    tp = f", tensor parallel {plan.tp}" if plan.tp > 1 else ""
    return [
        f"rollout: per GPU, vLLM in {plan.rollout_dtype}, gpu_memory_utilization {plan.utilization:g}{tp}",
        _row("weights", r["weights"]),
        _row(f"KV cache ({plan.utilization:g} x GPU - weights - {VLLM_ALLOWANCE_GIB:g} GiB allowance)",
             max(0.0, r["kv_cache"])),
        f"  = {r['kv_tokens']:,.0f} tokens at {kv_tok:,} B/token: {r['kv_tokens'] / seq:,.0f} sequences of {seq} "
        f"tokens at once (a step sends {plan.seqs_per_worker} per worker)",
        f"  one sequence of model.max_model_len={plan.max_model_len}: "
        f"{'fits' if plan.rollout_fits else 'DOES NOT FIT (vLLM refuses to start)'}",
    ]


def format_plan(plan: Plan, title: str = "") -> str:
    sh = plan.shape
    size = f"{sh.params() / 1e9:.3f}B" if sh.params() >= 1e9 else f"{sh.params() / 1e6:.1f}M"
    lines = [f"plan{': ' + title if title else ''}",
             f"model: {size} parameters ({plan.shape_source}): hidden {sh.hidden}, {sh.layers} "
             f"layers, {sh.heads} heads ({sh.kv_heads} KV), FFN {sh.intermediate}, vocabulary {sh.vocab}, "
             f"{'tied' if sh.tied else 'untied'} embeddings",
             ""]
    if plan.learner_gpus > 0:
        lines += _learner_lines(plan)
    else:
        lines.append("learner: no GPUs declared (learner.gpus_per_worker=0): nothing to fit")
    lines.append("")
    if plan.rollout_gpus > 0:
        lines += _rollout_lines(plan)
    else:
        lines.append("rollout: no GPUs declared (rollout.gpus_per_worker=0): nothing to fit")
    how = {"collective": "broadcast from learner rank 0", "object_store": "through Ray's object store"}
    lines += ["", f"weight sync per step: {plan.sync_bytes / GiB:.3g} GiB to each engine in {plan.rollout_dtype}"
              f" ({how.get(plan.sync_method, plan.sync_method)}: rollout.weight_sync.method={plan.sync_method})", ""]
    if plan.fits:
        lines.append("verdict: fits the declared GPUs")
    else:
        none = "no setting found: a GPU with more memory, or a smaller model"
        fixes = ([] if plan.learner_fits else plan.learner_fixes or [f"learner: {none}"])
        fixes += ([] if plan.rollout_fits else plan.rollout_fixes or [f"rollout: {none}"])
        lines.append("verdict: DOES NOT FIT; change: " + "; ".join(fixes))
    return "\n".join(lines)
