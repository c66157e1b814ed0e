"""The databases behind Optuna and MLflow, opened safely by several processes at once.

Measured with bench/storage_stress.py and tests/test_study_workers.py: processes that open a fresh store at
the same moment race to create its tables (Optuna's create_all fails on a duplicate key in PostgreSQL;
MLflow's alembic migrations corrupt the version table of a sqlite file), so opening happens under
`schema_lock` — a file lock for sqlite, an advisory lock on a server. A sqlite file is put in WAL mode
so readers never wait for a writer, and Optuna's connections wait up to BUSY_TIMEOUT_SECONDS for the
write lock instead of sqlite's 5 s, which a process starved of CPU by TensorFlow next door can exceed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from mnist_sweep import interrupt

BUSY_TIMEOUT_SECONDS = 300
LOCK_NAME = "mnist_sweep.schema"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (its ?options dropped), else None."""
    return Path(uri.removeprefix("sqlite:///").split("?")[0]) if uri.startswith("sqlite:///") else None


def nothing_recorded(uri: str) -> bool:
    """A sqlite store whose file is not there: nothing was recorded, and opening it would create it."""
    database = sqlite_file(uri)
    return database is not None and not database.is_file()


@contextlib.contextmanager
def schema_lock(uri: str) -> Iterator[None]:
    """Held while a store is opened: one process at a time creates or migrates its tables."""
    database = sqlite_file(uri)
    if database is not None:
        with _file_lock(database):
            _use_wal(database)
            yield
    elif uri.startswith(("postgresql", "mysql")):
        with _server_lock(uri):
            yield
    else:
        yield  # an MLflow server or a file store: nothing of ours creates tables there


@contextlib.contextmanager
def _file_lock(database: Path) -> Iterator[None]:
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "a") as handle:
        # Polled, not blocking: a Ctrl-C while another process holds the lock acts at once.
        interrupt.poll(lambda: _locked(handle), every=0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _locked(handle: Any) -> bool | None:
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return None
    return True


def create_whole(uri: str, create_tables: Callable[[str], None]) -> None:
    """A fresh sqlite store gets its tables in a file beside it, moved into place once complete.

    MLflow's migrations cannot resume a half-made store ("table issues already exists"), so a disk that
    fills up, or a kill, during the first migration must leave nothing half-made behind. Call under
    `schema_lock`.
    """
    database = sqlite_file(uri)
    if database is None or _has_tables(database):
        return
    partial = database.with_name(database.name + ".partial")
    try:
        _remove_sqlite(partial)  # left by a process killed while creating
        _use_wal(partial)
        create_tables(f"sqlite:///{partial}")
        with contextlib.closing(sqlite3.connect(partial)) as connection:  # the WAL folded into the file
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        os.replace(partial, database)
    finally:
        _remove_sqlite(partial)


def _has_tables(database: Path) -> bool:
    if not database.is_file() or database.stat().st_size == 0:
        return False
    with contextlib.closing(sqlite3.connect(database, timeout=BUSY_TIMEOUT_SECONDS)) as connection:
        return bool(connection.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table'").fetchone()[0])


def _remove_sqlite(database: Path) -> None:
    for suffix in ("", "-wal", "-shm", "-journal"):
        with contextlib.suppress(FileNotFoundError):
            database.with_name(database.name + suffix).unlink()


def _use_wal(database: Path) -> None:
    # WAL is a property of the file: set once, every later connection (MLflow's too) uses it.
    with contextlib.closing(sqlite3.connect(database, timeout=BUSY_TIMEOUT_SECONDS)) as connection:
        connection.execute("PRAGMA journal_mode = WAL")


@contextlib.contextmanager
def _server_lock(uri: str) -> Iterator[None]:
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    try:
        # The lock belongs to this connection: it is released when the connection closes, even on a crash.
        with engine.connect() as connection:
            if engine.dialect.name == "postgresql":
                key = zlib.crc32(LOCK_NAME.encode())
                connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": key})
            else:
                wait = {"name": LOCK_NAME, "seconds": BUSY_TIMEOUT_SECONDS}
                connection.execute(sqlalchemy.text("SELECT GET_LOCK(:name, :seconds)"), wait)
            yield
    finally:
        engine.dispose()


def engine_kwargs(uri: str) -> dict[str, Any]:
    """SQLAlchemy engine options for the Optuna storage at `uri`."""
    if sqlite_file(uri) is not None:
        return {"connect_args": {"timeout": BUSY_TIMEOUT_SECONDS}}
    return {"pool_pre_ping": True}  # a server that restarted: reconnect instead of failing a trial
