"""Evaluation over a (thinking, solution) budget grid: rollout records plus a per-budget summary.

``evaluate_checkpoint`` is the one way to evaluate a checkpoint: the eval command, the trainer's
evaluations and every workload call it. The same rollout workers and reward stage as training, so an
eval number means exactly what the training metric means. Output: records (``ROLLOUT_SCHEMA``) and one
summary row per budget (and per difficulty); ``log_eval`` logs them with an accuracy-vs-tokens plot.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from . import frontier, tracking
from .config import Budget, Config, eval_budgets
from .data.io import write_rollouts
from .prompts import load_prompt_tables
from .rewards import RewardConfig, RewardPool
from .rewards.stage import score_rollouts
from .rollout.worker import SamplingSpec
from .runtime import WorkerGroup, init_ray


@dataclass
class EvalResult:
    """One checkpoint over a budget grid: records, the per-budget summary, the per-budget-and-difficulty one."""

    records: pa.Table
    summary: pa.Table
    by_difficulty: pa.Table

    @property
    def rows(self) -> list[dict]:
        return self.summary.to_pylist()


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


def _over_grid(group: WorkerGroup, prompts: pa.Table, budgets: list[Budget], *, samples_per_prompt: int,
               temperature: float, top_p: float, reward: RewardConfig, pool: RewardPool | None, step: int,
               seed: int, hint: str = "") -> EvalResult:
    """Generate and score every budget in turn (the grid's order is the order of the random draws); with
    ``budget.prompt_hint`` (``hint``) each budget is told to the model as in training."""
    tables = []
    for b in budgets:
        spec = SamplingSpec(group_size=samples_per_prompt, budget=b, temperature=temperature, top_p=top_p,
                            seed=seed, prompt_hint=hint)
        recs = group.generate(prompts, spec, step)
        recs, _ = score_rollouts(recs, reward, pool)
        tables.append(recs.append_column("budget_label", pa.array([b.label] * recs.num_rows, pa.string())))
    records = pa.concat_tables(tables)
    summary = summarize(records)
    by_difficulty = summarize(records, ("budget_label", "difficulty"))
    return EvalResult(records.drop_columns(["budget_label"]), summary, by_difficulty)


def evaluate_checkpoint(cfg: Config, checkpoint: str | None = None, *, group: WorkerGroup | None = None,
                        pool: RewardPool | None = None, prompts: pa.Table | None = None,
                        budgets: list[Budget] | None = None, reward: RewardConfig | None = None,
                        seed: int | None = None, step: int = 0, tracker=None, out_dir: Path | None = None,
                        tag: str = "eval", prefix: str = "eval") -> EvalResult:
    """Evaluate ``checkpoint`` over a budget grid: the one way (eval command, training, workloads).

    Workers: ``group``'s rollout workers when given (they must hold the checkpoint's weights; ``pool`` is
    then used as given, None scoring in the driver), else a rollout-only group is started on
    ``checkpoint`` (default ``model.path``) with a reward pool of ``reward.num_workers``, both stopped
    after. Defaults from ``cfg``: the eval prompts and their verifier (``data``, ``eval.num_prompts``),
    the grid ``eval.budgets``, the ``reward`` section, ``eval``'s sampling and ``rollout.seed``.
    With ``tracker`` the run is tagged with the prompts' digest and ``log_eval`` logs the result."""
    if prompts is None:
        _, prompts, verifier = load_prompt_tables(cfg)
        reward = reward or cfg.reward.for_verifier(verifier)
    elif reward is None:
        raise ValueError("evaluate_checkpoint: prompts given without their reward")
    if tracker is not None:
        tracker.set_tags({tracking.TAG_DATASET_DIGEST: tracking.dataset_digest(prompts)})
    e = cfg.eval
    grid = dict(samples_per_prompt=e.samples_per_prompt, temperature=e.temperature, top_p=e.top_p,
                reward=reward, step=step, seed=cfg.rollout.seed if seed is None else seed, hint=cfg.budget.prompt_hint)
    budgets = eval_budgets(cfg) if budgets is None else budgets
    if group is not None:
        result = _over_grid(group, prompts, budgets, pool=pool, **grid)
    else:
        init_ray(cfg)
        group = WorkerGroup(cfg, checkpoint or cfg.model.path, learner=False)
        try:
            pool_cm = RewardPool(cfg.reward.num_workers) if cfg.reward.num_workers > 0 else contextlib.nullcontext()
            with pool_cm as own_pool:
                result = _over_grid(group, prompts, budgets, pool=own_pool, **grid)
        finally:
            group.shutdown()
    if tracker is not None:
        log_eval(tracker, result, step, tag, out_dir or Path(cfg.trainer.output_dir), prefix=prefix)
    return result


def eval_metrics(rows: list[dict], prefix: str = "eval") -> dict[str, float]:
    """Summary rows -> ``{prefix}/{budget}/{accuracy,mean_tokens,mean_thinking_tokens,truncation_rate}``: the
    metric names of a run's eval, and of the logged model a checkpoint becomes (``logged_model.record_final``)."""
    keys = ("accuracy", "mean_tokens", "mean_thinking_tokens", "truncation_rate")
    return {f"{prefix}/{row['budget_label']}/{k}": row[k] for row in rows for k in keys if k in row}


def log_eval(tracker, result: EvalResult, step: int, tag: str, out_dir: Path, *, prefix: str = "eval",
             log_metrics: Callable[[dict, int], None] | None = None, tolerate_store_errors: bool = False
             ) -> list[dict]:
    """Eval metrics (``{prefix}/{budget}/accuracy`` ..., through ``log_metrics`` when given, e.g. a run's
    durable buffer) and artifacts (records, summaries, frontier plot); returns the summary rows.

    The artifacts are written under ``out_dir/eval`` first and then logged; with
    ``tolerate_store_errors`` an upload that fails only warns (the files stay for a later upload)."""
    import matplotlib.pyplot as plt
    import pyarrow.parquet as pq

    rows = result.rows
    metrics = eval_metrics(rows, prefix)
    for row in result.by_difficulty.to_pylist():
        metrics[f"{prefix}/{row['budget_label']}/accuracy_d{row['difficulty']}"] = row["accuracy"]
    (log_metrics or tracker.log_metrics)(metrics, step)
    eval_dir = out_dir / "eval"
    files = [write_rollouts(result.records, eval_dir / f"{tag}.parquet")]
    for table, name in ((result.summary, f"{tag}_summary.parquet"), (result.by_difficulty, f"{tag}_by_difficulty.parquet")):
        pq.write_table(table, eval_dir / name)
        files.append(str(eval_dir / name))
    df = result.summary.to_pandas().rename(columns={"budget_label": "label"})
    fig = frontier.plot_frontier(df, x="mean_tokens", y="accuracy", label="label",
                                 title=f"accuracy vs tokens ({tag}, step {step})")
    fig.savefig(eval_dir / f"{tag}_frontier.png", dpi=110, bbox_inches="tight")
    files.append(str(eval_dir / f"{tag}_frontier.png"))
    plt.close(fig)
    try:
        for f in files:
            tracker.log_artifact(f, "eval")
    except Exception as exc:
        if not tolerate_store_errors:
            raise
        import warnings

        warnings.warn(f"eval artifacts of {tag} not logged ({type(exc).__name__}: {exc}); they stay in {eval_dir} "
                      "and are logged at the end of the run", stacklevel=2)
    return rows


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


def run_eval(cfg: Config) -> tuple[str, pa.Table]:
    """The ``eval`` command: evaluate ``model.path`` over ``eval.budgets``, log to one MLflow run.

    The checkpoint must exist (``ConfigError`` before any work otherwise): eval never builds a model."""
    from .checkpoint_files import require_checkpoint
    from .config import to_dict
    from .resume import fresh_run_dir

    model = require_checkpoint(cfg.model.path, think_end=cfg.model.think_end, chat_template=cfg.model.chat_template)
    run_name, out_dir = fresh_run_dir(cfg, "eval")
    config_dict = to_dict(cfg)
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracker = tracking.Tracker.start(uri, cfg.tracking.experiment, run_name=run_name,
                                     params=tracking.flatten(config_dict),
                                     tags=tracking.lineage_tags(config_dict, workload="eval", stage="eval",
                                                                source_checkpoint=cfg.model.path))
    with tracker:
        result = evaluate_checkpoint(cfg, model, tracker=tracker, out_dir=out_dir)
        print(format_summary(result.summary))
        return tracker.run_id, result.summary
