"""Prompt sets as MLflow dataset inputs: the runs table's Dataset column and the run page's "Datasets used".

A run's train and eval prompt tables are logged with MLflow's own dataset entities: a name, the digest
(``tracking.dataset_digest``: the same value as the run's ``budgetrl.dataset_digest`` lineage tag), the
source (the prompt file, or the task generator and its arguments) and the schema, with the input tag
``mlflow.data.context`` = ``train`` or ``eval``. Only metadata goes to MLflow; the prompts stay where
they came from (a generated set is rebuilt from its source's arguments).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pyarrow as pa
from mlflow.entities import DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from .config import Config
from .tracking import Tracker, dataset_digest


def prompt_source(cfg: Config, split: str):
    """Where a split's prompts came from: the user's file, or the task generator and its arguments."""
    d = cfg.data
    path = d.path if split == "train" else (d.eval_path or d.path)
    if path is not None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():  # "can be interpreted in multiple ways": two local sources register
            warnings.simplefilter("ignore", UserWarning)
            return resolve_dataset_source(str(Path(path).resolve()))
    from mlflow.data.code_dataset_source import CodeDatasetSource

    size = d.train_size if split == "train" else d.eval_size
    return CodeDatasetSource({"generator": "budgetrl.tasks", "task": d.task, "split": split, "size": size,
                              "difficulties": list(d.difficulties), "seed": d.seed})


def prompt_dataset(table: pa.Table, name: str, source):
    """An MLflow ``MetaDataset`` of ``table``: its name, digest, source and (inferred) column schema."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.types.utils import _infer_schema

    with warnings.catch_warnings():  # its hint about integer columns and missing values is for model signatures
        warnings.simplefilter("ignore", UserWarning)
        schema = _infer_schema(table.slice(0, 100).to_pandas())
    return MetaDataset(source, name=name, digest=dataset_digest(table), schema=schema)


def dataset_name(cfg: Config, split: str) -> str:
    """``addition-train`` for a generated set; the file's stem for a file."""
    d = cfg.data
    path = d.path if split == "train" else (d.eval_path or d.path)
    return f"{Path(path).stem}-{split}" if path is not None else f"{d.task}-{split}"


def log_prompt_sets(tracker: Tracker, cfg: Config, train: pa.Table, evals: pa.Table) -> None:
    """Log the train and eval prompt tables as the run's dataset inputs (contexts ``train``, ``eval``)."""
    inputs = []
    for split, table in (("train", train), ("eval", evals)):
        entity = prompt_dataset(table, dataset_name(cfg, split), prompt_source(cfg, split))._to_mlflow_entity()
        inputs.append(DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, split)]))
    tracker.client.log_inputs(tracker.run_id, datasets=inputs)
