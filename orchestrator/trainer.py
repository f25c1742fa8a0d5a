"""The controller: one plain loop in the driver that runs budget-constrained GRPO.

sample prompts -> rollouts (RolloutWorker actors) -> rewards (process pool) -> group advantages
-> learner step (Learner actor) -> weight sync to every engine -> MLflow. Evaluation over the
budget grid runs before training, every ``trainer.eval_every`` steps, and after the last step.
The driver moves Arrow tables and object refs; it never holds the model.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from . import frontier, tracking
from .config import Config, eval_budgets, to_dict, to_yaml
from .data.io import read_prompts, write_rollouts
from .data.tasks import get_task
from .evaluation import evaluate, format_summary, generate
from .learner.losses import group_advantages
from .rewards import RewardPool, RewardSpec
from .rewards.stage import score_rollouts
from .rollout.worker import SamplingSpec
from .runtime import WorkerGroup, init_ray
from .warmstart import prepare_start_checkpoint


@dataclass
class TrainResult:
    run_id: str
    checkpoint: str
    output_dir: str
    eval_before: list[dict] = field(default_factory=list)
    eval_after: list[dict] = field(default_factory=list)
    steps: int = 0


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


def fresh_run_dir(cfg: Config, kind: str, log=print) -> tuple[str, Path]:
    """(run name, output dir) that never overwrites an earlier run's outputs: a taken name gets a suffix."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = cfg.trainer.run_name or f"{kind}-{stamp}"
    out = Path(cfg.trainer.output_dir) / name
    if out.exists() and any(out.iterdir()):
        new = f"{name}-{stamp}"
        n = 1
        while (Path(cfg.trainer.output_dir) / new).exists():
            new, n = f"{name}-{stamp}-{n}", n + 1
        log(f"output dir {out} is taken by an earlier run; this run writes to {Path(cfg.trainer.output_dir) / new}")
        name, out = new, Path(cfg.trainer.output_dir) / new
    return name, out


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


def reward_spec(cfg: Config, verifier: str) -> RewardSpec:
    r = cfg.reward
    return RewardSpec(verifier=verifier, correct_reward=r.correct_reward, wrong_reward=r.wrong_reward,
                      format_weight=r.format_weight, format_fn=r.format_fn, length_penalty=r.length_penalty,
                      timeout_s=r.timeout_s)


def step_metrics(records: pa.Table) -> dict[str, float]:
    correct = np.asarray(records["correct"].to_numpy(zero_copy_only=False), dtype=float)
    think = np.asarray(records["thinking_tokens"].to_numpy(), dtype=float)
    sol = np.asarray(records["solution_tokens"].to_numpy(), dtype=float)
    trunc = np.asarray(records["thinking_truncated"].to_numpy(zero_copy_only=False), dtype=float)
    reward = np.asarray(records["reward"].to_numpy(zero_copy_only=False), dtype=float)
    return {"reward": reward.mean(), "accuracy": correct.mean(), "thinking_tokens": think.mean(),
            "solution_tokens": sol.mean(), "truncation_rate": trunc.mean(),
            "generated_tokens": float(think.sum() + sol.sum())}


def learner_batch(records: pa.Table, cfg: Config) -> tuple[pa.Table, dict]:
    rewards = records["reward"].to_numpy(zero_copy_only=False).astype(np.float32)
    groups = pa.compute.dictionary_encode(records["prompt_id"]).combine_chunks().indices.to_numpy()
    adv = group_advantages(rewards, groups, normalize_std=cfg.algorithm.normalize_std).astype(np.float32)
    batch = records.select(["prompt_token_ids", "response_token_ids", "loss_mask"]).append_column(
        "advantage", pa.array(adv, pa.float32()))
    # Share of groups whose rewards differ: only those carry a learning signal.
    uniq = {}
    for g, r in zip(groups, rewards):
        uniq.setdefault(int(g), set()).add(float(r))
    mixed = float(np.mean([len(v) > 1 for v in uniq.values()])) if uniq else 0.0
    return batch, {"mixed_group_fraction": mixed, "advantage_abs_mean": float(np.abs(adv).mean())}


def _log_eval(tracker, summary: pa.Table, by_diff: pa.Table, records: pa.Table, step: int, tag: str,
              out_dir: Path) -> list[dict]:
    rows = summary.to_pylist()
    metrics = {}
    for row in rows:
        for k in ("accuracy", "mean_tokens", "mean_thinking_tokens", "truncation_rate"):
            metrics[f"eval/{row['budget_label']}/{k}"] = row[k]
    for row in by_diff.to_pylist():
        metrics[f"eval/{row['budget_label']}/accuracy_d{row['difficulty']}"] = row["accuracy"]
    tracker.log_metrics(metrics, step=step)
    path = write_rollouts(records, out_dir / "eval" / f"{tag}.parquet")
    tracker.log_artifacts(str(Path(path).parent), "eval")
    tracker.log_table(summary, f"eval/{tag}_summary.parquet")
    tracker.log_table(by_diff, f"eval/{tag}_by_difficulty.parquet")
    df = summary.to_pandas().rename(columns={"budget_label": "label"})
    fig = frontier.plot_frontier(df, x="mean_tokens", y="accuracy", label="label",
                                 title=f"accuracy vs tokens ({tag}, step {step})")
    tracker.log_figure(fig, f"eval/{tag}_frontier.png")
    return rows


def train(cfg: Config, *, log=print, on_eval: Callable[[int, list[dict]], bool] | None = None) -> TrainResult:
    """Run one training run end to end; returns where its checkpoint and MLflow run are.

    ``on_eval(step, summary_rows)`` is called after every budget-grid evaluation (step 0 included);
    returning True stops training there (a sweep pruning a trial): the checkpoint is still saved.
    """
    run_name, out_dir = fresh_run_dir(cfg, "train", log)
    config_dict = to_dict(cfg)
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    # Fail on an unreachable tracking store before any expensive work starts.
    tags = {**tracking.lineage_tags(config_dict, workload="train", stage="rl"), **cfg.tracking.tags}
    tracker = tracking.Tracker.start(uri, cfg.tracking.experiment, run_name=run_name,
                                     params=tracking.flatten(config_dict), tags=tags,
                                     parent_run_id=cfg.tracking.parent_run_id)
    with tracker:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(to_yaml(cfg))
        tracker.log_artifacts(str(out_dir), "config")
        init_ray(cfg)
        start, ws_metrics = prepare_start_checkpoint(cfg, log=log)
        if ws_metrics:
            tracker.log_metrics({f"warmstart/{k}": v for k, v in ws_metrics.items()}, step=0)
        train_prompts, eval_prompts, verifier = load_prompt_tables(cfg)
        tracker.set_tags({tracking.TAG_SOURCE_CHECKPOINT: start,
                          tracking.TAG_DATASET_DIGEST: tracking.dataset_digest(train_prompts)})
        spec = reward_spec(cfg, verifier)
        budgets = eval_budgets(cfg)
        group = WorkerGroup(cfg, start)
        pool_cm = RewardPool(cfg.reward.num_workers) if cfg.reward.num_workers > 0 else contextlib.nullcontext()
        try:
            with pool_cm as pool:
                result = _loop(cfg, group, pool, spec, budgets, train_prompts, eval_prompts, tracker, out_dir, log,
                               on_eval)
        finally:
            group.shutdown()
        result.run_id = tracker.run_id
        return result


def _run_eval(cfg, group, pool, spec, budgets, prompts, step):
    e = cfg.eval
    return evaluate(group.rollout, prompts, budgets, samples_per_prompt=e.samples_per_prompt,
                    temperature=e.temperature, top_p=e.top_p, reward_spec=spec, pool=pool, step=step,
                    seed=cfg.rollout.seed)


def _loop(cfg, group, pool, spec, budgets, train_prompts, eval_prompts, tracker, out_dir, log,
          on_eval=None) -> TrainResult:
    from tqdm import tqdm

    t = cfg.trainer
    result = TrainResult(run_id="", checkpoint="", output_dir=str(out_dir))
    t0 = time.perf_counter()
    records, summary, by_diff = _run_eval(cfg, group, pool, spec, budgets, eval_prompts, 0)
    result.eval_before = _log_eval(tracker, summary, by_diff, records, 0, "step_0000", out_dir)
    log(f"eval before training ({time.perf_counter() - t0:.1f}s):\n{format_summary(summary)}")
    stop = bool(on_eval and on_eval(0, result.eval_before))
    last_eval = (0, result.eval_before, summary) if stop else None

    sampler = PromptSampler(train_prompts, t.prompts_per_step, t.seed)
    sampling = SamplingSpec(group_size=cfg.rollout.group_size, budget_thinking=cfg.budget.thinking,
                            budget_solution=cfg.budget.solution, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, seed=cfg.rollout.seed,
                            train_forced_think_end=cfg.budget.train_forced_think_end)
    totals = {"generated_tokens": 0.0, "reward_errors": 0.0, "reward_timeouts": 0.0}
    bar = tqdm(range(1, t.steps + 1), desc="train", unit="step", dynamic_ncols=True, disable=stop)
    for step in bar:
        if stop:
            break
        ts = time.perf_counter()
        prompts = sampler.next()
        records = generate(group.rollout, prompts, sampling, step)
        tg = time.perf_counter()
        records, rstats = score_rollouts(records, spec, pool)
        tr = time.perf_counter()
        batch, bstats = learner_batch(records, cfg)
        lmetrics = group.learner.step(batch)
        tl = time.perf_counter()
        weights = group.learner.get_weights()
        version = step
        ray.get([w.update_weights.remote(weights, version) for w in group.rollout])
        tsync = time.perf_counter()
        m = step_metrics(records)
        totals["generated_tokens"] += m["generated_tokens"]
        totals["reward_errors"] += rstats["reward_errors"]
        totals["reward_timeouts"] += rstats["reward_timeouts"]
        metrics = {f"train/{k}": v for k, v in m.items()}
        metrics.update({f"train/{k}": v for k, v in bstats.items()})
        metrics.update({f"learner/{k}": float(v) for k, v in lmetrics.items() if isinstance(v, (int, float))})
        metrics.update({"time/generate": tg - ts, "time/reward": tr - tg, "time/learn": tl - tr,
                        "time/sync": tsync - tl, "time/step": tsync - ts,
                        "train/reward_errors": rstats["reward_errors"],
                        "train/reward_timeouts": rstats["reward_timeouts"],
                        "cost/generated_tokens_total": totals["generated_tokens"],
                        "cost/wall_seconds": time.perf_counter() - t0})
        tracker.log_metrics(metrics, step=step)
        bar.set_postfix(reward=f"{m['reward']:.2f}", acc=f"{m['accuracy']:.2f}", think=f"{m['thinking_tokens']:.1f}",
                        trunc=f"{m['truncation_rate']:.2f}")
        if t.log_samples_every and (step % t.log_samples_every == 0 or step == 1):
            write_rollouts(records, out_dir / "rollouts" / f"step_{step:05d}.parquet")
        if t.eval_every and step % t.eval_every == 0 and step != t.steps:
            records_e, summary, by_diff = _run_eval(cfg, group, pool, spec, budgets, eval_prompts, step)
            rows = _log_eval(tracker, summary, by_diff, records_e, step, f"step_{step:04d}", out_dir)
            if on_eval and on_eval(step, rows):
                stop, last_eval = True, (step, rows, summary)
                tracker.set_tags({"budgetrl.stopped_at_step": str(step)})
                log(f"stopping at step {step}: the caller's on_eval asked to stop")
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step != t.steps:
            group.learner.save(str(out_dir / f"checkpoint-{step:05d}"))
    bar.close()
    if last_eval is not None:  # stopped early right after an eval: that eval is the final one
        result.steps, result.eval_after, summary = last_eval
    else:
        result.steps = t.steps
        records_e, summary, by_diff = _run_eval(cfg, group, pool, spec, budgets, eval_prompts, t.steps)
        result.eval_after = _log_eval(tracker, summary, by_diff, records_e, t.steps, f"step_{t.steps:04d}", out_dir)
        if on_eval:
            on_eval(t.steps, result.eval_after)
    log(f"eval after {result.steps} steps:\n{format_summary(summary)}")
    ckpt = group.learner.save(str(out_dir / "checkpoint"))
    result.checkpoint = ckpt
    tracker.set_tags({"budgetrl.checkpoint": ckpt})
    if (out_dir / "rollouts").is_dir():
        tracker.log_artifacts(str(out_dir / "rollouts"), "rollouts")
    tracker.log_artifacts(ckpt, "checkpoint")
    tracker.log_dict({"before": result.eval_before, "after": result.eval_after}, "eval/summary.json")
    tracker.log_metrics({"cost/wall_seconds": time.perf_counter() - t0}, step=result.steps)
    (out_dir / "result.json").write_text(json.dumps(
        {"checkpoint": ckpt, "eval_before": result.eval_before, "eval_after": result.eval_after}, indent=1))
    result.checkpoint = ckpt
    return result
