"""``ray job submit`` end to end, as a user runs it against a cluster.

A real Ray head (``ray start --head``) with token authentication, the Ray CLI submitting
``python -m orchestrator train configs/quickstart.yaml ...`` with ``--working-dir`` (the repository) and
``MLFLOW_TRACKING_URI`` in ``--runtime-env-json``; the run must land FINISHED in that MLflow store.

The head is this test's own: its own temp dir, ports and token file, started in a new session so that
exactly its processes are stopped afterwards (``ray stop`` would stop every Ray process of the user,
including the suite's local runtime).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest
import requests
from conftest import TINY

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's bin: `ray` and `python` of this interpreter
JOB_TIMEOUT_S = 480


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], env=env, capture_output=True, text=True, timeout=timeout,
                          check=False)


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:100]
    except psutil.Error:
        return "?"


def _stop(pgid: int, tmp: Path) -> None:
    """SIGTERM, then SIGKILL, every process of the head's session or naming its temp dir.

    The job driver runs in a session of its own (Ray's job supervisor starts it so); its command line
    holds the head's temp dir (the job's files are under it), as do the head's workers.
    """
    me = os.getpid()
    names_tmp = re.compile(re.escape(str(tmp)) + r"(?![^/\s])")  # the dir itself, not /tmp/rjX-other
    procs = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            cmdline = " ".join(p.info["cmdline"] or ())
            if p.pid != me and (os.getpgid(p.pid) == pgid or names_tmp.search(cmdline)):
                procs.append(p)
        except (psutil.Error, ProcessLookupError):
            pass
    for p in procs:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=5)
    if alive:
        print("SIGKILL for what outlived SIGTERM by 5 s:", [(p.pid, _name(p)) for p in alive])
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _submit(submit: list, env: dict) -> str | None:
    """Run `ray job submit` (it follows the driver's log until the job ends); its output, None on timeout.

    Right after `ray start` the head's job agent may not be registered yet ("No available agent to
    submit job"): nothing was submitted then, so the same submission id is tried again.
    """
    now = time.monotonic()
    deadline, retry_until = now + JOB_TIMEOUT_S, now + 60
    while True:
        try:
            result = _run(submit, env, max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return None
        output = result.stdout + result.stderr
        if "No available agent" not in output or time.monotonic() > retry_until:
            return output
        time.sleep(2)


@pytest.fixture(scope="module")
def ray_head():
    """(dashboard address, client env, temp dir) of a token-auth Ray head on 127.0.0.1."""
    tmp = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))  # short: Ray's socket paths stay < 107 chars
    token = tmp / "auth_token"
    token.write_text(secrets.token_hex(32))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    # Token auth for the server and every client; an activated venv (the job's `python` is this one).
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    # Free ports for everything `ray start` would otherwise put on a fixed default (the dashboard
    # agent's 52365, the client server's 10001): another Ray on this machine may hold those.
    gcs, dashboard, agent, client = (_free_port() for _ in range(4))
    cmd = [BIN / "ray", "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
           f"--dashboard-port={dashboard}", f"--dashboard-agent-listen-port={agent}",
           f"--ray-client-server-port={client}", "--num-cpus=2", "--disable-usage-stats",
           f"--temp-dir={tmp}"]
    # A new session: every daemon `ray start` leaves behind is in process group `proc.pid`.
    proc = subprocess.Popen([str(c) for c in cmd], env=env, cwd=tmp, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, f"ray start failed:\n{out}"
        yield f"http://127.0.0.1:{dashboard}", env, tmp
    finally:
        if proc.poll() is None:
            proc.kill()
        _stop(proc.pid, tmp)
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.mark.timeout(900)
def test_ray_job_submit_train(ray_head):
    address, env, head_tmp = ray_head
    work = head_tmp / "job"  # under the head's dir: the driver's command line names it (see _stop)
    uri = f"sqlite:///{work / 'mlflow.db'}"  # an absolute path: sqlite:////tmp/...
    # tests/test_train_e2e.py's short run; no tracking.tracking_uri: the runtime env's URI must be used.
    overrides = [f"model.path={work / 'tiny'}", "warmstart.steps=4", "warmstart.train_size=256",
                 "warmstart.batch_size=32", "trainer.steps=2", "trainer.prompts_per_step=4",
                 "rollout.group_size=4", f"trainer.output_dir={work / 'out'}", "trainer.run_name=jobsubmit",
                 "eval.num_prompts=12", "data.eval_size=12", "data.train_size=64",
                 "budgets=[6x4,unconstrained]", "eval.max_thinking=24", "budget.thinking=6",
                 "budget.solution=4", "learner.micro_batch_size=8", "learner.num_threads=1",
                 "tracking.experiment=jobsubmit", "reward.num_workers=1",
                 "rollout.engine=hf"]  # what is under test is the submission; test_train_e2e covers vLLM
    overrides += [f"model.tiny.{k}={v}" for k, v in TINY.items()]
    job_id = f"budgetrl-test-{uuid.uuid4().hex[:8]}"
    runtime_env = {"env_vars": {"MLFLOW_TRACKING_URI": uri}}
    submit = [BIN / "ray", "job", "submit", "--address", address, "--submission-id", job_id,
              "--working-dir", ROOT, "--runtime-env-json", json.dumps(runtime_env),
              "--", "python", "-m", "orchestrator", "train", "configs/quickstart.yaml", *overrides]
    t0 = time.perf_counter()
    output = _submit(submit, env)
    if output is None:
        output = f"`ray job submit` still running after {JOB_TIMEOUT_S}s"
        _run([BIN / "ray", "job", "stop", "--address", address, job_id], env, 60)
    wall = time.perf_counter() - t0
    # The job's status from the Jobs REST API, which wants the token as much as the CLI does.
    url, token = f"{address}/api/jobs/{job_id}", Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    assert requests.get(url, timeout=30).status_code in (401, 403)
    reply = requests.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    status = reply.json().get("status") if reply.ok else f"HTTP {reply.status_code}: {reply.text[:300]}"
    if status != "SUCCEEDED":
        logs = _run([BIN / "ray", "job", "logs", "--address", address, job_id], env, 60)
        print(output, logs.stdout, logs.stderr, sep="\n")
        pytest.fail(f"job {job_id} did not succeed ({wall:.0f}s): {status}\n"
                    f"--- driver log (tail) ---\n{logs.stdout[-4000:]}{logs.stderr[-1000:]}")
    print(f"ray job submit -> SUCCEEDED in {wall:.1f}s")

    # The run is in the store the runtime env named, finished, with the training metrics.
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("jobsubmit")
    assert experiment is not None, f"no experiment 'jobsubmit' in {uri}: MLFLOW_TRACKING_URI was not used"
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.status for r in runs] == ["FINISHED"], [(r.info.run_name, r.info.status) for r in runs]
    run_id = runs[0].info.run_id
    for key in ("train/reward", "train/accuracy"):
        assert [m.step for m in client.get_metric_history(run_id, key)] == [1, 2], key
    assert (work / "out" / "jobsubmit" / "checkpoint" / "model.safetensors").is_file()

    # The working dir was the repository's code without .gitignore'd or heavy paths (.venv is 4 GB).
    unpacked = head_tmp / "session_latest" / "runtime_resources" / "working_dir_files"
    packages = [p for p in unpacked.iterdir() if p.is_dir()]
    assert packages, "no working_dir package was unpacked on the head"
    for pkg in packages:
        assert (pkg / "configs" / "quickstart.yaml").is_file(), sorted(p.name for p in pkg.iterdir())
        assert (pkg / "orchestrator" / "trainer.py").is_file(), sorted(p.name for p in pkg.iterdir())
        for heavy in (".venv", ".git", "outputs", "mlruns", "mlflow.db"):
            assert not (pkg / heavy).exists(), f"{heavy} was uploaded with the working dir"
        size = sum(f.stat().st_size for f in pkg.rglob("*") if f.is_file())
        print(f"working dir package {pkg.name}: {size / 2**20:.2f} MiB")
        assert size < 20 * 2**20, f"working dir package is {size / 2**20:.1f} MiB"
