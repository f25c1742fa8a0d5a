"""Prompt tables: load them (task generator or the user's files), fit them to the context, sample per step.

The training and eval prompts are Arrow tables (``PROMPT_SCHEMA``); everything here runs in the driver
before any actor starts, so data that cannot be used fails early, naming the key and the bad prompt.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .config import Config, ConfigError, eval_budgets, largest_train_budget
from .data.io import read_prompts
from .data.tasks import get_task
from .prompt_hint import budget_hint


def load_prompt_tables(cfg: Config) -> tuple[pa.Table, pa.Table, str]:
    """(train prompts, eval prompts, verifier name) from the task generator or the user's files."""
    d = cfg.data
    if d.path is not None:
        train = read_prompts(d.path)
        evals = read_prompts(d.eval_path) if d.eval_path else train
        verifier = "math"
    else:
        task = get_task(d.task)
        train = task.generate(d.train_size, difficulties=tuple(d.difficulties), seed=d.seed, split="train")
        evals = task.generate(d.eval_size, difficulties=tuple(d.difficulties), seed=d.seed, split="eval")
        verifier = task.verifier
    if cfg.reward.verifier != "auto":
        verifier = cfg.reward.verifier
    return train, evals.slice(0, cfg.eval.num_prompts), verifier


def fit_prompts(cfg: Config, model_path: str, train: pa.Table, evals: pa.Table, log=print
                ) -> tuple[pa.Table, pa.Table, dict]:
    """Apply ``data.overlong_prompts`` to prompts that cannot fit the context window with their budget.

    Checked with the model's tokenizer before any actor starts: ``error`` names the longest prompt,
    ``drop`` removes them, ``truncate_left`` leaves them for the rollout workers to cut."""
    from transformers import AutoTokenizer

    from .rollout.worker import render_prompt

    tok = AutoTokenizer.from_pretrained(model_path)
    m, mode = cfg.model, cfg.data.overlong_prompts
    train_budget = largest_train_budget(cfg.budget)  # a budget schedule's largest; the hint at it is the longest
    eval_budget = max(eval_budgets(cfg), key=lambda b: b.total)
    counts, out = {}, []
    for name, table, b in (("train", train, train_budget), ("eval", evals, eval_budget)):
        hint, budget = budget_hint(cfg.budget.prompt_hint, b), b.total
        texts = [render_prompt(m.prompt_template, p, tok, m.chat_template, hint) for p in table["prompt"].to_pylist()]
        lengths = np.array([len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]])
        limit = m.max_model_len - budget - 1
        over = lengths > limit
        counts[name] = int(over.sum())
        if counts[name] and mode == "error":
            worst = int(np.argmax(lengths))
            raise ConfigError(
                f"data.overlong_prompts='error': {counts[name]} {name} prompt(s) do not fit model.max_model_len="
                f"{m.max_model_len} with a {budget}-token budget (longest: prompt_id "
                f"{table['prompt_id'][worst].as_py()!r}, {lengths[worst]} tokens > {limit}); set "
                f"data.overlong_prompts to drop or truncate_left, or raise model.max_model_len")
        if counts[name] and mode == "drop":
            table = table.filter(pa.array(~over))
            if table.num_rows == 0:
                raise ConfigError(f"data.overlong_prompts='drop': every {name} prompt is longer than {limit} tokens")
        if counts[name]:
            log(f"{counts[name]} {name} prompt(s) longer than {limit} tokens: {mode}")
        out.append(table)
    return out[0], out[1], counts


class PromptSampler:
    """Epochs over the training prompts in a seeded random order."""

    def __init__(self, prompts: pa.Table, batch: int, seed: int):
        self.prompts, self.batch, self.rng = prompts, batch, np.random.default_rng(seed)
        self.order, self.pos = self.rng.permutation(prompts.num_rows), 0

    def next(self) -> pa.Table:
        if self.pos + self.batch > len(self.order):
            self.order, self.pos = self.rng.permutation(self.prompts.num_rows), 0
        idx = self.order[self.pos:self.pos + self.batch]
        self.pos += self.batch
        return self.prompts.take(pa.array(idx))

    def state(self) -> dict:
        return {"order": self.order.tolist(), "pos": int(self.pos), "rng": self.rng.bit_generator.state}

    def restore(self, state: dict) -> None:
        if max(state["order"], default=-1) >= self.prompts.num_rows:
            raise ValueError("resume: the saved data position does not fit the training prompts (data changed?)")
        self.order, self.pos = np.asarray(state["order"], dtype=np.int64), int(state["pos"])
        self.rng.bit_generator.state = state["rng"]
