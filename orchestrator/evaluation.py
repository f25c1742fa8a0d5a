"""Evaluation over a (thinking, solution) budget grid: rollout records plus a per-budget summary.

The same rollout workers and reward stage as training, so an eval number means exactly what the
training metric means. Output: records (``ROLLOUT_SCHEMA``) and one summary row per budget (and
per difficulty), which ``frontier.py`` turns into accuracy-vs-tokens plots.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray

from .config import Budget
from .rewards import RewardConfig, RewardPool
from .rollout.worker import ENGINE_SECONDS, SamplingSpec, engine_seconds
from .rewards.stage import score_rollouts


def generate(workers: list, prompts: pa.Table, spec: SamplingSpec, step: int) -> pa.Table:
    """Split the prompt table across rollout workers and concatenate their records.

    The result's schema metadata keeps the slowest worker's engine seconds (the critical path).
    """
    return gather(submit(workers, prompts, spec, step))


def submit(workers: list, prompts: pa.Table, spec: SamplingSpec, step: int) -> list:
    """Start ``generate`` on the workers (an even split of the prompts); returns the Ray refs."""
    n = len(workers)
    size = -(-prompts.num_rows // n)
    return [w.generate.remote(prompts.slice(i * size, size), spec, step=step)
            for i, w in enumerate(workers) if i * size < prompts.num_rows]


def gather(refs: list) -> pa.Table:
    """The records of ``submit``'s refs, in prompt order, with the slowest worker's engine seconds."""
    parts = ray.get(refs)
    slowest = max((engine_seconds(p) for p in parts), default=0.0)
    return pa.concat_tables(parts).replace_schema_metadata({ENGINE_SECONDS: str(slowest)})


def summarize(records: pa.Table, by: tuple[str, ...] = ("budget_label",)) -> pa.Table:
    """Accuracy and token means per group (Avg@k: the mean over every sample of every prompt)."""
    tokens = pc.add(records["thinking_tokens"], records["solution_tokens"])
    t = records.append_column("total_tokens", tokens)
    t = t.append_column("correct_f", pc.cast(t["correct"], pa.float64()))
    t = t.append_column("truncated_f", pc.cast(t["thinking_truncated"], pa.float64()))
    agg = t.group_by(list(by)).aggregate([
        ("correct_f", "mean"), ("reward", "mean"), ("thinking_tokens", "mean"), ("solution_tokens", "mean"),
        ("total_tokens", "mean"), ("truncated_f", "mean"), ("correct_f", "count"),
        ("budget_thinking", "max"), ("budget_solution", "max"),
    ])
    names = {"correct_f_mean": "accuracy", "reward_mean": "mean_reward", "thinking_tokens_mean": "mean_thinking_tokens",
             "solution_tokens_mean": "mean_solution_tokens", "total_tokens_mean": "mean_tokens",
             "truncated_f_mean": "truncation_rate", "correct_f_count": "samples", "budget_thinking_max": "budget_thinking",
             "budget_solution_max": "budget_solution"}
    agg = agg.rename_columns([names.get(c, c) for c in agg.column_names])
    return agg.sort_by([("budget_thinking", "ascending")] + [(c, "ascending") for c in by if c != "budget_label"])


def evaluate(workers: list, prompts: pa.Table, budgets: list[Budget], *, samples_per_prompt: int,
             temperature: float, top_p: float, reward_spec: RewardConfig, pool: RewardPool | None,
             step: int = 0, seed: int = 0) -> tuple[pa.Table, pa.Table, pa.Table]:
    """Records for every budget, the per-budget summary, and the per-budget-and-difficulty summary."""
    tables = []
    for b in budgets:
        spec = SamplingSpec(group_size=samples_per_prompt, budget=b, temperature=temperature, top_p=top_p,
                            seed=seed)
        recs = generate(workers, prompts, spec, step)
        recs, _ = score_rollouts(recs, reward_spec, pool)
        tables.append(recs.append_column("budget_label", pa.array([b.label] * recs.num_rows, pa.string())))
    records = pa.concat_tables(tables)
    summary = summarize(records)
    by_difficulty = summarize(records, ("budget_label", "difficulty"))
    return records.drop_columns(["budget_label"]), summary, by_difficulty


def model_comparison(rows_by_model: dict[str, list[dict]]) -> pa.Table:
    """Summary rows of several models over the same budget grid -> one table with a ``model`` column."""
    out = []
    for model, rows in rows_by_model.items():
        for r in rows:
            out.append({"model": model, "budget": r["budget_label"], "budget_thinking": r["budget_thinking"],
                        "budget_solution": r["budget_solution"], "accuracy": r["accuracy"],
                        "mean_tokens": r["mean_tokens"], "mean_thinking_tokens": r["mean_thinking_tokens"],
                        "truncation_rate": r["truncation_rate"], "samples": r["samples"]})
    return pa.Table.from_pylist(out)


def format_model_comparison(table: pa.Table) -> str:
    """Markdown: one row per budget, accuracy and mean tokens per model (``model_comparison`` tables)."""
    models = list(dict.fromkeys(table.column("model").to_pylist()))
    budgets = list(dict.fromkeys(table.column("budget").to_pylist()))
    cell = {(r["model"], r["budget"]): r for r in table.to_pylist()}
    head = "| budget | " + " | ".join(f"{m}: acc | tokens" for m in models) + " |"
    lines = [head, "|---|" + "---|---|" * len(models)]
    for b in budgets:
        parts = []
        for m in models:
            r = cell.get((m, b))
            parts.append(f"{r['accuracy']:.3f} | {r['mean_tokens']:.1f}" if r else " | ")
        lines.append(f"| {b} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def format_summary(summary: pa.Table) -> str:
    """A plain text table for the terminal."""
    cols = ["budget_label", "accuracy", "mean_thinking_tokens", "mean_solution_tokens", "mean_tokens",
            "truncation_rate", "samples"]
    cols = [c for c in cols if c in summary.column_names]
    head = f"{'budget':>14} {'accuracy':>9} {'think':>7} {'solve':>7} {'total':>7} {'trunc':>6} {'n':>6}"
    lines = [head]
    for row in summary.select(cols).to_pylist():
        lines.append(f"{row['budget_label']:>14} {row['accuracy']:>9.3f} {row['mean_thinking_tokens']:>7.1f} "
                     f"{row['mean_solution_tokens']:>7.1f} {row['mean_tokens']:>7.1f} {row['truncation_rate']:>6.2f} "
                     f"{row['samples']:>6d}")
    return "\n".join(lines)


def run_eval(cfg) -> tuple[str, pa.Table]:
    """The ``eval`` command: evaluate ``model.path`` over ``eval.budgets``, log to one MLflow run.

    The checkpoint must exist (``ConfigError`` before any work otherwise): eval never builds a model."""
    import contextlib
    from . import tracking
    from .checkpoint_files import require_checkpoint
    from .config import eval_budgets, to_dict
    from .rewards import RewardPool
    from .runtime import WorkerGroup, init_ray
    from .trainer import _log_eval, fresh_run_dir, load_prompt_tables

    model = require_checkpoint(cfg.model.path, think_end=cfg.model.think_end, chat_template=cfg.model.chat_template)
    run_name, out_dir = fresh_run_dir(cfg, "eval")
    config_dict = to_dict(cfg)
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracker = tracking.Tracker.start(uri, cfg.tracking.experiment, run_name=run_name,
                                     params=tracking.flatten(config_dict),
                                     tags=tracking.lineage_tags(config_dict, workload="eval", stage="eval",
                                                                source_checkpoint=cfg.model.path))
    with tracker:
        init_ray(cfg)
        _, prompts, verifier = load_prompt_tables(cfg)
        tracker.set_tags({tracking.TAG_DATASET_DIGEST: tracking.dataset_digest(prompts)})
        group = WorkerGroup(cfg, model, learner=False)
        pool_cm = RewardPool(cfg.reward.num_workers) if cfg.reward.num_workers > 0 else contextlib.nullcontext()
        try:
            with pool_cm as pool:
                e = cfg.eval
                records, summary, by_diff = evaluate(
                    group.rollout, prompts, eval_budgets(cfg), samples_per_prompt=e.samples_per_prompt,
                    temperature=e.temperature, top_p=e.top_p, reward_spec=cfg.reward.for_verifier(verifier),
                    pool=pool, seed=cfg.rollout.seed)
        finally:
            group.shutdown()
        _log_eval(tracker, summary, by_diff, records, 0, "eval", out_dir)
        print(format_summary(summary))
        return tracker.run_id, summary
