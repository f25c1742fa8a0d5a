"""The GRPO Learner: turns a batch of scored rollouts (Arrow) into one round of policy updates.

A plain class; the driver makes it a Ray actor with ``ray.remote(num_cpus=..., num_gpus=...)(Learner)``.
Master weights and AdamW state stay fp32; ``dtype="bfloat16"`` runs forward/backward under autocast.
The model stays in eval mode (no dropout) so the on-policy ratio is exactly 1.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from orchestrator import weight_sync
from orchestrator.devices import check_dtype
from orchestrator.learner import distributed as dist
from orchestrator.learner.build import place_models
from orchestrator.learner.checkpoint import (
    LEARNER_STATE,
    load_optimizer_state,
    load_policy,
    resolve_device,
    resolve_dtype,
    MAX_SHARD_SIZE,
    save_hf_checkpoint,
    save_optimizer_state,
)
from orchestrator.checkpoint_files import load_tensors
from orchestrator.algorithms import AGGREGATIONS, POLICY_LOSSES, AlgorithmConfig, kl_penalty, masked_aggregate
from orchestrator.algorithms import resolve as resolve_algorithm
from orchestrator.learner.losses import token_logprobs
from orchestrator.learner.micro_batches import Packed, local_chunks, pack, place
from orchestrator.learner.sync_sender import WeightSender

BATCH_COLUMNS = ("prompt_token_ids", "response_token_ids", "loss_mask", "advantage")


@dataclass
class Sequences:
    """A training batch as numpy, one entry per sample; ``tokens[i]`` is prompt + response."""

    tokens: list[np.ndarray]
    prompt_len: np.ndarray
    resp_len: np.ndarray
    loss_mask: list[np.ndarray]  # float32, one per response token
    advantage: np.ndarray  # float32

    def __len__(self) -> int:
        return len(self.tokens)


def _list_column(table: pa.Table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, flat values) of a list column; ValueError naming the column when it is not one."""
    col = table.column(name)
    if col.null_count:
        raise ValueError(f"{name}: {col.null_count} null row(s)")
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not (pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type)):
        raise ValueError(f"{name}: expected a list column, got type {arr.type}")
    flat = arr.flatten()
    if flat.null_count:
        raise ValueError(f"{name}: contains null elements")
    offsets = arr.offsets.to_numpy()
    return np.diff(offsets), flat.to_numpy(zero_copy_only=False)


def sequences_from_table(batch: pa.Table, vocab_size: int | None = None) -> Sequences:
    """Validate a learner batch and unpack it; every error names the bad column."""
    if not isinstance(batch, pa.Table):
        raise TypeError(f"batch: expected a pyarrow.Table, got {type(batch).__name__}")
    missing = [c for c in BATCH_COLUMNS if c not in batch.column_names]
    if missing:
        raise ValueError(f"batch: missing column(s) {missing}; need {list(BATCH_COLUMNS)}")
    if batch.num_rows == 0:
        raise ValueError("batch: empty (0 rows)")
    p_len, p_flat = _list_column(batch, "prompt_token_ids")
    r_len, r_flat = _list_column(batch, "response_token_ids")
    m_len, m_flat = _list_column(batch, "loss_mask")
    if np.any(p_len == 0):
        raise ValueError(f"prompt_token_ids: row {int(np.argmax(p_len == 0))} is empty")
    if not np.array_equal(r_len, m_len):
        row = int(np.argmax(r_len != m_len))
        raise ValueError(
            f"loss_mask: row {row} has {m_len[row]} entries but response_token_ids has {r_len[row]}"
        )
    for name, flat in (("prompt_token_ids", p_flat), ("response_token_ids", r_flat)):
        if flat.size and (flat.min() < 0 or (vocab_size is not None and flat.max() >= vocab_size)):
            raise ValueError(f"{name}: token id out of range [0, {vocab_size})")
    adv_col = batch.column("advantage")
    if adv_col.null_count:
        raise ValueError(f"advantage: {adv_col.null_count} null row(s)")
    try:
        advantage = np.asarray(adv_col.to_numpy(), dtype=np.float32)
    except (TypeError, ValueError, pa.ArrowInvalid) as exc:
        raise ValueError(f"advantage: expected one float per row ({exc})") from None
    if not np.all(np.isfinite(advantage)):
        raise ValueError("advantage: contains NaN or inf")

    p_off = np.concatenate([[0], np.cumsum(p_len)])
    r_off = np.concatenate([[0], np.cumsum(r_len)])
    p_flat = p_flat.astype(np.int64, copy=False)
    r_flat = r_flat.astype(np.int64, copy=False)
    m_flat = m_flat.astype(np.float32)
    tokens, masks = [], []
    for i in range(batch.num_rows):
        tokens.append(np.concatenate([p_flat[p_off[i] : p_off[i + 1]], r_flat[r_off[i] : r_off[i + 1]]]))
        masks.append(m_flat[r_off[i] : r_off[i + 1]])
    return Sequences(tokens, p_len.astype(np.int64), r_len.astype(np.int64), masks, advantage)


def _check_arguments(rank, world_size, dist_init, micro_batch_size, micro_batch_tokens, lr, lr_warmup_steps) -> None:
    """A Learner built by hand gets the errors config validation would give (each names the argument)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank: {rank} is not in [0, world_size={world_size})")
    if world_size > 1 and not dist_init:
        raise ValueError("dist_init: a tcp://HOST:PORT rendezvous is needed when world_size > 1")
    if int(micro_batch_size) < 1:
        raise ValueError(f"micro_batch_size: must be >= 1, got {micro_batch_size}")
    if int(micro_batch_tokens) < 0:
        raise ValueError(f"micro_batch_tokens: must be >= 0 (0: rows only), got {micro_batch_tokens}")
    for name, value in (("lr", lr), ("lr_warmup_steps", lr_warmup_steps)):
        if value < 0:
            raise ValueError(f"{name}: must be >= 0, got {value}")


class Learner(WeightSender):
    """Holds the policy, its AdamW state and (when ``kl_coef > 0``) a frozen reference copy.

    With ``world_size > 1`` it is one rank of a data-parallel group (``dist_init`` is the rendezvous):
    every rank gets the whole batch, all ranks draw the same mini-batch permutation, and rank ``r``
    trains on rows ``r, r + world, ...`` of each mini-batch, so N ranks apply exactly the update one
    rank would on the same batch.
    """

    def __init__(
        self,
        model_path: str,
        *,
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        grad_clip: float | None = 1.0,
        micro_batch_size: int = 32,
        micro_batch_tokens: int = 0,
        algorithm: AlgorithmConfig | dict | None = None,
        lr_warmup_steps: int = 0,
        dtype: str = "float32",
        num_threads: int | None = None,
        seed: int = 0,
        device: str = "auto",
        rank: int = 0,
        world_size: int = 1,
        strategy: str = "auto",
        dist_init: str | None = None,
        activation_checkpointing: bool = False,
        max_shard_size: int | str = MAX_SHARD_SIZE,
        compile: bool = False,
    ):
        _check_arguments(rank, world_size, dist_init, micro_batch_size, micro_batch_tokens, lr, lr_warmup_steps)
        self.algorithm = a = resolve_algorithm(algorithm)  # the section whole (algorithms/presets.py), preset filled
        self.compute_dtype = resolve_dtype(dtype)
        if self.compute_dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype: {dtype!r} not supported; use float32 or bfloat16 (fp16 needs loss scaling)")
        if num_threads:
            torch.set_num_threads(int(num_threads))
        torch.manual_seed(seed + rank)
        # One permutation stream shared by all ranks: they must agree on every mini-batch.
        self._rng = np.random.default_rng(seed)
        self.device = resolve_device(device)
        # A bf16 run on a GPU without bf16 fails here, naming model.dtype.
        check_dtype(str(self.compute_dtype).removeprefix("torch."), self.device)
        self.rank, self.world_size = rank, world_size
        self.strategy = dist.resolve_strategy(strategy, self.device, world_size)
        if strategy == "fsdp" and world_size == 1:  # asked for by name: FSDP2's code path on one device
            self.strategy = "fsdp"
        self.sharded = self.strategy == "fsdp"
        # FSDP averages gradients over ranks; the losses already divide by global counts (SUM semantics).
        self._loss_scale = float(world_size) if self.sharded else 1.0
        self.lr, self.grad_clip = float(lr), grad_clip
        self.micro_batch_size, self.ppo_epochs, self.mini_batches = micro_batch_size, a.ppo_epochs, a.mini_batches
        self.micro_batch_tokens = int(micro_batch_tokens)  # > 0: also cap rows x padded length per forward
        self.policy_loss = POLICY_LOSSES.get(a.policy_loss)
        self.per_token_agg = AGGREGATIONS.entry(a.loss_agg).meta["per_token"]  # its divisor counts tokens
        self.kl_coef = float(a.kl_coef)
        self.kl_in_loss = self.kl_coef > 0 and a.kl_mode == "loss"
        self.lr_warmup_steps = int(lr_warmup_steps)
        self._version = 0
        if world_size > 1 or self.sharded:
            dist.init_process_group(dist_init or dist.local_rendezvous(), rank, world_size, self.device)

        # Master weights fp32 whatever the compute dtype (autocast or FSDP's mp_policy runs bf16), loaded on
        # the CPU and sharded or moved from there (learner/build.py); the reference in the compute dtype.
        self.model, self.tokenizer = load_policy(model_path, torch.float32, "cpu")
        self.model.eval()
        self.architectures = [type(self.model).__name__]
        self.vocab_size = int(self.model.get_input_embeddings().weight.shape[0])
        self._tied = self._tied_output_key()
        self.activation_checkpointing = bool(activation_checkpointing)
        self.max_shard_size = max_shard_size  # save / save_state shard above it (learner.max_shard_size)
        self.model, self.ref_model = place_models(
            self.model, device=self.device, sharded=self.sharded, compute_dtype=self.compute_dtype,
            reference=self.kl_coef > 0, checkpointing=self.activation_checkpointing,
            world_size=world_size, rank=rank)
        self.compile, self._compiled = bool(compile), {}  # see _forward
        decay, no_decay = [], []
        for p in self.model.parameters():  # parameters() yields a tied weight once
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        self.params = decay + no_decay
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=self.lr,
            betas=tuple(betas),
        )

    # ---- public API -------------------------------------------------------------------------------

    @property
    def policy_version(self) -> int:
        return self._version

    def version(self) -> int:
        """Number of completed step() calls (the policy_version rollouts are tagged with)."""
        return self._version

    def step(self, batch: pa.Table) -> dict[str, float]:
        """One RL step: ppo_epochs x mini_batches AdamW updates on ``batch``; returns metrics."""
        t0 = time.perf_counter()
        seqs = sequences_from_table(batch, self.vocab_size)
        n = len(seqs)
        if n < self.mini_batches:
            raise ValueError(f"mini_batches: {self.mini_batches} exceeds the batch's {n} rows")
        lr_now = self._lr_at(self._version)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_now

        # Old logprobs come from the current weights, not the rollout engine. With a single update per
        # step they equal the detached logprobs of the training forward pass, so that pass is skipped.
        single_update = self.ppo_epochs * self.mini_batches == 1
        acc = _Totals()
        old = None
        if not single_update:
            old, ent_sum, ent_n = self._logprobs_all(self.model, seqs, with_entropy=True)
            lead = 1.0 if self.rank == 0 else 0.0  # already summed over ranks
            acc.add("entropy", ent_sum * lead, ent_n * lead)
        ref = self._logprobs_all(self.ref_model, seqs)[0] if self.kl_in_loss else None

        updates = skipped = 0
        for _ in range(self.ppo_epochs):
            perm = self._rng.permutation(n)
            for idx in np.array_split(perm, self.mini_batches):
                stepped = self._update(seqs, idx, old, ref, acc, with_entropy=single_update)
                updates += int(stepped)
                skipped += int(not stepped)
        self._version += 1
        acc = acc.reduced(self) if self.world_size > 1 else acc
        loss_tokens = float(sum(m.sum() for m in seqs.loss_mask))
        return {
            "loss": acc.mean("loss"),
            "pg_loss": acc.mean("pg_loss"),
            "kl": acc.mean("kl"),
            "clip_frac": acc.mean("clip_frac"),
            "approx_kl": acc.mean("approx_kl"),
            "ratio_mean": acc.mean("ratio_mean"),
            "entropy": acc.mean("entropy"),
            "grad_norm": acc.mean("grad_norm"),
            "lr": lr_now,
            "tokens": float(sum(len(t) for t in seqs.tokens)),
            "loss_tokens": loss_tokens,
            "sequences": float(n),
            "updates": float(updates),
            "skipped_updates": float(skipped),
            "policy_version": float(self._version),
            "world_size": float(self.world_size),
            "seconds": time.perf_counter() - t0,
        }

    def step_and_payload(self, batch: pa.Table, payload: bool, dtype: str | None = None
                         ) -> tuple[dict[str, float], weight_sync.WeightPayload | None]:
        """``step``, then (``payload``) the updated weights as ``sync_payload(dtype)`` gives them, in one call:
        the trainer asks for both with ``num_returns=2`` and hands the payload's ref to the rollout workers
        before the metrics arrive, so the sync starts without a second round trip to this actor."""
        metrics = self.step(batch)
        return metrics, (self.sync_payload(dtype) if payload else None)

    def get_weights(self, dtype: str | None = None) -> dict[str, torch.Tensor]:
        """Full state dict as contiguous CPU copies, always including the output embedding.

        vLLM's CPU engine keeps a stale packed lm_head when a tied model's update omits
        ``lm_head.weight``, so it is sent explicitly. ``dtype`` casts (e.g. "bfloat16" halves transfer).
        Under FSDP this is a collective: every rank calls it, rank 0 gets the weights, others ``{}``.
        """
        return self._full_state(dtype, copy=True)

    def sync_payload(self, dtype: str | None = None) -> weight_sync.WeightPayload:
        """The weights for a rollout sync (``get_weights``' contents as a ``WeightPayload``) in the engines'
        ``dtype``, without a copy on a CPU learner when no cast is needed: the arrays view the live
        parameters, which is safe because Ray copies an actor call's return value into the object store
        before the actor runs its next call (the update). A cast (fp32 masters to a bf16 engine) copies."""
        return weight_sync.pack(self._full_state(dtype, copy=False))

    def _full_state(self, dtype: str | None, copy: bool) -> dict[str, torch.Tensor]:
        cast = resolve_dtype(dtype) if dtype is not None else None
        copies: dict[tuple, torch.Tensor] = {}
        out: dict[str, torch.Tensor] = {}

        def cpu_copy(t: torch.Tensor) -> torch.Tensor:
            key = (t.device, t.data_ptr(), tuple(t.shape), t.dtype)  # tied tensors share one copy
            if key not in copies:
                copies[key] = t.detach().to(device="cpu", dtype=cast or t.dtype, copy=copy).contiguous()
            return copies[key]

        state = dist.full_model_state_dict(self.model, self.sharded)
        if self.sharded and self.rank != 0:
            return {}
        for name, tensor in state.items():
            out[name] = cpu_copy(tensor)
        if self._tied is not None:
            out_key, in_key = self._tied
            if out_key not in out and in_key in out:
                out[out_key] = out[in_key]
        return out

    @torch.no_grad()
    def sequence_logprobs(
        self, prompt_token_ids: list[list[int]], response_token_ids: list[list[int]]
    ) -> list[list[float]]:
        """Logprob of each response token under the current weights."""
        if len(prompt_token_ids) != len(response_token_ids):
            raise ValueError(
                f"response_token_ids: {len(response_token_ids)} rows but prompt_token_ids has "
                f"{len(prompt_token_ids)}"
            )
        table = pa.table(
            {
                "prompt_token_ids": pa.array(prompt_token_ids, pa.list_(pa.int32())),
                "response_token_ids": pa.array(response_token_ids, pa.list_(pa.int32())),
                "loss_mask": pa.array([[1] * len(r) for r in response_token_ids], pa.list_(pa.int8())),
                "advantage": pa.array([0.0] * len(response_token_ids), pa.float32()),
            }
        )
        seqs = sequences_from_table(table, self.vocab_size)
        return [lp.tolist() for lp in self._logprobs_all(self.model, seqs)[0]]

    @torch.no_grad()
    def sequence_kl(self, batch: pa.Table) -> np.ndarray:
        """Each sample's KL to the reference summed over its loss-masked response tokens, under
        ``algorithm.kl_estimator`` (k1: logp - ref_logp), with the current weights: the KL reward penalty
        (``algorithm.kl_mode=reward``), which the driver asks for before computing advantages.

        Needs ``kl_coef > 0`` (the reference copy). Collective under several ranks: every rank calls it."""
        if self.ref_model is None:
            raise ValueError("sequence_kl: no reference model; it is built when algorithm.kl_coef > 0")
        if "advantage" not in batch.column_names:  # the advantage step asks before advantages exist
            batch = batch.append_column("advantage", pa.array(np.zeros(batch.num_rows, np.float32)))
        seqs = sequences_from_table(batch, self.vocab_size)
        policy = self._logprobs_all(self.model, seqs)[0]
        ref = self._logprobs_all(self.ref_model, seqs)[0]
        est = self.algorithm.kl_estimator
        return np.array([float((kl_penalty(torch.from_numpy(p), torch.from_numpy(r), est) * torch.from_numpy(m)).sum())
                         for p, r, m in zip(policy, ref, seqs.loss_mask)], dtype=np.float64)

    def save(self, out_dir: str, max_shard_size: int | str | None = None) -> str | None:
        """HF ``save_pretrained`` directory (safetensors, fp32 masters, sharded above ``max_shard_size``) +
        tokenizer, written atomically.

        Under FSDP every rank calls it (the weights are gathered); rank 0 writes and returns the path."""
        max_shard_size = max_shard_size or self.max_shard_size
        if not self.sharded:
            if self.rank != 0:
                return None
            return save_hf_checkpoint(self.model, self.tokenizer, out_dir, max_shard_size=max_shard_size)
        state = self.get_weights()
        if self.rank != 0:
            return None
        return save_hf_checkpoint(self.model, self.tokenizer, out_dir, state_dict=state,
                                  architectures=self.architectures, max_shard_size=max_shard_size)

    def save_state(self, out_dir: str, max_shard_size: int | str | None = None) -> str | None:
        """Everything needed to continue training: ``model/`` (HF checkpoint), optimizer, RNG, version; the
        weights and the optimizer moments sharded above ``max_shard_size`` (``load_state`` reads either).

        Collective under FSDP (every rank calls; rank 0 writes). Not atomic by itself: the driver
        writes into a temporary directory and swaps it into place (``trainer_state.json`` last)."""
        max_shard_size = max_shard_size or self.max_shard_size
        osd = dist.full_optimizer_state_dict(self.model, self.optimizer, self.sharded)
        model_dir = self.save(str(Path(out_dir) / "model"), max_shard_size)
        if self.rank != 0:
            return None
        save_optimizer_state(osd, out_dir, max_shard_size)
        rng = {"version": self._version, "numpy": self._rng.bit_generator.state,
               "torch": torch.get_rng_state().tolist()}
        (Path(out_dir) / LEARNER_STATE).write_text(json.dumps(rng))
        return model_dir

    def load_state(self, state_dir: str) -> int:
        """Restore weights, optimizer moments, RNG and version from ``save_state``; returns the version.

        The reference model (KL) is untouched: it stays the run's start checkpoint."""
        d = Path(state_dir)
        weights = load_tensors(d / "model")
        dist.load_full_model_state_dict(self.model, weights, self.sharded)
        dist.load_full_optimizer_state_dict(self.model, self.optimizer, load_optimizer_state(d), self.sharded)
        meta = json.loads((d / LEARNER_STATE).read_text())
        self._version = int(meta["version"])
        self._rng.bit_generator.state = meta["numpy"]
        torch.set_rng_state(torch.tensor(meta["torch"], dtype=torch.uint8))
        return self._version

    def shutdown(self) -> None:
        self.close_sync_groups()
        dist.destroy()

    # ---- internals --------------------------------------------------------------------------------

    def _tied_output_key(self) -> tuple[str, str] | None:
        """(output embedding key, input embedding key) when the output embedding is a separate module."""
        out_emb, in_emb = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if out_emb is None:
            return None
        names = {id(mod): name for name, mod in self.model.named_modules()}
        return f"{names[id(out_emb)]}.weight", f"{names[id(in_emb)]}.weight"

    def _lr_at(self, version: int) -> float:
        """Linear warmup over the first ``lr_warmup_steps`` step() calls (RL steps), then constant."""
        if self.lr_warmup_steps <= 0:
            return self.lr
        return self.lr * min(1.0, (version + 1) / self.lr_warmup_steps)

    def _autocast(self):
        if self.compute_dtype == torch.float32 or self.sharded:  # FSDP casts through its mp_policy
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.compute_dtype)

    def _local_chunks(self, seqs: Sequences, idx: np.ndarray) -> list[np.ndarray]:
        """This rank's rows of ``idx`` as micro-batches (``micro_batches.local_chunks``)."""
        return local_chunks(seqs.prompt_len + seqs.resp_len, idx, self.rank, self.world_size,
                            self.micro_batch_size, self.micro_batch_tokens)

    def _pack(self, seqs: Sequences, idx: np.ndarray) -> Packed:
        return pack(seqs, idx, self.device)

    def _place(self, per_seq: list[np.ndarray], idx: np.ndarray, packed: Packed) -> torch.Tensor:
        return place(per_seq, idx, packed, self.device)

    def _forward(self, model, packed: Packed, with_entropy: bool = False):
        """Token logprobs of ``packed`` under ``model``. With ``compile``: through ``torch.compile(model,
        dynamic=True)`` (made on first use; ``self.model`` stays the module whose parameter names checkpoints,
        the optimizer and weight syncs use). It pays on CPUs from a few million parameters (learner.compile=auto:
        devices.py, docs/performance.md section 10)."""
        if self.compile:
            if id(model) not in self._compiled:
                # Each grad mode, autocast state and call form (policy, reference, with or without a prompt
                # prefix skipped) is its own graph of one code object: more than dynamo's default limit of 8,
                # past which it would silently run the forward eagerly.
                torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
                self._compiled[id(model)] = torch.compile(model, dynamic=True)
            model = self._compiled[id(model)]
        with self._autocast():
            return token_logprobs(
                model, packed.input_ids, packed.attention_mask, start=packed.start, with_entropy=with_entropy
            )

    @torch.no_grad()
    def _logprobs_all(self, model, seqs: Sequences, with_entropy: bool = False):
        """Per-sequence response-token logprobs (numpy) and, optionally, masked entropy sum and count.

        Each rank scores its share of the rows; the shares are all-gathered so every rank has all."""
        result: list[np.ndarray | None] = [None] * len(seqs)
        ent_sum = ent_n = 0.0
        for idx in self._local_chunks(seqs, np.arange(len(seqs))):
            if len(idx) == 0:
                if self.sharded:  # keep FSDP's per-forward collectives in step with the other ranks
                    self._forward(model, self._pack(seqs, np.arange(1)), with_entropy)
                continue
            packed = self._pack(seqs, idx)
            out = self._forward(model, packed, with_entropy)
            lp = out[0] if with_entropy else out
            lp = lp.float().cpu().numpy()
            for row, i in enumerate(idx):
                col = packed.resp_col[row]
                result[i] = lp[row, col : col + packed.resp_len[row]].copy()
            if with_entropy:
                mask = self._place(seqs.loss_mask, idx, packed)
                ent_sum += float((out[1] * mask).sum())
                ent_n += float(mask.sum())
        if self.world_size > 1:
            import torch.distributed as tdist

            shares: list = [None] * self.world_size
            mine = {i: lp for i, lp in enumerate(result) if lp is not None}
            tdist.all_gather_object(shares, mine)
            for share in shares:
                for i, lp in share.items():
                    result[i] = lp
            ent_sum, ent_n = dist.all_reduce_sum([ent_sum, ent_n], self.device)
        return result, ent_sum, ent_n

    def _global_sum(self, value: float) -> float:
        """Sum over data-parallel ranks (identity for one rank): loss denominators are global counts."""
        if self.world_size == 1:
            return value
        return dist.all_reduce_sum([value], self.device)[0]

    def _all_reduce_gradients(self) -> None:
        """DDP: all_reduce(SUM) the gradients (losses already use global counts); FSDP reduces itself."""
        if self.world_size > 1 and not self.sharded:
            dist.all_reduce_gradients(self.params)

    def _update(self, seqs, idx, old, ref, acc: _Totals, with_entropy: bool) -> bool:
        """Accumulate one mini-batch's gradient over micro-batches and take one AdamW step.

        ``idx`` is the whole (global) mini-batch; this rank computes on its share of it."""
        loss_tokens = float(sum(seqs.loss_mask[i].sum() for i in idx))  # every rank sees the whole batch
        denom = loss_tokens if self.per_token_agg else float(len(idx))
        if loss_tokens == 0:
            return False  # nothing to learn; an AdamW step would still move weights via momentum
        lead = 1.0 if self.rank == 0 else 0.0  # per-update scalars are counted once, on rank 0
        self.optimizer.zero_grad(set_to_none=True)
        mb_loss = mb_pg = mb_kl = 0.0
        for micro in self._local_chunks(seqs, idx):
            if len(micro) == 0:
                if self.sharded:  # a zero-weight forward/backward keeps FSDP's collectives in step
                    packed = self._pack(seqs, np.arange(1))
                    (self._forward(self.model, packed).sum() * 0.0).backward()
                continue
            packed = self._pack(seqs, micro)
            mask = self._place(seqs.loss_mask, micro, packed)
            out = self._forward(self.model, packed, with_entropy)
            logprobs = out[0] if with_entropy else out
            old_lp = logprobs.detach() if old is None else self._place(old, micro, packed)
            adv = torch.from_numpy(seqs.advantage[micro]).to(self.device)
            a = self.algorithm
            pg, metrics = self.policy_loss(logprobs, old_lp, adv, mask, clip_low=a.clip_low, clip_high=a.clip_high,
                                           agg=a.loss_agg, denom=denom, norm_length=a.norm_length)
            loss = pg
            if ref is not None:
                kl_tok = kl_penalty(logprobs, self._place(ref, micro, packed), a.kl_estimator)
                kl = masked_aggregate(kl_tok, mask, a.loss_agg, denom, a.norm_length)
                loss = loss + self.kl_coef * kl
                mb_kl += float(kl.detach())
            (loss * self._loss_scale).backward()
            mb_loss += float(loss.detach())
            mb_pg += float(pg.detach())
            for key in ("clip_frac", "approx_kl", "ratio_mean"):
                acc.add(key, metrics[key] * metrics["tokens"], metrics["tokens"])
            if with_entropy:
                acc.add("entropy", float((out[1] * mask).sum()), float(mask.sum()))

        self._all_reduce_gradients()
        max_norm = self.grad_clip if self.grad_clip and self.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        # Loss parts are this rank's share of the global loss: summed over ranks they are the loss.
        acc.add("loss", mb_loss, lead)
        acc.add("pg_loss", mb_pg, lead)
        acc.add("kl", mb_kl, lead)
        acc.add("grad_norm", grad_norm * lead, lead)  # identical on every rank after the reduction
        if not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return True


class _Totals:
    """Weighted running sums for metrics."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, key: str, value: float, weight: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value
        self.weights[key] = self.weights.get(key, 0.0) + weight

    def mean(self, key: str) -> float:
        w = self.weights.get(key, 0.0)
        return self.sums[key] / w if w > 0 else 0.0

    KEYS = ("loss", "pg_loss", "kl", "clip_frac", "approx_kl", "ratio_mean", "entropy", "grad_norm")

    def reduced(self, learner: Learner) -> _Totals:
        """Sums and weights added up over the learner's ranks (one collective, fixed key order)."""
        vals = [self.sums.get(k, 0.0) for k in self.KEYS] + [self.weights.get(k, 0.0) for k in self.KEYS]
        vals = dist.all_reduce_sum(vals, learner.device)
        out = _Totals()
        n = len(self.KEYS)
        out.sums = dict(zip(self.KEYS, vals[:n]))
        out.weights = dict(zip(self.KEYS, vals[n:]))
        return out
