"""Where a run writes when it is a Ray job: relative paths under $BUDGETRL_HOME, or a clear refusal.

The process is made to look like a submitted job's driver the way Ray makes it: the job supervisor's
``RAY_JOB_CONFIG_JSON_ENV_VAR`` with a ``working_dir`` and a cwd inside ``working_dir_files/_ray_pkg_*``
(tests/test_multinode.py submits real jobs).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_ray_job(tmp_path, monkeypatch):
    pkg = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    pkg.mkdir(parents=True)
    (pkg / "shipped-model").mkdir()
    (pkg / "shipped-model" / "config.json").write_text("{}")
    monkeypatch.chdir(pkg)
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps(
        {"runtime_env": {"working_dir": "gcs://_ray_pkg_abc.zip"}, "metadata": {"job_submission_id": "j"}}))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("BUDGETRL_HOME", raising=False)
    return pkg


def test_outside_a_job_relative_paths_stay_relative(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    assert cfg.trainer.output_dir == "outputs" and cfg.model.path == "outputs/models/tiny-base"
    assert cfg.tracking.tracking_uri is None


def test_a_job_without_budgetrl_home_fails_naming_the_setting(in_ray_job):
    with pytest.raises(ConfigError, match=r"trainer\.output_dir: this command runs as a Ray job .*_ray_pkg_abc.*"
                                          r"Set BUDGETRL_HOME .* or give trainer\.output_dir an absolute path"):
        load_config(ROOT / "configs" / "quickstart.yaml")


def test_a_job_resolves_what_it_writes_under_budgetrl_home(in_ray_job, tmp_path, monkeypatch):
    home = tmp_path / "durable"
    monkeypatch.setenv("BUDGETRL_HOME", str(home))
    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    assert cfg.trainer.output_dir == str(home / "outputs")
    assert cfg.model.path == str(home / "outputs" / "models" / "tiny-base")  # built by the run: durable
    assert cfg.tracking.tracking_uri == f"sqlite:///{home / 'mlflow.db'}"
    # What the job shipped is read where it is; absolute paths and a tracking server stay as given.
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", ["model.path=shipped-model",
                                                           f"trainer.output_dir={tmp_path / 'abs'}",
                                                           "tracking.tracking_uri=http://127.0.0.1:5000"])
    assert (cfg.model.path, cfg.trainer.output_dir) == ("shipped-model", str(tmp_path / "abs"))
    assert cfg.tracking.tracking_uri == "http://127.0.0.1:5000"
    from orchestrator.tracking import resolve_tracking_uri

    assert resolve_tracking_uri("sqlite:///runs.db") == f"sqlite:///{home / 'runs.db'}"


def test_a_job_with_an_absolute_output_dir_needs_a_store_too(in_ray_job, tmp_path, monkeypatch):
    """Only the default SQLite store would land in the copy: a tracking URI or BUDGETRL_HOME is needed."""
    with pytest.raises(ConfigError, match=r"tracking\.tracking_uri \(or MLFLOW_TRACKING_URI\): this command runs as"):
        load_config(ROOT / "configs" / "quickstart.yaml", [f"trainer.output_dir={tmp_path / 'abs'}",
                                                           f"model.path={tmp_path / 'model'}"])
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"trainer.output_dir={tmp_path / 'abs'}",
                                                             f"model.path={tmp_path / 'model'}"])
    assert cfg.trainer.output_dir == str(tmp_path / "abs")
