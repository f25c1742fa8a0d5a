"""Runs that survive faults: actors killed mid-step, then the driver itself killed with SIGKILL.

One real training run (its own Ray runtime, 2 rollout workers, MLflow in SQLite) in a
subprocess. While it trains, the test SIGKILLs a rollout worker process, then a learner process, then
the whole driver process group. Re-running the same command resumes: the same MLflow run ends with
every step's metrics exactly once, and nothing the first attempt saved is lost.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import (TINY, drawn_budgets, drawn_prompt_ids, expected_budgets, expected_prompt_ids, kill_actors_when,
                      state_step, wait_for)

ROOT = Path(__file__).resolve().parents[1]
STEPS = 16  # enough steps left after the second recovery that the driver is killed mid-run


def _command(tmp: Path) -> list[str]:
    # HF rollout engine: replacing a worker is engine-agnostic, and five vLLM engine starts (two
    # workers, a replacement, two on resume) cost a minute of the suite; test_train_e2e covers vLLM.
    # One step off-policy: the faults land while a next step's rollout is in flight, the hardest case
    # (the synchronous loop is the same code without it).
    overrides = [f"model.path={tmp / 'tiny'}", "warmstart.steps=0", "rollout.engine=hf", f"trainer.steps={STEPS}", "trainer.state_every=2",
                 "trainer.prompts_per_step=4", "rollout.group_size=4", "rollout.num_workers=2",
                 "rollout.cpus_per_worker=0.5", "learner.cpus_per_worker=0.5", "ray.num_cpus=4",
                 "trainer.off_policy_steps=1",
                 # Weights over gloo groups (one per engine), not the CPU default (the object store, which
                 # tests/test_multinode.py runs under its node faults): each replaced worker and the rebuilt
                 # learner must join a new group.
                 "rollout.weight_sync.method=collective",
                 f"trainer.output_dir={tmp / 'out'}", "trainer.run_name=faults", "trainer.log_samples_every=1",
                 "eval.num_prompts=8", "data.eval_size=8", "data.train_size=64", "budgets=[6x4]",
                 "eval.max_thinking=24", "budget.thinking=6", "budget.solution=4", "learner.micro_batch_size=16",
                 "learner.num_threads=1", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
                 "tracking.experiment=faults", "reward.num_workers=1", "rollout.vllm.kv_cache_gib=1",
                 # per-prompt budgets, drawn again for every step redone after a restore or the resume
                 "budget.schedule.kind=mixture", "budget.schedule.thinking.values=[4,6]"]
    overrides += [f"model.tiny.{k}={v}" for k, v in TINY.items()]
    return [sys.executable, "-m", "orchestrator", "train", str(ROOT / "configs" / "quickstart.yaml"), *overrides]


def _overrides(tmp: Path) -> list[str]:
    return _command(tmp)[5:]




def _actor_pids(root: psutil.Process, title: str) -> list[int]:
    pids = []
    for p in root.children(recursive=True):
        try:
            if " ".join(p.cmdline()).startswith(f"ray::{title}"):
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids




@pytest.mark.timeout(900)
def test_faults_then_sigkill_then_resume(tmp_path):
    from mlflow import MlflowClient

    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_DEDUP_LOGS": "0"}
    out = tmp_path / "out" / "faults"
    log1 = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_command(tmp_path), cwd=ROOT, env=env, stdout=log1, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        root = psutil.Process(proc.pid)
        log = tmp_path / "first.log"
        wait_for(lambda: state_step(out) >= 2, proc, 600, "the first state")
        rollouts = wait_for(lambda: _actor_pids(root, "RolloutWorker"), proc, 30, "rollout worker processes")
        os.kill(rollouts[0], signal.SIGKILL)  # a rollout worker dies mid-run
        # Steps are ~0.1 s and the learner runs a step ahead: wait for the recovery itself, then a state after it.
        wait_for(lambda: "a rollout worker died" in log.read_text(), proc, 300, "the worker's replacement", log)
        at = state_step(out)
        wait_for(lambda: state_step(out) > at, proc, 300, "a state after the rollout worker was replaced")
        learners = wait_for(lambda: _actor_pids(root, "Learner"), proc, 30, "learner processes")
        os.kill(learners[0], signal.SIGKILL)  # the learner dies mid-run
        wait_for(lambda: "continuing from" in log.read_text(), proc, 300, "the learner's rebuild", log)
        at = state_step(out)
        wait_for(lambda: state_step(out) > at, proc, 300, "a state after the learner was rebuilt")
        killed_at = state_step(out)
        os.killpg(proc.pid, signal.SIGKILL)  # then the driver and everything it started
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log1.close()
    first_log = (tmp_path / "first.log").read_text()
    assert "a rollout worker died" in first_log and "a learner rank died" in first_log, first_log[-3000:]
    assert not (out / "result.json").exists() and (out / "state").is_dir()

    second = subprocess.run(_command(tmp_path), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming run faults" in second.stdout + second.stderr

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("faults")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1, "the resumed attempt must continue the same MLflow run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    resumed_from = int(run.data.tags["budgetrl.resumed_from_step"])
    assert resumed_from >= killed_at >= 4
    for key in ("train/reward", "learner/policy_version", "time/step", "cost/generated_tokens_total"):
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == list(range(1, STEPS + 1)), (key, sorted(steps))  # every step once
    versions = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "learner/policy_version")}
    assert versions == {s: float(s) for s in range(1, STEPS + 1)}  # the learner never lost or repeated a step
    # Samples one update behind the learner, except the first step and a step regenerated after a restore.
    lags = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/policy_lag")}
    assert lags[1] == 0.0 and set(lags.values()) <= {0.0, 1.0}, lags
    assert sum(v == 1.0 for v in lags.values()) >= STEPS // 2, lags
    m = run.data.metrics
    assert m["cost/total"] > 0 and m["cost/cpu_hours"] > 0
    for i in (0, 1):  # both rollout workers took part and hold the final policy
        assert m[f"rollout/worker_{i}/samples"] > 0 and m[f"rollout/worker_{i}/policy_version"] == STEPS
    assert run.data.tags["budgetrl.rollout.weight_sync"] == "collective"  # the last syncs came over the groups
    result = json.loads((out / "result.json").read_text())
    assert result["run_id"] == run.info.run_id and result["steps"] == STEPS
    assert (out / "checkpoint" / "model.safetensors").is_file()
    assert not (out / "state").exists() and not list(out.glob(".state-*"))
    # The data position survived the learner rebuild and the driver kill: every step trained on the
    # prompts an uninterrupted run of the same seed draws (steps redone after a restore included).
    assert drawn_prompt_ids(out, STEPS) == expected_prompt_ids(_overrides(tmp_path), STEPS)
    # ... each prompt at the budget the seeded schedule gives it at that step, its whole group alike
    assert drawn_budgets(out, STEPS) == expected_budgets(_overrides(tmp_path), drawn_prompt_ids(out, STEPS))


def test_resume_plan_ignores_a_new_parent_run_but_not_a_changed_setting(tmp_path):
    """A pipeline re-run opens a new parent MLflow run: a stage killed mid-training still resumes under
    it; a changed training setting still refuses, naming the key."""
    from orchestrator.config import ConfigError, load_config, to_yaml
    from orchestrator.resume import TRAINER_STATE, plan_run

    def cfg(*extra):
        return load_config(str(ROOT / "configs/quickstart.yaml"),
                           [f"trainer.output_dir={tmp_path}", "trainer.run_name=stage", *extra], check_paths=False)

    out = tmp_path / "stage"
    (out / "state").mkdir(parents=True)
    (out / "config.yaml").write_text(to_yaml(cfg("tracking.parent_run_id=aaaa")))
    (out / "state" / TRAINER_STATE).write_text(json.dumps({"step": 3, "run_id": "r"}))
    name, where, state = plan_run(cfg("tracking.parent_run_id=bbbb"), log=lambda *_: None)
    assert (name, where, state) == ("stage", out, out / "state")
    with pytest.raises(ConfigError, match=r"learner\.lr"):
        plan_run(cfg("tracking.parent_run_id=bbbb", "learner.lr=0.5"), log=lambda *_: None)


def test_learner_loss_without_states_stops_instead_of_logging_steps_twice(tmp_path, tiny_model, ray_session):
    """``trainer.state_every=0`` keeps no state, and each step's metrics go out as they come: a learner
    restart would start again at step 0 and log steps 1..k a second time. It stops, saying why. (One HF
    engine and one rank: ``rollout.colocate`` auto puts the engine in the learner's process, so the actor
    killed is both, and its loss takes the learner's path.)"""
    from mlflow import MlflowClient

    from orchestrator.config import load_config
    from orchestrator.trainer import train

    out = tmp_path / "out" / "nostate"
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [
        f"model.path={tiny_model}", "model.build_if_missing=none", "warmstart.steps=0", "rollout.engine=hf",
        "trainer.steps=200", "trainer.state_every=0", "trainer.log_samples_every=1", "trainer.prompts_per_step=2",
        "rollout.group_size=2", f"trainer.output_dir={tmp_path / 'out'}", "trainer.run_name=nostate",
        "eval.num_prompts=2", "data.eval_size=2", "data.train_size=16", "budgets=[6x4]", "eval.max_thinking=12",
        "eval.max_solution=4", "budget.thinking=6", "budget.solution=4", "learner.micro_batch_size=8",
        "learner.num_threads=1", "reward.num_workers=0", "rollout.cpus_per_worker=0.5", "learner.cpus_per_worker=0.5",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.experiment=nostate",
        *[f"model.tiny.{k}={v}" for k, v in TINY.items()]])
    assert cfg.rollout.colocate is True
    killer, killed = kill_actors_when(lambda: (out / "rollouts" / "step_00003.parquet").exists(), "ColocatedLearner")
    with pytest.raises(RuntimeError, match=r"a learner rank died at step \d+ .* trainer\.state_every=0 keeps no state"):
        train(cfg, log=lambda *_: None)
    killer.join(30)
    assert len(killed) == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = client.search_runs([client.get_experiment_by_name("nostate").experiment_id])[0]
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/reward")]
    assert steps and len(steps) == len(set(steps)) and sorted(steps) == list(range(1, len(steps) + 1)), steps


def _write(path: Path, step: int, files=("model.safetensors",)) -> None:
    from orchestrator.resume import TRAINER_STATE

    path.mkdir(parents=True)
    for name in files:
        (path / name).write_text(f"weights of step {step}")
    (path / TRAINER_STATE).write_text(json.dumps({"step": step}))


def test_interrupted_state_swaps_recover_the_newest_complete_state(tmp_path):
    """A crash at each point of ``write_state``'s swap leaves a state that ``latest_state`` finds, and the
    next write leaves exactly one ``state/``: mid-write (no marker), between the two renames, after both."""
    from orchestrator.resume import STATE, latest_state, read_state, write_state

    # Crashed mid-write: an incomplete .state-tmp-* (no marker) beside state/ (step 2): state/ is used.
    out = tmp_path / "a"
    _write(out / STATE, 2)
    (out / ".state-tmp-1").mkdir()
    (out / ".state-tmp-1" / "model.safetensors").write_text("half")
    assert latest_state(out) == out / STATE

    # Crashed between the renames: state/ moved to .state-old-*, the complete new one still .state-tmp-*.
    out = tmp_path / "b"
    _write(out / ".state-old-1", 2)
    _write(out / ".state-tmp-2", 4)
    assert not (out / STATE).exists() and latest_state(out) == out / ".state-tmp-2"
    # Crashed before the first rename: both complete; the newer one wins.
    out = tmp_path / "c"
    _write(out / STATE, 2)
    _write(out / ".state-tmp-3", 4)
    assert latest_state(out) == out / ".state-tmp-3"

    # The next write (after resuming from the leftover) leaves one state/ and no leftovers.
    for out in (tmp_path / "a", tmp_path / "b", tmp_path / "c"):
        write_state(out, lambda d: (Path(d) / "model.safetensors").write_text("weights of step 6"), {"step": 6})
        assert read_state(out / STATE)["step"] == 6
        assert (out / STATE / "model.safetensors").read_text() == "weights of step 6"
        assert not list(out.glob(".state-*")), list(out.iterdir())


def test_state_files_and_directories_are_fsynced_before_the_swap(tmp_path, monkeypatch):
    """Every file of a state (not only trainer_state.json), its directory and the run directory reach the
    disk before (and after) the rename that makes the state current: a power loss cannot leave a
    complete-looking state with empty files."""
    import orchestrator.resume as resume

    synced, renames = [], []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(resume.os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                        real_fsync(fd))[1])
    monkeypatch.setattr(resume.os, "rename", lambda a, b: (renames.append((str(a), str(b), len(synced))),
                                                           real_rename(a, b))[1])

    def save_learner(d: str) -> None:
        (Path(d) / "model").mkdir()
        (Path(d) / "model" / "model.safetensors").write_text("w")
        (Path(d) / "optimizer.safetensors").write_text("m")

    out = tmp_path / "run"
    out.mkdir()
    final = resume.write_state(out, save_learner, {"step": 2})
    tmp = Path(renames[-1][0])  # the temporary dir renamed into state/
    before_swap = set(synced[:renames[-1][2]])
    for name in ("model/model.safetensors", "optimizer.safetensors", resume.TRAINER_STATE, "model", "."):
        assert str((tmp / name).resolve()) in before_swap, (name, sorted(before_swap))
    assert str(out.resolve()) in synced[renames[-1][2]:]  # the rename itself reaches the disk
    assert final == out / resume.STATE


def test_deferred_state_is_written_before_its_metrics_are_sent(tmp_path):
    """A state taken at a step's end waits (a snapshot: later changes to the payload do not reach it);
    the commit writes it first, then sends the metrics; a dropped state is never written, and a run
    without states only sends its metrics."""
    from orchestrator.resume import DeferredState, read_state

    order = []
    deferred = DeferredState()
    assert not deferred.waiting
    payload = {"step": 3, "pending_metrics": [["m", 1.0, 0, 3]]}
    deferred.take(payload)
    payload["step"] = 4
    assert deferred.waiting

    def save_learner(path):
        order.append("learner")
        Path(path, "weights").write_text("w")

    deferred.commit(tmp_path, save_learner, lambda: order.append("flush") or read_state(tmp_path / "state"))
    assert order == ["learner", "flush"] and read_state(tmp_path / "state")["step"] == 3
    assert not deferred.waiting

    deferred.take({"step": 5})
    deferred.drop()
    deferred.metrics_only()
    order.clear()
    deferred.commit(tmp_path, save_learner, lambda: order.append("flush"))
    assert order == ["flush"] and read_state(tmp_path / "state")["step"] == 3
    deferred.commit(tmp_path, save_learner, lambda: order.append("flush"))
    assert order == ["flush"]  # nothing waited the second time
