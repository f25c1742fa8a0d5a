"""The controller: one plain loop in the driver that runs budget-constrained GRPO.

A step is six named calls: sample (prompts.py) -> generate (the rollout worker group) -> reward ->
advantage -> learn (the learner group) -> sync the weights to every engine and log. Prefetching the
next rollout (``_prefetch``), retries after a lost actor (``_on_rollouts``), the timers (``step_stats.StepTimer``)
and the deferred durable state (``resume.DeferredState``) are small helpers beside the loop. The budget
grid (``evaluation.evaluate_checkpoint``) runs before training, every ``trainer.eval_every`` steps and
after the last. The driver moves Arrow tables and object refs; it never holds the model.

Reliability: every ``trainer.state_every`` steps the run saves a resumable state (orchestrator/resume.py);
a re-run of the same run name continues from it in the same MLflow run. A step's metrics reach MLflow
once a state covering that step is saved, so no step is ever shown twice. A rollout worker that dies
is replaced (current weights pushed) and the step retried; a learner that dies is rebuilt from the
last state and the run continues from there, up to ``trainer.max_restarts`` times.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray
from tqdm import tqdm

from . import algorithms, logged_model, resume, system_metrics, tracking
from .budget_schedule import budget_metrics, build_schedule
from .config import Budget, Config, ConfigError, eval_budgets, to_dict, to_yaml
from .cost import run_cost
from .dataset_inputs import log_prompt_sets
from .curriculum import Curriculum, CurriculumContext
from .data.io import write_rollouts
from .evaluation import eval_metrics, evaluate_checkpoint, format_summary, log_eval
from .prompts import PromptSampler, fit_prompts, load_prompt_tables
from .rewards import RewardPool
from .rewards.stage import score_rollouts
from .step_stats import StepTimer, generated_tokens, step_metrics
from .rollout.worker import SamplingSpec, engine_seconds
from .runtime import ACTOR_LOST, NodeUnavailable, WorkerGroup, describe_placement, init_ray
from .warmstart import prepare_start_checkpoint
from .weight_syncer import WeightSyncer


@dataclass
class TrainResult:
    run_id: str
    checkpoint: str
    output_dir: str
    eval_before: list[dict] = field(default_factory=list)
    eval_after: list[dict] = field(default_factory=list)
    steps: int = 0
    resumed_from: int | None = None  # the step a resumed run continued from
    restarts: int = 0  # actors replaced after crashes


def learner_batch(records: pa.Table, cfg: Config, learner=None) -> tuple[pa.Table, dict]:
    """The advantage step (orchestrator/algorithms/batch.py); ``learner`` gives the KL reward penalty."""
    return algorithms.learner_batch(records, cfg.algorithm, learner.sequence_kl if learner is not None else None)


def train(cfg: Config, *, log=print, on_eval: Callable[[int, list[dict]], bool] | None = None,
          curriculum: Curriculum | None = None) -> TrainResult:
    """Run one training run end to end (or continue a killed one); returns its checkpoint and MLflow run.

    ``on_eval(step, summary_rows)`` is called after every budget-grid evaluation (step 0 included);
    returning True stops training there (a sweep pruning a trial): the checkpoint is still saved.
    ``curriculum`` (orchestrator/curriculum.py) selects and rewrites each step's prompts.
    """
    from .warmstart import ensure_base_model

    if curriculum is not None and cfg.trainer.off_policy_steps:
        raise ConfigError(f"trainer.off_policy_steps={cfg.trainer.off_policy_steps}: a curriculum selects each "
                          "step's prompts from the previous step's results; use 0 with a curriculum")
    run_name, out_dir, state_path = resume.plan_run(cfg, log)
    # Data that cannot be used fails here, before MLflow or Ray: unreadable files, overlong prompts.
    try:
        train_prompts, eval_prompts, verifier = load_prompt_tables(cfg)
    except (OSError, ValueError) as exc:
        key = "data.path" if cfg.data.path is not None else "data.task"
        raise ConfigError(f"{key}: {exc}") from exc
    train_prompts, eval_prompts, overlong = fit_prompts(cfg, ensure_base_model(cfg), train_prompts, eval_prompts, log)
    config_dict = to_dict(cfg)
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    state = resume.read_state(state_path) if state_path is not None else None
    # Fail on an unreachable tracking store before any expensive work starts.
    if state is not None:
        tracker = tracking.Tracker.resume(uri, state["run_id"])
        log(f"resuming run {run_name} (MLflow run {state['run_id']}) from step {state['step']} of {state_path}")
    else:
        tags = {**tracking.lineage_tags(config_dict, workload="train", stage="rl"), **cfg.tracking.tags}
        tracker = tracking.Tracker.start(uri, cfg.tracking.experiment, run_name=run_name,
                                         params=tracking.flatten(config_dict), tags=tags,
                                         parent_run_id=cfg.tracking.parent_run_id)
    with tracker:
        out_dir.mkdir(parents=True, exist_ok=True)
        if state is None:
            (out_dir / "config.yaml").write_text(to_yaml(cfg))
            tracker.log_artifacts(str(out_dir), "config")
        init_ray(cfg)
        start, ws_metrics = prepare_start_checkpoint(cfg, log=log)
        if ws_metrics and state is None:
            tracker.log_metrics({f"warmstart/{k}": v for k, v in ws_metrics.items()}, step=0)
        if state is None:
            tracker.set_tags({tracking.TAG_SOURCE_CHECKPOINT: start,
                              tracking.TAG_DATASET_DIGEST: tracking.dataset_digest(train_prompts),
                              "budgetrl.overlong_prompts": json.dumps(overlong)})
            log_prompt_sets(tracker, cfg, train_prompts, eval_prompts)
        spec = cfg.reward.for_verifier(verifier)
        try:
            group = WorkerGroup(cfg, start, name=f"budgetrl-run:{out_dir.resolve()}", shared_dir=str(out_dir))
        except NodeUnavailable as exc:
            raise NodeUnavailable(f"{exc}. The run stopped; {resume.how_to_continue(out_dir)}") from None
        pool_cm = RewardPool(cfg.reward.num_workers) if cfg.reward.num_workers > 0 else contextlib.nullcontext()
        try:
            with pool_cm as pool, system_metrics.sampling(cfg, tracker.run_id, uri, group.placement()):
                run = _Run(cfg, group, pool, spec, eval_budgets(cfg), train_prompts, eval_prompts, tracker, out_dir,
                           log, on_eval, start, curriculum)
                result = run.execute(state_path)
        except NodeUnavailable as exc:
            raise NodeUnavailable(f"{exc}. The run stopped; {resume.how_to_continue(out_dir)}") from None
        finally:
            group.shutdown()
        result.run_id = tracker.run_id
        return result


@dataclass
class _Prefetch:
    """The next step's rollout, started during this step (see ``_Run._prefetch``)."""

    step: int
    prompts: pa.Table
    refs: list  # WorkerGroup.submit's Ray refs
    sampler_before: dict  # the data position before its prompts were drawn (what a state saves)


class _Run:
    """The controller loop's state: step, data position, durable metric buffer, actor restarts."""

    def __init__(self, cfg, group, pool, spec, budgets, train_prompts, eval_prompts, tracker, out_dir, log, on_eval,
                 start_checkpoint, curriculum=None):
        self.cfg, self.group, self.pool, self.spec, self.budgets = cfg, group, pool, spec, budgets
        self.train_prompts, self.eval_prompts = train_prompts, eval_prompts
        self.tracker, self.out_dir, self.log, self.on_eval = tracker, out_dir, log, on_eval
        self.start_checkpoint = start_checkpoint
        self.curriculum = curriculum
        self._curriculum_start = None
        self.buffer = tracking.MetricBuffer()
        self.result = TrainResult(run_id="", checkpoint="", output_dir=str(out_dir))
        self.sampling = SamplingSpec(group_size=cfg.rollout.group_size,
                                     budget=Budget(cfg.budget.thinking, cfg.budget.solution),
                                     temperature=cfg.rollout.temperature,
                                     top_p=cfg.rollout.top_p, seed=cfg.rollout.seed, prompt_hint=cfg.budget.prompt_hint,
                                     train_forced_think_end=cfg.budget.train_forced_think_end)
        self._pending: _Prefetch | None = None  # the next step's rollout, started during this step
        self.deferred = resume.DeferredState()  # taken at the end of a step, written during the next rollout
        self._fresh_position()
        self.placement: dict = {}  # node of every actor (``WorkerGroup.placement``), kept current
        self.syncer = WeightSyncer(cfg, group, log)  # the learner's weights to every engine after a step
        self.elapsed_before = 0.0  # wall seconds of earlier attempts of this run (resume)
        self.t0 = time.perf_counter()

    # ---- state ------------------------------------------------------------------------------------

    def _fresh_position(self) -> None:
        self._pending = None  # a rollout of the old position is not this position's next step
        self.sampler = PromptSampler(self.train_prompts, self.cfg.trainer.prompts_per_step, self.cfg.trainer.seed)
        self.step = 0
        self.schedule = build_schedule(self.cfg.budget, self.cfg.trainer.seed, self.cfg.trainer.off_policy_steps)
        self.totals = {"generated_tokens": 0.0, "reward_errors": 0.0, "reward_timeouts": 0.0}

    def wall(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.t0

    def _payload(self) -> dict:
        # With a rollout already started for the next step, the data position is the one before its
        # prompts were drawn: a resumed run draws and generates them again.
        sampler = self._pending.sampler_before if self._pending is not None else self.sampler.state()
        return {"step": self.step, "run_id": self.tracker.run_id, "sampler": sampler,
                "totals": self.totals, "eval_before": self.result.eval_before, "wall_seconds": self.wall(),
                "restarts": self.result.restarts, "pending_metrics": self.buffer.records,
                "resumed_from": self.result.resumed_from,
                "curriculum": self.curriculum.state() if self.curriculum is not None else None,
                "budget_schedule": self.schedule.state()}

    def commit_state(self) -> None:
        """Write the deferred state, or send the metrics a run without states holds (no-op without either)."""
        self.deferred.commit(self.out_dir, self.group.learner.save_state, lambda: self.buffer.flush(self.tracker))

    def restore(self, state_path: Path | None) -> None:
        """Continue from a saved state (or from the start checkpoint when there is none yet)."""
        self.deferred.drop()  # taken from weights that are being replaced
        if state_path is None:
            self._fresh_position()
            self.buffer = tracking.MetricBuffer()
            self._push_weights()  # the learner was rebuilt from the start checkpoint
            if self.curriculum is not None and self._curriculum_start is not None:
                self.curriculum.restore(self._curriculum_start)
            return
        st = resume.read_state(state_path)
        self._pending = None
        self.group.learner.load_state(str(state_path))
        self.step = int(st["step"])
        self.sampler.restore(st["sampler"])
        self.totals = dict(st["totals"])
        self.result.eval_before = st.get("eval_before") or []
        self.result.restarts = max(self.result.restarts, int(st.get("restarts", 0)))
        self.elapsed_before, self.t0 = float(st.get("wall_seconds", 0.0)), time.perf_counter()
        self.buffer = tracking.MetricBuffer(st.get("pending_metrics"))
        self.buffer.flush(self.tracker)  # idempotent: those records may have gone out before the crash
        if self.curriculum is not None and st.get("curriculum") is not None:
            self.curriculum.restore(st["curriculum"])
        if st.get("budget_schedule"):  # an adapting schedule's state (a fixed one has none)
            self.schedule.restore(st["budget_schedule"])
        self._push_weights()

    # ---- fault handling ---------------------------------------------------------------------------

    def _restarted(self, what: str, exc: BaseException) -> None:
        self.result.restarts += 1
        if self.result.restarts > self.cfg.trainer.max_restarts:
            raise RuntimeError(f"{what} failed again after trainer.max_restarts={self.cfg.trainer.max_restarts} "
                               f"restarts: {exc}") from exc
        self.log(f"step {self.step + 1}: {what} died ({type(exc).__name__}); replacing it "
                 f"(restart {self.result.restarts} of at most {self.cfg.trainer.max_restarts})")

    def _rebuild_learner(self, exc: BaseException) -> None:
        """A learner rank (or its node) died mid-step: rebuild the group and continue from the last state.

        Without states (``trainer.state_every=0``) the steps since the start were already sent to MLflow
        and could not be redone without logging them twice: the run stops instead, saying so."""
        if not self.cfg.trainer.state_every and self.step > 0:
            raise RuntimeError(
                f"a learner rank died at step {self.step + 1} ({type(exc).__name__}) and trainer.state_every=0 keeps "
                f"no state to continue from (steps 1..{self.step} are already logged); set trainer.state_every > 0 "
                "to survive learner failures") from exc
        self._restarted("a learner rank", exc)
        self.group.replace_learner(self.start_checkpoint)
        self._record_placement("learner rebuilt")
        state = resume.latest_state(self.out_dir)
        self.log(f"continuing from {'step ' + str(resume.read_state(state)['step']) if state else 'the start'}")
        self.restore(state)

    def _record_placement(self, why: str) -> None:
        """Which node holds each actor, at the start and after every re-placement: logged, and written to
        ``OUTPUT/RUN/placement.json`` (and result.json, MLflow's ``placement.json`` at the end)."""
        self.placement = self.group.placement()
        self.log(f"placement ({why}): {describe_placement(self.placement)}")
        tmp = self.out_dir / "placement.json.tmp"
        tmp.write_text(json.dumps(self.placement, indent=1))
        tmp.replace(self.out_dir / "placement.json")

    def _push_weights(self) -> None:
        self._on_rollouts(lambda: self.syncer.finish(self.syncer.start(self.step)))

    def _on_rollouts(self, fn: Callable, retry: Callable | None = None):
        """Run ``fn`` over the rollout workers; a worker that died is replaced with the current weights
        and ``retry`` (default ``fn``) runs instead (nothing from the failed try is used)."""
        while True:
            try:
                return fn()
            except ACTOR_LOST as exc:
                dead = self.group.dead_rollouts()
                if not dead:
                    raise  # not a rollout worker (e.g. the learner that produced the weights): the caller handles it
                self._restarted("a rollout worker", exc)
                replaced = self.group.replace_rollouts(dead)
                self._record_placement(f"rollout worker {', '.join(map(str, dead))} replaced")
                self.syncer.finish(self.syncer.start(self.step, slots=replaced))
                fn = retry or fn

    # ---- the loop ---------------------------------------------------------------------------------

    def execute(self, state_path: Path | None) -> TrainResult:
        t = self.cfg.trainer
        stop = False
        self._record_placement("start")
        if state_path is not None:
            self.restore(state_path)
            self.result.resumed_from = self.step
            self.tracker.set_tags({"budgetrl.resumed_from_step": str(self.step)})
        else:
            t0 = time.perf_counter()
            self.result.eval_before, summary = self._eval(0)
            self.buffer.flush(self.tracker)
            self.log(f"eval before training ({time.perf_counter() - t0:.1f}s):\n{format_summary(summary)}")
            stop = bool(self.on_eval and self.on_eval(0, self.result.eval_before))
            if self.curriculum is not None and not stop:
                cmetrics = self.curriculum.setup(CurriculumContext(self._scored_rollout, self.train_prompts, self.log))
                self.buffer.add({f"curriculum/{k}": v for k, v in (cmetrics or {}).items()}
                                | {"cost/generated_tokens_total": self.totals["generated_tokens"]}, 0)
                self.buffer.flush(self.tracker)
        self._curriculum_start = self.curriculum.state() if self.curriculum is not None else None
        last_eval = (0, self.result.eval_before, None) if stop else None
        bar = tqdm(total=t.steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True, disable=stop)
        while not stop and self.step < t.steps and not self._out_of_tokens():
            try:
                stop, last = self._one_step(bar)
            except ACTOR_LOST as exc:
                self._rebuild_learner(exc)
                bar.n = self.step
                bar.refresh()
                continue
            if last is not None:
                last_eval = last
        bar.close()
        return self._finish(last_eval)

    def _one_step(self, bar) -> tuple[bool, tuple | None]:
        """One RL step: sample, generate, reward, advantage, learn, sync and log."""
        step, timer = self.step + 1, StepTimer()
        prompts, refs = self._sample(step)
        self.commit_state()  # the deferred state, written while the rollout generates (before the learner moves on)
        records = self._generate(step, prompts, refs)
        timer.lap("generate")
        engine_s = engine_seconds(records)
        self._prefetch(step, records, sync_sent=False)  # off-policy: the next rollout runs beside the learner
        records, rstats, cur_metrics = self._reward(step, records)
        kept, dstats = self._fill(step, records)  # DAPO dynamic sampling (algorithm.dynamic_sampling)
        timer.lap("reward")
        batch, bstats = learner_batch(kept, self.cfg, self.group.learner)  # advantages
        bstats.update(dstats)
        lmetrics, weights, sent = self._learn(step, batch, records)
        timer.lap("learn")
        self._wait_for_prefetch()
        timer.lap("generate")
        self._sync(step, records, weights, sent)
        timer.lap("sync")
        metrics = {**{f"train/{k}": v for k, v in bstats.items()}, **cur_metrics,
                   **{f"learner/{k}": float(v) for k, v in lmetrics.items() if isinstance(v, (int, float))},
                   **timer.metrics(engine_s, float(lmetrics.get("seconds", 0.0)), bool(self.cfg.trainer.off_policy_steps))}
        return self._log_step(step, records, rstats, metrics, bar)

    def _sample(self, step: int) -> tuple[pa.Table, list | None]:
        """This step's prompts, and the refs of their rollout when it already started: prefetched during
        the previous step, or started now when a deferred state is to be written meanwhile."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.step == step:
            return pending.prompts, pending.refs
        prompts = self._draw(step)
        return prompts, (self.group.submit(prompts, self.sampling, step) if self.deferred.waiting else None)

    def _draw(self, step: int) -> pa.Table:
        """This step's prompts: the sampler's batch, through the curriculum (refilled when it drops rows),
        each with its budget from the budget schedule (orchestrator/budget_schedule.py)."""
        prompts = self.sampler.next()
        if self.curriculum is not None:
            want, parts, n = prompts.num_rows, [], 0
            for _ in range(8):  # a curriculum that drops nearly everything must not stall the run
                parts.append(self.curriculum.select(prompts, step))
                n += parts[-1].num_rows
                if n >= want:
                    break
                prompts = self.sampler.next()
            chosen = pa.concat_tables(parts, promote_options="default")
            prompts = chosen.slice(0, want) if chosen.num_rows else prompts
        return self.schedule.assign(prompts, step)

    def _generate(self, step: int, prompts: pa.Table, refs: list | None) -> pa.Table:
        """This step's records: gathered from ``refs`` (a rollout already started) on the first try, else
        generated now; generated again after a lost rollout worker is replaced."""
        def again() -> pa.Table:
            return self.group.generate(prompts, self.sampling, step)

        def first() -> pa.Table:
            if refs:
                try:
                    return self.group.gather(refs)
                except ACTOR_LOST:
                    if self.group.dead_rollouts():
                        raise  # _on_rollouts replaces the worker, then ``again`` regenerates
            return again()

        return self._on_rollouts(first, retry=again)

    def _prefetch(self, step: int, records: pa.Table, *, sync_sent: bool) -> None:
        """Start step ``step + 1``'s rollout now, on whatever weights each worker holds when it runs.

        Off-policy (``trainer.off_policy_steps=1``) it starts right after this step's rollout
        (``sync_sent=False``), so it runs beside the learner's update on the workers' current weights,
        one update behind. Synchronous, it starts right after the weight sync is sent (``sync_sent=True``):
        each worker runs it after the sync (an actor runs one caller's calls in order), so it is on-policy
        as before, and the driver's work between the steps (the sync's acknowledgement, metrics, samples,
        the next draw and submit) runs beside the engine instead of before it (docs/performance.md, section 4)."""
        t = self.cfg.trainer
        if sync_sent == bool(t.off_policy_steps) or step >= t.steps:
            return
        if t.max_generated_tokens and self.totals["generated_tokens"] + generated_tokens(records) >= t.max_generated_tokens:
            return  # this step ends the run: no rollout for a step that will not come
        before = self.sampler.state()
        prompts = self._draw(step + 1)
        self._pending = _Prefetch(step + 1, prompts, self.group.submit(prompts, self.sampling, step + 1), before)

    def _wait_for_prefetch(self) -> None:
        """Off-policy: wait for the next step's rollout (the time it keeps the new weights waiting)."""
        if self._pending is not None and self.cfg.trainer.off_policy_steps:
            ray.wait(self._pending.refs, num_returns=len(self._pending.refs))

    def _reward(self, step: int, records: pa.Table) -> tuple[pa.Table, dict, dict]:
        """Scored records, reward error counts, and the curriculum's, budget schedule's and per-budget metrics
        (they observe the scores before the next step's prompts are drawn; synchronous: once the sync is sent)."""
        records, rstats = score_rollouts(records, self.spec, self.pool)
        cur = (self.curriculum.observe(records, step) or {}) if self.curriculum is not None else {}
        return records, rstats, {**{f"curriculum/{k}": v for k, v in cur.items()},
                                 **{f"schedule/{k}": v for k, v in self.schedule.observe(records, step).items()},
                                 **{f"budget/{k}": v for k, v in budget_metrics(records).items()}}

    def _fill(self, step: int, records: pa.Table) -> tuple[pa.Table, dict]:
        """The groups to learn from: with dynamic sampling, flat groups dropped and refilled from more
        prompts (scored, their tokens counted); otherwise ``records`` as they are."""
        more = lambda: self._scored_rollout(self._draw(step), self.cfg.rollout.group_size)  # noqa: E731
        return algorithms.fill_batch(records, more, self.cfg.algorithm)

    def _learn(self, step: int, batch: pa.Table, records: pa.Table) -> tuple[dict, object, object]:
        """The learner's update: (its metrics, the exported weights ref, the weight sync already sent or None).

        The object-store sync is sent with the step: each worker loads the new weights as soon as the
        learner exports them, and after any rollout already queued on it (an actor runs one caller's
        calls in order when tasks are not retried, as here), so an off-policy rollout keeps its weights
        and a synchronous run's next rollout, queued after the sync, gets the new ones. A collective
        sync starts once learner and workers are free (``_sync``), the next rollout queued behind it."""
        metric_refs, weights = self.group.learner.submit_step(batch, export=self.syncer.with_step)
        sent = None
        if self.syncer.with_step:
            sent = self.syncer.start(step, weights)
            self._prefetch(step, records, sync_sent=True)
        return self.group.learner.step_result(metric_refs), weights, sent

    def _sync(self, step: int, records: pa.Table, weights, sent) -> None:
        """Every engine holds the new weights when this returns (a replaced worker gets them again)."""
        if not self.syncer.with_step:
            sent = self._on_rollouts(lambda: self.syncer.start(step))
            self._prefetch(step, records, sync_sent=True)
        self._on_rollouts(lambda: self.syncer.finish(sent), retry=lambda: self.syncer.finish(self.syncer.start(step, weights)))

    def _log_step(self, step: int, records: pa.Table, rstats: dict, extra: dict, bar) -> tuple[bool, tuple | None]:
        """The step is done: its metrics to the durable buffer, samples, then eval, checkpoint and state
        as the cadences ask. Returns (stop, the last eval when the caller's ``on_eval`` stopped the run)."""
        t = self.cfg.trainer
        self.step = step
        m = step_metrics(records)
        self.totals["generated_tokens"] += m["generated_tokens"]
        self.totals["reward_errors"] += rstats["reward_errors"]
        self.totals["reward_timeouts"] += rstats["reward_timeouts"]
        metrics = {f"train/{k}": v for k, v in m.items()}
        # Updates between sampling and learning policy (0 synchronous; 1: off_policy_steps=1 after step 1).
        metrics["train/policy_lag"] = (step - 1) - float(np.mean(records["policy_version"].to_numpy()))
        metrics.update(extra)
        metrics.update({"train/reward_errors": rstats["reward_errors"], "train/reward_timeouts": rstats["reward_timeouts"],
                        "cost/generated_tokens_total": self.totals["generated_tokens"], "cost/wall_seconds": self.wall()})
        self.buffer.add(metrics, step)
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward']:.2f}", acc=f"{m['accuracy']:.2f}", think=f"{m['thinking_tokens']:.1f}",
                        trunc=f"{m['truncation_rate']:.2f}")
        if t.log_samples_every and (step % t.log_samples_every == 0 or step == 1):
            write_rollouts(records, self.out_dir / "rollouts" / f"step_{step:05d}.parquet")
        stop, last = False, None
        final = step == t.steps or self._out_of_tokens()  # the final eval and checkpoint come in _finish
        if t.eval_every and step % t.eval_every == 0 and not final:
            rows, summary = self._eval(step)
            if self.on_eval and self.on_eval(step, rows):
                stop, last = True, (step, rows, summary)
                self.tracker.set_tags({"budgetrl.stopped_at_step": str(step)})
                self.log(f"stopping at step {step}: the caller's on_eval asked to stop")
        if t.checkpoint_every and step % t.checkpoint_every == 0 and not final:
            path = self.group.learner.save(str(self.out_dir / f"checkpoint-{step:05d}"))
            logged_model.record_periodic(self.tracker, path, step, self.buffer, self.log)
        if t.state_every and step % t.state_every == 0 and not final and not stop:
            self.deferred.take(self._payload())  # written at the start of the next step (resume.DeferredState)
        elif not t.state_every:
            self.deferred.metrics_only()  # nothing to resume from: metrics go out as they come (next step)
        return stop, last

    def _eval(self, step: int) -> tuple[list[dict], pa.Table]:
        """The budget grid on the run's own workers (retried after a lost worker), logged as ``step_NNNN``."""
        result = self._on_rollouts(lambda: evaluate_checkpoint(
            self.cfg, group=self.group, pool=self.pool, prompts=self.eval_prompts, budgets=self.budgets,
            reward=self.spec, step=step))
        rows = log_eval(self.tracker, result, step, f"step_{step:04d}", self.out_dir, log_metrics=self.buffer.add,
                        tolerate_store_errors=True)
        return rows, result.summary

    def _out_of_tokens(self) -> bool:
        limit = self.cfg.trainer.max_generated_tokens
        return bool(limit) and self.totals["generated_tokens"] >= limit

    def _scored_rollout(self, prompts: pa.Table, group_size: int) -> pa.Table:
        """Training-budget rollouts, scored, outside the learning loop (a curriculum's preview)."""
        spec = replace(self.sampling, group_size=group_size)
        records = self._on_rollouts(lambda: self.group.generate(prompts, spec, self.step))
        records, _ = score_rollouts(records, self.spec, self.pool)
        self.totals["generated_tokens"] += step_metrics(records)["generated_tokens"]
        return records

    def _finish(self, last_eval) -> TrainResult:
        cfg, t, result = self.cfg, self.cfg.trainer, self.result
        self.commit_state()  # what the last step left deferred (with state_every=0: its metrics)
        if last_eval is not None:  # stopped early right after an eval: that eval is the final one
            result.steps, result.eval_after, summary = last_eval
            if summary is None:  # stopped at step 0
                result.eval_after = result.eval_before
        else:
            result.steps = self.step
            if self._out_of_tokens() and self.step < t.steps:
                self.log(f"stopping at step {self.step}: trainer.max_generated_tokens={t.max_generated_tokens} reached")
                self.tracker.set_tags({"budgetrl.stopped_at_step": str(self.step)})
            result.eval_after, summary = self._eval(self.step)
            if self.on_eval:
                self.on_eval(self.step, result.eval_after)
        if summary is not None:
            self.log(f"eval after {result.steps} steps:\n{format_summary(summary)}")
        ckpt = self.group.learner.save(str(self.out_dir / "checkpoint"))  # the weights are safe before MLflow I/O
        result.checkpoint = ckpt
        costs = run_cost(cfg, self.wall(), cfg.cost)
        self.buffer.add({**costs, "cost/wall_seconds": self.wall()}, result.steps)
        self._worker_stats(result.steps)
        for wait in (0, 5, 15, 30):  # a store that blinks at the very end gets a few chances
            time.sleep(wait)
            if self.buffer.flush(self.tracker):
                break
        else:
            dump = self.out_dir / "unflushed_metrics.json"
            dump.write_text(json.dumps({"run_id": self.tracker.run_id, "tracking_uri": self.tracker.tracking_uri,
                                        "columns": ["key", "value", "timestamp_ms", "step"],
                                        "metrics": self.buffer.records}))
            self._write_result(ckpt)
            raise tracking.TrackingError(
                f"tracking store {self.tracker.tracking_uri} is unreachable at the end of the run: the checkpoint "
                f"is saved at {ckpt}; {len(self.buffer)} metric values of run {self.tracker.run_id} are kept in {dump}")
        self.tracker.set_tags({"budgetrl.checkpoint": ckpt, "budgetrl.cost_currency": cfg.cost.currency,
                               "budgetrl.restarts": str(result.restarts)})
        self.tracker.log_artifacts(str(self.out_dir / "eval"), "eval")  # idempotent; fills uploads that failed
        if (self.out_dir / "rollouts").is_dir():
            self.tracker.log_artifacts(str(self.out_dir / "rollouts"), "rollouts")
        logged_model.record_final(self.tracker, ckpt, result.steps, eval_metrics(result.eval_after or []), self.log)
        self.tracker.log_dict({"before": result.eval_before, "after": result.eval_after}, "eval/summary.json")
        self.tracker.log_dict(self.placement, "placement.json")
        self._write_result(ckpt)
        return result

    def _worker_stats(self, step: int) -> None:
        """Each rollout worker's counters, and how the last weights reached the engines (object_store,
        collective) and were loaded (vLLM on CPU: inplace) as run tags."""
        stats = self._on_rollouts(lambda: ray.get([w.stats.remote() for w in self.group.rollout]))
        self.buffer.add({f"rollout/worker_{s['worker_index']}/{k}": v for s in stats for k, v in s.items()
                         if k != "worker_index" and isinstance(v, (int, float))}, step)
        tags = {f"budgetrl.rollout.{tag}": ",".join(sorted({s[k] for s in stats if s.get(k)}))
                for tag, k in (("weight_load", "last_reload"), ("weight_sync", "last_sync"))}
        try:
            if tags := {k: v for k, v in tags.items() if v}:
                self.tracker.set_tags(tags)
        except Exception as exc:  # noqa: BLE001 - a tag is not worth failing a finished run over
            self.log(f"could not tag the weight-load path ({type(exc).__name__}: {exc})")

    def _write_result(self, ckpt: str) -> None:
        """``result.json`` marks the run finished (a re-run of its name starts a new run); the state goes."""
        r = self.result
        (self.out_dir / resume.RESULT).write_text(json.dumps(
            {"checkpoint": ckpt, "run_id": self.tracker.run_id, "steps": r.steps, "resumed_from": r.resumed_from,
             "restarts": r.restarts, "eval_before": r.eval_before, "eval_after": r.eval_after,
             "placement": self.placement}, indent=1))
        resume.remove_state(self.out_dir)
