"""Elastic Reasoning recipe: one parent MLflow run, one training stage per arm (x seed), one comparison table.

Stages (``pipeline.run_pipeline``; each a child of the parent run). By default two arms: ``budgeted`` trains with
two-phase rollouts at the tight budget (t, s); ``baseline`` trains plain GRPO with a thinking budget large enough
not to bind, the same steps, prompts per step and group size (same number of samples), from the same start
checkpoint. ``arms`` names any number of arms instead (e.g. budget schedules against the single-budget run and the
unconstrained baseline), and ``seeds`` trains each arm once per sampling seed (``rollout.seed``). Every run
evaluates over the same (t, s) grid plus unconstrained, so the table compares start and trained models on
identical prompts: the paper's table, at whatever scale the base config sets, with each arm's mean over seeds,
its hypervolume (``frontier.model_hypervolume``) and, when ``goal`` is set, whether it reached it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from omegaconf import MISSING

from orchestrator import frontier, tracking
from orchestrator.config import (ConfigError, eval_budgets, load_config, merge_structured, resolve_base_config,
                                 to_dict)
from orchestrator.evaluation import format_model_comparison as format_table
from orchestrator.evaluation import model_comparison as comparison_table
from orchestrator.pipeline import PipelineError, Stage, StageContext, StageOutput, run_pipeline


@dataclass
class GoalConfig:
    """What one model must show (issue 23): ``budget`` accuracy >= start + ``min_gain``, unconstrained accuracy
    >= start - ``max_unconstrained_drop`` with unconstrained tokens <= (1 - ``min_token_saving``) x start's."""

    budget: str = "16x8"
    min_gain: float = 0.25
    max_unconstrained_drop: float = 0.03
    min_token_saving: float = 0.20


@dataclass
class ElasticConfig:
    base: str = MISSING  # training config every stage starts from
    overrides: list[str] = field(default_factory=list)  # applied to every stage
    budgeted: list[str] = field(default_factory=lambda: ["budget.thinking=16"])
    baseline: list[str] = field(default_factory=lambda: ["budget.thinking=64"])
    run_baseline: bool = True
    # name -> overrides; when set, these arms replace budgeted/baseline (e.g. budget schedules).
    arms: dict[str, list[str]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=list)  # each arm once per rollout.seed; [] = the base config's seed
    goal: Optional[GoalConfig] = None
    # Token reference of the hypervolume column (accuracy reference 0); 0 = the grid's largest total budget.
    hypervolume_tokens: float = 0.0
    name: str = "elastic"


def load(path: str, overrides: list[str] = ()) -> ElasticConfig:
    cfg = merge_structured(ElasticConfig, path, overrides)
    cfg.base = resolve_base_config(cfg.base, path)
    return cfg


def _arms(cfg: ElasticConfig) -> dict[str, list[str]]:
    if cfg.arms:
        return {name: list(o) for name, o in cfg.arms.items()}
    return {"budgeted": list(cfg.budgeted), **({"baseline": list(cfg.baseline)} if cfg.run_baseline else {})}


def _stage_configs(cfg: ElasticConfig, check_paths: bool = True):
    """Every stage's training config (arm x seed), validated, and checked to spend the same compute."""
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError(f"seeds={list(cfg.seeds)}: each seed once")
    stages = {}
    for seed in cfg.seeds or [None]:  # seed-major: a partial run has every arm at the first seed
        for arm, extra in _arms(cfg).items():
            name = arm if seed is None else f"{arm}-s{seed}"
            seeded = [] if seed is None else [f"rollout.seed={seed}"]
            stages[name] = load_config(cfg.base, list(cfg.overrides) + extra + seeded +
                                       [f"trainer.run_name={cfg.name}-{name}"], check_paths=check_paths)
    first_name, first = next(iter(stages.items()))
    for name, c in stages.items():
        for key in ("steps", "prompts_per_step", "max_generated_tokens"):
            if getattr(c.trainer, key) != getattr(first.trainer, key):
                raise ConfigError(f"trainer.{key}: {first_name} ({getattr(first.trainer, key)}) and {name} "
                                  f"({getattr(c.trainer, key)}) must match for a same-compute comparison")
        if c.rollout.group_size != first.rollout.group_size:
            raise ConfigError(f"rollout.group_size: {first_name} and {name} must match for a same-compute comparison")
    if not cfg.arms and cfg.run_baseline:
        b, u = stages[next(n for n in stages if n.startswith("budgeted"))], stages[next(
            n for n in stages if n.startswith("baseline"))]
        if u.budget.thinking <= b.budget.thinking:
            raise ConfigError(f"baseline budget.thinking={u.budget.thinking} must exceed the budgeted run's "
                              f"{b.budget.thinking}")
    if cfg.goal is not None:
        labels = list(first.eval.budgets)
        for label in (cfg.goal.budget, "unconstrained"):
            if label not in labels:
                raise ConfigError(f"goal.budget={cfg.goal.budget!r}: the goal reads {label!r}, not in eval.budgets "
                                  f"({', '.join(labels)})")
    return stages


def _train_stage(scfg, log):
    """A stage that trains ``scfg`` as a child of the parent run and hands its evaluations to the driver."""

    def fn(ctx: StageContext) -> StageOutput:
        from orchestrator.trainer import train

        ctx.train_tracking(scfg.tracking)
        b = scfg.budget
        log(f"elastic: stage {ctx.name} (budget {b.thinking}x{b.solution}, schedule {b.schedule.kind})")
        res = train(scfg, log=log)
        return StageOutput(run_id=res.run_id, checkpoint=res.checkpoint,
                           outputs={"eval_before": res.eval_before, "eval_after": res.eval_after, "steps": res.steps})

    return fn


_MEAN_COLS = ("accuracy", "mean_tokens", "mean_thinking_tokens", "truncation_rate")


def _mean_rows(runs: list[list[dict]]) -> list[dict]:
    """One arm's eval rows averaged over its seeds (same grid in each; samples summed)."""
    out = []
    for rows in zip(*runs):
        r = dict(rows[0])
        for col in _MEAN_COLS:
            r[col] = sum(x[col] for x in rows) / len(rows)
        r["samples"] = sum(x["samples"] for x in rows)
        out.append(r)
    return out


def _rows_by_model(cfg: ElasticConfig, results: dict) -> tuple[dict[str, list[dict]], dict[str, list[dict]]]:
    """(every run's rows with the shared start first, the start and each arm's mean over seeds)."""
    first = next(iter(results.values()))
    runs = {"start": first.outputs["eval_before"], **{n: r.outputs["eval_after"] for n, r in results.items()}}
    if not cfg.seeds:
        return runs, runs
    means = {"start": runs["start"]}
    for arm in _arms(cfg):  # an arm with a seed not trained (a stopped invocation) has no mean
        if all(f"{arm}-s{seed}" in runs for seed in cfg.seeds):
            means[arm] = _mean_rows([runs[f"{arm}-s{seed}"] for seed in cfg.seeds])
    return runs, means


def _verdicts(cfg: ElasticConfig, means: dict[str, list[dict]], reference: float) -> list[dict]:
    """Per arm: hypervolume and, with a goal, the gain at the goal budget, the unconstrained change and saving."""
    at = {m: {r["budget_label"]: r for r in rows} for m, rows in means.items()}
    start, out = at["start"], []
    for model, rows in means.items():
        v = {"model": model, "hypervolume": frontier.model_hypervolume(rows, {"accuracy": 0.0, "tokens": reference})}
        if cfg.goal is not None:
            g, u, su = at[model][cfg.goal.budget], at[model]["unconstrained"], start["unconstrained"]
            v.update(gain=g["accuracy"] - start[cfg.goal.budget]["accuracy"], unconstrained_change=u["accuracy"] -
                     su["accuracy"], token_saving=1.0 - u["mean_tokens"] / su["mean_tokens"])
            v["goal_met"] = bool(v["gain"] >= cfg.goal.min_gain and v["unconstrained_change"] >=
                                 -cfg.goal.max_unconstrained_drop and v["token_saving"] >= cfg.goal.min_token_saving)
        out.append(v)
    return out


def _format_verdicts(verdicts: list[dict]) -> str:
    keys = [k for k in ("hypervolume", "gain", "unconstrained_change", "token_saving", "goal_met") if k in verdicts[0]]
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for v in verdicts:
        lines.append(f"| {v['model']} | " + " | ".join(
            str(v[k]) if isinstance(v[k], bool) else f"{v[k]:+.3f}" if k != "hypervolume" else f"{v[k]:.2f}"
            for k in keys) + " |")
    return "\n".join(lines)


def _log_comparison(cfg: ElasticConfig, parent, results: dict, reference: float, log, partial: bool = False) -> dict:
    """The parent's table (every run, and each arm's mean over seeds), plot, verdicts and metrics; ``partial``:
    of the stages that finished before one failed or was stopped."""
    runs, means = _rows_by_model(cfg, results)
    table, mean_table = comparison_table(runs), comparison_table(means)
    parent.log_table(table, "elastic/comparison.parquet")
    fig = frontier.plot_frontier(mean_table.to_pandas().rename(columns={"budget": "label"}), x="mean_tokens",
                                 y="accuracy", label="label", group="model",
                                 title="accuracy vs tokens by model (budget grid" +
                                       (f", mean over seeds {list(cfg.seeds)})" if cfg.seeds else ")"))
    parent.log_figure(fig, "elastic/comparison.png")
    verdicts = _verdicts(cfg, means, reference)
    text = format_table(mean_table) + "\n\n" + _format_verdicts(verdicts)
    out = {"markdown": text, "runs": {k: v.run_id for k, v in results.items()}, "verdicts": verdicts}
    if cfg.seeds:
        out["markdown_per_seed"] = format_table(table)
        parent.log_table(mean_table, "elastic/comparison_mean.parquet")
    parent.log_dict(out, "elastic/comparison.json")
    metrics = {f"{r['model']}/{r['budget']}/accuracy": r["accuracy"] for r in mean_table.to_pylist()}
    metrics.update({f"{v['model']}/hypervolume": v["hypervolume"] for v in verdicts})
    parent.log_metrics(metrics, step=0)
    log(f"elastic: comparison{' of the stages finished so far' if partial else ''} "
        "(greedy unless eval.temperature > 0; Avg@k over eval.samples_per_prompt"
        + (f"; mean over seeds {list(cfg.seeds)}" if cfg.seeds else "") + ")\n" + text)
    return {"table": table, "mean_table": mean_table, "verdicts": verdicts, "runs": out["runs"]}


def run(cfg: ElasticConfig, log=print) -> dict:
    """Train the stages under one parent run (``pipeline.run_pipeline``: a completed stage is reused by a
    re-run with the same config) and log the comparison; returns the tables, verdicts and run ids."""
    stages = _stage_configs(cfg)  # every stage's config is validated before anything starts
    first = next(iter(stages.values()))
    reference = cfg.hypervolume_tokens or max(b.total for b in eval_budgets(first))
    uri = tracking.resolve_tracking_uri(first.tracking.tracking_uri)
    params = {"base": cfg.base, "overrides": " ".join(cfg.overrides), "seeds": " ".join(map(str, cfg.seeds))}
    params.update({f"arm.{a}": " ".join(o) or "(base)" for a, o in _arms(cfg).items()})
    parent = tracking.Tracker.start(uri, first.tracking.experiment, run_name=cfg.name, params=params,
                                    tags=tracking.lineage_tags(to_dict(first), workload="elastic", stage="pipeline"))
    with parent:
        dag = [Stage(name, _train_stage(scfg, log), (), to_dict(scfg)) for name, scfg in stages.items()]
        try:
            results = run_pipeline(dag, parent=parent, root=Path(first.trainer.output_dir) / "stages" / cfg.name,
                                   workload="elastic", log=log)
        except PipelineError as err:  # stopped or failed: the parent still gets the table of what finished
            if err.results:
                try:
                    parent.set_tags({"budgetrl.partial": "true"})
                    _log_comparison(cfg, parent, err.results, reference, log, partial=True)
                except Exception as exc:  # noqa: BLE001 - the stage's failure is what the user must see
                    log(f"elastic: could not log the table of the finished stages: {type(exc).__name__}: {exc}")
            raise
        return {"parent_run_id": parent.run_id, **_log_comparison(cfg, parent, results, reference, log)}


def main(config: str, overrides: list[str]) -> int:
    run(load(config, overrides))
    return 0
