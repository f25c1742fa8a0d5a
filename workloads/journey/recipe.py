"""Journey-learning recipe: base -> tree data -> shortcut-SFT vs journey-SFT (Ray Train) -> evaluation.

One parent MLflow run, one child per stage (``pipeline.run_pipeline``: the stages return their checkpoints,
data and metrics to the driver, which logs them):

- ``base``: the start checkpoint, the base training config's model warm-started on a little addition
  (``orchestrator.warmstart``; the warm start is reused when its inputs are unchanged);
- ``data``: step-level search trees -> N shortcut/journey pairs (``data.py``), Parquet artifact;
- ``sft_shortcut`` and ``sft_journey``: SFT on Ray Train (``TorchTrainer``) from the same base with the same
  N, steps, batch size and lr, on the N shortcuts vs the N matching journeys;
- ``eval``: base, shortcut-SFT and journey-SFT on the held-out eval split over the base config's budget
  grid (vLLM rollout workers; one engine, weights swapped in place between models); the answer after
  ``</think>`` is graded by the task's verifier.

The parent gets the comparison table (Parquet + markdown + plot) and the mean trajectory lengths.
DPO (the paper's optional stage) is not implemented.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import pyarrow as pa

from orchestrator import frontier, tracking
from orchestrator.config import ConfigError, load_config, merge_structured, resolve_base_config, to_dict
from orchestrator.evaluation import format_model_comparison
from orchestrator.evaluation import model_comparison as comparison_table
from orchestrator.pipeline import Stage, StageContext, StageOutput, run_pipeline

from .data import DataGenConfig, generate_pairs, length_summary, policy_proposer, validate, write

MODELS = ("base", "shortcut", "journey")


@dataclass
class SFTStageConfig:
    epochs: float = 3.0  # the paper's 3 epochs over the N examples; steps = ceil(epochs * N / batch_size)
    steps: int = 0  # > 0: this many optimizer steps instead of epochs
    batch_size: int = 32
    lr: float = 5.0e-4
    warmup_steps: int = 5
    schedule: str = "cosine"
    num_workers: int = 1  # Ray Train workers (data parallel)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    num_threads: int = 2  # torch threads per worker on CPU (0: Ray's default)
    log_every: int = 10


@dataclass
class JourneyConfig:
    base: str = "configs/quickstart.yaml"  # training config: model, warm start, rollout, eval grid
    overrides: list[str] = field(default_factory=list)  # applied to the base config
    data: DataGenConfig = field(default_factory=DataGenConfig)
    sft: SFTStageConfig = field(default_factory=SFTStageConfig)
    name: str = "journey"


def load(path: str, overrides: list[str] = ()) -> JourneyConfig:
    cfg = merge_structured(JourneyConfig, path, overrides)
    cfg.base = resolve_base_config(cfg.base, path)  # relative to the workload config, else to cwd
    return cfg


def train_config(cfg: JourneyConfig):
    """The base training config with the recipe's overrides, validated, plus checks of the recipe keys."""
    tcfg = load_config(cfg.base, list(cfg.overrides) + [f"trainer.run_name={cfg.name}"])
    try:
        validate(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    s = cfg.sft
    if not (s.epochs > 0 or s.steps > 0):
        raise ConfigError(f"sft.epochs={s.epochs} and sft.steps={s.steps}: one must be positive")
    if s.num_workers < 1 or s.batch_size < s.num_workers:
        raise ConfigError(f"sft.num_workers={s.num_workers}, sft.batch_size={s.batch_size}: need 1 <= workers <= batch")
    if tcfg.data.task != cfg.data.task:
        raise ConfigError(f"data.task={cfg.data.task!r} differs from the base config's data.task={tcfg.data.task!r}")
    return tcfg


def sft_steps(cfg: JourneyConfig) -> int:
    return cfg.sft.steps if cfg.sft.steps > 0 else max(1, math.ceil(cfg.sft.epochs * cfg.data.n / cfg.sft.batch_size))


def sft_examples(table: pa.Table, kind: str, tcfg, eos: str) -> list[tuple[str, str]]:
    from orchestrator.rollout.worker import render_prompt

    rows = table.filter(pa.compute.equal(table["kind"], kind)).select(["prompt", "text"]).to_pylist()
    return [(render_prompt(tcfg.model.prompt_template, r["prompt"]), r["text"] + eos) for r in rows]


def checkpoint_weights(path: str) -> dict:
    """A checkpoint's tensors for an in-place engine update (the tied output embedding sent explicitly)."""
    from orchestrator.checkpoint_files import load_tensors

    state = load_tensors(path)
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def format_table(table: pa.Table, lengths: dict[str, float], n: int) -> str:
    lines = [format_model_comparison(table)]
    lines += ["", f"training trajectories (N = {n} each): mean tokens shortcut "
              f"{lengths.get('shortcut/mean_num_tokens', float('nan')):.1f}, journey "
              f"{lengths.get('journey/mean_num_tokens', float('nan')):.1f}; mean steps "
              f"{lengths.get('shortcut/mean_num_steps', float('nan')):.2f} vs "
              f"{lengths.get('journey/mean_num_steps', float('nan')):.2f}; wrong steps per journey "
              f"{lengths.get('journey/mean_num_wrong', float('nan')):.2f}"]
    return "\n".join(lines)


def _base_stage(tcfg, log):
    """(a) the start checkpoint: the base config's model, warm-started (reused when its inputs are unchanged)."""

    def fn(ctx: StageContext) -> StageOutput:
        from orchestrator.warmstart import prepare_start_checkpoint

        with ctx.start_run(tags={tracking.TAG_SOURCE_CHECKPOINT: tcfg.model.path}) as child:
            base, ws = prepare_start_checkpoint(tcfg, log=log)
            child.log_params({"checkpoint": base, "warmstart.steps": tcfg.warmstart.steps})
        return StageOutput(run_id=child.run_id, checkpoint=base, metrics={f"warmstart/{k}": v for k, v in ws.items()})

    return fn


def _data_stage(cfg: JourneyConfig, tcfg, out_dir, log):
    """(b) step-level trees -> N shortcut/journey pairs, written as Parquet and logged as an artifact."""

    def fn(ctx: StageContext) -> StageOutput:
        from transformers import AutoTokenizer

        base = ctx.inputs["base"].checkpoint
        with ctx.start_run() as child:
            proposer = (policy_proposer(cfg.data, base, tcfg.model.prompt_template, tcfg.model.max_model_len)
                        if cfg.data.proposer == "policy" else None)
            pairs = generate_pairs(cfg.data, tokenizer=AutoTokenizer.from_pretrained(base), proposer=proposer,
                                   think_end=tcfg.model.think_end)
            path = write(pairs, out_dir / "data" / "pairs.parquet")
            digest = tracking.dataset_digest(pairs)
            lengths = length_summary(pairs)
            child.log_artifact(path, "data")
        log(f"journey: {cfg.data.n} pairs -> {path} (digest {digest}); " +
            ", ".join(f"{k} {v:.2f}" for k, v in lengths.items()))
        return StageOutput(run_id=child.run_id, dataset_digest=digest, metrics=lengths,
                           outputs={"path": str(path), "lengths": lengths})

    return fn


def _sft_stage(cfg: JourneyConfig, tcfg, kind: str, out_dir, log):
    """(c) SFT on Ray Train on the N ``kind`` trajectories; both kinds: same base, N, steps, batch, lr. Rank 0's
    curve comes back to this driver, which logs it."""

    def fn(ctx: StageContext) -> StageOutput:
        import pyarrow.parquet as pq
        from transformers import AutoTokenizer

        from orchestrator.learner.sft_ray import sft_train_ray

        base, s, steps = ctx.inputs["base"].checkpoint, cfg.sft, sft_steps(cfg)
        pairs = pq.read_table(ctx.inputs["data"].outputs["path"])
        examples = sft_examples(pairs, kind, tcfg, AutoTokenizer.from_pretrained(base).eos_token)
        subset = pairs.filter(pa.compute.equal(pairs["kind"], kind))
        with ctx.start_run(params={"kind": kind, "examples": len(examples), "steps": steps, "batch_size": s.batch_size,
                                   "lr": s.lr, "num_workers": s.num_workers, "source_checkpoint": base}) as child:
            log(f"journey: SFT on {len(examples)} {kind}s for {steps} steps (Ray Train, {s.num_workers} worker(s))")
            ckpt = str(out_dir / "checkpoints" / f"sft_{kind}")
            metrics = sft_train_ray(base, ckpt, examples, steps=steps, batch_size=s.batch_size, lr=s.lr,
                                    warmup_steps=s.warmup_steps, schedule=s.schedule, seed=tcfg.trainer.seed,
                                    log_every=s.log_every, num_workers=s.num_workers, use_gpu=s.use_gpu,
                                    cpus_per_worker=s.cpus_per_worker, num_threads=s.num_threads or None,
                                    storage_path=out_dir / "ray_train", name=f"sft_{kind}", tracker=child)
            child.log_metrics({f"sft/final_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                              step=steps)
        return StageOutput(run_id=child.run_id, checkpoint=ckpt, dataset_digest=tracking.dataset_digest(subset))

    return fn


def _eval_stage(tcfg, out_dir, log):
    """(d) base, shortcut-SFT and journey-SFT over the budget grid: one engine, weights swapped between models."""

    def fn(ctx: StageContext) -> StageOutput:
        import ray

        from orchestrator.evaluation import evaluate_checkpoint, format_summary
        from orchestrator.prompts import load_prompt_tables
        from orchestrator.rewards import RewardPool
        from orchestrator.runtime import WorkerGroup

        ckpts = {"base": ctx.inputs["base"].checkpoint, **{k: ctx.inputs[f"sft_{k}"].checkpoint for k in MODELS[1:]}}
        with ctx.start_run(tags={tracking.TAG_SOURCE_CHECKPOINT: ckpts["base"]}) as child:
            _, prompts, verifier = load_prompt_tables(tcfg)
            group = WorkerGroup(tcfg, ckpts["base"], learner=False)
            pool_cm = RewardPool(tcfg.reward.num_workers) if tcfg.reward.num_workers > 0 else contextlib.nullcontext()
            summaries = {}
            try:
                with pool_cm as pool:
                    for version, model in enumerate(MODELS):
                        if model != "base":
                            state = checkpoint_weights(ckpts[model])
                            ray.get([w.update_weights.remote(state, version) for w in group.rollout])
                        result = evaluate_checkpoint(tcfg, ckpts[model], group=group, pool=pool, prompts=prompts,
                                                     reward=tcfg.reward.for_verifier(verifier), tracker=child,
                                                     out_dir=out_dir, tag=model, prefix=f"eval/{model}")
                        summaries[model] = result.rows
                        log(f"journey: eval of {model}\n" + format_summary(result.summary))
            finally:
                group.shutdown()
        return StageOutput(run_id=child.run_id, dataset_digest=tracking.dataset_digest(prompts),
                           outputs={"summaries": summaries})

    return fn


def _stages(cfg: JourneyConfig, tcfg, out_dir, log) -> list[Stage]:
    conf = {"train": to_dict(tcfg), "data": vars(cfg.data), "sft": vars(cfg.sft)}
    return [Stage("base", _base_stage(tcfg, log), (), {"train": conf["train"]}),
            Stage("data", _data_stage(cfg, tcfg, out_dir, log), ("base",), {**conf, "sft": None}),
            *[Stage(f"sft_{kind}", _sft_stage(cfg, tcfg, kind, out_dir, log), ("base", "data"), conf)
              for kind in ("shortcut", "journey")],
            Stage("eval", _eval_stage(tcfg, out_dir, log), ("base", "sft_shortcut", "sft_journey"), conf)]


def _log_comparison(parent, cfg: JourneyConfig, summaries: dict, lengths: dict, out_dir) -> tuple[pa.Table, str]:
    """(e) the comparison on the parent: table, trajectory lengths, plot, markdown."""
    import matplotlib.pyplot as plt

    table = comparison_table(summaries)
    parent.log_table(table, "journey/comparison.parquet")
    lengths_table = pa.Table.from_pylist([
        {"kind": k, "n": int(lengths[f"{k}/n"]), "mean_num_tokens": lengths[f"{k}/mean_num_tokens"],
         "mean_num_steps": lengths[f"{k}/mean_num_steps"], "mean_num_wrong": lengths[f"{k}/mean_num_wrong"]}
        for k in ("shortcut", "journey")])
    parent.log_table(lengths_table, "journey/trajectory_lengths.parquet")
    fig = frontier.plot_frontier(table.to_pandas().rename(columns={"budget": "label"}), x="mean_tokens",
                                 y="accuracy", label="label", group="model",
                                 title=f"accuracy vs tokens: base, shortcut-SFT, journey-SFT (N={cfg.data.n})")
    parent.log_figure(fig, "journey/comparison.png")
    plt.close(fig)
    text = format_table(table, lengths, cfg.data.n)
    md = out_dir / "comparison.md"
    md.write_text(text + "\n")
    parent.log_artifact(md, "journey")
    return table, text


def run(cfg: JourneyConfig, log=print) -> dict:
    """All stages under one parent run (``pipeline.run_pipeline``); returns the table, lengths, checkpoints and
    run ids."""
    from orchestrator.resume import fresh_run_dir
    from orchestrator.runtime import init_ray

    tcfg = train_config(cfg)  # everything validated before MLflow or Ray start
    t_start = time.time()
    _, out_dir = fresh_run_dir(tcfg, "journey", log=log)
    out_dir.mkdir(parents=True, exist_ok=True)
    uri = tracking.resolve_tracking_uri(tcfg.tracking.tracking_uri)
    recipe_params = {"base": cfg.base, "overrides": " ".join(cfg.overrides),
                     **{f"data.{k}": v for k, v in vars(cfg.data).items()},
                     **{f"sft.{k}": v for k, v in vars(cfg.sft).items()}, "sft.resolved_steps": sft_steps(cfg)}
    parent = tracking.Tracker.start(uri, tcfg.tracking.experiment, run_name=cfg.name, params=recipe_params,
                                    tags=tracking.lineage_tags(to_dict(tcfg), workload="journey", stage="pipeline"))
    with parent:
        init_ray(tcfg)
        results = run_pipeline(_stages(cfg, tcfg, out_dir, log), parent=parent, root=out_dir / "stages",
                               workload="journey", log=log)
        lengths = results["data"].outputs["lengths"]
        table, text = _log_comparison(parent, cfg, results["eval"].outputs["summaries"], lengths, out_dir)
        runs = {k: r.run_id for k, r in results.items()}
        ckpts = {"base": results["base"].checkpoint, **{k: results[f"sft_{k}"].checkpoint for k in MODELS[1:]}}
        seconds = {k: r.seconds for k, r in results.items()}
        seconds["total"] = time.time() - t_start
        parent.log_dict({"markdown": text, "runs": runs, "checkpoints": ckpts, "seconds": seconds},
                        "journey/comparison.json")
        parent.log_metrics({**{f"{r['model']}/{r['budget']}/accuracy": r["accuracy"] for r in table.to_pylist()},
                            **{f"lengths/{k}": v for k, v in lengths.items()},
                            **{f"seconds/{k}": v for k, v in seconds.items()}}, step=0)
        log("journey: comparison (greedy unless eval.temperature > 0)\n" + text +
            "\nseconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
        return {"parent_run_id": parent.run_id, "table": table, "lengths": lengths, "runs": runs,
                "checkpoints": ckpts, "seconds": seconds, "data_path": results["data"].outputs["path"],
                "output_dir": str(out_dir)}


def main(config: str, overrides: list[str]) -> int:
    run(load(config, overrides))
    return 0
