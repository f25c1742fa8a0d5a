"""The controller: one plain loop in the driver that runs budget-constrained GRPO.

sample prompts -> rollouts (RolloutWorker actors) -> rewards (process pool) -> group advantages
-> learner step (Learner ranks) -> weight sync to every engine -> MLflow. Evaluation over the
budget grid runs before training, every ``trainer.eval_every`` steps, and after the last step.
The driver moves Arrow tables and object refs; it never holds the model.

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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from . import algorithms, frontier, resume, tracking
from .config import Budget, Config, ConfigError, eval_budgets, to_dict, to_yaml
from .cost import run_cost
from .curriculum import Curriculum, CurriculumContext
from .data.io import read_prompts, write_rollouts
from .data.tasks import get_task
from .evaluation import evaluate, format_summary, gather, generate, submit
from .rewards import RewardPool
from .rewards.stage import score_rollouts
from .rollout.worker import SamplingSpec, engine_seconds
from .resume import fresh_run_dir  # noqa: F401  (re-exported: evaluation and workloads name runs with it)
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


def fit_prompts(cfg: Config, model_path: str, train: pa.Table, evals: pa.Table, log=print
                ) -> tuple[pa.Table, pa.Table, dict]:
    """Apply ``data.overlong_prompts`` to prompts that cannot fit the context window with their budget.

    Checked with the model's tokenizer before any actor starts: ``error`` names the longest prompt,
    ``drop`` removes them, ``truncate_left`` leaves them for the rollout workers to cut."""
    from transformers import AutoTokenizer

    from .rollout.worker import render_prompt

    tok = AutoTokenizer.from_pretrained(model_path)
    m, mode = cfg.model, cfg.data.overlong_prompts
    train_budget = cfg.budget.thinking + cfg.budget.solution
    eval_budget = max(b.thinking + b.solution for b in eval_budgets(cfg))
    counts, out = {}, []
    for name, table, budget in (("train", train, train_budget), ("eval", evals, eval_budget)):
        texts = [render_prompt(m.prompt_template, p, tok, m.chat_template) for p in table["prompt"].to_pylist()]
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


def generated_tokens(records: pa.Table) -> float:
    return float(pc.sum(records["thinking_tokens"]).as_py() or 0) + float(pc.sum(records["solution_tokens"]).as_py() or 0)


def step_metrics(records: pa.Table) -> dict[str, float]:
    correct = np.asarray(records["correct"].to_numpy(zero_copy_only=False), dtype=float)
    think = np.asarray(records["thinking_tokens"].to_numpy(), dtype=float)
    sol = np.asarray(records["solution_tokens"].to_numpy(), dtype=float)
    trunc = np.asarray(records["thinking_truncated"].to_numpy(zero_copy_only=False), dtype=float)
    reward = np.asarray(records["reward"].to_numpy(zero_copy_only=False), dtype=float)
    return {"reward": reward.mean(), "accuracy": correct.mean(), "thinking_tokens": think.mean(),
            "solution_tokens": sol.mean(), "truncation_rate": trunc.mean(),
            "generated_tokens": generated_tokens(records)}


def learner_batch(records: pa.Table, cfg: Config, learner=None) -> tuple[pa.Table, dict]:
    """The advantage step (orchestrator/algorithms/batch.py); ``learner`` gives the KL reward penalty."""
    return algorithms.learner_batch(records, cfg.algorithm, learner.sequence_kl if learner is not None else None)


def _log_eval(tracker, summary: pa.Table, by_diff: pa.Table, records: pa.Table, step: int, tag: str,
              out_dir: Path, log_metrics: Callable[[dict, int], None] | None = None,
              tolerate_store_errors: bool = False) -> list[dict]:
    """Eval metrics (through ``log_metrics`` when given, e.g. a run's durable buffer) and artifacts.

    The artifacts are written under ``out_dir/eval`` first and then logged; with
    ``tolerate_store_errors`` an upload that fails only warns (the files stay for a later upload)."""
    import pyarrow.parquet as pq

    rows = summary.to_pylist()
    metrics = {}
    for row in rows:
        for k in ("accuracy", "mean_tokens", "mean_thinking_tokens", "truncation_rate"):
            metrics[f"eval/{row['budget_label']}/{k}"] = row[k]
    for row in by_diff.to_pylist():
        metrics[f"eval/{row['budget_label']}/accuracy_d{row['difficulty']}"] = row["accuracy"]
    (log_metrics or tracker.log_metrics)(metrics, step)
    eval_dir = out_dir / "eval"
    files = [write_rollouts(records, eval_dir / f"{tag}.parquet")]
    for table, name in ((summary, f"{tag}_summary.parquet"), (by_diff, f"{tag}_by_difficulty.parquet")):
        pq.write_table(table, eval_dir / name)
        files.append(str(eval_dir / name))
    df = summary.to_pandas().rename(columns={"budget_label": "label"})
    fig = frontier.plot_frontier(df, x="mean_tokens", y="accuracy", label="label",
                                 title=f"accuracy vs tokens ({tag}, step {step})")
    fig.savefig(eval_dir / f"{tag}_frontier.png", dpi=110, bbox_inches="tight")
    files.append(str(eval_dir / f"{tag}_frontier.png"))
    import matplotlib.pyplot as plt

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
        spec = cfg.reward.for_verifier(verifier)
        try:
            group = WorkerGroup(cfg, start, name=f"budgetrl-run:{out_dir.resolve()}", shared_dir=str(out_dir))
        except NodeUnavailable as exc:
            raise NodeUnavailable(f"{exc}. The run stopped; {resume.how_to_continue(out_dir)}") from None
        pool_cm = RewardPool(cfg.reward.num_workers) if cfg.reward.num_workers > 0 else contextlib.nullcontext()
        try:
            with pool_cm as pool:
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
    """The next step's rollout, started during this step (see ``_Run._start_next``)."""

    step: int
    prompts: pa.Table
    refs: list  # evaluation.submit's Ray refs
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
                                     top_p=cfg.rollout.top_p, seed=cfg.rollout.seed,
                                     train_forced_think_end=cfg.budget.train_forced_think_end)
        self._pending: _Prefetch | None = None  # the next step's rollout, started during this step
        self._deferred_state: dict | None = None  # a state taken at the end of a step, written at the next
        self._deferred_flush = False  # trainer.state_every=0: the step's metrics go out during the next rollout
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
                "curriculum": self.curriculum.state() if self.curriculum is not None else None}

    def save_state(self) -> None:
        """Take the state's contents now; ``commit_state`` writes them (durable state first: it carries
        the pending metrics; then the metrics go to MLflow) at the start of the next step, once that
        step's rollout is generating, so the learner's save and the driver's MLflow flush run beside the
        engine instead of between steps (docs/performance.md, section 4). A crash before the commit
        resumes from the state before, as a crash mid-save does."""
        self._deferred_state = json.loads(json.dumps(self._payload()))  # a snapshot; written as this JSON

    def commit_state(self) -> None:
        """Write a deferred state, or send the metrics a run without states holds (no-op without either)."""
        payload, self._deferred_state = self._deferred_state, None
        flush, self._deferred_flush = self._deferred_flush, False
        if payload is not None:
            resume.write_state(self.out_dir, self.group.learner.save_state, payload)
        if payload is not None or flush:  # the buffer holds the payload's pending metrics: nothing newer yet
            self.buffer.flush(self.tracker)

    def restore(self, state_path: Path | None) -> None:
        """Continue from a saved state (or from the start checkpoint when there is none yet)."""
        self._deferred_state = None  # taken from weights that are being replaced
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

    def _on_rollouts(self, fn: Callable):
        """Run ``fn`` over the rollout workers; a worker that died is replaced with the current weights
        and ``fn`` runs again (the step's prompts are re-generated: nothing from the failed try is used)."""
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
            records, summary, by_diff = self._eval(0)
            self.result.eval_before = _log_eval(self.tracker, summary, by_diff, records, 0, "step_0000",
                                                self.out_dir, self.buffer.add, tolerate_store_errors=True)
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
        from tqdm import tqdm

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

    def _out_of_tokens(self) -> bool:
        limit = self.cfg.trainer.max_generated_tokens
        return bool(limit) and self.totals["generated_tokens"] >= limit

    def _scored_rollout(self, prompts: pa.Table, group_size: int) -> pa.Table:
        """Training-budget rollouts, scored, outside the learning loop (a curriculum's preview)."""
        import dataclasses

        spec = dataclasses.replace(self.sampling, group_size=group_size)
        records = self._on_rollouts(lambda: generate(self.group.rollout, prompts, spec, self.step))
        records, _ = score_rollouts(records, self.spec, self.pool)
        self.totals["generated_tokens"] += step_metrics(records)["generated_tokens"]
        return records

    def _draw(self, step: int) -> pa.Table:
        """This step's prompts: the sampler's batch, through the curriculum (refilled when it drops rows)."""
        prompts = self.sampler.next()
        if self.curriculum is None:
            return prompts
        want, parts, n = prompts.num_rows, [], 0
        for _ in range(8):  # a curriculum that drops nearly everything must not stall the run
            parts.append(self.curriculum.select(prompts, step))
            n += parts[-1].num_rows
            if n >= want:
                break
            prompts = self.sampler.next()
        chosen = pa.concat_tables(parts, promote_options="default")
        return chosen.slice(0, want) if chosen.num_rows else prompts

    def _eval(self, step: int):
        e = self.cfg.eval
        return self._on_rollouts(lambda: evaluate(
            self.group.rollout, self.eval_prompts, self.budgets, samples_per_prompt=e.samples_per_prompt,
            temperature=e.temperature, top_p=e.top_p, reward_spec=self.spec, pool=self.pool, step=step,
            seed=self.cfg.rollout.seed))

    def _records(self, prompts: pa.Table, step: int, refs: list | None) -> pa.Table:
        """This step's records: from ``refs`` (the rollout started during the previous step) on the
        first try, else generated now. Retried by _on_rollouts."""
        if refs:
            try:
                return gather(refs)
            except ACTOR_LOST:
                if self.group.dead_rollouts():
                    raise  # _on_rollouts replaces the worker, then this runs again and regenerates
        return generate(self.group.rollout, prompts, self.sampling, step)

    def _start_next(self, step: int, records: pa.Table) -> None:
        """Start step ``step + 1``'s rollout now, on whatever weights each worker holds when it runs.

        Off-policy (``trainer.off_policy_steps=1``) it is called before the learner's update, so the
        rollout runs beside it on the workers' current weights, one update behind. Synchronous, it is
        called right after the weight sync is sent: each worker runs it after the sync (an actor runs
        one caller's calls in order), so it is on-policy as before, and the driver's work between the
        steps (the sync's acknowledgement, metrics, samples, the next draw and submit) runs beside the
        engine instead of before it (docs/performance.md, section 4)."""
        t = self.cfg.trainer
        if step >= t.steps:
            return
        if t.max_generated_tokens and self.totals["generated_tokens"] + generated_tokens(records) >= t.max_generated_tokens:
            return  # this step ends the run: no rollout for a step that will not come
        before = self.sampler.state()
        prompts = self._draw(step + 1)
        self._pending = _Prefetch(step + 1, prompts, submit(self.group.rollout, prompts, self.sampling, step + 1), before)

    def _one_step(self, bar) -> tuple[bool, tuple | None]:
        cfg, t = self.cfg, self.cfg.trainer
        step = self.step + 1
        ts = time.perf_counter()
        pending, self._pending = self._pending, None
        if pending is not None and pending.step == step:
            prompts, refs = pending.prompts, pending.refs
        else:
            prompts, refs = self._draw(step), None
            if self._deferred_state is not None or self._deferred_flush:  # generate, then write meanwhile
                refs = submit(self.group.rollout, prompts, self.sampling, step)
        self.commit_state()  # before the learner moves past the state's weights
        tries = [refs]  # the started rollout is used on the first try only
        records = self._on_rollouts(lambda: self._records(prompts, step, tries.pop() if tries else None))
        tg = time.perf_counter()
        t_engine = engine_seconds(records)
        if t.off_policy_steps:
            self._start_next(step, records)
        records, rstats = score_rollouts(records, self.spec, self.pool)
        # Observed before the next step's prompts are drawn (synchronous runs draw them below).
        cur_metrics = (self.curriculum.observe(records, step) or {}) if self.curriculum is not None else {}
        # DAPO dynamic sampling (algorithm.dynamic_sampling): drop flat groups, generate more to refill.
        kept, dstats = algorithms.fill_batch(
            records, lambda: self._scored_rollout(self._draw(step), cfg.rollout.group_size), cfg.algorithm)
        tr = time.perf_counter()
        batch, bstats = learner_batch(kept, cfg, self.group.learner)
        bstats.update(dstats)
        metric_refs, weights = self.group.learner.submit_step(batch, export=self.syncer.with_step)
        # The object-store sync is sent with the step: each worker loads the new weights as soon as the
        # learner exports them, and after any rollout already queued on it (an actor runs one caller's
        # calls in order when tasks are not retried, as here), so an off-policy rollout keeps its weights
        # and a synchronous run's next rollout, queued after the sync, gets the new ones. A collective
        # sync starts once learner and workers are free (below), the next rollout queued behind it.
        sent = [self.syncer.start(step, weights)] if self.syncer.with_step else []
        if sent and not t.off_policy_steps:
            self._start_next(step, records)
        lmetrics = self.group.learner.step_result(metric_refs)
        tl = time.perf_counter()
        if self._pending is not None and t.off_policy_steps:  # the time the next rollout keeps the weights waiting
            ray.wait(self._pending.refs, num_returns=len(self._pending.refs))
        tw = time.perf_counter()
        if not self.syncer.with_step:
            sent = [self._on_rollouts(lambda: self.syncer.start(step))]
            if not t.off_policy_steps:
                self._start_next(step, records)
        self._on_rollouts(lambda: self.syncer.finish(sent.pop() if sent else self.syncer.start(step, weights)))
        tsync = time.perf_counter()
        self.step = step
        m = step_metrics(records)
        self.totals["generated_tokens"] += m["generated_tokens"]
        self.totals["reward_errors"] += rstats["reward_errors"]
        self.totals["reward_timeouts"] += rstats["reward_timeouts"]
        metrics = {f"train/{k}": v for k, v in m.items()}
        metrics.update({f"train/{k}": v for k, v in bstats.items()})
        # Updates between the policy that generated the samples and the one that learned from them
        # (0 synchronous; 1 with trainer.off_policy_steps=1 after the first step).
        metrics["train/policy_lag"] = (step - 1) - float(np.mean(records["policy_version"].to_numpy()))
        metrics.update({f"curriculum/{k}": v for k, v in cur_metrics.items()})
        metrics.update({f"learner/{k}": float(v) for k, v in lmetrics.items() if isinstance(v, (int, float))})
        # What the step spends outside the engine's generation and the learner's update: scheduling,
        # serialization, reward, batching, weight sync (issue 9's overhead share).
        # Off-policy, the engine runs while the learner does: only the waits for it count, and the
        # overhead is what is left outside the learner's update and those waits. A synchronous rollout
        # started in the previous step's tail counts only the engine time this step waited for (a
        # rollout started in this step waited at least its engine time: the min is that time).
        waited = (tg - ts) + (tw - tl)
        t_gen = waited if t.off_policy_steps else min(t_engine, waited)
        t_compute = float(lmetrics.get("seconds", 0.0)) + t_gen
        metrics.update({"time/generate": waited, "time/reward": tr - tg, "time/learn": tl - tr,
                        "time/sync": tsync - tw, "time/step": tsync - ts, "time/generate_engine": t_engine,
                        "time/overhead": tsync - ts - t_compute,
                        "time/overhead_share": (tsync - ts - t_compute) / max(tsync - ts, 1e-9),
                        "train/reward_errors": rstats["reward_errors"],
                        "train/reward_timeouts": rstats["reward_timeouts"],
                        "cost/generated_tokens_total": self.totals["generated_tokens"],
                        "cost/wall_seconds": self.wall()})
        self.buffer.add(metrics, step)
        bar.update(1)
        bar.set_postfix(reward=f"{m['reward']:.2f}", acc=f"{m['accuracy']:.2f}", think=f"{m['thinking_tokens']:.1f}",
                        trunc=f"{m['truncation_rate']:.2f}")
        if t.log_samples_every and (step % t.log_samples_every == 0 or step == 1):
            write_rollouts(records, self.out_dir / "rollouts" / f"step_{step:05d}.parquet")
        stop, last = False, None
        final = step == t.steps or self._out_of_tokens()  # the final eval and checkpoint come in _finish
        if t.eval_every and step % t.eval_every == 0 and not final:
            records_e, summary, by_diff = self._eval(step)
            rows = _log_eval(self.tracker, summary, by_diff, records_e, step, f"step_{step:04d}", self.out_dir,
                             self.buffer.add, tolerate_store_errors=True)
            if self.on_eval and self.on_eval(step, rows):
                stop, last = True, (step, rows, summary)
                self.tracker.set_tags({"budgetrl.stopped_at_step": str(step)})
                self.log(f"stopping at step {step}: the caller's on_eval asked to stop")
        if t.checkpoint_every and step % t.checkpoint_every == 0 and not final:
            self.group.learner.save(str(self.out_dir / f"checkpoint-{step:05d}"))
        if t.state_every and step % t.state_every == 0 and not final and not stop:
            self.save_state()
        elif not t.state_every:
            self._deferred_flush = True  # nothing to resume from: metrics go out as they come (next step)
        return stop, last

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
            records_e, summary, by_diff = self._eval(self.step)
            result.eval_after = _log_eval(self.tracker, summary, by_diff, records_e, self.step,
                                          f"step_{self.step:04d}", self.out_dir, self.buffer.add,
                                          tolerate_store_errors=True)
            if self.on_eval:
                self.on_eval(self.step, result.eval_after)
        if summary is not None:
            self.log(f"eval after {result.steps} steps:\n{format_summary(summary)}")
        ckpt = self.group.learner.save(str(self.out_dir / "checkpoint"))  # the weights are safe before MLflow I/O
        result.checkpoint = ckpt
        costs = run_cost(cfg, self.wall(), cfg.cost)
        self.buffer.add({**costs, "cost/wall_seconds": self.wall()}, result.steps)
        worker_stats = self._on_rollouts(lambda: ray.get([w.stats.remote() for w in self.group.rollout]))
        self.buffer.add({f"rollout/worker_{s['worker_index']}/{k}": v for s in worker_stats for k, v in s.items()
                         if k != "worker_index" and isinstance(v, (int, float))}, result.steps)
        # How the last weights reached the engines (object_store, collective) and were loaded (vLLM on CPU: inplace).
        tags = {f"budgetrl.rollout.{tag}": ",".join(sorted({s[k] for s in worker_stats if s.get(k)}))
                for tag, k in (("weight_load", "last_reload"), ("weight_sync", "last_sync"))}
        if any(tags.values()):
            try:
                self.tracker.set_tags({k: v for k, v in tags.items() if v})
            except Exception as exc:  # noqa: BLE001 - a tag is not worth failing a finished run over
                self.log(f"could not tag the weight-load path ({type(exc).__name__}: {exc})")
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
        self.tracker.log_artifacts(ckpt, "checkpoint")
        self.tracker.log_dict({"before": result.eval_before, "after": result.eval_after}, "eval/summary.json")
        self.tracker.log_dict(self.placement, "placement.json")
        self._write_result(ckpt)
        return result

    def _write_result(self, ckpt: str) -> None:
        """``result.json`` marks the run finished (a re-run of its name starts a new run); the state goes."""
        r = self.result
        (self.out_dir / resume.RESULT).write_text(json.dumps(
            {"checkpoint": ckpt, "run_id": self.tracker.run_id, "steps": r.steps, "resumed_from": r.resumed_from,
             "restarts": r.restarts, "eval_before": r.eval_before, "eval_after": r.eval_after,
             "placement": self.placement}, indent=1))
        resume.remove_state(self.out_dir)
