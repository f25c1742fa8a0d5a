"""Checkpoints as MLflow 3 logged models: the lineage the MLflow UI draws (dataset -> run -> model -> version).

A checkpoint directory becomes a ``LoggedModel`` of the run that saved it (``source_run_id``, and a run output at
its step), tagged with its path and step and the run's lineage tags, with its eval metrics attached by
``model_id`` (the run keeps them too). The final checkpoint is named ``checkpoint`` and its files are the model's
artifacts (uploaded once: the run has no ``checkpoint/`` artifact of its own any more); a periodic one is named
like its directory (``checkpoint-00010``) and is external: its weights stay on disk. ``registry.py`` registers
versions from these models. A plain HF ``save_pretrained`` directory: no MLmodel file, no pyfunc flavour.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric

from .tracking import (TAG_CHECKPOINT, TAG_CONFIG_HASH, TAG_DATASET_DIGEST, TAG_GIT_COMMIT, TAG_STAGE, TAG_TRIAL,
                       TAG_WORKLOAD, MetricBuffer, Tracker, finite_metrics)

# Checkpoints as MLflow 3 logged models (``log_checkpoint_model``): the final one is named ``checkpoint``
# (``runs:/RUN/checkpoint`` resolves to it), a periodic one ``checkpoint-NNNNN`` like its directory.
FINAL_MODEL = "checkpoint"
MODEL_TYPE = "budgetrl-checkpoint"
TAG_MODEL_STEP = "budgetrl.step"  # logged-model tag: the training step the checkpoint was saved at
_MODEL_LINEAGE_TAGS = (TAG_CONFIG_HASH, TAG_GIT_COMMIT, TAG_DATASET_DIGEST, TAG_WORKLOAD, TAG_STAGE, TAG_TRIAL)


def find_checkpoint_model(client: MlflowClient, run_id: str, name: str = FINAL_MODEL,
                          experiment_id: str | None = None):
    """The logged model ``name`` whose source run is ``run_id`` (newest first), or None."""
    experiment_id = experiment_id or client.get_run(run_id).info.experiment_id
    name_q = name.replace("'", "\\'")
    found = client.search_logged_models([experiment_id], max_results=1,
                                        filter_string=f"name = '{name_q}' AND source_run_id = '{run_id}'",
                                        order_by=[{"field_name": "creation_time", "ascending": False}])
    return found[0] if found else None


def log_checkpoint_model(tracker: Tracker, checkpoint_dir: str | os.PathLike, step: int, *,
                         name: str = FINAL_MODEL, upload: bool = True) -> str:
    """Record a checkpoint directory as an MLflow 3 logged model of the run, output at ``step``; its model id.

    ``upload``: the directory's files become the model's artifacts (the run keeps no second copy under
    ``checkpoint/``); otherwise the model is external (``mlflow.model.isExternal``), its weights staying at
    the path in its ``budgetrl.checkpoint`` tag (periodic checkpoints: no multi-GB upload every N steps).
    A resumed run that records the same name again reuses its model. Attach eval metrics with ``model_id``
    (``MetricBuffer.attach_model`` or ``log_model_metrics``)."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.utils.mlflow_tags import MLFLOW_MODEL_IS_EXTERNAL

    client, path = tracker.client, str(Path(checkpoint_dir).resolve())
    tags = {TAG_CHECKPOINT: path, TAG_MODEL_STEP: str(int(step))}
    if not upload:
        tags[MLFLOW_MODEL_IS_EXTERNAL] = "true"
    run_tags = client.get_run(tracker.run_id).data.tags
    tags.update({k: run_tags[k] for k in _MODEL_LINEAGE_TAGS if k in run_tags})
    model = find_checkpoint_model(client, tracker.run_id, name, tracker.experiment_id)
    if model is None:
        model = client.create_logged_model(tracker.experiment_id, name=name, source_run_id=tracker.run_id,
                                           tags=tags, model_type=MODEL_TYPE)
        client.log_outputs(tracker.run_id, [LoggedModelOutput(model.model_id, int(step))])
    else:
        client.set_logged_model_tags(model.model_id, tags)
    try:
        if upload:
            client.log_model_artifacts(model.model_id, path)
    except BaseException:
        client.finalize_logged_model(model.model_id, "FAILED")
        raise
    client.finalize_logged_model(model.model_id, "READY")
    return model.model_id


def record_final(tracker: Tracker, path: str, step: int, metrics: Mapping[str, Any], log=print) -> str | None:
    """The final checkpoint as the run's logged model ``checkpoint`` holding its files and final eval. A store
    that has no logged models (an MLflow 2 server) gets the files as the run's ``checkpoint/`` artifact instead,
    which ``registry.py`` still reads; the model id, or None then."""
    try:
        model_id = log_checkpoint_model(tracker, path, step)
    except Exception as exc:  # noqa: BLE001 - the upload below raises again if the store itself is the problem
        log(f"checkpoint {path} not recorded as an MLflow logged model ({type(exc).__name__}: {exc}); "
            "logging it as the run's checkpoint/ artifact")
        tracker.log_artifacts(path, FINAL_MODEL)
        return None
    log_model_metrics(tracker, model_id, metrics, step)
    return model_id


def record_periodic(tracker: Tracker, path: str, step: int, buffer: MetricBuffer, log=print) -> str | None:
    """A periodic checkpoint as an external logged model named like its directory, holding its step's eval (still
    in ``buffer``, sent at the next flush); a store error only warns: the checkpoint is saved, the run goes on."""
    try:
        model_id = log_checkpoint_model(tracker, path, step, name=Path(path).name, upload=False)
    except Exception as exc:  # noqa: BLE001 - bookkeeping is not worth a training run
        log(f"checkpoint {path} not recorded as an MLflow logged model ({type(exc).__name__}: {exc})")
        return None
    buffer.attach_model(model_id, step)
    return model_id


def log_model_metrics(tracker: Tracker, model_id: str, metrics: Mapping[str, Any], step: int) -> None:
    """Attach metrics to a logged model (and its run, at ``step``). A value the run already has at that step
    keeps its timestamp, so the run's history does not gain a second point (the store drops exact repeats)."""
    values, _ = finite_metrics(metrics)
    now = int(time.time() * 1000)
    batch = []
    for key, value in values:
        same = [m.timestamp for m in tracker.client.get_metric_history(tracker.run_id, key)
                if m.step == int(step) and m.value == value]
        batch.append(Metric(key, value, same[0] if same else now, int(step), model_id=model_id))
    for i in range(0, len(batch), MetricBuffer.BATCH):
        tracker.client.log_batch(tracker.run_id, metrics=batch[i:i + MetricBuffer.BATCH])


def checkpoint_model_artifacts(client: MlflowClient, model) -> dict[str, int]:
    """{relative path: size} of a logged model's artifacts ({} for an external model or an unreadable store)."""
    import mlflow

    root = model.artifact_location.rstrip("/")
    out: dict[str, int] = {}
    todo = [""]
    try:
        while todo:
            sub = todo.pop()
            for f in mlflow.artifacts.list_artifacts(artifact_uri=f"{root}/{sub}".rstrip("/"),
                                                     tracking_uri=client.tracking_uri):
                rel = f"{sub}/{Path(f.path).name}".lstrip("/")
                if f.is_dir:
                    todo.append(rel)
                else:
                    out[rel] = int(f.file_size or 0)
    except Exception:  # noqa: BLE001 - "holds nothing" is the answer for a store we cannot read
        return {}
    return out
