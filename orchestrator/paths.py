"""Where a run's files land: relative paths, and the durable root of a run inside a Ray job.

``ray job submit --working-dir .`` starts the driver in Ray's temporary copy of the working directory
(``<ray temp>/session_*/runtime_resources/working_dir_files/_ray_pkg_*``), which goes when Ray cleans
its session. A relative output path there (the quickstart's ``outputs/``, the default SQLite tracking
store) would leave checkpoints, states, warm starts and MLflow records only in that copy. So inside a
job, every relative path a run *writes* resolves against ``$BUDGETRL_HOME`` (pass it in the job's
runtime env; on a cluster, storage every node mounts), and without it the command fails at once
naming the setting to give. Outside a job nothing changes: relative paths are relative to the cwd.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

HOME_ENV = "BUDGETRL_HOME"
_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"  # set by Ray's job supervisor for a submitted job's driver
_PKG_MARKER = "working_dir_files"  # Ray unpacks a job's working_dir under .../working_dir_files/_ray_pkg_*


class DurablePathError(ValueError):
    """A relative output path inside a Ray job with no durable root to resolve it against."""


def ray_job_working_dir() -> Path | None:
    """The working-dir copy this process runs in, when it is a Ray job's driver started there; else None."""
    raw = os.environ.get(_JOB_ENV)
    if not raw:
        return None
    try:
        runtime_env = json.loads(raw).get("runtime_env") or {}
    except ValueError:
        runtime_env = {}
    cwd = Path.cwd().resolve()
    if runtime_env.get("working_dir") or _PKG_MARKER in cwd.parts:
        return cwd
    return None


def durable_root(key: str) -> Path | None:
    """``$BUDGETRL_HOME`` inside a Ray job (``DurablePathError`` naming ``key`` if unset); None outside one."""
    job_dir = ray_job_working_dir()
    if job_dir is None:
        return None
    home = os.environ.get(HOME_ENV)
    if not home:
        raise DurablePathError(
            f"{key}: this command runs as a Ray job in Ray's temporary copy of the working dir ({job_dir}), "
            f"deleted with the Ray session; a relative path there would lose the run's results. Set {HOME_ENV} "
            f"in the job's runtime env (--runtime-env-json '{{\"env_vars\": {{\"{HOME_ENV}\": \"/shared/budgetrl\"}}}}'; "
            f"on a cluster: storage every node mounts) or give {key} an absolute path")
    root = Path(home).expanduser()
    if not root.is_absolute():
        raise DurablePathError(f"{HOME_ENV}={home!r}: must be an absolute path")
    return root


def output_path(value: str, key: str) -> str:
    """A path the run writes: unchanged if absolute or outside a Ray job, else under ``$BUDGETRL_HOME``."""
    if Path(value).expanduser().is_absolute():
        return str(Path(value).expanduser())
    root = durable_root(key)
    return value if root is None else str(root / value)


def input_or_output_path(value: str, key: str) -> str:
    """A path the run reads if it exists where given (a model shipped in the working dir) and otherwise
    writes (a model the run builds there): as given when it exists, else like ``output_path``."""
    if Path(value).expanduser().exists():
        return value
    return output_path(value, key)


def resolve_durable_paths(cfg) -> None:
    """Inside a Ray job, the relative paths a training config's run writes go under ``$BUDGETRL_HOME``:
    the output dir, a model the run builds, and the default SQLite tracking store (``DurablePathError``
    naming the key when there is no durable root)."""
    cfg.trainer.output_dir = output_path(cfg.trainer.output_dir, "trainer.output_dir")
    if cfg.model.build_if_missing != "none" and cfg.model.path:
        cfg.model.path = input_or_output_path(cfg.model.path, "model.path")
    uri = cfg.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and ray_job_working_dir() is not None:
        root = durable_root("tracking.tracking_uri (or MLFLOW_TRACKING_URI)")
        cfg.tracking.tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
