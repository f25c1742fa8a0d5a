"""Read any rollout/eval table (Parquet, CSV, JSONL) and map it to the analysis' canonical columns.

Canonical frame (what every function in ``stats`` and ``regression`` takes):

- ``label`` (str): which input/checkpoint the row belongs to
- ``correct`` (int 0/1), ``tokens`` (float, reasoning tokens)
- ``difficulty``, ``domain`` (str; ``"all"`` when the table has no such column)
- optional ``budget``, ``budget_solution`` (float), ``prompt_id`` (str), ``sample_index`` (int)

Only the needed columns are read, so the token-id list columns of rollout files cost nothing.
"""

from __future__ import annotations

import dataclasses
import glob
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from orchestrator.config import ConfigError

from .config import AUTO, ROLLOUT_NAMES, ColumnsConfig, InputSpec, label_of

ALL = "all"  # the level of difficulty/domain when the table has no such column, and pooled rows
OPTIONAL_ROLES = ("difficulty", "domain", "budget", "budget_solution", "prompt_id", "sample_index")
_TRUE = {"true", "t", "yes", "y", "1", "1.0", "correct"}
_FALSE = {"false", "f", "no", "n", "0", "0.0", "wrong", "incorrect"}


class InputError(ConfigError):
    """An input table cannot be analyzed; the message names the input, the column and the config key."""


def _files(path: str) -> list[Path]:
    if any(ch in path for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(path, recursive=True))
    elif os.path.isdir(path):
        files = sorted(Path(path).glob("*.parquet"))
    else:
        files = [Path(path)]
    return [f for f in files if f.is_file()]


def _read_file(f: Path, wanted: list[str] | None) -> pa.Table:
    suffix = f.suffix.lower()
    if suffix in (".parquet", ".pq"):
        names = pq.read_schema(f).names
        cols = None if wanted is None else [c for c in wanted if c in names]
        return pq.read_table(f, columns=cols)
    if suffix in (".csv", ".tsv"):
        opts = pacsv.ParseOptions(delimiter="\t" if suffix == ".tsv" else ",")
        table = pacsv.read_csv(f, parse_options=opts)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        table = pa.Table.from_pandas(pd.read_json(f, lines=suffix != ".json"), preserve_index=False)
    else:
        raise InputError(f"{f}: unsupported file type {suffix!r}; use .parquet, .csv, .tsv or .jsonl")
    if wanted is not None:
        table = table.select([c for c in wanted if c in table.column_names])
    return table


def _schema_names(f: Path) -> list[str]:
    if f.suffix.lower() in (".parquet", ".pq"):
        return pq.read_schema(f).names
    return _read_file(f, None).column_names


def resolve_columns(available: list[str], columns: ColumnsConfig, where: Mapping[str, Any] = (),
                    *, source: str = "input") -> dict[str, str | list[str] | None]:
    """Role -> source column(s) for one table; a named column that is missing raises ``InputError``."""

    def missing(role: str, name: str) -> InputError:
        hint = ""
        if role in OPTIONAL_ROLES:
            hint = f" (set columns.{role}=null if the table has none)"
        shown = ", ".join(available[:40]) + (" ..." if len(available) > 40 else "")
        return InputError(f"{source}: column {name!r} (columns.{role}) not found{hint}; "
                          f"available columns: {shown}")

    roles: dict[str, str | list[str] | None] = {}
    if columns.correct not in available:
        raise missing("correct", columns.correct)
    roles["correct"] = columns.correct
    parts = [p.strip() for p in columns.tokens.split("+")]
    for p in parts:
        if p not in available:
            raise missing("tokens", p)
    roles["tokens"] = parts
    for role in OPTIONAL_ROLES:
        name = getattr(columns, role)
        if name is None:
            roles[role] = None
        elif name == AUTO:
            roles[role] = ROLLOUT_NAMES[role] if ROLLOUT_NAMES[role] in available else None
        elif name in available:
            roles[role] = name
        else:
            raise missing(role, name)
    for key in where:
        if key not in available:
            raise InputError(f"{source}: column {key!r} (where) not found; available columns: "
                             + ", ".join(available[:40]))
    return roles


def _as_correct(values: pd.Series, name: str, source: str) -> pd.Series:
    """bool / 0-1 numbers / 'true'-'false' strings -> float 0/1 with NaN for missing."""
    if pd.api.types.is_bool_dtype(values):
        return values.astype("float64")
    if pd.api.types.is_numeric_dtype(values):
        out = values.astype("float64")
        bad = out.notna() & ~out.isin([0.0, 1.0])
        if bad.any():
            raise InputError(f"{source}: column {name!r} (columns.correct) must be 0/1 or bool; "
                             f"found {out[bad].iloc[0]!r} in {int(bad.sum())} rows")
        return out
    text = values.astype("string").str.strip().str.lower()
    out = pd.Series(np.nan, index=values.index, dtype="float64")
    out[text.isin(_TRUE)] = 1.0
    out[text.isin(_FALSE)] = 0.0
    bad = text.notna() & out.isna()
    if bad.any():
        raise InputError(f"{source}: column {name!r} (columns.correct) must be bool, 0/1 or true/false; "
                         f"found {text[bad].iloc[0]!r} in {int(bad.sum())} rows")
    return out


def _as_number(values: pd.Series, name: str, role: str, source: str) -> pd.Series:
    out = pd.to_numeric(values, errors="coerce").astype("float64")
    bad = values.notna() & out.isna()
    if bad.any():
        raise InputError(f"{source}: column {name!r} (columns.{role}) must be numeric; "
                         f"found {values[bad].iloc[0]!r} in {int(bad.sum())} rows")
    return out


def _level_text(values: pd.Series) -> pd.Series:
    """Category levels as strings; integral floats print without '.0' (2.0 -> '2')."""
    if pd.api.types.is_float_dtype(values):
        finite = values.dropna()
        if len(finite) and np.all(np.equal(np.mod(finite, 1), 0)):
            return values.map(lambda v: "missing" if pd.isna(v) else str(int(v)))
    return values.map(lambda v: "missing" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v))


def canonical(table: pa.Table | pd.DataFrame, columns: ColumnsConfig | None = None, label: str = "input",
              where: Mapping[str, Any] | None = None, *, source: str | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Any table -> (canonical frame, notes). Rows with a missing correct/tokens value are dropped (noted)."""
    columns = columns or ColumnsConfig()
    where = dict(where or {})
    source = source or f"input {label!r}"
    df = table.to_pandas() if isinstance(table, pa.Table) else table
    roles = resolve_columns(list(map(str, df.columns)), columns, where, source=source)
    notes: list[str] = []
    for key, value in where.items():
        allowed = list(value) if isinstance(value, (list, tuple)) else [value]
        df = df[df[key].isin(allowed)]
    if len(df) == 0:
        extra = f" after where={where}" if where else ""
        raise InputError(f"{source}: the table has no rows{extra}")
    out = pd.DataFrame(index=df.index)
    out["label"] = label
    out["correct"] = _as_correct(df[roles["correct"]], roles["correct"], source)
    tokens = None
    for part in roles["tokens"]:
        v = _as_number(df[part], part, "tokens", source)
        tokens = v if tokens is None else tokens + v
    out["tokens"] = tokens
    neg = out["tokens"] < 0
    if neg.any():
        raise InputError(f"{source}: column {columns.tokens!r} (columns.tokens) has {int(neg.sum())} "
                         f"negative values (e.g. {out['tokens'][neg].iloc[0]:g})")
    for role in ("difficulty", "domain"):
        out[role] = ALL if roles[role] is None else _level_text(df[roles[role]]).to_numpy()
    for role in ("budget", "budget_solution"):
        if roles[role] is not None:
            out[role] = _as_number(df[roles[role]], roles[role], role, source)
    if roles["prompt_id"] is not None:
        out["prompt_id"] = df[roles["prompt_id"]].astype("string").to_numpy()
    if roles["sample_index"] is not None:
        out["sample_index"] = _as_number(df[roles["sample_index"]], roles["sample_index"], "sample_index", source)
    missing_rows = out["correct"].isna() | out["tokens"].isna()
    if missing_rows.any():
        notes.append(f"{source}: dropped {int(missing_rows.sum())} of {len(out)} rows with a missing "
                     f"{roles['correct']!r} or {columns.tokens!r} value")
        out = out[~missing_rows]
    if len(out) == 0:
        raise InputError(f"{source}: no row has both {roles['correct']!r} (columns.correct) and "
                         f"{columns.tokens!r} (columns.tokens)")
    for role in ("budget", "budget_solution"):
        if role in out and out[role].isna().any():
            n = int(out[role].isna().sum())
            notes.append(f"{source}: {n} rows have no {roles[role]!r} value; the budget grid ignores them")
    out["correct"] = out["correct"].astype("int8")
    return out.reset_index(drop=True), notes


def read_input(spec: InputSpec, columns: ColumnsConfig) -> tuple[pd.DataFrame, list[str]]:
    """One configured input -> (canonical frame, notes)."""
    label = label_of(spec)
    source = f"input {label!r} ({spec.path})"
    files = _files(spec.path)
    if not files:
        raise InputError(f"{source}: no such file (or no .parquet files in the directory / glob)")
    available = _schema_names(files[0])
    single = len(files) == 1 and Path(spec.path) == files[0]
    roles = resolve_columns(available, columns, spec.where, source=source if single else f"{source}: {files[0].name}")
    wanted = [roles["correct"], *roles["tokens"], *spec.where]
    wanted += [v for r, v in roles.items() if r in OPTIONAL_ROLES and v is not None]
    wanted = list(dict.fromkeys(wanted))
    tables = []
    for f in files:
        t = _read_file(f, wanted)
        lacking = [c for c in wanted if c not in t.column_names]
        if lacking:
            raise InputError(f"{source}: {f.name} lacks column {lacking[0]!r} that {files[0].name} has")
        tables.append(t.select(wanted))
    table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    if table.num_rows == 0:
        raise InputError(f"{source}: the table is empty (0 rows)")
    resolved = dataclasses.replace(columns, **{r: roles[r] for r in OPTIONAL_ROLES})
    return canonical(table, resolved, label, spec.where, source=source)


def level_order(values) -> list[str]:
    """Sorted category levels: numerically when every level is a number, else as text; 'all' first."""
    levels = list(dict.fromkeys(str(v) for v in values))

    def key(v: str):
        try:
            return (0, float(v), v)
        except ValueError:
            return (1, 0.0, v)

    rest = sorted((v for v in levels if v != ALL), key=key)
    return ([ALL] if ALL in levels else []) + rest
