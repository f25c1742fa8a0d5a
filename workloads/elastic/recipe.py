"""Elastic Reasoning recipe: one parent MLflow run, two training stages, one comparison table.

Stages (``pipeline.run_pipeline``; each a child of the parent run): ``budgeted`` trains with two-phase
rollouts at the tight budget (t, s); ``baseline`` trains plain GRPO with a thinking budget large enough not
to bind, the same steps, prompts per step and group size (same number of samples), from the same start
checkpoint. Both runs evaluate over the same (t, s) grid plus unconstrained, so the table compares start,
baseline and budget-trained models on identical prompts: the paper's table, at whatever scale the base
config sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import MISSING

from orchestrator import frontier, tracking
from orchestrator.config import ConfigError, load_config, merge_structured, resolve_base_config, to_dict
from orchestrator.evaluation import format_model_comparison as format_table
from orchestrator.evaluation import model_comparison as comparison_table
from orchestrator.pipeline import Stage, StageContext, StageOutput, run_pipeline


@dataclass
class ElasticConfig:
    base: str = MISSING  # training config every stage starts from
    overrides: list[str] = field(default_factory=list)  # applied to every stage
    budgeted: list[str] = field(default_factory=lambda: ["budget.thinking=16"])
    baseline: list[str] = field(default_factory=lambda: ["budget.thinking=64"])
    run_baseline: bool = True
    name: str = "elastic"


def load(path: str, overrides: list[str] = ()) -> ElasticConfig:
    cfg = merge_structured(ElasticConfig, path, overrides)
    cfg.base = resolve_base_config(cfg.base, path)
    return cfg


def _stage_configs(cfg: ElasticConfig, check_paths: bool = True):
    common = list(cfg.overrides)
    stages = {"budgeted": load_config(cfg.base, common + list(cfg.budgeted) + [f"trainer.run_name={cfg.name}-budgeted"],
                                      check_paths=check_paths)}
    if cfg.run_baseline:
        stages["baseline"] = load_config(cfg.base, common + list(cfg.baseline) + [f"trainer.run_name={cfg.name}-baseline"],
                                         check_paths=check_paths)
        b, u = stages["budgeted"], stages["baseline"]
        for key in ("steps", "prompts_per_step"):
            if getattr(b.trainer, key) != getattr(u.trainer, key):
                raise ConfigError(f"trainer.{key}: budgeted ({getattr(b.trainer, key)}) and baseline "
                                  f"({getattr(u.trainer, key)}) must match for a same-compute comparison")
        if b.rollout.group_size != u.rollout.group_size:
            raise ConfigError("rollout.group_size: budgeted and baseline must match for a same-compute comparison")
        if u.budget.thinking <= b.budget.thinking:
            raise ConfigError(f"baseline budget.thinking={u.budget.thinking} must exceed the budgeted run's "
                              f"{b.budget.thinking}")
    return stages


def _train_stage(scfg, log):
    """A stage that trains ``scfg`` as a child of the parent run and hands its evaluations to the driver."""

    def fn(ctx: StageContext) -> StageOutput:
        from orchestrator.trainer import train

        ctx.train_tracking(scfg.tracking)
        log(f"elastic: stage {ctx.name} (thinking budget {scfg.budget.thinking})")
        res = train(scfg, log=log)
        return StageOutput(run_id=res.run_id, checkpoint=res.checkpoint,
                           outputs={"eval_before": res.eval_before, "eval_after": res.eval_after, "steps": res.steps})

    return fn


def run(cfg: ElasticConfig, log=print) -> dict:
    """Train the stages under one parent run (``pipeline.run_pipeline``: a completed stage is reused by a
    re-run with the same config) and log the comparison; returns the table and run ids."""
    stages = _stage_configs(cfg)  # every stage's config is validated before anything starts
    first = stages["budgeted"]
    uri = tracking.resolve_tracking_uri(first.tracking.tracking_uri)
    parent = tracking.Tracker.start(uri, first.tracking.experiment, run_name=cfg.name,
                                    params={"base": cfg.base, "budgeted": " ".join(cfg.budgeted),
                                            "baseline": " ".join(cfg.baseline), "overrides": " ".join(cfg.overrides)},
                                    tags=tracking.lineage_tags(to_dict(first), workload="elastic", stage="pipeline"))
    with parent:
        dag = [Stage(name, _train_stage(scfg, log), (), to_dict(scfg)) for name, scfg in stages.items()]
        results = run_pipeline(dag, parent=parent, root=Path(first.trainer.output_dir) / "stages" / cfg.name,
                               workload="elastic", log=log)
        rows = {"start": results["budgeted"].outputs["eval_before"]}
        if "baseline" in results:
            rows["baseline"] = results["baseline"].outputs["eval_after"]
        rows["budgeted"] = results["budgeted"].outputs["eval_after"]
        table = comparison_table(rows)
        parent.log_table(table, "elastic/comparison.parquet")
        fig = frontier.plot_frontier(table.to_pandas().rename(columns={"budget": "label"}), x="mean_tokens",
                                     y="accuracy", label="label", group="model",
                                     title="accuracy vs tokens by model (budget grid)")
        parent.log_figure(fig, "elastic/comparison.png")
        text = format_table(table)
        runs = {k: v.run_id for k, v in results.items()}
        parent.log_dict({"markdown": text, "runs": runs}, "elastic/comparison.json")
        metrics = {f"{r['model']}/{r['budget']}/accuracy": r["accuracy"] for r in table.to_pylist()}
        parent.log_metrics(metrics, step=0)
        log("elastic: comparison (greedy unless eval.temperature > 0; Avg@k over eval.samples_per_prompt)\n" + text)
        return {"parent_run_id": parent.run_id, "table": table, "runs": runs}


def main(config: str, overrides: list[str]) -> int:
    run(load(config, overrides))
    return 0
