"""Several Ray nodes on one machine: placement by custom resources, jobs that keep their results, lost nodes.

One cluster for the module (``tests/local_cluster.py``), started with the Ray CLI as an operator would,
with token auth on: a head with no actor resources, two rollout nodes (``rollout_gpu``) and a learner
node (``learner_gpu``), the custom resources of ``clusters/raycluster-gpu.yaml``'s groups. The tests
run in file order on that cluster: the job tests use it as started; the node-loss scenario then kills
nodes and adds spares.

Network: every address the tests and drivers use is 127.0.0.1 (Ray itself resolves it to this
machine's own address for its internal connections; every process is on this machine).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

from conftest import TINY, drawn_prompt_ids, expected_prompt_ids, hf_logprobs, state_step, wait_for
from local_cluster import BIN, LocalCluster

ROOT = Path(__file__).resolve().parents[1]
JOB_TIMEOUT_S = 480


@pytest.fixture(scope="module")
def cluster():
    c = LocalCluster(Path(tempfile.mkdtemp(prefix="mn", dir="/tmp")))  # short: Ray's socket paths < 107 chars
    try:
        c.start_head()
        c.add_node("rollout-a", {"rollout_gpu": 1})
        c.add_node("rollout-b", {"rollout_gpu": 1})
        c.add_node("learner-a", {"learner_gpu": 1})
        c.add_node("learner-b", {"learner_gpu": 1})  # a spare learner node from the start
        yield c
    finally:
        c.stop()
        import shutil

        shutil.rmtree(c.tmp, ignore_errors=True)


def _small(**kw) -> list[str]:
    """A quickstart shortened to seconds: tiny model, few prompts, short budgets."""
    values = {"warmstart.steps": 4, "warmstart.train_size": 256, "warmstart.batch_size": 32, "trainer.steps": 2,
              "trainer.prompts_per_step": 4, "rollout.group_size": 4, "eval.num_prompts": 8, "data.eval_size": 8,
              "data.train_size": 64, "budgets": "[16x8]", "eval.max_thinking": 24, "budget.thinking": 16,
              "budget.solution": 8, "learner.micro_batch_size": 16, "learner.num_threads": 1,
              "reward.num_workers": 1, "rollout.vllm.kv_cache_gib": 1, "model.max_model_len": 64,
              "rollout.resources.rollout_gpu": 1, "learner.resources.learner_gpu": 1, **kw}
    return [f"{k}={v}" for k, v in values.items()] + [f"model.tiny.{k}={v}" for k, v in TINY.items()]


# ---- ray job submit ---------------------------------------------------------------------------------


def _submit(cluster: LocalCluster, args: list[str], env_vars: dict) -> tuple[str, str, str]:
    """`ray job submit` of ``python -m orchestrator ARGS`` with the repository as working dir; (job id,
    status from the token-protected Jobs REST API, CLI output + driver log)."""
    job_id = f"budgetrl-test-{uuid.uuid4().hex[:8]}"
    submit = [BIN / "ray", "job", "submit", "--address", cluster.dashboard, "--submission-id", job_id,
              "--working-dir", ROOT, "--runtime-env-json", json.dumps({"env_vars": env_vars}),
              "--", "python", "-m", "orchestrator", *args]
    deadline, retry_until = time.monotonic() + JOB_TIMEOUT_S, time.monotonic() + 60
    while True:  # right after `ray start` the job agent may not be registered ("No available agent")
        try:
            r = subprocess.run([str(c) for c in submit], env=cluster.env, capture_output=True, text=True,
                               timeout=max(1.0, deadline - time.monotonic()))
            output = r.stdout + r.stderr
        except subprocess.TimeoutExpired:
            subprocess.run([str(BIN / "ray"), "job", "stop", "--address", cluster.dashboard, job_id],
                           env=cluster.env, capture_output=True, timeout=60)
            output = f"`ray job submit` still running after {JOB_TIMEOUT_S}s"
        if "No available agent" not in output or time.monotonic() > retry_until:
            break
        time.sleep(2)
    url = f"{cluster.dashboard}/api/jobs/{job_id}"
    token = Path(cluster.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert requests.get(url, timeout=30).status_code in (401, 403)  # the job API wants the token
    reply = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    status = reply.json().get("status") if reply.ok else f"HTTP {reply.status_code}"
    logs = subprocess.run([str(BIN / "ray"), "job", "logs", "--address", cluster.dashboard, job_id],
                          env=cluster.env, capture_output=True, text=True, timeout=60)
    return job_id, status, output + "\n" + logs.stdout


@pytest.mark.timeout(900)
def test_job_on_several_nodes_keeps_results_and_syncs_weights_to_every_engine(cluster, tmp_path):
    """`ray job submit` of the shortened quickstart with the README's relative paths, onto two rollout
    nodes and a learner node: placement by custom resources, the run's results under $BUDGETRL_HOME and
    the runtime env's MLflow store after the job ends, every engine on every node holding the learner's
    final weights; a second job reuses the warm start; without BUDGETRL_HOME the job fails at once."""
    from mlflow import MlflowClient

    home = cluster.tmp / "home"  # on a real cluster: storage every node mounts
    uri = f"sqlite:///{cluster.tmp / 'jobs-mlflow.db'}"
    env_vars = {"MLFLOW_TRACKING_URI": uri, "BUDGETRL_HOME": str(home)}
    # Relative paths as the README's command has them (model.path, trainer.output_dir from the config).
    args = ["train", "configs/quickstart.yaml", *_small(**{
        "rollout.num_workers": 2, "trainer.run_name": "job", "tracking.experiment": "jobs",
        # A learning signal a random tiny model has (lengths vary within a group), and a large step, so
        # the weights move and a stale engine would show.
        "reward.length_penalty": 0.5, "learner.lr": 1e-3, "rollout.temperature": 1.0,
        "tracking.system_metrics_interval_s": 1,
        # fp32 on every host (auto is bf16 on CPUs with bf16 instructions): the engines' logprobs are checked
        # against fp32 transformers to 2e-3 below; bf16 syncs are checked in tests/test_rollout.py.
        "model.dtype": "float32"})]
    t0 = time.perf_counter()
    job, status, log = _submit(cluster, args, env_vars)
    wall = time.perf_counter() - t0
    assert status == "SUCCEEDED", f"job {job}: {status}\n{log[-5000:]}"
    print(f"job 1 SUCCEEDED in {wall:.1f}s")

    # The results are where the docs say, after the job ended: nothing only in Ray's working-dir copy.
    out = home / "outputs" / "job"
    result = json.loads((out / "result.json").read_text())
    assert (out / "checkpoint" / "model.safetensors").is_file()
    assert (home / "outputs" / "models" / "tiny-base" / "config.json").is_file()
    warm = list((home / "outputs" / "warmstart").glob("*/warmstart.json"))
    assert len(warm) == 1, warm
    packages = [p for p in (cluster.tmp / "session_latest" / "runtime_resources" / "working_dir_files").iterdir()
                if p.is_dir()]
    assert packages
    for pkg in packages:
        assert (pkg / "orchestrator" / "trainer.py").is_file()
        for heavy in (".venv", ".git", "outputs", "mlruns", "mlflow.db"):
            assert not (pkg / heavy).exists(), f"{heavy} is in the job's working-dir copy {pkg}"

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("jobs").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_name, r.info.status) for r in runs]
    run = runs[0]
    assert run.info.run_id == result["run_id"]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/reward")] == [1, 2]

    # Placement: each rollout worker on its own rollout node, the learner on the learner node, nothing on
    # the head (it offers neither resource).
    place = result["placement"]
    roles = [n["labels"]["budgetrl.io/role"] for n in place["rollout"] + place["learner"]]
    assert roles == ["rollout", "rollout", "learner"], place  # learner-a or the spare learner-b
    rollout_nodes = {n["labels"]["budgetrl.io/node"] for n in place["rollout"]}
    assert rollout_nodes == {"rollout-a", "rollout-b"}, place
    assert json.loads((out / "placement.json").read_text()) == place
    # System metrics: the driver's machine as system/*, each node holding actors as system/node-<id>/*.
    assert "system/cpu_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)
    for n in place["rollout"] + place["learner"]:
        assert f"system/node-{n['node_id'][:8]}/cpu_utilization_percentage" in run.data.metrics, sorted(run.data.metrics)

    # Weights reached every engine on every node: the final eval (split across both workers) was
    # generated by policy version 2, and vLLM's logprobs of its tokens are the final checkpoint's
    # (transformers on the saved weights), not the warm start's.
    assert run.data.metrics["rollout/worker_0/policy_version"] == run.data.metrics["rollout/worker_1/policy_version"] == 2
    rows = pq.read_table(out / "eval" / "step_0002.parquet").to_pylist()
    assert {r["policy_version"] for r in rows} == {2} and len(rows) == 8
    final = hf_logprobs(str(out / "checkpoint"), rows)
    start = hf_logprobs(str(warm[0].parent), rows)
    own = [(np.array([x if x is not None else np.nan for x in r["response_logprobs"]]), np.array(r["injected"]))
           for r in rows]
    diff_final = max(np.nanmax(np.abs(lp[~inj] - f[~inj])) for (lp, inj), f in zip(own, final))
    diff_start = max(np.nanmax(np.abs(lp[~inj] - s[~inj])) for (lp, inj), s in zip(own, start))
    assert diff_final < 2e-3, diff_final
    assert diff_start > 10 * max(diff_final, 1e-4), (diff_start, diff_final)  # the weights did move

    # A second job reuses the warm start (and the tiny model) instead of rebuilding them (its rollout
    # settings differ, which the warm start does not depend on: one HF worker, one step, to be quick).
    marker_mtime = warm[0].stat().st_mtime_ns
    args2 = args + ["rollout.engine=hf", "rollout.num_workers=1", "trainer.steps=1", "trainer.run_name=job2"]
    job2, status2, log2 = _submit(cluster, args2, env_vars)
    assert status2 == "SUCCEEDED", f"job {job2}: {status2}\n{log2[-5000:]}"
    assert f"warm start: reusing {warm[0].parent}" in log2, log2[-3000:]
    assert warm[0].stat().st_mtime_ns == marker_mtime
    runs = client.search_runs([client.get_experiment_by_name("jobs").experiment_id], order_by=["start_time ASC"])
    assert len(runs) == 2 and runs[1].data.metrics["warmstart/reused"] == 1.0

    # Without BUDGETRL_HOME, relative output paths would land in Ray's temporary copy: refused at once.
    job3, status3, log3 = _submit(cluster, ["show-config", "configs/quickstart.yaml"], {"MLFLOW_TRACKING_URI": uri})
    assert status3 == "FAILED", log3[-3000:]
    assert re.search(r"config error: trainer\.output_dir: this command runs as a Ray job .* BUDGETRL_HOME", log3), log3[-3000:]


def test_output_dir_a_node_cannot_see_fails_at_once(cluster, tmp_path):
    """A node without the cluster's shared storage (its own empty view of the output dir): the run stops
    before its first step, naming the setting, instead of writing states the driver never sees."""
    island = cluster.add_node("island", {"island_gpu": 1}, private_dirs=(tmp_path / "out",))
    try:
        overrides = [f"model.path={tmp_path / 'tiny'}", "model.build_if_missing=tiny",
                     f"ray.address={cluster.address}",
                     *_small(**{"warmstart.steps": 0, "rollout.engine": "hf", "learner.resources.learner_gpu": 0,
                                "learner.resources.island_gpu": 1, "trainer.output_dir": tmp_path / "out",
                                "trainer.run_name": "island", "trainer.node_wait_s": 60,
                                "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}"})]
        r = subprocess.run([sys.executable, "-m", "orchestrator", "train", str(ROOT / "configs" / "quickstart.yaml"),
                            *overrides], cwd=ROOT, env=cluster.env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-3000:]
        assert re.search(r"config error: trainer\.output_dir: learner rank 0's node \(\w+\) does not see "
                         r"the driver's .*/out/island; on several nodes it must be storage every node mounts", r.stderr), \
            r.stderr[-3000:]
        assert not list((tmp_path / "out").glob("island/state*"))
    finally:
        cluster.kill_node(island)


# ---- lost nodes -----------------------------------------------------------------------------------




def _placed(out: Path, role: str) -> str | None:
    """The ``budgetrl.io/node`` label of the node holding ``role``'s first actor (placement.json)."""
    try:
        node = json.loads((out / "placement.json").read_text())[role][0]
        return node["labels"]["budgetrl.io/node"] if node.get("alive") else None
    except (OSError, ValueError, KeyError, IndexError):
        return None




@pytest.mark.timeout(900)
def test_lost_rollout_node_learner_node_then_no_spare(cluster, tmp_path):
    """A rollout node's raylet killed mid-run with a spare up: the worker is re-placed there with the
    current weights and the step retried. The learner's node killed: the learner group is rebuilt on a
    spare from the last state. Then the rollout node killed with no spare left: the run waits
    ``trainer.node_wait_s``, stops naming the missing resource (exit 3) with its state kept; a node
    added and the same command again resumes it. Every step once, on the prompts an uninterrupted run
    draws, with the weights of the step before."""
    from mlflow import MlflowClient

    steps, out = 60, tmp_path / "out" / "nodes"  # ~0.2 s a step: the run outlasts the faults
    overrides = [f"model.path={tmp_path / 'tiny'}", "model.build_if_missing=tiny", f"ray.address={cluster.address}",
                 *_small(**{"warmstart.steps": 0, "rollout.engine": "hf", "trainer.steps": steps,
                            "trainer.state_every": 2, "trainer.log_samples_every": 1, "trainer.node_wait_s": 8,
                            "trainer.max_restarts": 5, "trainer.output_dir": tmp_path / "out",
                            "trainer.run_name": "nodes", "tracking.tracking_uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                            "tracking.experiment": "nodes", "eval.num_prompts": 4, "data.eval_size": 4})]
    command = [sys.executable, "-m", "orchestrator", "train", str(ROOT / "configs" / "quickstart.yaml"), *overrides]
    env = {**cluster.env, "PYTHONUNBUFFERED": "1"}
    first = tmp_path / "first.log"
    with open(first, "w") as fh:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: state_step(out) >= 2, proc, 300, "the first state", first)
        lost = _placed(out, "rollout")
        assert lost in ("rollout-a", "rollout-b"), lost
        spare = {"rollout-a": "rollout-b", "rollout-b": "rollout-a"}[lost]
        cluster.kill_node(cluster.node(lost))  # a rollout node goes away; the other one is free
        wait_for(lambda: _placed(out, "rollout") == spare, proc, 120, f"the rollout worker re-placed on {spare}", first)
        wait_for(lambda: state_step(out) >= 4, proc, 300, "a state after the rollout worker was re-placed", first)

        lost_learner = _placed(out, "learner")
        spare_learner = {"learner-a": "learner-b", "learner-b": "learner-a"}[lost_learner]
        cluster.kill_node(cluster.node(lost_learner))  # the learner's node goes away; the other is the spare
        wait_for(lambda: _placed(out, "learner") == spare_learner, proc, 120, f"the learner rebuilt on {spare_learner}",
              first)
        wait_for(lambda: state_step(out) >= 6, proc, 300, "a state after the learner was rebuilt", first)

        cluster.kill_node(cluster.node(spare))  # the last rollout node goes; no spare is left
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            import os
            import signal

            os.killpg(proc.pid, signal.SIGKILL)
    text = first.read_text()
    assert "a rollout worker died" in text and "a learner rank died" in text, text[-4000:]
    assert rc == 3, text[-4000:]
    assert re.search(r"cluster error: no live node offers what the run needs after waiting 8 s \(trainer\.node_wait_s\): "
                     r"rollout worker 0 needs \{.*\"rollout_gpu\": 1\.0.*\}.*state \(step \d+\) is kept in", text), text[-3000:]
    kept = state_step(out)
    assert kept >= 6 and not (out / "result.json").exists()

    cluster.add_node("rollout-c", {"rollout_gpu": 1})
    second = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming run nodes (MLflow run" in second.stdout + second.stderr

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("nodes").experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"]
    run_id = runs[0].info.run_id
    for key in ("train/reward", "learner/policy_version", "time/step"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, steps + 1)), key
    versions = {m.step: m.value for m in client.get_metric_history(run_id, "learner/policy_version")}
    assert versions == {s: float(s) for s in range(1, steps + 1)}  # no update lost or repeated
    lags = {m.step: m.value for m in client.get_metric_history(run_id, "train/policy_lag")}
    assert set(lags.values()) == {0.0}, lags  # every step's samples came from the weights of the step before
    assert runs[0].data.metrics["rollout/worker_0/policy_version"] == steps
    place = json.loads((out / "result.json").read_text())["placement"]
    assert [n["labels"]["budgetrl.io/node"] for n in place["rollout"] + place["learner"]] == ["rollout-c", spare_learner]
    # The data position survived every restart: each step trained on the prompts an uninterrupted run draws.
    assert drawn_prompt_ids(out, steps) == expected_prompt_ids(overrides, steps)
