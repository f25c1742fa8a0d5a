"""A small DAG runner for multi-stage workloads: named stages, dependencies, concurrency, resume, lineage.

A ``Stage`` is a name, the names of the stages it reads from, a JSON-able ``config`` and a function
``fn(ctx) -> StageOutput``. ``run_pipeline`` runs every stage once its inputs are done: in order in the
calling thread, or up to ``max_concurrency`` at a time (threads in the driver: a stage that calls
``trainer.train`` gets its resources from its own Ray placement group, so Ray needs enough CPUs for the
stages that run at once). Used by every multi-stage workload (meta_abilities, elastic, difficulty, journey).

Resume: a stage's **key** is a hash of its config and of its inputs' identities (their keys and
checkpoints), so it changes whenever anything upstream changes. Each stage writes into
``root/<name>-<key>/`` and, last, a completion marker ``stage.json``; a later run that finds the marker
(and the checkpoint it names) skips the stage and reuses its outputs.

Tracking: everything lands under one parent MLflow run. A stage's function either calls ``train`` with
``ctx.train_tracking()`` (parent run id + lineage tags) or opens ``ctx.start_run()``, and returns its metrics
in ``StageOutput.metrics``; the runner (in the driver: nothing on a Ray worker logs to MLflow) logs them and
tags that run with the stage key, its checkpoint and its inputs (``tracking.TAG_INPUTS``: source
stage, run, checkpoint, dataset digest). A skipped stage is logged as a short child run tagged
``budgetrl.reused_run`` = the run that produced the outputs. ``tracking.lineage_graph`` reads the
graph of any run or checkpoint back from MLflow alone.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import tracking

MARKER = "stage.json"


class PipelineError(RuntimeError):
    """A stage failed or the graph is malformed; the message names the stage. ``results``: the stages that
    finished before it (a workload can still report them)."""

    def __init__(self, message: str, results: Mapping[str, StageResult] | None = None):
        super().__init__(message)
        self.results = dict(results or {})


@dataclass
class StageOutput:
    """What a stage function returns: the run that produced it, its checkpoint, anything JSON-able."""

    run_id: str | None = None
    checkpoint: str | None = None
    dataset_digest: str | None = None
    outputs: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)  # logged by the runner on the stage's run (step 0)


@dataclass
class StageResult:
    name: str
    key: str
    run_id: str | None  # the MLflow run that produced the outputs (an earlier one when skipped)
    checkpoint: str | None
    dataset_digest: str | None
    outputs: dict
    out_dir: str
    skipped: bool = False
    logged_run_id: str | None = None  # this invocation's child run (== run_id unless skipped)
    seconds: float = 0.0


@dataclass
class Stage:
    name: str
    fn: Callable[[StageContext], StageOutput | None]
    deps: tuple[str, ...] = ()
    config: Any = None  # resolved, JSON-able stage config (dataclasses are converted); hashed into the key


@dataclass
class StageContext:
    """What a stage function sees: its inputs' results, its own output directory, the tracking handles."""

    name: str
    key: str
    config: Any
    out_dir: Path
    inputs: dict[str, StageResult]
    parent: tracking.Tracker
    workload: str
    log: Callable[[str], None] = print

    def lineage_tags(self) -> dict[str, str]:
        """Tags every run of this stage carries: workload, stage, stage key, inputs, parent run."""
        inputs = [{"stage": r.name, "run_id": r.run_id, "checkpoint": r.checkpoint, "key": r.key,
                   "dataset_digest": r.dataset_digest} for r in self.inputs.values()]
        tags = {tracking.TAG_WORKLOAD: self.workload, tracking.TAG_STAGE: self.name,
                tracking.TAG_STAGE_KEY: self.key, tracking.TAG_INPUTS: json.dumps(inputs, sort_keys=True),
                tracking.TAG_SOURCE_RUNS: ",".join(r.run_id for r in self.inputs.values() if r.run_id),
                tracking.TAG_SOURCE_CHECKPOINTS: json.dumps(
                    [r.checkpoint for r in self.inputs.values() if r.checkpoint])}
        with_ckpt = [r for r in self.inputs.values() if r.checkpoint]
        if len(with_ckpt) == 1:
            tags[tracking.TAG_SOURCE_CHECKPOINT] = with_ckpt[0].checkpoint
            if with_ckpt[0].run_id:
                tags[tracking.TAG_SOURCE_RUN] = with_ckpt[0].run_id
        return tags

    def train_tracking(self, tracking_cfg) -> None:
        """Point a training config's ``tracking`` section at this stage (parent run, lineage tags)."""
        tracking_cfg.tracking_uri = self.parent.tracking_uri
        tracking_cfg.parent_run_id = self.parent.run_id
        tracking_cfg.tags = {**dict(tracking_cfg.tags), **self.lineage_tags()}

    def start_run(self, params: Mapping[str, Any] | None = None, tags: Mapping[str, Any] | None = None,
                  run_name: str | None = None) -> tracking.Tracker:
        """A child run of the parent for a stage that does not call ``train`` (merge, eval, ...).

        Its tags are this stage's own (config hash of the stage config, git commit, inputs), not the
        parent's, so a child never carries the parent's ``budgetrl.stage_run.*`` bookkeeping."""
        return _child(self.parent, run_name or self.name, params,
                      {**tracking.lineage_tags(_hashable(self.config), workload=self.workload, stage=self.name),
                       **self.lineage_tags(), **(tags or {})})


def _plain(config: Any) -> Any:
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    return config


def _hashable(config: Any) -> dict:
    c = _plain(config)
    return c if isinstance(c, Mapping) else {"config": c}


def _child(parent: tracking.Tracker, run_name: str, params, tags) -> tracking.Tracker:
    experiment = parent.client.get_experiment(parent.experiment_id).name
    return tracking.Tracker.start(parent.tracking_uri, experiment, run_name=run_name, params=params, tags=tags,
                                  parent_run_id=parent.run_id)


def stage_key(stage: Stage, inputs: Mapping[str, StageResult]) -> str:
    """Hash of the stage's name and config and of its inputs' keys and checkpoints."""
    return tracking.config_hash({"stage": stage.name, "config": _plain(stage.config),
                                 "inputs": {n: {"key": r.key, "checkpoint": r.checkpoint} for n, r in inputs.items()}})


def check_graph(stages: Sequence[Stage]) -> list[str]:
    """Stage names in a topological order; ``PipelineError`` on duplicates, unknown deps or cycles."""
    by_name: dict[str, Stage] = {}
    for s in stages:
        if s.name in by_name:
            raise PipelineError(f"stage {s.name!r} is defined twice")
        if not s.name or "/" in s.name or s.name.startswith("."):
            raise PipelineError(f"stage name {s.name!r} must be non-empty, without '/' and not start with '.'")
        by_name[s.name] = s
    for s in stages:
        for d in s.deps:
            if d not in by_name:
                raise PipelineError(f"stage {s.name!r} depends on unknown stage {d!r}")
    order, state = [], {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "active":
            raise PipelineError(f"dependency cycle: {' -> '.join(path + (name,))}")
        state[name] = "active"
        for d in by_name[name].deps:
            visit(d, path + (name,))
        state[name] = "done"
        order.append(name)

    for s in stages:
        visit(s.name, ())
    return order


def _read_marker(out_dir: Path) -> StageResult | None:
    marker = out_dir / MARKER
    if not marker.is_file():
        return None
    try:
        data = json.loads(marker.read_text())
        result = StageResult(**data)
    except (ValueError, TypeError):
        return None
    if result.checkpoint and not Path(result.checkpoint).exists():
        return None  # the outputs it names are gone: run again
    return result


def _write_marker(out_dir: Path, result: StageResult) -> None:
    """Written last, atomically (temp file + rename): its presence means the stage completed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".{MARKER}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(json.dumps(dataclasses.asdict(result), indent=1, default=str))
    os.replace(tmp, out_dir / MARKER)


def _result_tags(result: StageResult) -> dict[str, str]:
    tags = {tracking.TAG_STAGE_KEY: result.key}
    if result.checkpoint:
        tags[tracking.TAG_CHECKPOINT] = result.checkpoint
    if result.dataset_digest:
        tags[tracking.TAG_DATASET_DIGEST] = result.dataset_digest
    return tags


def _needed(order: list[str], by_name: Mapping[str, Stage], only: Sequence[str] | None) -> list[str]:
    """``order`` cut to the stages in ``only`` and every stage they need (all of it without ``only``)."""
    if not only:
        return order
    need, todo = set(), list(only)
    while todo:
        n = todo.pop()
        if n not in by_name:
            raise PipelineError(f"only: unknown stage {n!r}")
        if n not in need:
            need.add(n)
            todo.extend(by_name[n].deps)
    return [n for n in order if n in need]


def _execute(stage: Stage, inputs: dict[str, StageResult], parent: tracking.Tracker, root: Path, workload: str,
             log: Callable[[str], None]) -> StageResult:
    """One stage: reuse its completed outputs, or run it and log what it returned on its run (the driver's
    job: a stage's function returns metrics, it need not log them)."""
    key = stage_key(stage, inputs)
    out_dir = (root / f"{stage.name}-{key}").absolute()
    ctx = StageContext(stage.name, key, stage.config, out_dir, inputs, parent, workload, log)
    done = _read_marker(out_dir)
    if done is not None:
        tags = {**tracking.lineage_tags(_hashable(stage.config), workload=workload, stage=stage.name),
                **ctx.lineage_tags(), **_result_tags(done), tracking.TAG_REUSED_RUN: str(done.run_id),
                tracking.TAG_SKIPPED: "true"}
        with _child(parent, f"{stage.name} (reused)", None, tags) as child:
            pass
        log(f"pipeline: {stage.name}: reusing {out_dir} (run {done.run_id})")
        return dataclasses.replace(done, skipped=True, logged_run_id=child.run_id, seconds=0.0)
    log(f"pipeline: {stage.name}: start (key {key})")
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = stage.fn(ctx) or StageOutput()
    seconds = time.perf_counter() - t0
    result = StageResult(name=stage.name, key=key, run_id=out.run_id, checkpoint=out.checkpoint,
                         dataset_digest=out.dataset_digest, outputs=dict(out.outputs), out_dir=str(out_dir),
                         seconds=seconds)
    if result.run_id is None:  # every stage shows in the parent, even one that logged nothing itself
        with ctx.start_run() as child:
            result.run_id = child.run_id
    run = tracking.Tracker(parent.tracking_uri, result.run_id, parent.experiment_id)
    run.set_tags({**ctx.lineage_tags(), **_result_tags(result), tracking.TAG_SKIPPED: "false"})
    run.log_metrics({**out.metrics, "pipeline/stage_seconds": seconds}, step=0)
    result.logged_run_id = result.run_id
    _write_marker(out_dir, dataclasses.replace(result, skipped=False))
    log(f"pipeline: {stage.name}: done in {seconds:.1f}s")
    return result


def run_pipeline(stages: Sequence[Stage], *, parent: tracking.Tracker, root: str | os.PathLike,
                 workload: str, max_concurrency: int = 1, log: Callable[[str], None] = print,
                 only: Sequence[str] | None = None) -> dict[str, StageResult]:
    """Run the DAG under ``parent``; returns every stage's result. ``only``: run just these stages and
    what they need. One at a time (``max_concurrency=1``) the stages run in the calling thread, in order.
    A failure stops new stages from starting, waits for the running ones, and raises ``PipelineError``
    naming the stage (completed stages keep their markers, so a re-run resumes)."""
    if max_concurrency < 1:
        raise PipelineError(f"max_concurrency={max_concurrency}: must be >= 1")
    by_name = {s.name: s for s in stages}
    order = _needed(check_graph(stages), by_name, only)
    results: dict[str, StageResult] = {}

    def execute(stage: Stage) -> StageResult:
        return _execute(stage, {d: results[d] for d in stage.deps}, parent, Path(root), workload, log)

    def finished(name: str, res: StageResult) -> None:
        results[name] = res
        parent.set_tags({f"{tracking.TAG_STAGE_RUN_PREFIX}{name}": str(res.run_id),
                         f"{tracking.TAG_STAGE_SKIPPED_PREFIX}{name}": str(res.skipped).lower()})
        log(_progress(results, len(order), max_concurrency))

    if max_concurrency == 1:
        for name in order:
            try:
                res = execute(by_name[name])
            except BaseException as exc:  # noqa: BLE001 - re-raised with the stage's name
                log(f"pipeline: {name}: FAILED: {type(exc).__name__}: {exc}")
                raise PipelineError(f"stage {name!r} failed: {type(exc).__name__}: {exc}", results) from exc
            finished(name, res)
        return results
    _resolve_lazy_imports()
    failure = _run_concurrently(order, by_name, results, execute, finished, max_concurrency, log)
    if failure is not None:
        name, exc = failure
        raise PipelineError(f"stage {name!r} failed: {type(exc).__name__}: {exc}", results) from exc
    return results


def _progress(results: Mapping[str, StageResult], total: int, max_concurrency: int) -> str:
    """How many stages are done and, from the mean time of those that ran here, about how long the rest take."""
    ran = [r.seconds for r in results.values() if not r.skipped]
    line = f"pipeline: {len(results)} of {total} stages done"
    left = total - len(results)
    if ran and left:
        eta = left * sum(ran) / len(ran) / max_concurrency
        line += f", about {eta / 60:.0f} min to go at this pace" if eta >= 60 else f", about {eta:.0f} s to go"
    return line


def _run_concurrently(order, by_name, results, execute, finished, max_concurrency, log):
    """Threads in the driver, a stage started once its inputs are done; returns the first (stage, error)."""
    pending = list(order)
    running: dict[cf.Future, str] = {}
    failure: tuple[str, BaseException] | None = None
    lock = threading.Lock()
    with cf.ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="stage") as pool:
        while pending or running:
            if failure is None:
                for name in list(pending):
                    if len(running) >= max_concurrency:
                        break
                    if all(d in results for d in by_name[name].deps):
                        pending.remove(name)
                        running[pool.submit(execute, by_name[name])] = name
            if not running:
                break
            done, _ = cf.wait(running, return_when=cf.FIRST_COMPLETED)
            for fut in done:
                name = running.pop(fut)
                try:
                    res = fut.result()
                except BaseException as exc:  # noqa: BLE001 - reported with the stage's name
                    if failure is None:
                        failure = (name, exc)
                    log(f"pipeline: {name}: FAILED: {type(exc).__name__}: {exc}")
                    continue
                with lock:
                    finished(name, res)
    return failure


def _resolve_lazy_imports() -> None:
    """Resolve transformers' lazily imported names in this thread before stages run in threads: its
    lazy module is not thread-safe, and two stages importing ``AutoTokenizer`` at the same moment
    failed with ``ImportError: cannot import name 'AutoTokenizer'`` (measured on a 3-stage DAG)."""
    try:
        import transformers
    except ImportError:  # a pipeline without model stages
        return
    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM", "GenerationConfig", "PreTrainedTokenizerFast",
                 "Qwen2Config", "Qwen2ForCausalLM"):
        getattr(transformers, name)
