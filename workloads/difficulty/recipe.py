"""Preview difficulty-aware intervention vs plain GRPO at the same generated-token budget.

Two training stages (``pipeline.run_pipeline``) under one parent MLflow run, from the same start checkpoint and config:
``intervention`` (GRPO with ``DifficultyCurriculum``: preview pass rates, drop solved prompts, reference
prefixes for unsolved ones, masked out of the loss) and ``baseline`` (plain GRPO). Both stop at the same
``trainer.max_generated_tokens`` (the preview's tokens count toward the intervention's), and both
evaluate every ``trainer.eval_every`` steps, so the parent run gets accuracy vs generated tokens and vs
learner steps per difficulty for both, and the share of prompts intervened over time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from omegaconf import MISSING

from orchestrator import tracking
from orchestrator.config import ConfigError, load_config, merge_structured, resolve_base_config, to_dict
from orchestrator.pipeline import Stage, StageContext, StageOutput, run_pipeline

from .curriculum import DifficultyConfig, DifficultyCurriculum


@dataclass
class DifficultyRecipeConfig:
    base: str = MISSING  # training config both stages start from
    overrides: list[str] = field(default_factory=list)  # applied to both stages
    max_generated_tokens: int = 400_000  # the shared generation budget (trainer.max_generated_tokens)
    curriculum: DifficultyConfig = field(default_factory=DifficultyConfig)
    run_baseline: bool = True
    name: str = "difficulty"


def load(path: str, overrides: list[str] = ()) -> DifficultyRecipeConfig:
    cfg = merge_structured(DifficultyRecipeConfig, path, overrides)
    cfg.base = resolve_base_config(cfg.base, path)
    if cfg.max_generated_tokens <= 0:
        raise ConfigError(f"max_generated_tokens={cfg.max_generated_tokens!r}: must be > 0 (the shared budget)")
    cfg.curriculum.validate()
    return cfg


def stage_configs(cfg: DifficultyRecipeConfig, check_paths: bool = True) -> dict:
    common = [*cfg.overrides, f"trainer.max_generated_tokens={cfg.max_generated_tokens}"]
    stages = {"intervention": load_config(cfg.base, [*common, f"trainer.run_name={cfg.name}-intervention"],
                                          check_paths=check_paths)}
    if cfg.run_baseline:
        stages["baseline"] = load_config(cfg.base, [*common, f"trainer.run_name={cfg.name}-baseline"],
                                         check_paths=check_paths)
    first = stages["intervention"]
    if not first.trainer.eval_every:
        raise ConfigError("trainer.eval_every=0: the comparison needs evaluations during training (set it > 0)")
    if first.data.path is None and first.data.task is None:
        raise ConfigError("data: the intervention needs prompts with reference reasoning (data.task)")
    return stages


def curves(client, run_id: str, model: str) -> list[dict]:
    """One row per (eval step, metric): accuracy per budget and difficulty with steps and tokens so far."""
    tokens = {m.step: m.value for m in client.get_metric_history(run_id, "cost/generated_tokens_total")}
    rows = []
    for key in client.get_run(run_id).data.metrics:
        if not key.startswith("eval/") or "/accuracy" not in key:
            continue
        _, budget, name = key.split("/", 2)
        difficulty = name.split("_d", 1)[1] if "_d" in name else "all"
        for m in client.get_metric_history(run_id, key):
            rows.append({"model": model, "budget": budget, "difficulty": difficulty, "step": int(m.step),
                         "generated_tokens": float(tokens.get(m.step, 0.0)), "accuracy": float(m.value)})
    return sorted(rows, key=lambda r: (r["budget"], r["difficulty"], r["step"]))


def plot_curves(table: pa.Table, budget: str, x: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = table.to_pandas()
    df = df[df["budget"] == budget]
    diffs = sorted(df["difficulty"].unique(), key=lambda d: (d != "all", d))
    fig, axes = plt.subplots(1, len(diffs), figsize=(4 * len(diffs), 3.4), squeeze=False, sharey=True)
    for ax, d in zip(axes[0], diffs):
        for model, g in df[df["difficulty"] == d].groupby("model"):
            ax.plot(g[x], g["accuracy"], marker="o", label=model)
        ax.set_title(f"{budget}, difficulty {d}")
        ax.set_xlabel("generated tokens" if x == "generated_tokens" else "learner steps")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend()
    fig.tight_layout()
    return fig


def plot_intervened(client, run_id: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for key, label in (("curriculum/intervened_share", "intervened (prefix given)"),
                       ("curriculum/dropped_share", "dropped (always solved)")):
        hist = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        ax.plot([m.step for m in hist], [m.value for m in hist], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("share of the step's prompts")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def _train_stage(cfg: DifficultyRecipeConfig, scfg, log):
    """A stage that trains ``scfg`` (with the curriculum for ``intervention``) as a child of the parent run."""

    def fn(ctx: StageContext) -> StageOutput:
        from orchestrator.trainer import train

        ctx.train_tracking(scfg.tracking)
        log(f"difficulty: stage {ctx.name} (generation budget {cfg.max_generated_tokens} tokens)")
        curriculum = DifficultyCurriculum(cfg.curriculum) if ctx.name == "intervention" else None
        res = train(scfg, log=log, curriculum=curriculum)
        return StageOutput(run_id=res.run_id, checkpoint=res.checkpoint,
                           outputs={"eval_after": res.eval_after, "steps": res.steps})

    return fn


def _stages(cfg: DifficultyRecipeConfig, stages: dict, log) -> list[Stage]:
    curriculum = {f"curriculum.{k}": v for k, v in vars(cfg.curriculum).items()}
    return [Stage(name, _train_stage(cfg, scfg, log), (),
                  {"train": to_dict(scfg), **(curriculum if name == "intervention" else {})})
            for name, scfg in stages.items()]


def run(cfg: DifficultyRecipeConfig, log=print) -> dict:
    """Both stages under one parent run (``pipeline.run_pipeline``: a completed stage is reused by a re-run with
    the same config), then the curves, plots and summary on the parent."""
    stages = stage_configs(cfg)  # every stage's config is validated before anything starts
    first = stages["intervention"]
    uri = tracking.resolve_tracking_uri(first.tracking.tracking_uri)
    parent = tracking.Tracker.start(
        uri, first.tracking.experiment, run_name=cfg.name,
        params={"base": cfg.base, "overrides": " ".join(cfg.overrides), "max_generated_tokens": cfg.max_generated_tokens,
                **{f"curriculum.{k}": v for k, v in vars(cfg.curriculum).items()}},
        tags=tracking.lineage_tags(to_dict(first), workload="difficulty", stage="pipeline"))
    with parent:
        results = run_pipeline(_stages(cfg, stages, log), parent=parent, workload="difficulty", log=log,
                               root=Path(first.trainer.output_dir) / "stages" / cfg.name)
        client = parent.client
        rows = []
        for name, res in results.items():
            rows += curves(client, res.run_id, name)
        table = pa.Table.from_pylist(rows)
        parent.log_table(table, "difficulty/curves.parquet")
        budgets = sorted(set(table["budget"].to_pylist()))
        for budget in budgets:
            for x in ("generated_tokens", "step"):
                parent.log_figure(plot_curves(table, budget, x), f"difficulty/accuracy_vs_{x}_{budget}.png")
        parent.log_figure(plot_intervened(client, results["intervention"].run_id), "difficulty/intervened_share.png")
        summary = {}
        for name, res in results.items():
            m = client.get_run(res.run_id).data.metrics
            summary[name] = {"steps": res.outputs["steps"],
                             "final_accuracy": {f"{r['budget_label']}": r["accuracy"]
                                                for r in res.outputs["eval_after"]},
                             "run_id": res.run_id, "generated_tokens": m.get("cost/generated_tokens_total"),
                             "by_difficulty": {k.split("/", 1)[1]: v for k, v in m.items()
                                               if k.startswith("eval/") and "/accuracy_d" in k}}
        parent.log_dict(summary, "difficulty/summary.json")
        log("difficulty: " + "; ".join(f"{k}: {v['steps']} steps, {v['generated_tokens']:.0f} tokens, "
                                       f"final {v['final_accuracy']}" for k, v in summary.items()))
        return {"parent_run_id": parent.run_id, "summary": summary, "table": table}


def main(config: str, overrides: list[str]) -> int:
    run(load(config, overrides))
    return 0
