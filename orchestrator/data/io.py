"""Prompt and rollout files: Parquet or JSONL in, Parquet out, checked against the schemas."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .schema import PROMPT_SCHEMA, ROLLOUT_SCHEMA

REQUIRED_PROMPT_COLUMNS = ("prompt", "answer")


def read_prompts(path: str | os.PathLike) -> pa.Table:
    """A user's prompt file -> a table with ``PROMPT_SCHEMA``.

    Needs ``prompt`` and ``answer``; ``prompt_id`` defaults to the row number, ``task`` to the file
    stem, ``difficulty`` and ``domain`` and ``reasoning`` to null. Extra columns are ignored.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt file {str(p)!r} does not exist")
    try:
        if p.suffix in (".parquet", ".pq"):
            table = pq.read_table(p)
        elif p.suffix in (".jsonl", ".json"):
            rows = []
            with p.open() as fh:
                for n, line in enumerate(fh, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as exc:
                            raise ValueError(f"{p}: line {n} is not valid JSON: {exc}") from None
            table = pa.Table.from_pylist(rows)
        else:
            raise ValueError(f"prompt file {str(p)!r}: unsupported extension {p.suffix!r} (use .parquet or .jsonl)")
    except (pa.ArrowInvalid, OSError) as exc:
        raise ValueError(f"prompt file {str(p)!r} cannot be read: {exc}") from None
    missing = [c for c in REQUIRED_PROMPT_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"prompt file {str(p)!r} lacks column(s) {missing}; has {table.column_names}")
    n = table.num_rows
    if n == 0:
        raise ValueError(f"prompt file {str(p)!r} has no rows")
    cols = {}
    defaults = {"prompt_id": [f"{p.stem}-{i}" for i in range(n)], "task": [p.stem] * n, "difficulty": [None] * n,
                "domain": [None] * n, "reasoning": [None] * n}
    for field in PROMPT_SCHEMA:
        if field.name in table.column_names:
            col = table.column(field.name)
            if field.name in ("prompt", "answer", "prompt_id", "reasoning", "task", "domain"):
                col = pa.array([None if v is None else str(v) for v in col.to_pylist()], pa.string())
            cols[field.name] = col.cast(field.type)
        else:
            cols[field.name] = pa.array(defaults[field.name], field.type)
    return pa.table(cols, schema=PROMPT_SCHEMA)


def write_rollouts(table: pa.Table, path: str | os.PathLike) -> str:
    """Write rollout records atomically (temp file + rename): a crash never leaves half a file."""
    table = table.cast(ROLLOUT_SCHEMA) if table.schema != ROLLOUT_SCHEMA else table
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(p.suffix + ".tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, p)
    return str(p)
