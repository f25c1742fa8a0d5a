"""Warm-start supervised fine-tuning: teach a causal LM to continue prompts with target texts.

Plain torch on one process, generic over tasks: examples are (prompt_text, target_text) pairs and the
loss covers only the target tokens. The result is a ``save_pretrained`` checkpoint (safetensors plus
tokenizer) that the RL stages, vLLM and transformers load unchanged.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

IGNORE_INDEX = -100
SCHEDULES = ("cosine", "linear", "constant")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
METRICS_FILE = "budgetrl_sft.json"


def lr_factor(step: int, *, steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier on the peak lr at optimizer step ``step`` (0-based): linear warmup, then decay to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _validate(
    examples, steps, batch_size, lr, warmup_steps, schedule, weight_decay, dtype, log_every, num_threads
) -> None:
    if not examples:
        raise ValueError("examples is empty: sft_train needs at least one (prompt, target) pair")
    for i, ex in enumerate(examples):
        if not (isinstance(ex, (tuple, list)) and len(ex) == 2 and all(isinstance(s, str) for s in ex)):
            raise ValueError(
                f"examples[{i}] must be a (prompt_text, target_text) pair of strings, got {ex!r}"
            )
        if not ex[1]:
            raise ValueError(f"examples[{i}] has an empty target: there would be nothing to learn")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("log_every", log_every)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
    if num_threads is not None and (not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be a positive integer or None, got {num_threads!r}")


def _tokenize(tokenizer, examples, max_len: int | None) -> list[tuple[list[int], int]]:
    """(token ids of prompt+target, number of prompt tokens) per example."""
    prompts = tokenizer([p for p, _ in examples], add_special_tokens=False)["input_ids"]
    targets = tokenizer([t for _, t in examples], add_special_tokens=False)["input_ids"]
    out = []
    for i, (p, t) in enumerate(zip(prompts, targets)):
        if not t:
            raise ValueError(f"examples[{i}] target tokenizes to nothing")
        if max_len is not None and len(p) + len(t) > max_len:
            raise ValueError(
                f"examples[{i}] is {len(p) + len(t)} tokens, longer than the model's "
                f"max_position_embeddings={max_len}"
            )
        out.append((p + t, len(p)))
    return out


def _collate(batch: list[tuple[list[int], int]], pad_id: int):
    """Right-padded input ids, attention mask and labels that ignore prompt and padding tokens."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(batch):
        t = torch.tensor(ids, dtype=torch.long)
        input_ids[row, : len(ids)] = t
        labels[row, n_prompt : len(ids)] = t[n_prompt:]
        attention[row, : len(ids)] = 1
    return input_ids, attention, labels


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless stream of index batches over shuffled epochs (a batch may straddle two epochs)."""
    buf: list[int] = []
    epoch = 0
    while True:
        while len(buf) < batch_size:
            buf += torch.randperm(n, generator=generator).tolist()
            epoch += 1
        yield buf[:batch_size], epoch
        buf = buf[batch_size:]


def _check_data(data, world_size: int) -> None:
    if world_size > 1 and len(data) < world_size:
        raise ValueError(f"{len(data)} examples cannot be split over {world_size} workers")


def sft_loop(
    model,
    tokenizer,
    examples: Sequence[tuple[str, str]],
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    warmup_steps: int = 20,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    seed: int = 0,
    dtype: str = "float32",
    log_every: int = 20,
    progress: bool = True,
    on_log: Callable[[int, dict], None] | None = None,
    device: str = "cpu",
    forward=None,
    rank: int = 0,
    world_size: int = 1,
) -> dict:
    """The SFT optimisation loop on an already loaded ``model`` (shared by ``sft_train`` and Ray Train).

    Every rank draws the same global batch of ``batch_size`` examples and takes its ``rank::world_size``
    share; ``forward`` is the module to call (a DDP wrapper of ``model`` under data parallelism), so
    gradients average over ranks. Metrics are this rank's (the loss of its share of each batch).
    """
    examples = list(examples)
    forward = forward if forward is not None else model
    model.train()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    data = _tokenize(tokenizer, examples, getattr(model.config, "max_position_embeddings", None))
    _check_data(data, world_size)
    if batch_size < world_size:
        raise ValueError(f"batch_size={batch_size} is smaller than the number of workers ({world_size})")

    optimizer, scheduler = _optimizer(model, lr=lr, weight_decay=weight_decay, steps=steps,
                                      warmup_steps=warmup_steps, schedule=schedule)
    batches = _batches(len(data), batch_size, torch.Generator().manual_seed(seed))
    autocast = torch.autocast(device_type=device.split(":")[0], dtype=DTYPES[dtype], enabled=dtype != "float32")

    from tqdm.auto import tqdm

    window = _LogWindow()
    bar = tqdm(range(1, steps + 1), desc="sft", disable=not progress, dynamic_ncols=True)
    for step in bar:
        idx, epoch = next(batches)
        idx = idx[rank::world_size]
        input_ids, attention, labels = (t.to(device) for t in _collate([data[i] for i in idx], pad_id))
        with autocast:
            loss = forward(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        step_lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()

        value = loss.item()
        window.add(value, int(attention.sum()))
        bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if step % log_every == 0 or step == steps:
            metrics = window.close(lr=step_lr, grad_norm=float(grad_norm), epoch=epoch)
            if on_log is not None:
                on_log(step, dict(metrics))
    bar.close()
    return window.summary(steps=steps, epochs=epoch, examples=len(data))


def _optimizer(model, *, lr: float, weight_decay: float, steps: int, warmup_steps: int, schedule: str):
    """AdamW without decay on biases and norms, and its warm-up + decay schedule."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        foreach=True,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps=steps, warmup_steps=warmup_steps, schedule=schedule)
    )
    return optimizer, scheduler


class _LogWindow:
    """Losses and tokens since the last log line, and totals over the whole loop."""

    def __init__(self):
        self.start = self.window_start = time.perf_counter()
        self.total_tokens = self.window_tokens = 0
        self.losses: list[float] = []
        self.initial_loss: float | None = None
        self.metrics: dict = {}

    def add(self, loss: float, tokens: int) -> None:
        self.initial_loss = loss if self.initial_loss is None else self.initial_loss
        self.total_tokens += tokens
        self.window_tokens += tokens
        self.losses.append(loss)

    def close(self, **extra) -> dict:
        """The window's metrics (mean loss, tokens/s) plus ``extra``; starts the next window."""
        now = time.perf_counter()
        self.metrics = {
            "loss": sum(self.losses) / len(self.losses),
            **extra,
            "seconds": now - self.start,
            "tokens_per_s": self.window_tokens / max(now - self.window_start, 1e-9),
        }
        self.losses, self.window_tokens, self.window_start = [], 0, now
        return self.metrics

    def summary(self, **extra) -> dict:
        seconds = time.perf_counter() - self.start
        return {
            "loss": self.metrics["loss"],
            "initial_loss": self.initial_loss,
            "steps": extra.pop("steps"),
            "seconds": seconds,
            "tokens_per_s": self.total_tokens / max(seconds, 1e-9),
            **extra,
        }


def save_checkpoint(model, tokenizer, out_dir: str | os.PathLike, args: dict, result: dict) -> Path:
    """``save_pretrained`` (safetensors, sharded like the learner's above ``MAX_SHARD_SIZE``) plus tokenizer and
    the run's args/metrics in ``METRICS_FILE``."""
    from .checkpoint import MAX_SHARD_SIZE

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(out)
    (out / METRICS_FILE).write_text(json.dumps({"args": args, "metrics": result}, indent=1))
    return out


def sft_train(
    model_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    examples: Sequence[tuple[str, str]],
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 1e-3,
    warmup_steps: int = 20,
    schedule: str = "cosine",
    weight_decay: float = 0.0,
    seed: int = 0,
    num_threads: int | None = None,
    dtype: str = "float32",
    log_every: int = 20,
    progress: bool = True,
    on_log: Callable[[int, dict], None] | None = None,
    device: str | None = None,
) -> dict:
    """Fine-tune ``model_dir`` on ``examples`` for ``steps`` optimizer steps and save to ``out_dir``.

    AdamW (betas 0.9/0.95, decay on matrices only), gradient clipping at 1.0, linear warmup then the
    ``schedule``. ``dtype="bfloat16"`` autocasts the forward pass and keeps float32 master weights.
    ``on_log(step, metrics)`` is called every ``log_every`` steps and at the end. Returns the final
    metrics: ``loss`` (mean over the last logging window), ``initial_loss``, ``steps``, ``seconds``,
    ``tokens_per_s`` (non-padding tokens processed per second), ``epochs``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    examples = list(examples)
    _validate(
        examples, steps, batch_size, lr, warmup_steps, schedule, weight_decay, dtype, log_every, num_threads
    )
    if not device:
        from orchestrator.devices import actor_device

        device = str(actor_device())  # cuda:N from Ray's assignment, else the CPU
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        torch.manual_seed(seed)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
        result = sft_loop(model, tokenizer, examples, steps=steps, batch_size=batch_size, lr=lr,
                          warmup_steps=warmup_steps, schedule=schedule, weight_decay=weight_decay, seed=seed,
                          dtype=dtype, log_every=log_every, progress=progress, on_log=on_log, device=device)
        args = {
            "source": str(model_dir),
            "steps": steps,
            "batch_size": batch_size,
            "lr": lr,
            "warmup_steps": warmup_steps,
            "schedule": schedule,
            "weight_decay": weight_decay,
            "seed": seed,
            "dtype": dtype,
        }
        save_checkpoint(model, tokenizer, out_dir, args, result)
        return result
    finally:
        if num_threads is not None:
            torch.set_num_threads(previous_threads)
