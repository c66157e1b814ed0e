"""Several processes on one machine sharing a sqlite file (the default Optuna and MLflow stores).

Three things make that safe (measured with bench/storage_stress.py): creating the tables (Optuna's
create_all, MLflow's alembic migrations) happens under an exclusive file lock, because two processes
migrating a fresh file at once corrupt its version table; the file is in WAL mode, so readers never
wait for a writer; and Optuna's connections wait up to BUSY_TIMEOUT_SECONDS for the write lock instead
of sqlite's 5 s, which a process starved of CPU by TensorFlow next door can exceed.
"""

from __future__ import annotations

import contextlib
import fcntl
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BUSY_TIMEOUT_SECONDS = 300


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI, else None."""
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


@contextlib.contextmanager
def schema_lock(uri: str) -> Iterator[None]:
    """Held while a store is opened: one process at a time creates or migrates a sqlite file's tables."""
    database = sqlite_file(uri)
    if database is None:
        yield  # server databases create their tables in transactions of their own
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            _use_wal(database)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _use_wal(database: Path) -> None:
    # WAL is a property of the file: set once, every later connection (MLflow's too) uses it.
    with contextlib.closing(sqlite3.connect(database, timeout=BUSY_TIMEOUT_SECONDS)) as connection:
        connection.execute("PRAGMA journal_mode = WAL")


def engine_kwargs(uri: str) -> dict[str, Any]:
    """SQLAlchemy engine options for the Optuna storage at `uri`."""
    if sqlite_file(uri) is not None:
        return {"connect_args": {"timeout": BUSY_TIMEOUT_SECONDS}}
    return {"pool_pre_ping": True}  # a server that restarted: reconnect instead of failing a trial
