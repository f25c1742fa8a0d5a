"""Meta-ability alignment (arXiv 2505.10554) as one DAG under one parent MLflow run.

    warmstart (SFT on a mix of the three abilities + the domain task: the "instruct" base)
      -> {ability}-L1 -> {ability}-L2 ...     per ability, a level curriculum (each level starts from
                                              the previous level's checkpoint); paper reward
      -> merge                                linear merge of the last-level specialists
      -> domain-from-merged, domain-from-base domain RL (1/0 reward) from the merged and from the base
      -> eval-<model>                         held-out instances of every ability x level + the domain task
    then a table (Parquet + markdown + plot) on the parent run.

Everything is built from orchestrator parts: ``pipeline.run_pipeline`` (resume, concurrency, lineage),
``trainer.train`` (RL stages), ``learner.sft.sft_train`` (warm start), ``merge.merge_checkpoints`` and
``evaluation.evaluate_checkpoint``.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from omegaconf import MISSING

from orchestrator import tracking
from orchestrator.config import Budget, Config, ConfigError, durable_output, load_config, merge_structured, resolve_base_config, to_dict, validate
from orchestrator.pipeline import Stage, StageContext, StageOutput, run_pipeline

ABILITIES = ("deduction", "induction", "abduction")
MERGE_METHODS = ("linear", "task_arithmetic")
WORKLOAD = "meta_abilities"
# The paper's scores: format +1/-1; answer +2 full match, -1.5 mismatch, -2 unparseable (docs/tasks.md).
PAPER_REWARD = ["reward.verifier=auto", "reward.correct_reward=2.0", "reward.wrong_reward=-1.5",
                "reward.format_weight=1.0"]
DOMAIN_REWARD = ["reward.verifier=auto", "reward.correct_reward=1.0", "reward.wrong_reward=0.0",
                 "reward.format_weight=0.0"]


@dataclass
class WarmstartMix:
    """Warm-start SFT on a mix of tasks: ``per_task`` examples of each, over its levels."""

    steps: int = 400
    batch_size: int = 32
    lr: float = 1.0e-3
    per_task: int = 2000
    concise_fraction: float = 0.3
    num_threads: int = 2
    tasks: list[str] = field(default_factory=lambda: ["deduction", "induction", "abduction", "addition"])


@dataclass
class MergeSection:
    weights: dict[str, float] = field(default_factory=lambda: {"deduction": 1.0, "induction": 0.2, "abduction": 0.1})
    normalize: bool = True  # divide by the sum, as the paper's merge tool does by default
    # linear: sum_i w_i theta_i (the paper) | task_arithmetic: theta_base + sum_i w_i (theta_i - theta_base),
    # around the warm start every specialist was trained from
    method: str = "linear"


@dataclass
class EvalSection:
    per_level: int = 64  # held-out instances per ability and level
    domain_per_level: int = 64  # held-out domain problems per domain difficulty
    max_thinking: int = 192
    max_solution: int = 48
    domain_max_thinking: int = 64
    domain_max_solution: int = 16
    seed: int = 0
    # 0 is greedy (one answer per instance). A small model's greedy answer can be one label for every
    # instance (its prior); sampling several answers per instance measures what it puts mass on.
    temperature: float = 0.0
    samples: int = 1  # answers per instance; the accuracy is their mean (pass@1 over samples)


@dataclass
class MetaConfig:
    base: str = MISSING  # training config every RL stage starts from
    name: str = "meta-abilities"
    output_dir: str = "outputs/meta_abilities"  # stage directories <name>-<key>/ live here
    max_concurrency: int = 3  # stages at once; Ray needs their CPUs (ray.num_cpus in overrides)
    abilities: list[str] = field(default_factory=lambda: list(ABILITIES))
    levels: list[int] = field(default_factory=lambda: [1, 2])
    overrides: list[str] = field(default_factory=list)  # every training stage
    ability: list[str] = field(default_factory=list)  # ability RL stages, after the paper's reward
    # one ability's RL stages, after `ability` (say more steps or larger groups where start accuracy is low)
    per_ability: dict[str, list[str]] = field(default_factory=dict)
    domain: list[str] = field(default_factory=list)  # domain RL stages, after the 1/0 reward
    domain_task: str = "addition"
    domain_difficulties: list[int] = field(default_factory=lambda: [2, 3])
    warmstart: WarmstartMix = field(default_factory=WarmstartMix)
    merge: MergeSection = field(default_factory=MergeSection)
    evaluation: EvalSection = field(default_factory=EvalSection)
    run_domain_from_base: bool = True


def load(path: str, overrides: list[str] = ()) -> MetaConfig:
    cfg = merge_structured(MetaConfig, path, overrides)
    cfg.base = resolve_base_config(cfg.base, path)
    cfg.output_dir = durable_output(cfg.output_dir, "output_dir")
    check(cfg)
    return cfg


def check(cfg: MetaConfig) -> None:
    """Reject impossible workload settings before any work (the stage configs are checked too)."""
    if not cfg.abilities or len(set(cfg.abilities)) != len(cfg.abilities):
        raise ConfigError(f"abilities={cfg.abilities!r}: list distinct abilities")
    for a in cfg.abilities:
        if a not in ABILITIES:
            raise ConfigError(f"abilities: {a!r} is not one of {', '.join(ABILITIES)}")
    if not cfg.levels or len(set(cfg.levels)) != len(cfg.levels) or any(lv not in range(1, 6) for lv in cfg.levels):
        raise ConfigError(f"levels={cfg.levels!r}: distinct levels in 1..5")
    unknown = [a for a in cfg.per_ability if a not in cfg.abilities]
    if unknown:
        raise ConfigError(f"per_ability.{unknown[0]}: not one of the trained abilities ({', '.join(cfg.abilities)})")
    missing = [a for a in cfg.abilities if a not in cfg.merge.weights]
    if missing:  # weights of abilities not trained are ignored (YAML dicts merge into the defaults)
        raise ConfigError(f"merge.weights={dict(cfg.merge.weights)!r}: no weight for {', '.join(missing)}")
    from orchestrator.merge import MergeError, effective_weights

    if cfg.merge.method not in MERGE_METHODS:
        raise ConfigError(f"merge.method={cfg.merge.method!r}: one of {', '.join(MERGE_METHODS)}")
    try:
        effective_weights([cfg.merge.weights[a] for a in cfg.abilities], cfg.merge.normalize)
    except MergeError as exc:
        raise ConfigError(f"merge.weights={dict(cfg.merge.weights)!r}: {exc}") from None
    if cfg.max_concurrency < 1:
        raise ConfigError(f"max_concurrency={cfg.max_concurrency}: must be >= 1")
    for k in ("per_level", "domain_per_level", "max_thinking", "max_solution", "domain_max_thinking",
              "domain_max_solution"):
        if getattr(cfg.evaluation, k) <= 0:
            raise ConfigError(f"evaluation.{k}={getattr(cfg.evaluation, k)}: must be > 0")
    e = cfg.evaluation
    if e.temperature < 0:
        raise ConfigError(f"evaluation.temperature={e.temperature}: must be >= 0 (0 is greedy)")
    if e.samples < 1:
        raise ConfigError(f"evaluation.samples={e.samples}: must be >= 1")
    if e.samples > 1 and e.temperature == 0:
        raise ConfigError(f"evaluation.samples={e.samples} with evaluation.temperature=0: greedy answers "
                          "are all the same; set evaluation.temperature > 0 or samples=1")
    w = cfg.warmstart
    for k in ("steps", "batch_size", "per_task"):
        if getattr(w, k) <= 0:
            raise ConfigError(f"warmstart.{k}={getattr(w, k)}: must be > 0")


# ---- stage configs -------------------------------------------------------------------------------


def _format_fn(cfg: Config) -> str:
    prefilled = cfg.model.prompt_template.rstrip().endswith("<think>")
    return "workloads.tasks.logic:meta_ability_format" + ("_prefilled" if prefilled else "")


def stage_configs(cfg: MetaConfig, check_paths: bool = False) -> dict[str, Config]:
    """Every training stage's config (model.path is filled from its input when the stage runs)."""
    common = list(cfg.overrides) + ["warmstart.steps=0", "model.build_if_missing=none"]
    out: dict[str, Config] = {}
    for a in cfg.abilities:
        for lv in cfg.levels:
            c = load_config(cfg.base, common + PAPER_REWARD + [f"data.task={a}", f"data.difficulties=[{lv}]"]
                            + list(cfg.ability) + list(cfg.per_ability.get(a, [])), check_paths=check_paths)
            c.reward.format_fn = _format_fn(c)
            validate(c, check_paths=check_paths)
            out[f"{a}-L{lv}"] = c
    dom = common + DOMAIN_REWARD + [f"data.task={cfg.domain_task}",
                                   f"data.difficulties=[{','.join(map(str, cfg.domain_difficulties))}]"]
    out["domain-from-merged"] = load_config(cfg.base, dom + list(cfg.domain), check_paths=check_paths)
    if cfg.run_domain_from_base:
        out["domain-from-base"] = load_config(cfg.base, dom + list(cfg.domain), check_paths=check_paths)
    return out


def base_config(cfg: MetaConfig) -> Config:
    """The base training config with the workload overrides: model to build, tracking, Ray."""
    return load_config(cfg.base, list(cfg.overrides), check_paths=False)


# ---- stage functions -----------------------------------------------------------------------------


def _sft_mix_task(base_cfg: Config, mix: WarmstartMix, tasks: list, model_dir: str, out_dir: str, seed: int) -> dict:
    from transformers import AutoTokenizer

    from orchestrator.learner.sft import sft_train
    from orchestrator.warmstart import sft_examples

    tok = AutoTokenizer.from_pretrained(model_dir)
    examples = []
    for task, difficulties in tasks:
        c = copy.deepcopy(base_cfg)
        c.data.task, c.data.difficulties = task, list(difficulties)
        c.warmstart.train_size, c.warmstart.concise_fraction = mix.per_task, mix.concise_fraction
        examples += sft_examples(c, tok)
    random.Random(seed).shuffle(examples)
    digest = tracking.dataset_digest(pa.table({"prompt": [p for p, _ in examples], "target": [t for _, t in examples]}))
    every = max(1, mix.steps // 8)

    def report(step: int, m: dict) -> None:
        print(f"warm start (mix): step {step}/{mix.steps} loss {m.get('loss', float('nan')):.4f}", flush=True)

    metrics = sft_train(model_dir, out_dir, examples, steps=mix.steps, batch_size=mix.batch_size, lr=mix.lr,
                        seed=seed, num_threads=mix.num_threads or None, progress=False, log_every=every, on_log=report)
    return {"metrics": metrics, "dataset_digest": digest}


def _mix_tasks(cfg: MetaConfig) -> list[tuple[str, list[int]]]:
    """(task, levels) of the warm-start mix: abilities at the curriculum levels, the domain task at its own."""
    return [(t, list(cfg.levels) if t in ABILITIES else list(cfg.domain_difficulties)) for t in cfg.warmstart.tasks]


def _warmstart_stage(cfg: MetaConfig, base_cfg: Config):
    def fn(ctx: StageContext) -> StageOutput:
        import ray

        from orchestrator.runtime import WORKER_ENV
        from orchestrator.warmstart import ensure_base_model

        model_dir = ensure_base_model(base_cfg)
        out = ctx.out_dir / "checkpoint"
        with ctx.start_run(params={"warmstart": to_plain(cfg.warmstart), "model": model_dir}) as run:
            t0 = time.time()
            task = ray.remote(_sft_mix_task).options(num_cpus=1, runtime_env={"env_vars": dict(WORKER_ENV)})
            got = ray.get(task.remote(base_cfg, cfg.warmstart, _mix_tasks(cfg), model_dir, str(out),
                                      base_cfg.trainer.seed))
            metrics = {k: float(v) for k, v in got["metrics"].items() if isinstance(v, (int, float))}
            metrics["wall_seconds"] = time.time() - t0
            run.log_metrics({f"warmstart/{k}": v for k, v in metrics.items()}, step=0)
            run.set_tags({tracking.TAG_SOURCE_CHECKPOINT: model_dir})
        return StageOutput(run_id=run.run_id, checkpoint=str(out), dataset_digest=got["dataset_digest"],
                           outputs={"metrics": metrics})

    return fn


def _train_stage(train_cfg: Config, source: str):
    def fn(ctx: StageContext) -> StageOutput:
        from orchestrator.trainer import train

        c = copy.deepcopy(train_cfg)
        c.model.path = ctx.inputs[source].checkpoint
        c.trainer.output_dir, c.trainer.run_name = str(ctx.out_dir), ctx.name
        ctx.train_tracking(c.tracking)
        validate(c)
        res = train(c, log=ctx.log)
        digest = ctx.parent.client.get_run(res.run_id).data.tags.get(tracking.TAG_DATASET_DIGEST)
        return StageOutput(run_id=res.run_id, checkpoint=res.checkpoint, dataset_digest=digest,
                           outputs={"eval_before": res.eval_before, "eval_after": res.eval_after})

    return fn


def _merge_stage(cfg: MetaConfig, sources: dict[str, str]):
    def fn(ctx: StageContext) -> StageOutput:
        from orchestrator.merge import MergeSpec, base_coefficient, effective_weights, merge_checkpoints

        names = list(sources)
        weights = [float(cfg.merge.weights[a]) for a in names]
        base = ctx.inputs["warmstart"].checkpoint if cfg.merge.method == "task_arithmetic" else None
        spec = MergeSpec(models=[ctx.inputs[sources[a]].checkpoint for a in names], weights=weights,
                         normalize=cfg.merge.normalize, base=base)
        coeffs = effective_weights(weights, cfg.merge.normalize)
        with ctx.start_run(params={"merge.abilities": names, "merge.weights": weights,
                                   "merge.normalize": cfg.merge.normalize, "merge.coefficients": coeffs,
                                   "merge.method": cfg.merge.method}) as run:
            path = merge_checkpoints(spec, ctx.out_dir / "checkpoint")
        around = f" + base {base_coefficient(coeffs):.3f} (task arithmetic around the warm start)" if base else ""
        ctx.log(f"merge: {', '.join(f'{a} {c:.3f}' for a, c in zip(names, coeffs))}{around} -> {path}")
        return StageOutput(run_id=run.run_id, checkpoint=path, outputs={"coefficients": dict(zip(names, coeffs))})

    return fn


def eval_suites(cfg: MetaConfig) -> list[dict]:
    """Held-out prompt sets: each ability at each level, and the domain task."""
    e = cfg.evaluation
    suites = [{"task": a, "difficulties": list(cfg.levels), "num": e.per_level * len(cfg.levels),
               "max_thinking": e.max_thinking, "max_solution": e.max_solution} for a in cfg.abilities]
    suites.append({"task": cfg.domain_task, "difficulties": list(cfg.domain_difficulties),
                   "num": e.domain_per_level * len(cfg.domain_difficulties),
                   "max_thinking": e.domain_max_thinking, "max_solution": e.domain_max_solution})
    if e.temperature > 0:  # greedy suites keep their keys: their stages are not re-run
        for s in suites:
            s.update(temperature=e.temperature, samples=e.samples)
    return suites


def decoding(cfg: MetaConfig) -> str:
    """How the table's answers were drawn, for its titles."""
    e = cfg.evaluation
    return "greedy" if e.temperature == 0 else f"temperature {e.temperature:g}, {e.samples} per instance"


def _format_rate(records: pa.Table) -> float:
    from orchestrator.rewards.shaping import THINK_OPEN, response_text, tags_well_formed

    rows = records.select(["thinking", "solution"]).to_pylist()
    ok = [tags_well_formed(THINK_OPEN + response_text(r["thinking"], r["solution"])) for r in rows]
    return sum(ok) / max(1, len(ok))


def evaluate_suites(train_cfg: Config, checkpoint: str, suites: list[dict], seed: int, tracker=None,
                    out_dir: Path | None = None) -> list[dict]:
    """Accuracy of ``checkpoint`` on every suite, by level (greedy unless the suite says a temperature
    and samples per instance); rows of the comparison table."""
    import dataclasses

    import pyarrow.compute as pc

    from orchestrator import evaluation
    from orchestrator.data.io import write_rollouts
    from orchestrator.data.tasks import get_task
    from orchestrator.rewards import RewardConfig, RewardPool
    from orchestrator.runtime import WorkerGroup, init_ray

    c = copy.deepcopy(train_cfg)
    c.model.path = checkpoint
    init_ray(c)
    group = WorkerGroup(c, checkpoint, learner=False)
    rows = []
    try:
        with RewardPool(max(1, c.reward.num_workers)) as pool:
            for s in suites:
                task = get_task(s["task"])
                prompts = task.generate(s["num"], difficulties=tuple(s["difficulties"]), seed=seed, split="eval")
                spec = RewardConfig(verifier=task.verifier, timeout_s=c.reward.timeout_s)
                budget = Budget(s["max_thinking"], s["max_solution"], "unconstrained")
                sampling = dataclasses.replace(c.eval, samples_per_prompt=int(s.get("samples", 1)),
                                               temperature=float(s.get("temperature", 0.0)), top_p=1.0)
                result = evaluation.evaluate_checkpoint(
                    dataclasses.replace(c, eval=sampling), checkpoint, group=group, pool=pool, prompts=prompts,
                    budgets=[budget], reward=spec, seed=seed)
                records = result.records
                if out_dir is not None:
                    write_rollouts(records, out_dir / "eval" / f"{s['task']}.parquet")
                for r in result.by_difficulty.to_pylist():
                    recs = records.filter(pc.equal(records["difficulty"], r["difficulty"]))
                    rows.append({"task": s["task"], "level": int(r["difficulty"]), "accuracy": r["accuracy"],
                                 "format_rate": _format_rate(recs), "mean_tokens": r["mean_tokens"],
                                 "truncation_rate": r["truncation_rate"], "samples": int(r["samples"]),
                                 "dataset_digest": tracking.dataset_digest(prompts)})
    finally:
        group.shutdown()
    if tracker is not None:
        tracker.log_metrics({f"eval/{r['task']}/L{r['level']}/{k}": r[k] for r in rows
                             for k in ("accuracy", "format_rate", "mean_tokens")}, step=0)
        tracker.log_table(pa.Table.from_pylist(rows), "eval/by_task_level.parquet")
        if out_dir is not None and (out_dir / "eval").is_dir():
            tracker.log_artifacts(str(out_dir / "eval"), "eval/records")
    return rows


def _eval_stage(cfg: MetaConfig, train_cfg: Config, source: str):
    def fn(ctx: StageContext) -> StageOutput:
        ckpt = ctx.inputs[source].checkpoint
        suites = ctx.config["suites"]
        with ctx.start_run(params={"checkpoint": ckpt, "suites": [s["task"] for s in suites]},
                           tags={tracking.TAG_SOURCE_CHECKPOINT: ckpt}) as run:
            rows = evaluate_suites(train_cfg, ckpt, suites, cfg.evaluation.seed, tracker=run, out_dir=ctx.out_dir)
        digest = tracking.config_hash({"suites": suites, "seed": cfg.evaluation.seed})
        return StageOutput(run_id=run.run_id, checkpoint=None, dataset_digest=digest, outputs={"rows": rows})

    return fn


def to_plain(x):
    import dataclasses

    return dataclasses.asdict(x) if dataclasses.is_dataclass(x) else x


# ---- the DAG -------------------------------------------------------------------------------------


def model_stages(cfg: MetaConfig) -> dict[str, str]:
    """Table row name -> the stage whose checkpoint it evaluates."""
    last = cfg.levels[-1]
    models = {"base": "warmstart"}
    models.update({a: f"{a}-L{last}" for a in cfg.abilities})
    models["merged"] = "merge"
    if cfg.run_domain_from_base:
        models["domain-from-base"] = "domain-from-base"
    models["domain-from-merged"] = "domain-from-merged"
    return models


def build_stages(cfg: MetaConfig) -> list[Stage]:
    """The stage graph; every stage config is resolved and validated here, before anything runs."""
    trains = stage_configs(cfg)
    base = base_config(cfg)
    base_model = {k: v for k, v in to_dict(base)["model"].items()}
    stages = [Stage("warmstart", _warmstart_stage(cfg, base), (),
                    {"model": base_model, "data_seed": base.data.seed, "seed": base.trainer.seed,
                     "template": base.model.prompt_template, "mix": to_plain(cfg.warmstart),
                     "mix_tasks": _mix_tasks(cfg)})]
    for a in cfg.abilities:
        prev = "warmstart"
        for lv in cfg.levels:
            name = f"{a}-L{lv}"
            stages.append(Stage(name, _train_stage(trains[name], prev), (prev,), _hashable(trains[name])))
            prev = name
    last = {a: f"{a}-L{cfg.levels[-1]}" for a in cfg.abilities}
    merge_inputs = tuple(last.values()) + (("warmstart",) if cfg.merge.method == "task_arithmetic" else ())
    stages.append(Stage("merge", _merge_stage(cfg, last), merge_inputs,
                        {"weights": dict(cfg.merge.weights), "normalize": cfg.merge.normalize,
                         "order": list(last), "method": cfg.merge.method}))
    stages.append(Stage("domain-from-merged", _train_stage(trains["domain-from-merged"], "merge"), ("merge",),
                        _hashable(trains["domain-from-merged"])))
    if cfg.run_domain_from_base:
        stages.append(Stage("domain-from-base", _train_stage(trains["domain-from-base"], "warmstart"),
                            ("warmstart",), _hashable(trains["domain-from-base"])))
    suites = eval_suites(cfg)
    eval_cfg = base_config(cfg)
    for model, src in model_stages(cfg).items():
        stages.append(Stage(f"eval-{model}", _eval_stage(cfg, eval_cfg, src), (src,),
                            {"suites": suites, "seed": cfg.evaluation.seed, "engine": _hashable(eval_cfg)["rollout"],
                             "model": {k: v for k, v in to_dict(eval_cfg)["model"].items() if k != "path"}}))
    return stages


def _hashable(c: Config) -> dict:
    """A training config as it identifies a stage: without the fields filled in when the stage runs."""
    d = to_dict(c)
    d["model"].pop("path", None)
    d["trainer"].pop("output_dir", None)
    d["trainer"].pop("run_name", None)
    d.pop("tracking", None)
    d.pop("ray", None)
    return d


# ---- the table -----------------------------------------------------------------------------------


def comparison_table(rows_by_model: dict[str, list[dict]]) -> pa.Table:
    return pa.Table.from_pylist([{"model": m, **r} for m, rows in rows_by_model.items() for r in rows])


def format_table(table: pa.Table, metric: str = "accuracy") -> str:
    """Markdown: one row per model, one column per (task, level), cells ``metric``."""
    rows = table.to_pylist()
    models = list(dict.fromkeys(r["model"] for r in rows))
    cols = list(dict.fromkeys((r["task"], r["level"]) for r in rows))
    cell = {(r["model"], r["task"], r["level"]): r for r in rows}
    head = "| model | " + " | ".join(f"{t} L{lv}" for t, lv in cols) + " |"
    lines = [head, "|---|" + "---|" * len(cols)]
    for m in models:
        parts = []
        for t, lv in cols:
            r = cell.get((m, t, lv))
            parts.append(f"{r[metric]:.3f}" if r and r.get(metric) is not None else "")
        lines.append(f"| {m} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def plot_table(table: pa.Table, how: str = "greedy"):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = table.to_pylist()
    models = list(dict.fromkeys(r["model"] for r in rows))
    cols = list(dict.fromkeys((r["task"], r["level"]) for r in rows))
    cell = {(r["model"], r["task"], r["level"]): r["accuracy"] for r in rows}
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cols)), 4))
    width = 0.8 / max(1, len(models))
    x = np.arange(len(cols))
    for i, m in enumerate(models):
        ax.bar(x + i * width, [cell.get((m, t, lv), 0.0) for t, lv in cols], width, label=m)
    ax.set_xticks(x + 0.4 - width / 2, [f"{t}\nL{lv}" for t, lv in cols])
    ax.set_ylabel(f"accuracy ({how}, held-out)")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title("meta-ability alignment: accuracy by model, task and level")
    fig.tight_layout()
    return fig


# ---- entry points --------------------------------------------------------------------------------


def run(cfg: MetaConfig, log=print, only: list[str] | None = None) -> dict:
    """Run (or resume) the DAG under one parent run and log the comparison table to it."""
    from orchestrator.runtime import init_ray

    check(cfg)
    stages = build_stages(cfg)  # every stage's config is validated before anything starts
    first = base_config(cfg)
    uri = tracking.resolve_tracking_uri(first.tracking.tracking_uri)
    parent = tracking.Tracker.start(uri, first.tracking.experiment, run_name=cfg.name,
                                    params={"base": cfg.base, "abilities": cfg.abilities, "levels": cfg.levels,
                                            "merge.weights": dict(cfg.merge.weights),
                                            "merge.normalize": cfg.merge.normalize,
                                            "merge.method": cfg.merge.method,
                                            "max_concurrency": cfg.max_concurrency,
                                            "overrides": " ".join(cfg.overrides)},
                                    tags=tracking.lineage_tags(to_plain(cfg), workload=WORKLOAD, stage="pipeline"))
    t0 = time.perf_counter()
    with parent:
        init_ray(first)  # once, before stage threads start (each train() would otherwise race to init)
        results = run_pipeline(stages, parent=parent, root=cfg.output_dir, workload=WORKLOAD,
                               max_concurrency=cfg.max_concurrency, log=log, only=only)
        out = {"parent_run_id": parent.run_id, "results": results,
               "runs": {k: v.run_id for k, v in results.items()}}
        rows = {m: results[f"eval-{m}"].outputs["rows"] for m in model_stages(cfg) if f"eval-{m}" in results}
        if rows:
            table = comparison_table(rows)
            text = (f"Held-out accuracy ({decoding(cfg)}):\n\n" + format_table(table)
                    + "\n\nShare of well-formed <think>...</think><answer>...</answer> "
                    "responses (the domain task has no answer tags):\n\n" + format_table(table, "format_rate"))
            parent.log_table(table, "meta_abilities/comparison.parquet")
            parent.log_figure(plot_table(table, decoding(cfg)), "meta_abilities/comparison.png")
            parent.log_dict({"markdown": text, "runs": out["runs"],
                             "checkpoints": {k: v.checkpoint for k, v in results.items() if v.checkpoint}},
                            "meta_abilities/comparison.json")
            parent.client.log_text(parent.run_id, text + "\n", "meta_abilities/comparison.md")
            parent.log_metrics({f"{r['model']}/{r['task']}/L{r['level']}/accuracy": r["accuracy"]
                                for r in table.to_pylist()}, step=0)
            log("meta_abilities: the comparison table\n" + text)
            out["table"] = table
        parent.log_metrics({"pipeline/wall_seconds": time.perf_counter() - t0}, step=0)
        if "merge" in results:
            parent.set_tags({tracking.TAG_CHECKPOINT + ".merged": results["merge"].checkpoint})
        return out


def main(config: str, overrides: list[str]) -> int:
    run(load(config, overrides))
    return 0
