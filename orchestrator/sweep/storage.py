"""Where a sweep's Optuna study lives: a database URL checked before anything starts, masked for display,
and opened from the driver and from every trial process.

Any SQLAlchemy URL works; SQLite by default (``<base trainer.output_dir>/sweeps/optuna.db``).
"""

from __future__ import annotations

import os
import re
import threading
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError


def bad(key: str, value: Any, why: str) -> ConfigError:
    """The sweep's config errors: ``key=value: why``."""
    return ConfigError(f"{key}={value!r}: {why}")


def safe_url(url: str) -> str:
    """A database URL with its password masked, for messages, logs and MLflow params."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
        return parsed.render_as_string(hide_password=True) if parsed.password else url
    except Exception:  # noqa: BLE001 - not parseable: mask anything that looks like user:password@
        return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def _check_sqlite(url: str, db: str | None, key: str) -> None:
    if not db or db == ":memory:":
        raise bad(key, safe_url(url), "an in-memory SQLite study is lost when the driver exits; give a file path")
    path = Path(db).resolve()
    if path.exists() and not path.is_file():
        raise bad(key, safe_url(url), f"{path} exists and is not a file")
    probe = path.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise bad(key, safe_url(url), f"cannot create or write {path} ({probe} is not a writable directory)")


def _check_server(url: str, key: str) -> None:
    import sqlalchemy
    from sqlalchemy.exc import NoSuchModuleError

    try:
        engine = sqlalchemy.create_engine(url)
    except (NoSuchModuleError, ModuleNotFoundError, ImportError) as e:
        raise bad(key, safe_url(url), f"no SQLAlchemy driver for this URL: {e}") from None
    except Exception as e:  # noqa: BLE001 - any construction error is a bad URL
        raise bad(key, safe_url(url), f"unusable storage URL: {type(e).__name__}: {e}") from None
    error: list[BaseException] = []

    def connect() -> None:
        try:
            with engine.connect():
                pass
        except BaseException as e:  # noqa: BLE001
            error.append(e)

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(10.0)
    if t.is_alive():
        raise bad(key, safe_url(url), "storage unreachable (no connection within 10 s)")
    if error:
        e = error[0]
        raise bad(key, safe_url(url), f"storage unreachable: {type(e).__name__}: {str(e).splitlines()[0]}") from None
    engine.dispose()


def check_storage_url(url: str, key: str = "storage") -> None:
    """Fail (ConfigError) if the study storage cannot be used; creates nothing.

    SQLite: the file's directory must exist or be creatable, and be writable. Other databases: the
    SQLAlchemy driver must be installed and the server must accept a connection within 10 s.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise bad(key, safe_url(url), f"not a SQLAlchemy database URL ({e})") from None
    if parsed.get_backend_name() == "sqlite":
        _check_sqlite(url, parsed.database, key)
    else:
        _check_server(url, key)


def sqlite_abs(url: str) -> str:
    """Make a relative ``sqlite:///`` path absolute (trials run in other working directories)."""
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        rest = url[len("sqlite:///"):]
        path, _, query = rest.partition("?")
        if path and path != ":memory:":
            return "sqlite:///" + str(Path(path).resolve()) + (f"?{query}" if query else "")
    return url


def open_storage(url: str):
    """Optuna's RDB storage at ``url`` (the schema is created by whichever process comes first)."""
    import optuna

    kwargs = {}
    if url.startswith("sqlite"):
        # Trials tell the study from their own processes; wait for the SQLite lock instead of failing.
        kwargs["engine_kwargs"] = {"connect_args": {"timeout": 60}}
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, **kwargs)
        except Exception as exc:  # two processes creating the schema at once: one loses the race
            if "already exists" not in str(exc) or attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
