"""MLflow runs, nested runs, lineage tags and artifacts.

``Tracker`` wraps one MLflow run through an explicit ``MlflowClient`` (never the fluent active-run
globals), so it works the same from the driver, threads and Ray actors, and pickles as (URI, run id).
One training run is one run; a sweep or a multi-stage workload is a parent run with ``child`` runs.
Every run carries the lineage tags below (``lineage_tags`` fills them from a config).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import tempfile
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.parquet as pq
import requests
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT, MLFLOW_PARENT_RUN_ID
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

if TYPE_CHECKING:
    from typing_extensions import Self

TAG_PREFIX = "budgetrl."
TAG_CONFIG_HASH = "budgetrl.config_hash"
TAG_GIT_COMMIT = "budgetrl.git_commit"
TAG_GIT_DIRTY = "budgetrl.git_dirty"
TAG_DATASET_DIGEST = "budgetrl.dataset_digest"
TAG_SOURCE_CHECKPOINT = "budgetrl.source_checkpoint"
TAG_SOURCE_RUN = "budgetrl.source_run"
TAG_WORKLOAD = "budgetrl.workload"
TAG_STAGE = "budgetrl.stage"
TAG_STUDY = "budgetrl.study"
# Sweeps (orchestrator/sweep/): a trial's child run, and the frontier command that reads them back.
TAG_TRIAL = "budgetrl.trial"
TAG_SWEEP_INVOCATION = "budgetrl.sweep_invocation"
TAG_PRUNED = "budgetrl.pruned"  # "true" on a trial stopped early (kept off fronts)
TAG_CHECKPOINT = "budgetrl.checkpoint"  # the checkpoint a run produced (set by the trainer and pipeline stages)
# Multi-stage pipelines (orchestrator/pipeline.py): a stage's inputs and its identity.
TAG_SOURCE_RUNS = "budgetrl.source_runs"  # comma-separated run ids of every input stage
TAG_SOURCE_CHECKPOINTS = "budgetrl.source_checkpoints"  # JSON list of the input checkpoints
TAG_INPUTS = "budgetrl.inputs"  # JSON list of {stage, run_id, checkpoint, key, dataset_digest}
TAG_STAGE_KEY = "budgetrl.stage_key"  # hash of the stage config and its inputs' identities
TAG_REUSED_RUN = "budgetrl.reused_run"  # on a skipped stage's child: the run that produced its outputs
TAG_SKIPPED = "budgetrl.skipped"
TAG_STAGE_RUN_PREFIX = "budgetrl.stage_run."  # on a pipeline's parent: stage name -> producing run id
TAG_STAGE_SKIPPED_PREFIX = "budgetrl.stage_skipped."
TAG_PARENT_RUN = MLFLOW_PARENT_RUN_ID  # "mlflow.parentRunId": MLflow's own nesting tag, shown by the UI
# The MLflow 3 UI opens an experiment without this tag in its GenAI mode (runs filed under "Evaluations");
# the model-training kind shows the runs table, charts and compare views.
TAG_EXPERIMENT_KIND = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"

# Seconds to wait for an HTTP tracking server before giving up; MLflow's own client would retry
# a refused connection for minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES with exponential backoff).
PROBE_TIMEOUT_S = 5.0
_END_STATUSES = ("FINISHED", "FAILED", "KILLED")


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unreachable, unwritable, experiment deleted)."""


# ---------------------------------------------------------------------------------------------
# URIs


def default_tracking_uri() -> str:
    """``sqlite:///<cwd>/mlflow.db``, absolute so Ray actors with another cwd use the same file; inside a
    Ray job ``$BUDGETRL_HOME/mlflow.db`` (the job's cwd is Ray's temporary copy: orchestrator/paths.py)."""
    from .paths import DurablePathError, durable_root

    try:
        root = durable_root("tracking.tracking_uri (or MLFLOW_TRACKING_URI)")
    except DurablePathError as exc:
        raise TrackingError(str(exc)) from None
    return "sqlite:///" + str((root or Path.cwd().resolve()) / "mlflow.db")


def resolve_tracking_uri(uri: str | None = None) -> str:
    """An explicit URI, else ``MLFLOW_TRACKING_URI`` (what ``ray job submit`` passes), else the default.

    A relative SQLite path is made absolute here, so a Tracker shipped to a Ray actor (whose cwd
    differs) still writes to the same file.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()
    db = _sqlite_path(uri)
    if db is None:
        return uri
    query = uri.partition("?")[2]
    return f"sqlite:///{db}" + (f"?{query}" if query else "")


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative to cwd if written so), else None."""
    if not uri.startswith("sqlite:///"):
        return None
    path = unquote(uri[len("sqlite:///") :].split("?", 1)[0])
    if path in ("", ":memory:"):
        return None
    from .paths import DurablePathError, output_path

    try:  # a relative file inside a Ray job goes under $BUDGETRL_HOME, not the job's temporary copy
        return Path(output_path(path, "tracking.tracking_uri")).resolve()
    except DurablePathError as exc:
        raise TrackingError(str(exc)) from None


def _artifact_root(uri: str) -> str | None:
    """``mlruns/`` next to a SQLite file; None lets a server (or other store) choose.

    MLflow's SQLite store otherwise puts a new experiment's artifacts in ``./mlruns`` of whatever
    directory the creating process runs in (a Ray actor's working dir, a test's cwd).
    """
    db = _sqlite_path(uri)
    return (db.parent / "mlruns").as_uri() if db is not None else None


def _probe(uri: str) -> None:
    """Fail fast with a ``TrackingError`` naming ``uri`` if the store cannot be reached."""
    db = _sqlite_path(uri)
    if db is not None:
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"tracking store {uri}: cannot create {db.parent}: {e}") from e
        if not os.access(db.parent, os.W_OK):
            raise TrackingError(f"tracking store {uri}: directory {db.parent} is not writable")
    elif uri.startswith(("http://", "https://")):
        # Any HTTP answer (even 401/404) means a server is there; only transport errors count.
        try:
            requests.get(uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S)
        except requests.RequestException as e:
            raise TrackingError(f"tracking server {uri} is unreachable: {type(e).__name__}: {e}") from e


# ---------------------------------------------------------------------------------------------
# Lineage values


def flatten(d: Mapping[str, Any], sep: str = ".", max_len: int = MAX_PARAM_VAL_LENGTH) -> dict[str, str]:
    """Nested config -> ``{"a.b.c": "value"}`` for MLflow params.

    Non-string leaves are JSON (``true``, ``null``, ``[1, 2]``) as in the YAML. MLflow rejects param
    values over ``max_len`` characters, so longer ones are cut with a visible marker and a warning;
    log the full config with ``Tracker.log_dict`` as well.
    """
    if dataclasses.is_dataclass(d) and not isinstance(d, type):
        d = dataclasses.asdict(d)
    out: dict[str, str] = {}
    for key, value in d.items():
        name = str(key)
        if isinstance(value, Mapping) and value:
            out.update({f"{name}{sep}{k}": v for k, v in flatten(value, sep, max_len).items()})
            continue
        text = value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)
        if len(text) > max_len:
            marker = f"...[truncated {len(text)} chars]"
            warnings.warn(f"param {name!r} is {len(text)} chars, over MLflow's {max_len}; truncated", stacklevel=2)
            text = text[: max_len - len(marker)] + marker
        out[name] = text
    return out


def config_hash(d: Mapping[str, Any]) -> str:
    """First 12 hex of sha256 over canonical JSON: same config, same hash, whatever the key order."""
    if dataclasses.is_dataclass(d) and not isinstance(d, type):
        d = dataclasses.asdict(d)
    canonical = json.dumps(d, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def git_commit(path: str | os.PathLike = ".") -> tuple[str | None, bool]:
    """(HEAD commit, working tree dirty) of the repo containing ``path``; (None, False) outside one."""

    def git(*args: str) -> str | None:
        try:
            # --no-optional-locks: never take index.lock, so this cannot block a concurrent git command.
            proc = subprocess.run(
                ["git", "--no-optional-locks", "-C", str(path), *args],
                check=False,
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return proc.stdout.strip() if proc.returncode == 0 else None

    status = git("status", "--porcelain")
    if status is None:
        return None, False
    return git("rev-parse", "HEAD"), bool(status)


def dataset_digest(table: pa.Table) -> str:
    """sha256 (first 16 hex) of a table's columns and values.

    Independent of chunking, column order and schema metadata (e.g. pandas index info), so the
    same data digests the same in any process; column types count (int32 vs int64 differ).
    """
    h = hashlib.sha256()
    h.update(f"rows={table.num_rows}\n".encode())
    for name in sorted(table.column_names):
        field = table.schema.field(name)
        h.update(f"{name}:{field.type}\n".encode())
        column = table.column(name).combine_chunks()
        for start in range(0, len(column), 65536):
            piece = column.slice(start, 65536)
            fixed_width = pa.types.is_integer(field.type) or pa.types.is_floating(field.type)
            if fixed_width and piece.null_count == 0:
                h.update(piece.to_numpy().tobytes())
            else:
                h.update(json.dumps(piece.to_pylist(), default=repr, sort_keys=True).encode())
        h.update(b"\n")
    return h.hexdigest()[:16]


def lineage_tags(
    config: Mapping[str, Any],
    *,
    workload: str,
    stage: str | None = None,
    source_checkpoint: str | None = None,
    source_run: str | None = None,
    dataset_digest: str | None = None,
    repo: str | os.PathLike | None = None,
) -> dict[str, str]:
    """Lineage tags for a run; unknown values are left out rather than written as placeholders.

    The git commit is the one of the code being run (``repo`` defaults to this package's directory,
    not the cwd); it is also written to ``mlflow.source.git.commit`` so the MLflow UI shows it.
    """
    tags = {TAG_CONFIG_HASH: config_hash(config), TAG_WORKLOAD: workload}
    commit, dirty = git_commit(repo if repo is not None else Path(__file__).resolve().parent)
    if commit is not None:
        tags.update({TAG_GIT_COMMIT: commit, TAG_GIT_DIRTY: str(dirty).lower(), MLFLOW_GIT_COMMIT: commit})
    optional = {
        TAG_STAGE: stage,
        TAG_SOURCE_CHECKPOINT: source_checkpoint,
        TAG_SOURCE_RUN: source_run,
        TAG_DATASET_DIGEST: dataset_digest,
    }
    tags.update({k: str(v) for k, v in optional.items() if v is not None})
    return tags


# ---------------------------------------------------------------------------------------------
# Runs


def _experiment_id(client: MlflowClient, uri: str, name: str, artifact_location: str | None) -> str:
    try:
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            try:
                return client.create_experiment(
                    name, artifact_location=artifact_location or _artifact_root(uri),
                    tags={TAG_EXPERIMENT_KIND: EXPERIMENT_KIND},
                )
            except Exception:  # another process created it first
                experiment = client.get_experiment_by_name(name)
                if experiment is None:
                    raise
    except Exception as e:
        raise TrackingError(f"tracking store {uri}: cannot get or create experiment {name!r}: {e}") from e
    if experiment.lifecycle_stage == "deleted":
        raise TrackingError(
            f"experiment {name!r} in {uri} is deleted; restore it (mlflow experiments restore) "
            "or remove it for good (mlflow gc) before reusing the name"
        )
    if TAG_EXPERIMENT_KIND not in experiment.tags:  # one a user tagged otherwise is left as it is
        client.set_experiment_tag(experiment.experiment_id, TAG_EXPERIMENT_KIND, EXPERIMENT_KIND)
    return experiment.experiment_id


def finite_metrics(metrics: Mapping[str, Any]) -> tuple[list[tuple[str, float]], list[str]]:
    """(finite (key, float) pairs, "key=value" of the non-finite ones); TypeError names a non-number."""
    values, dropped = [], []
    for key, value in metrics.items():
        try:
            value = float(value)
        except (TypeError, ValueError) as e:
            raise TypeError(f"metric {key!r} is not a number: {value!r}") from e
        if math.isfinite(value):
            values.append((key, value))
        else:
            dropped.append(f"{key}={value}")
    return values, dropped


class Tracker:
    """One MLflow run. Use as a context manager: it ends FINISHED, FAILED on an exception, KILLED on ^C."""

    def __init__(self, tracking_uri: str, run_id: str, experiment_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.experiment_id = experiment_id
        self.client = MlflowClient(tracking_uri)
        self._ended = False

    # Pickle as (URI, run id, experiment id): the client holds a DB engine or HTTP session.
    def __getstate__(self) -> dict[str, Any]:
        return {"tracking_uri": self.tracking_uri, "run_id": self.run_id, "experiment_id": self.experiment_id}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["tracking_uri"], state["run_id"], state["experiment_id"])

    def __repr__(self) -> str:
        return f"Tracker(run_id={self.run_id!r}, experiment_id={self.experiment_id!r}, uri={self.tracking_uri!r})"

    @classmethod
    def start(
        cls,
        tracking_uri: str | None,
        experiment: str,
        run_name: str | None = None,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        artifact_location: str | None = None,
    ) -> Tracker:
        """Create a run (and the experiment if missing). ``params`` may be nested; they are flattened."""
        uri = resolve_tracking_uri(tracking_uri)
        _probe(uri)
        client = MlflowClient(uri)
        experiment_id = _experiment_id(client, uri, experiment, artifact_location)
        return cls._create(client, uri, experiment_id, run_name, params, tags, parent_run_id)

    @classmethod
    def _create(cls, client, uri, experiment_id, run_name, params, tags, parent_run_id) -> Tracker:
        run_tags = {k: str(v) for k, v in (tags or {}).items()}
        if parent_run_id is not None:
            run_tags[MLFLOW_PARENT_RUN_ID] = parent_run_id
        run = client.create_run(experiment_id, tags=run_tags, run_name=run_name)
        tracker = cls(uri, run.info.run_id, experiment_id)
        if params:
            tracker.log_params(params)
        return tracker

    @classmethod
    def resume(cls, tracking_uri: str | None, run_id: str) -> Tracker:
        """Reattach to an existing run (after a crash, or in another process) and mark it RUNNING."""
        uri = resolve_tracking_uri(tracking_uri)
        _probe(uri)
        client = MlflowClient(uri)
        try:
            run = client.get_run(run_id)
        except Exception as e:
            raise TrackingError(f"tracking store {uri}: cannot resume run {run_id}: {e}") from e
        if run.info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return cls(uri, run_id, run.info.experiment_id)

    def child(
        self,
        run_name: str,
        params: Mapping[str, Any] | None = None,
        tags: Mapping[str, Any] | None = None,
    ) -> Tracker:
        """A nested run in the same experiment; it inherits this run's ``budgetrl.*`` lineage tags."""
        inherited = {
            k: v for k, v in self.client.get_run(self.run_id).data.tags.items() if k.startswith(TAG_PREFIX)
        }
        inherited.update(tags or {})
        return self._create(
            self.client, self.tracking_uri, self.experiment_id, run_name, params, inherited, self.run_id
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log (nested) params; MLflow refuses to change a param already logged with another value."""
        self.client.log_batch(self.run_id, params=[Param(k, v) for k, v in flatten(params).items()])

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        """One batched write; NaN/inf values are dropped with a warning (one bad step must not kill a run)."""
        timestamp = int(time.time() * 1000)
        values, dropped = finite_metrics(metrics)
        batch = [Metric(key, value, timestamp, int(step)) for key, value in values]
        if dropped:
            warnings.warn(f"run {self.run_id} step {step}: dropped non-finite metrics {', '.join(dropped)}", stacklevel=2)
        self.client.log_batch(self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_table(self, table: pa.Table, artifact_file: str) -> None:
        """Write ``table`` as a Parquet artifact at ``artifact_file`` (e.g. ``frontier/points.parquet``)."""
        directory, name = os.path.split(artifact_file)
        with tempfile.TemporaryDirectory() as tmp:
            pq.write_table(table, os.path.join(tmp, name))
            self.client.log_artifact(self.run_id, os.path.join(tmp, name), directory or None)

    def log_figure(self, fig: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, fig, artifact_file)

    def log_dict(self, d: Mapping[str, Any], artifact_file: str) -> None:
        """JSON or YAML by extension (``.json``, ``.yaml``/``.yml``)."""
        self.client.log_dict(self.run_id, dict(d), artifact_file)

    def log_artifact(self, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(local_path), artifact_path)

    def log_artifacts(self, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(local_dir), artifact_path)

    def artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run terminated; a second call is a no-op."""
        if status not in _END_STATUSES:
            raise ValueError(f"status must be one of {_END_STATUSES}, got {status!r}")
        if not self._ended:
            self.client.set_terminated(self.run_id, status)
            self._ended = True

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        return False


# ---------------------------------------------------------------------------------------------
# Durable metrics


class MetricBuffer:
    """Metrics held until the training state that produced them is saved, then written in batches.

    A resumed run re-does the steps after its last saved state; holding their metrics until then means
    MLflow never shows a step twice, nor a step the final weights did not go through. Records keep
    their first timestamp, so sending one again after a crash is idempotent (the store drops exact
    duplicates). While the store is unreachable records stay here and go out at the next flush. A record is
    ``[key, value, timestamp_ms, step]``, plus the id of the logged model it also belongs to once
    ``attach_model`` names one (a checkpoint's eval: ``logged_model.py``).
    """

    BATCH = 1000  # MLflow's log_batch limit on metrics per request

    def __init__(self, records: list | None = None):
        self.records: list[list] = [list(r) for r in (records or [])]
        self.failed_flushes = 0

    def __len__(self) -> int:
        return len(self.records)

    def add(self, metrics: Mapping[str, Any], step: int) -> None:
        ts = int(time.time() * 1000)
        values, _ = finite_metrics(metrics)  # NaN/inf are dropped, as Tracker.log_metrics does
        self.records.extend([key, value, ts, int(step)] for key, value in values)

    def attach_model(self, model_id: str, step: int, prefix: str = "eval/") -> int:
        """Held metrics of ``step`` whose key starts with ``prefix`` go out attached to logged model ``model_id``
        too (a checkpoint's eval); returns how many (0: they were already sent, see ``log_model_metrics``)."""
        held = [r for r in self.records if r[3] == int(step) and str(r[0]).startswith(prefix)]
        for r in held:
            r[4:] = [model_id]
        return len(held)

    def flush(self, tracker: Tracker) -> bool:
        """Send everything held; False (records kept, one warning) when the store cannot take them."""
        if not self.records:
            return True
        try:
            _probe(tracker.tracking_uri)
            for i in range(0, len(self.records), self.BATCH):
                chunk = self.records[i:i + self.BATCH]
                tracker.client.log_batch(tracker.run_id, metrics=[Metric(*r[:4], model_id=r[4] if len(r) > 4 else None)
                                                                  for r in chunk])
        except Exception as e:  # an unreachable or failing store must not end the training run
            self.failed_flushes += 1
            if self.failed_flushes == 1:
                warnings.warn(f"run {tracker.run_id}: tracking store unavailable ({type(e).__name__}: {e}); "
                              f"holding {len(self.records)} metric values until it is back", stacklevel=2)
            return False
        self.records.clear()
        self.failed_flushes = 0
        return True


# ---------------------------------------------------------------------------------------------
# Lineage read back


def find_checkpoint_run(tracking_uri: str | None, checkpoint: str | os.PathLike) -> str | None:
    """The run that produced ``checkpoint`` (tag ``budgetrl.checkpoint``; reused-stage children skipped)."""
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    value = str(checkpoint).replace("'", "\\'")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, filter_string=f"tags.`{TAG_CHECKPOINT}` = '{value}'",
                              max_results=100, order_by=["attributes.start_time ASC"])
    runs = [r for r in runs if TAG_REUSED_RUN not in r.data.tags]
    return runs[0].info.run_id if runs else None


def lineage_graph(tracking_uri: str | None, *, run_id: str | None = None,
                  checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """The lineage of a run (or of the run that produced ``checkpoint``), read from MLflow tags alone.

    Returns ``{"root": run_id, "nodes": {run_id: {stage, checkpoint, dataset_digest, config_hash,
    stage_key, parent_run_id, inputs: [run ids]}}, "edges": [(source run, run), ...]}``, following the
    ``budgetrl.inputs`` tags that pipeline stages carry (``budgetrl.source_run`` for other runs)."""
    uri = resolve_tracking_uri(tracking_uri)
    if run_id is None:
        if checkpoint is None:
            raise ValueError("lineage_graph: give run_id or checkpoint")
        run_id = find_checkpoint_run(uri, checkpoint)
        if run_id is None:
            raise LookupError(f"no run in {uri} is tagged {TAG_CHECKPOINT}={checkpoint}")
    client = MlflowClient(uri)
    nodes: dict[str, dict] = {}
    edges: list[tuple[str, str]] = []
    todo = [run_id]
    while todo:
        rid = todo.pop()
        if rid in nodes:
            continue
        tags = client.get_run(rid).data.tags
        if TAG_INPUTS in tags:
            sources = [i["run_id"] for i in json.loads(tags[TAG_INPUTS]) if i.get("run_id")]
        else:
            sources = [tags[TAG_SOURCE_RUN]] if tags.get(TAG_SOURCE_RUN) else []
        nodes[rid] = {"stage": tags.get(TAG_STAGE), "checkpoint": tags.get(TAG_CHECKPOINT),
                      "source_checkpoint": tags.get(TAG_SOURCE_CHECKPOINT),
                      "dataset_digest": tags.get(TAG_DATASET_DIGEST), "config_hash": tags.get(TAG_CONFIG_HASH),
                      "stage_key": tags.get(TAG_STAGE_KEY), "parent_run_id": tags.get(TAG_PARENT_RUN),
                      "inputs": sources}
        edges += [(src, rid) for src in sources]
        todo += sources
    return {"root": run_id, "nodes": nodes, "edges": edges}

