"""The start checkpoint of a run: the configured model, built (tiny) and warm-started if asked.

A warm start is supervised fine-tuning on the task's reference reasoning, so the policy writes
``<think> ... </think> answer`` before RL begins. With ``budget.prompt_hint`` on, each example is told a
budget its reference fits in (``told_budgets``), so the policy meets the hint before RL instead of an
unseen prefix (measured: a hint the warm start never saw took the reward to zero from step 0). Its
output directory is keyed by a hash of everything that determines it, so a re-run (or a sweep's many trials) reuses it instead of
re-training; a half-written checkpoint is never reused (the SFT writes atomically).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import ray

from .config import Budget, Config, to_dict
from .prompt_hint import budget_hint
from .rollout.worker import render_prompt

COMPLETE_MARKER = "warmstart.json"


def _key(cfg: Config) -> str:
    d = to_dict(cfg)
    what = {"model": d["model"], "warmstart": d["warmstart"], "data": d["data"]}
    if cfg.budget.prompt_hint:  # only then: every other warm start keeps its key (and its cached checkpoint)
        what["hint"] = [cfg.budget.prompt_hint, *hint_budgets(cfg)]
    blob = json.dumps(what, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def hint_budgets(cfg: Config) -> tuple[list[int], list[int]]:
    """The thinking and solution budgets a hinted warm start tells its examples: every value the training
    schedule can assign, and the eval grid's unconstrained budget."""
    from .budget_schedule import build_schedule

    thinking, solution = build_schedule(cfg.budget).support()
    return sorted({*thinking, cfg.eval.max_thinking}), sorted({*solution, cfg.eval.max_solution})


def told_budgets(lengths: list[tuple[int, int]], thinking: list[int], solution: list[int], seed: int) -> list[Budget]:
    """For each example's (reasoning, answer) token lengths, a budget drawn from those that fit it (the largest
    when none does), so a told budget is an upper bound the reference keeps."""
    rng = np.random.default_rng(seed)

    def pick(n: int, values: list[int]) -> int:
        fits = [v for v in values if v >= n]
        return int(rng.choice(fits)) if fits else max(values)

    return [Budget(pick(r, thinking), pick(a, solution)) for r, a in lengths]


def ensure_base_model(cfg: Config) -> str:
    """The configured model directory, checked before Ray starts (``checkpoint_files.check_model_dir``: weights
    and every shard, EOS ids, ``model.think_end``, chat template); the tiny model (or the stand-in) is built there
    first when asked and missing. A directory that holds a checkpoint its builder did not write is never built over."""
    from .checkpoint_files import check_model_dir

    path = Path(cfg.model.path)
    if cfg.model.build_if_missing == "standin":
        from .checkpoint_files import CheckpointError
        from .standin_model import MARKER_FILE as STANDIN_MARKER, build_standin_model

        if (path / STANDIN_MARKER).is_file() or not (path / "config.json").is_file():
            try:
                build_standin_model(path)
            except FileExistsError as exc:  # a non-empty directory that is not a stand-in build
                raise CheckpointError(f"model.path={str(path)!r}: {exc} (model.build_if_missing=standin)") from None
    if cfg.model.build_if_missing == "tiny":
        from .tiny_model import MARKER_FILE, build_tiny_model, is_built

        if not is_built(path) and ((path / MARKER_FILE).is_file() or not (path / "config.json").is_file()):
            t = cfg.model.tiny
            build_tiny_model(path, hidden_size=t.hidden_size, num_layers=t.num_layers, num_heads=t.num_heads,
                             intermediate_size=t.intermediate_size,
                             max_position_embeddings=t.max_position_embeddings, seed=t.seed)
    check_model_dir(path, think_end=cfg.model.think_end, chat_template=cfg.model.chat_template)
    return str(path)


def warmstart_dir(cfg: Config) -> Path:
    return Path(cfg.trainer.output_dir) / "warmstart" / _key(cfg)


def sft_examples(cfg: Config, tokenizer) -> list[tuple[str, str]]:
    from .data.tasks import get_task

    task = get_task(cfg.data.task)
    table = task.generate(cfg.warmstart.train_size, difficulties=tuple(cfg.data.difficulties), seed=cfg.data.seed + 1,
                          split="train", concise_fraction=cfg.warmstart.concise_fraction)
    eos = tokenizer.eos_token
    rows = table.select(["prompt", "reasoning", "answer"]).to_pylist()
    # A task may wrap its answer (e.g. "<answer>{answer}</answer>" for the meta-ability tasks).
    answers = [getattr(task, "answer_format", "{answer}").format(answer=r["answer"]) for r in rows]
    hints = [""] * len(rows)
    if cfg.budget.prompt_hint:  # token counts + 1 for </think> and for EOS
        reasoning = tokenizer([r["reasoning"] or "" for r in rows], add_special_tokens=False)["input_ids"]
        answer_ids = tokenizer(answers, add_special_tokens=False)["input_ids"]
        lengths = [(len(r) + 1, len(a) + 1) for r, a in zip(reasoning, answer_ids)]
        told = told_budgets(lengths, *hint_budgets(cfg), seed=cfg.data.seed + 2)
        hints = [budget_hint(cfg.budget.prompt_hint, b) for b in told]
    out = []
    for row, answer, hint in zip(rows, answers, hints):
        prompt = render_prompt(cfg.model.prompt_template, row["prompt"], tokenizer, cfg.model.chat_template, hint)
        out.append((prompt, f"{row['reasoning'] or ''}{cfg.model.think_end}{answer}{eos}"))
    return out


def _sft_task(cfg: Config, base: str, out_dir: str) -> dict:
    from transformers import AutoTokenizer

    from .learner.sft import sft_train

    tok = AutoTokenizer.from_pretrained(base)
    w = cfg.warmstart
    every = max(1, w.steps // 8)

    def report(step: int, m: dict) -> None:  # a few lines, not a per-step bar through Ray's log stream
        print(f"warm start: step {step}/{w.steps} loss {m.get('loss', float('nan')):.4f}", flush=True)

    # The model's compute dtype (bf16 autocast over fp32 masters, or fp32); float16 engines warm-start in fp32.
    dtype = "bfloat16" if cfg.model.dtype == "bfloat16" else "float32"
    return sft_train(base, out_dir, sft_examples(cfg, tok), steps=w.steps, batch_size=w.batch_size, lr=w.lr,
                     seed=cfg.trainer.seed, num_threads=w.num_threads or None, dtype=dtype, progress=False,
                     log_every=every, on_log=report)


def prepare_start_checkpoint(cfg: Config, log=print) -> tuple[str, dict]:
    """(start checkpoint path, warm-start metrics or {}); runs the SFT as a Ray task when needed."""
    base = ensure_base_model(cfg)
    if cfg.warmstart.steps <= 0:
        return base, {}
    out = warmstart_dir(cfg)
    marker = out / COMPLETE_MARKER
    if marker.is_file():
        log(f"warm start: reusing {out}")
        return str(out), {**json.loads(marker.read_text()), "reused": 1.0}
    if not cfg.data.task or cfg.data.path is not None:
        raise ValueError("warmstart.steps > 0 needs a task generator with reference reasoning (data.task, no data.path)")
    log(f"warm start: SFT for {cfg.warmstart.steps} steps -> {out}")
    t0 = time.time()
    from .runtime import WORKER_ENV

    task = ray.remote(_sft_task).options(num_cpus=1, runtime_env={"env_vars": dict(WORKER_ENV)})
    metrics = ray.get(task.remote(cfg, base, str(out)))
    metrics = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
    metrics["wall_seconds"] = time.time() - t0
    marker.write_text(json.dumps(metrics))
    return str(out), metrics
