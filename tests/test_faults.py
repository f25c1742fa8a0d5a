"""The fault matrix, the parts that need no training run: bad data, overlong prompts, MLflow outages.

(Actors and the driver killed mid-run: tests/test_resume.py; hanging verifiers: tests/test_rewards.py;
a killed sweep driver: tests/test_sweep.py.) Real MLflow: SQLite files and a real ``mlflow server``
on 127.0.0.1 that the test stops and starts again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from conftest import TINY, free_port, start_mlflow_server, stop_mlflow_server
from orchestrator.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


def _cfg(tmp: Path, tiny_model: str, *extra: str):
    base = [f"model.path={tiny_model}", "model.build_if_missing=none", "warmstart.steps=0",
            f"trainer.output_dir={tmp / 'out'}", f"tracking.tracking_uri=sqlite:///{tmp / 'mlflow.db'}",
            "budget.thinking=16", "budget.solution=8", "eval.max_thinking=16", "eval.max_solution=8",
            "budgets=[unconstrained]", "model.max_model_len=64", "eval.num_prompts=4"]
    return load_config(ROOT / "configs" / "quickstart.yaml", base + [f"model.tiny.{k}={v}" for k, v in TINY.items()]
                       + list(extra))


def _prompts(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("content", [b"PAR1 this is not parquet", b""])
def test_corrupt_prompt_file_fails_before_any_work(tmp_path, tiny_model, content):
    from orchestrator.trainer import train

    bad = tmp_path / "prompts.parquet"
    bad.write_bytes(content)
    cfg = _cfg(tmp_path, tiny_model, f"data.path={bad}")
    with pytest.raises(ConfigError, match=r"data\.path: .*prompts\.parquet"):
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "mlflow.db").exists()  # no MLflow run was started
    assert not (tmp_path / "out").exists()


def test_overlong_prompts_error_drop_and_truncate(tmp_path, tiny_model):
    from orchestrator.config import Budget
    from orchestrator.rollout.worker import RolloutWorker, SamplingSpec
    from orchestrator.prompts import fit_prompts, load_prompt_tables
    from orchestrator.trainer import train

    rows = [{"prompt_id": "short", "prompt": "1+2=", "answer": "3"},
            {"prompt_id": "long", "prompt": "9" * 80 + "+1=", "answer": "1" + "0" * 80}]
    path = _prompts(tmp_path / "p.jsonl", rows)
    cfg = _cfg(tmp_path, tiny_model, f"data.path={path}")
    with pytest.raises(ConfigError, match=r"overlong_prompts='error'.*max_model_len=64.*prompt_id 'long'"):
        train(cfg, log=lambda *_: None)
    assert not (tmp_path / "mlflow.db").exists()

    cfg = _cfg(tmp_path, tiny_model, f"data.path={path}", "data.overlong_prompts=drop")
    train_t, eval_t, _ = load_prompt_tables(cfg)
    kept, kept_eval, counts = fit_prompts(cfg, tiny_model, train_t, eval_t, log=lambda *_: None)
    assert kept["prompt_id"].to_pylist() == ["short"] and counts == {"train": 1, "eval": 1}

    worker = RolloutWorker(tiny_model, engine="hf", prompt_template="<s>{prompt}<think>",
                           engine_kwargs=dict(dtype="float32", max_model_len=64), truncate_prompts=True)
    spec = SamplingSpec(group_size=1, budget=Budget(16, 8), temperature=0.0)
    out = worker.generate(train_t, spec)
    full = worker.tokenizer("<s>" + rows[1]["prompt"] + "<think>", add_special_tokens=False)["input_ids"]
    ids = out.to_pylist()[1]["prompt_token_ids"]
    assert len(ids) + 16 + 8 < 64 and ids == full[-len(ids):]  # the end (question, <think>) is kept
    assert out.to_pylist()[0]["prompt_token_ids"][:1] == worker.tokenizer("<s>")["input_ids"]


def test_unreachable_tracking_server_fails_before_ray(tmp_path, tiny_model):
    import ray

    from orchestrator.tracking import TrackingError
    from orchestrator.trainer import train

    ray_before = ray.is_initialized()
    cfg = _cfg(tmp_path, tiny_model, "tracking.tracking_uri=http://127.0.0.1:1")
    t0 = time.monotonic()
    with pytest.raises(TrackingError, match=r"127\.0\.0\.1:1"):
        train(cfg, log=lambda *_: None)
    assert time.monotonic() - t0 < 30 and ray.is_initialized() == ray_before  # Ray was not started


def test_metrics_survive_a_tracking_server_outage(tmp_path):
    """Metrics logged while the server is down are held, then sent once (re-sending is idempotent)."""
    from orchestrator.tracking import MetricBuffer, Tracker

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = start_mlflow_server(tmp_path, port)
    try:
        tracker = Tracker.start(uri, "outage", run_name="outage")
        buf = MetricBuffer()
        buf.add({"train/reward": 0.1}, step=1)
        assert buf.flush(tracker)
        stop_mlflow_server(server)
        for step in (2, 3):
            buf.add({"train/reward": 0.1 * step}, step=step)
        with pytest.warns(UserWarning, match="holding 2 metric values"):
            assert not buf.flush(tracker)
        assert len(buf) == 2  # nothing dropped while the store is away
        saved = [list(r) for r in buf.records]  # what a state file would carry across a crash
        server = start_mlflow_server(tmp_path, port)
        assert buf.flush(tracker) and len(buf) == 0
        assert MetricBuffer(saved).flush(tracker)  # sent again after a crash: no duplicates
        hist = tracker.client.get_metric_history(tracker.run_id, "train/reward")
        assert sorted(m.step for m in hist) == [1, 2, 3]
        tracker.end()
    finally:
        stop_mlflow_server(server)


def test_a_run_the_cluster_cannot_hold_stops_naming_the_resource(tmp_path, tiny_model, ray_session):
    """A resource no node offers (a typo, a node group that does not exist): the placement waits
    ``trainer.node_wait_s``, then the run stops naming each actor, what it needs and what the nodes offer."""
    from mlflow import MlflowClient

    from orchestrator.runtime import NodeUnavailable
    from orchestrator.trainer import train

    cfg = _cfg(tmp_path, tiny_model, "rollout.engine=hf", "rollout.resources.rollout_gpux=1", "trainer.node_wait_s=1",
               "tracking.experiment=unplaceable")
    t0 = time.monotonic()
    with pytest.raises(NodeUnavailable, match=r"after waiting 1 s \(trainer\.node_wait_s\): rollout worker 0 needs "
                                              r"\{\"CPU\": 1\.0, \"rollout_gpux\": 1\.0\}\. Live nodes: 1, offering CPU.*"
                                              r"it has no saved state yet"):
        train(cfg, log=lambda *_: None)
    assert time.monotonic() - t0 < 60
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("unplaceable").experiment_id])
    assert run.info.status == "FAILED"
    from ray.util import placement_group_table

    assert not [pg for pg in placement_group_table().values() if pg["state"] != "REMOVED"
                and pg["name"].startswith("budgetrl-run:") and str(tmp_path) in pg["name"]]  # nothing left behind
