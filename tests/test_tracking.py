"""Tracker against a real SQLite MLflow store; lineage helpers."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from matplotlib.figure import Figure

from orchestrator import tracking
from orchestrator.tracking import Tracker, TrackingError


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, Path]:
    """One SQLite store per module: creating and migrating the DB is the slow part (about 2 s)."""
    root = tmp_path_factory.mktemp("mlflow")
    return f"sqlite:///{root / 'mlflow.db'}", root


def test_run_params_metrics_tags_and_lineage(store):
    uri, _ = store
    config = {"rollout": {"budget": {"thinking": 512, "solution": 128}, "engine": "vllm"}, "lr": 1e-6}
    tags = tracking.lineage_tags(config, workload="elastic", stage="rl", dataset_digest="abc")
    with Tracker.start(uri, "exp-basic", run_name="r1", params=config, tags=tags) as t:
        with pytest.warns(UserWarning, match="loss=nan"):
            t.log_metrics({"reward": 0.5, "loss": float("nan")}, step=1)
        t.log_metrics({"reward": 0.75}, step=2)
        t.set_tags({"note": "hello"})
    run = t.client.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    assert run.data.params["rollout.budget.thinking"] == "512"
    assert run.data.params["rollout.engine"] == "vllm"
    assert [m.value for m in t.client.get_metric_history(t.run_id, "reward")] == [0.5, 0.75]
    assert "loss" not in run.data.metrics  # NaN dropped, run kept going
    assert run.data.tags[tracking.TAG_CONFIG_HASH] == tracking.config_hash(config)
    assert run.data.tags[tracking.TAG_WORKLOAD] == "elastic"
    assert run.data.tags[tracking.TAG_STAGE] == "rl"
    assert run.data.tags[tracking.TAG_DATASET_DIGEST] == "abc"
    assert run.data.tags["note"] == "hello"


def test_artifacts_land_next_to_db_and_read_back(store, tmp_path, monkeypatch):
    uri, root = store
    monkeypatch.chdir(tmp_path)  # artifacts must not follow the cwd
    table = pa.table({"accuracy": [0.1, 0.9], "label": ["a", "b"]})
    fig = Figure()
    fig.add_subplot().plot([0, 1], [0, 1])
    src = tmp_path / "ckpt"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with Tracker.start(uri, "exp-artifacts") as t:
        t.log_table(table, "frontier/points.parquet")
        t.log_figure(fig, "frontier/plot.png")
        t.log_dict({"a": {"b": 1}}, "config.yaml")
        t.log_artifacts(src, "checkpoint")
    assert t.artifact_uri().startswith((root / "mlruns").as_uri())
    assert not (tmp_path / "mlruns").exists()
    got = pq.read_table(t.client.download_artifacts(t.run_id, "frontier/points.parquet", str(tmp_path)))
    assert got.equals(table)
    names = {a.path for a in t.client.list_artifacts(t.run_id, "frontier")}
    assert names == {"frontier/points.parquet", "frontier/plot.png"}
    assert {a.path for a in t.client.list_artifacts(t.run_id, "checkpoint")} == {"checkpoint/config.json"}


def test_child_run_nests_and_inherits_lineage(store):
    uri, _ = store
    parent = Tracker.start(uri, "exp-nested", tags={tracking.TAG_WORKLOAD: "meta_abilities", "other": "x"})
    child = parent.child("stage-deduction", tags={tracking.TAG_STAGE: "deduction"}, params={"level": 2})
    child.end()
    parent.end()
    tags = child.client.get_run(child.run_id).data.tags
    assert tags[tracking.TAG_PARENT_RUN] == parent.run_id == tags["mlflow.parentRunId"]
    assert tags[tracking.TAG_WORKLOAD] == "meta_abilities"
    assert tags[tracking.TAG_STAGE] == "deduction"
    assert "other" not in tags  # only budgetrl.* lineage is inherited
    assert child.experiment_id == parent.experiment_id


def test_failure_resume_and_pickle(store):
    uri, _ = store
    with pytest.raises(RuntimeError, match="boom"), Tracker.start(uri, "exp-fail") as t:
        raise RuntimeError("boom")
    assert t.client.get_run(t.run_id).info.status == "FAILED"
    again = pickle.loads(pickle.dumps(Tracker.resume(uri, t.run_id)))  # as a Ray actor would get it
    assert again.client.get_run(t.run_id).info.status == "RUNNING"
    again.log_metrics({"x": 1}, step=0)
    again.end("KILLED")
    assert again.client.get_run(t.run_id).info.status == "KILLED"
    with pytest.raises(ValueError):
        again.end("DONE")


def test_unreachable_server_fails_fast():
    start = time.monotonic()
    with pytest.raises(TrackingError, match=r"http://127\.0\.0\.1:1"):
        Tracker.start("http://127.0.0.1:1", "exp")
    assert time.monotonic() - start < 10


def test_default_uri_is_absolute_sqlite(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert tracking.resolve_tracking_uri() == tracking.default_tracking_uri()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.resolve_tracking_uri() == "http://mlflow:5000"
    assert tracking.resolve_tracking_uri("sqlite:///x.db") == f"sqlite:///{tmp_path.resolve()}/x.db"
    assert tracking.resolve_tracking_uri("sqlite:////abs/x.db?timeout=5") == "sqlite:////abs/x.db?timeout=5"


def test_flatten_and_truncation():
    flat = tracking.flatten({"a": {"b": 1, "c": {"d": True}}, "e": None, "f": [1, 2], "g": {}, "h": "s"})
    assert flat == {"a.b": "1", "a.c.d": "true", "e": "null", "f": "[1, 2]", "g": "{}", "h": "s"}
    with pytest.warns(UserWarning, match="truncated"):
        long = tracking.flatten({"k": "x" * 7000})["k"]
    assert len(long) == tracking.MAX_PARAM_VAL_LENGTH and long.endswith("[truncated 7000 chars]")


def test_config_hash_is_order_independent():
    a = {"x": 1, "y": {"p": [1, 2], "q": "s"}}
    b = {"y": {"q": "s", "p": [1, 2]}, "x": 1}
    assert tracking.config_hash(a) == tracking.config_hash(b)
    assert len(tracking.config_hash(a)) == 12
    assert tracking.config_hash(a) != tracking.config_hash({**a, "x": 2})


def test_dataset_digest_stable_and_chunking_independent():
    data = {
        "prompt_id": [f"p{i}" for i in range(10)],
        "difficulty": list(range(10)),
        "score": [i / 3 for i in range(10)],
        "tokens": [[i, i + 1] for i in range(10)],
        "domain": ["math", None] * 5,
    }
    one = pa.table(data)
    chunked = pa.concat_tables([one.slice(0, 3), one.slice(3, 4), one.slice(7)])
    assert chunked.column("prompt_id").num_chunks == 3
    reordered = one.select(["tokens", "score", "prompt_id", "domain", "difficulty"])
    with_meta = one.replace_schema_metadata({b"pandas": b"{}"})
    digest = tracking.dataset_digest(one)
    assert digest == tracking.dataset_digest(chunked) == tracking.dataset_digest(reordered)
    assert digest == tracking.dataset_digest(with_meta)
    changed = one.set_column(2, "score", pa.array([i / 3 for i in range(9)] + [0.0]))
    assert tracking.dataset_digest(changed) != digest
    # Same digest in a fresh process (no dependence on hash randomization or memory layout).
    code = (
        "import json, pyarrow as pa; from orchestrator.tracking import dataset_digest;"
        f"print(dataset_digest(pa.table(json.loads({json.dumps(data)!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == digest


def test_git_commit_and_lineage(tmp_path):
    assert tracking.git_commit(tmp_path) == (None, False)  # not a repo: no crash
    git = [
        "git",
        "-C",
        str(tmp_path),
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "-c",
        "commit.gpgsign=false",
    ]
    subprocess.run([*git, "init", "-q"], check=True)
    (tmp_path / "f.txt").write_text("1")
    subprocess.run([*git, "add", "f.txt"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "m"], check=True)
    commit, dirty = tracking.git_commit(tmp_path)
    assert len(commit) == 40 and dirty is False
    (tmp_path / "f.txt").write_text("2")
    assert tracking.git_commit(tmp_path) == (commit, True)
    tags = tracking.lineage_tags({"a": 1}, workload="journey", repo=tmp_path)
    assert tags[tracking.TAG_GIT_COMMIT] == tags["mlflow.source.git.commit"] == commit
    assert tags[tracking.TAG_GIT_DIRTY] == "true"
    assert tracking.TAG_STAGE not in tags  # unknown lineage is left out, not written as "None"



def test_prompt_files_logged_as_dataset_inputs(store, tmp_path):
    """A user's prompt files as the run's dataset inputs: the file as source, its stem as name, the
    ``train``/``eval`` contexts, the digest of the lineage tag, the columns as schema."""
    from orchestrator.config import load_config
    from orchestrator.data.io import read_prompts
    from orchestrator.dataset_inputs import log_prompt_sets

    uri, _ = store
    for name, n in (("train.jsonl", 4), ("held_out.jsonl", 2)):
        (tmp_path / name).write_text("".join(json.dumps({"prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n"
                                             for i in range(n)))
    cfg = load_config(Path(__file__).parents[1] / "configs" / "quickstart.yaml",
                      [f"data.path={tmp_path / 'train.jsonl'}", f"data.eval_path={tmp_path / 'held_out.jsonl'}"],
                      check_paths=False)
    train, evals = read_prompts(cfg.data.path), read_prompts(cfg.data.eval_path)
    t = Tracker.start(uri, "datasets", run_name="files")
    log_prompt_sets(t, cfg, train, evals)
    inputs = {tag.value: d.dataset for d in t.client.get_run(t.run_id).inputs.dataset_inputs
              for tag in d.tags if tag.key == "mlflow.data.context"}
    assert {k: (d.name, d.source_type, json.loads(d.source)["uri"]) for k, d in inputs.items()} == {
        "train": ("train-train", "local", str(tmp_path / "train.jsonl")),
        "eval": ("held_out-eval", "local", str(tmp_path / "held_out.jsonl"))}
    assert inputs["train"].digest == tracking.dataset_digest(train) != inputs["eval"].digest
    assert [c["name"] for c in json.loads(inputs["eval"].schema)["mlflow_colspec"]][:2] == ["prompt_id", "task"]
