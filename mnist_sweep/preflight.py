"""Checks made before anything is written: a bad path or URI fails with nothing created."""

from __future__ import annotations

import tempfile
import urllib.error
import urllib.request
from pathlib import Path

from mnist_sweep.config import SweepConfig
from mnist_sweep.data import check_test_split_present, load_split, resolve_source
from mnist_sweep.locations import local_artifact_folder


class PreflightError(RuntimeError):
    """A storage, tracking store or folder that cannot be used; one line for the user."""


def _nearest_existing(path: Path) -> Path:
    current = path.expanduser().absolute()
    while not current.exists():
        current = current.parent
    return current


def check_creatable(key: str, value: str, path: Path) -> None:
    """`path` exists as what we need, or its nearest existing ancestor is a writable folder."""
    anchor = _nearest_existing(path)
    if not anchor.is_dir() and anchor != path.expanduser().absolute():
        raise PreflightError(f"{key} = {value!r}: {anchor} is a file, not a folder")
    folder = anchor if anchor.is_dir() else anchor.parent
    try:
        # A real file, gone at once: os.access answers yes to root even on a read-only folder.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PreflightError(f"{key} = {value!r}: cannot write in {folder} ({exc.strerror})") from None


def check_database(key: str, uri: str) -> None:
    """A sqlite file we can create, or a database server that answers."""
    if uri.startswith("sqlite:///"):
        check_creatable(key, uri, Path(uri.removeprefix("sqlite:///")))
        return
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, connect_args=_connect_timeout(uri))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # drivers raise their own types; the user needs the first line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PreflightError(f"{key} = {uri!r}: cannot connect ({first})") from None


def _connect_timeout(uri: str) -> dict[str, int]:
    return {"connect_timeout": 10} if uri.startswith(("postgresql", "mysql")) else {}


def check_tracking_server(uri: str) -> None:
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=10) as response:
            if response.status != 200:
                raise PreflightError(f"tracking.uri = {uri!r}: /health answered {response.status}")
    except (urllib.error.URLError, OSError) as exc:
        raise PreflightError(f"tracking.uri = {uri!r}: no MLflow server answers ({exc})") from None


def check_all(cfg: SweepConfig) -> None:
    """Everything `run`, `worker` and `finalize` will write to, checked without writing."""
    check_database("study.storage", cfg.study.storage)
    tracking = cfg.tracking
    if tracking.uri.startswith(("http://", "https://")):
        check_tracking_server(tracking.uri)
    elif tracking.uri.startswith("file://"):
        check_creatable("tracking.uri", tracking.uri, Path(tracking.uri.removeprefix("file://")))
    else:
        check_database("tracking.uri", tracking.uri)
    artifacts = local_artifact_folder(tracking.uri, tracking.artifacts)
    if artifacts is not None:
        check_creatable("tracking.artifacts", tracking.artifacts or str(artifacts), artifacts)
    check_creatable("tracking.reports", tracking.reports, Path(tracking.reports))


def check_inputs(cfg: SweepConfig, *, training: bool, needs_data: bool = True) -> None:
    """The data (training images read and checked when `training`) and every place written to."""
    if needs_data:
        source = resolve_source(cfg.data.path)
        if training:
            load_split(source, validation=cfg.data.validation, train_limit=cfg.data.train_limit, seed=cfg.data.seed)
        check_test_split_present(source)
    check_all(cfg)
