"""Session-wide fixtures: one Ray runtime, one tiny model, one vLLM rollout worker for each pytest-xdist
worker process (two: pyproject.toml's addopts)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

ROOT = Path(__file__).resolve().parents[1]
# The longest files first (seconds of one CI run, --durations, summed per file), so the two xdist workers end
# together: with `--dist loadfile --no-loadscope-reorder` (pyproject.toml) files are handed out in collection
# order as workers free up, and a long file handed out last would run alone at the end (xdist's own reorder,
# most tests first, puts these few-test, long files last). Longest-processing-time first; the rest keep
# their order. Re-measure with `pytest --durations=0` when a file's cost moves.
LONGEST_FILES = (
    "test_multinode.py", "test_sweep.py", "test_resume.py", "test_faults.py", "test_algorithms_e2e.py",
    "test_journey.py", "test_serve.py", "test_rollout.py", "test_collective_sync.py", "test_learner_ranks.py",
    "test_curriculum.py", "test_elastic.py",
)


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order


# Small enough to be fast, head_dim 32 (vLLM's CPU attention needs a multiple of 32).
TINY = dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128, max_position_embeddings=256)


@pytest.fixture(scope="session")
def benchmark_module():
    """``load(name)``: a script of ``benchmarks/`` as a module (the folder is scripts, not a package)."""
    import importlib.util
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load


@pytest.fixture(scope="session")
def ray_session():
    import ray

    # Logical CPUs above the machine's 2 cores: tests place several small actors at once
    # (the shared rollout worker plus a training run's group); the OS shares the real cores.
    from orchestrator.runtime import start_local_ray  # retried when Ray's 30 s start-up window is missed

    start_local_ray(num_cpus=8, include_dashboard=False, log_to_driver=False,
                    runtime_env={"env_vars": {"TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from orchestrator.tiny_model import build_tiny_model

    return str(build_tiny_model(tmp_path_factory.mktemp("models") / "tiny", **TINY))


@pytest.fixture(scope="session")
def standin_model(tmp_path_factory) -> str:
    """The stand-in checkpoint (orchestrator/standin_model.py): trained BPE, chat template, sharded weights."""
    from orchestrator.standin_model import build_standin_model

    return str(build_standin_model(tmp_path_factory.mktemp("models") / "standin"))


@pytest.fixture(scope="session")
def vllm_worker(ray_session, tiny_model):
    """One vLLM RolloutWorker actor shared by every test that needs a real engine."""
    from orchestrator.rollout.worker import RolloutWorker
    from orchestrator.runtime import VLLM_CPU_ENV

    env = dict(VLLM_CPU_ENV, VLLM_CPU_KVCACHE_SPACE="1")
    actor = ray_session.remote(RolloutWorker).options(num_cpus=1, runtime_env={"env_vars": env}).remote(
        tiny_model, engine="vllm", prompt_template="<s>{prompt}<think>",
        engine_kwargs=dict(dtype="float32", max_model_len=256, seed=0))
    ray_session.get(actor.ready.remote())
    yield actor
    ray_session.kill(actor)


@pytest.fixture(scope="session")
def hf_worker(tiny_model):
    """The HF engine runs in-process: no Ray needed."""
    from orchestrator.rollout.worker import RolloutWorker

    return RolloutWorker(tiny_model, engine="hf", prompt_template="<s>{prompt}<think>",
                         engine_kwargs=dict(dtype="float32"))


@pytest.fixture(scope="session")
def hf_bf16_worker(tiny_model):
    """The HF engine in bf16 (the budget tests run in both dtypes; a bf16 vLLM engine would be a second
    engine per xdist worker)."""
    from orchestrator.rollout.worker import RolloutWorker

    return RolloutWorker(tiny_model, engine="hf", prompt_template="<s>{prompt}<think>",
                         engine_kwargs=dict(dtype="bfloat16"))


sys.path.insert(0, os.path.dirname(__file__))


# ---- helpers shared by the fault tests (test_resume, test_multinode) ---------------------------------


def expected_prompt_ids(overrides: list[str], steps: int) -> list[list[str]]:
    """The prompt ids an uninterrupted run of this config draws at steps 1..steps (its own sampler)."""
    from orchestrator.config import load_config
    from orchestrator.prompts import PromptSampler, load_prompt_tables

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides, check_paths=False)
    train, _, _ = load_prompt_tables(cfg)
    sampler = PromptSampler(train, cfg.trainer.prompts_per_step, cfg.trainer.seed)
    return [sampler.next()["prompt_id"].to_pylist() for _ in range(steps)]


def drawn_prompt_ids(out: Path, steps: int) -> list[list[str]]:
    """The prompt ids each step trained on, from its rollout file (``trainer.log_samples_every=1``)."""
    import pyarrow.parquet as pq

    ids = []
    for step in range(1, steps + 1):
        rows = pq.read_table(out / "rollouts" / f"step_{step:05d}.parquet", columns=["prompt_id"]).to_pylist()
        ids.append(list(dict.fromkeys(r["prompt_id"] for r in rows)))
    return ids




def expected_budgets(overrides: list[str], prompt_ids: list[list[str]]) -> list[dict]:
    """Per step, {prompt_id: (thinking, solution)} as a fresh schedule of this config draws them."""
    from orchestrator.budget_schedule import build_schedule
    from orchestrator.config import load_config

    cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides, check_paths=False)
    s = build_schedule(cfg.budget, cfg.trainer.seed, cfg.trainer.off_policy_steps)
    return [{p: (b.thinking, b.solution) for p, b in zip(ids, s.budgets(ids, step))}
            for step, ids in enumerate(prompt_ids, start=1)]


def drawn_budgets(out: Path, steps: int) -> list[dict]:
    """Per step, {prompt_id: (thinking, solution)} from its rollout file; fails if a group's budgets differ."""
    import pyarrow.parquet as pq

    got = []
    for step in range(1, steps + 1):
        seen: dict = {}
        for r in pq.read_table(out / "rollouts" / f"step_{step:05d}.parquet").to_pylist():
            b = seen.setdefault(r["prompt_id"], (r["budget_thinking"], r["budget_solution"]))
            assert b == (r["budget_thinking"], r["budget_solution"]), (step, r["prompt_id"])
        got.append(seen)
    return got


def state_step(out: Path) -> int:
    """The step of a run directory's saved state (``trainer_state.json``), -1 while there is none."""
    import json

    try:
        return int(json.loads((out / "state" / "trainer_state.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def kill_actors_when(ready, title: str, timeout: float = 300) -> tuple:
    """A started daemon thread that waits for ``ready()`` (up to ``timeout`` s), then SIGKILLs this process's
    descendants titled ``ray::TITLE`` (the actors of the Ray runtime this test session started); the pids
    killed are appended to the returned list. Returns (thread, pids)."""
    import threading
    import time

    import psutil

    killed: list[int] = []

    def run():
        deadline = time.monotonic() + timeout
        while not ready() and time.monotonic() < deadline:
            time.sleep(0.05)
        for p in psutil.Process().children(recursive=True):
            try:
                if " ".join(p.cmdline()).startswith(f"ray::{title}"):
                    p.kill()
                    killed.append(p.pid)
            except psutil.Error:
                pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, killed


def hf_logprobs(model_dir: str, rows: list[dict]) -> list:
    """transformers' fp32 logprobs of each rollout row's response tokens under the weights at ``model_dir``
    (what an engine that holds those weights must have sampled them with)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for row in rows:
            ids = torch.tensor([row["prompt_token_ids"] + row["response_token_ids"]])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            n = len(row["response_token_ids"])
            out.append(logp[-n:].gather(1, ids[0, -n:, None])[:, 0].numpy())
    return out


def wait_for(cond, proc, timeout: float, what: str, log: Path | None = None):
    """Poll ``cond`` until it returns something truthy (returned); fail if ``proc`` exits or time runs out,
    with the tail of ``log`` when given."""
    import time

    tail = (lambda: "\n" + log.read_text()[-4000:]) if log is not None else (lambda: "")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"the run exited ({proc.returncode}) while waiting for {what}:{tail()}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}:{tail()}")


@pytest.fixture()
def cfg_file(tmp_path):
    """A minimal training config over an existing (empty) model directory: for config-validation tests."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    p = tmp_path / "c.yaml"
    p.write_text(f"model:\n  path: {model}\n  max_model_len: 256\nbudget:\n  thinking: 16\n  solution: 8\n")
    return p


# (thinking, solution, label, correct of 100, mean tokens): a made-up eval grid for the effort and serving tests.
EVAL_GRID = [(4, 2, "4x2", 10, 5), (8, 4, "8x4", 35, 10), (16, 8, "16x8", 50, 20), (32, 16, "32x16", 58, 40),
             (64, 32, "64x32", 60, 80), (128, 64, "unconstrained", 62, 160)]


@pytest.fixture(scope="session")
def eval_summary():
    """``evaluation.summarize`` of 100 records per ``EVAL_GRID`` budget: the table a run's eval logs."""
    import pyarrow as pa

    from orchestrator.evaluation import summarize

    rows = []
    for t, s, label, correct, tokens in EVAL_GRID:
        for i in range(100):
            rows.append({"budget_label": label, "budget_thinking": t, "budget_solution": s, "correct": i < correct,
                         "reward": float(i < correct), "thinking_tokens": tokens - tokens // 4,
                         "solution_tokens": tokens // 4, "thinking_truncated": False, "difficulty": 1})
    return summarize(pa.Table.from_pylist(rows))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mlflow_server(tmp: Path, port: int) -> subprocess.Popen:
    """A light ``mlflow server`` on 127.0.0.1 (SQLite in ``tmp``, one worker, no job runner), in its own
    process group; returns once ``/health`` answers."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    mlflow = Path(sys.executable).with_name("mlflow")
    proc = subprocess.Popen([str(mlflow), "server", "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}",
                             "--artifacts-destination", str(tmp / "artifacts"), "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180  # a loaded 2-core host has taken over 90 s to start one
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return proc
        except requests.RequestException:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail("mlflow server did not start")


def stop_mlflow_server(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
