"""Run directories and resumable training state: where a run writes, and how a killed run continues.

A run's directory holds ``state/`` (the latest resumable training state: the learner's weights,
optimizer moments and RNG from ``Learner.save_state`` plus the driver's ``trainer_state.json``).
A state is written into a hidden temporary directory, ``trainer_state.json`` last (the completion
marker), then swapped into place, so a crash at any moment leaves a complete earlier or later state.
Re-running a run name whose directory has a state and no ``result.json`` continues that run: same
directory, same MLflow run, from the saved step.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from .config import Config, ConfigError, merge_structured, to_dict

STATE = "state"
TRAINER_STATE = "trainer_state.json"
RESULT = "result.json"
# Keys a resumed run may change: length of the run, logging cadence, where it runs and logs. A
# pipeline re-run opens a new parent MLflow run, so a stage killed mid-training resumes under a new
# ``tracking.parent_run_id`` (its own run keeps its old parent; the new parent's stage tags name it).
MUTABLE = ("trainer.steps", "trainer.eval_every", "trainer.checkpoint_every", "trainer.state_every",
           "trainer.log_samples_every", "trainer.resume", "trainer.max_restarts", "trainer.node_wait_s", "trainer.max_generated_tokens", "ray.",
           "tracking.tracking_uri", "tracking.parent_run_id", "tracking.system_metrics", "reward.num_workers", "reward.timeout_s", "cost.",
           "learner.max_shard_size")


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


def _step_of(path: Path) -> int:
    try:
        return int(json.loads((path / TRAINER_STATE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1  # incomplete or unreadable: never chosen


def latest_state(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete state in ``out_dir`` (``state/``, or a swap interrupted by a crash)."""
    out = Path(out_dir)
    if not out.is_dir():
        return None
    candidates = [p for p in [out / STATE, *out.glob(".state-*")] if (p / TRAINER_STATE).is_file()]
    scored = [(s, p) for p in candidates if (s := _step_of(p)) >= 0]
    return max(scored)[1] if scored else None


def read_state(path: str | os.PathLike) -> dict:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def _fsync_tree(root: Path) -> None:
    """Flush every file under ``root`` and every directory entry to disk (a rename is only as durable
    as the data and the directory it names: without this a power loss can leave a complete-looking
    state whose files are empty)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as fh:
                os.fsync(fh.fileno())
        _fsync_dir(Path(dirpath))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_state(out_dir: str | os.PathLike, save_learner: Callable[[str], object], payload: dict) -> Path:
    """Write a complete state (learner files, then ``trainer_state.json``) and swap it into ``state/``.

    Order: learner files written and fsynced, then the marker (fsynced with its directory), then
    ``state/`` renamed aside, the new one renamed in, the parent fsynced. A crash at any point leaves a
    complete state under ``state/`` or a ``.state-*`` name, which ``latest_state`` finds."""
    out = Path(out_dir)
    tmp = out / f".state-tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    try:
        save_learner(str(tmp))
        _fsync_tree(tmp)
        marker = tmp / TRAINER_STATE
        with open(marker, "w") as fh:
            json.dump(payload, fh)
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final, old = out / STATE, None
    if final.exists():
        old = out / f".state-old-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(out)
    for stale in out.glob(".state-*"):  # the replaced state and leftovers of crashed writes
        shutil.rmtree(stale, ignore_errors=True)
    return final


def how_to_continue(out_dir: str | os.PathLike) -> str:
    """What a run that stopped for a missing resource keeps, and how to continue it."""
    state = latest_state(out_dir)
    kept = f"its state (step {read_state(state)['step']}) is kept in {state}" if state is not None else \
        "it has no saved state yet"
    return f"{kept}: run the same command again once the nodes are there and it continues"


def remove_state(out_dir: str | os.PathLike) -> None:
    """A finished run needs no state: its ``checkpoint/`` holds the weights (optimizer moments are large)."""
    out = Path(out_dir)
    for p in [out / STATE, *out.glob(".state-*")]:
        shutil.rmtree(p, ignore_errors=True)


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def config_differences(cfg: Config, out_dir: str | os.PathLike) -> list[str]:
    """Keys (outside ``MUTABLE``) whose value differs from the config the run in ``out_dir`` started with."""
    saved = merge_structured(Config, Path(out_dir) / "config.yaml")
    now, before = _flat(to_dict(cfg)), _flat(to_dict(saved))
    keys = sorted(set(now) | set(before))
    return [f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in keys
            if now.get(k) != before.get(k) and not any(k == m or k.startswith(m) for m in MUTABLE)]


def plan_run(cfg: Config, log=print) -> tuple[str, Path, Path | None]:
    """(run name, output dir, state to resume from or None), decided before anything starts.

    ``trainer.resume``: ``auto`` continues an unfinished run of the same name that has a state;
    ``must`` fails unless there is one; ``never`` always starts a new run (in a new directory)."""
    t = cfg.trainer
    if t.run_name and t.resume != "never":
        out = Path(t.output_dir) / t.run_name
        state = latest_state(out)
        finished = (out / RESULT).is_file()
        if state is not None and not finished:
            diff = config_differences(cfg, out)
            if diff:
                raise ConfigError(f"trainer.run_name={t.run_name!r}: cannot resume {out} with a different config "
                                  f"({'; '.join(diff[:5])}); use trainer.resume=never or another run_name")
            return t.run_name, out, state
        if t.resume == "must":
            why = "it finished" if finished else "it has no saved state"
            raise ConfigError(f"trainer.resume='must': nothing to resume in {out} ({why})")
    elif t.resume == "must":
        raise ConfigError("trainer.resume='must' needs trainer.run_name (the run to continue)")
    name, out = fresh_run_dir(cfg, "train", log)
    return name, out, None


class DeferredState:
    """A state taken at the end of a step and written at the start of the next, once that step's rollout
    is generating, so the learner's save and the driver's MLflow flush run beside the engine instead of
    between steps (docs/performance.md, section 4). The state carries the pending metrics, so it is
    written first and the metrics go to MLflow after. A crash before the write resumes from the state
    before, as a crash mid-write does. Without states (``trainer.state_every=0``) only the metrics wait."""

    def __init__(self):
        self.payload: dict | None = None
        self.flush = False  # metrics to send at the next commit (a run without states)

    @property
    def waiting(self) -> bool:
        return self.payload is not None or self.flush

    def take(self, payload: dict) -> None:
        self.payload = json.loads(json.dumps(payload))  # a snapshot; written as this JSON

    def metrics_only(self) -> None:
        self.flush = True

    def drop(self) -> None:
        """Forget a state taken from weights that are being replaced."""
        self.payload = None

    def commit(self, out_dir: str | os.PathLike, save_learner: Callable[[str], object],
               flush_metrics: Callable[[], object]) -> None:
        """Write the state taken (if any), then send the metrics (no-op when nothing waits)."""
        payload, self.payload = self.payload, None
        flush, self.flush = self.flush, False
        if payload is not None:
            write_state(out_dir, save_learner, payload)
        if payload is not None or flush:  # the buffer holds the payload's pending metrics: nothing newer yet
            flush_metrics()
