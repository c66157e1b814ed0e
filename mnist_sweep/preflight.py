"""Checks made before anything is written: a bad path or URI fails with nothing created."""

from __future__ import annotations

import base64
import contextlib
import errno
import itertools
import os
import sqlite3
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Literal, overload

from mnist_sweep.config import SweepConfig
from mnist_sweep.data import (
    IMAGE_SIDE,
    NUM_CLASSES,
    DataSource,
    Split,
    check_test_split_present,
    load_split,
    resolve_source,
)
from mnist_sweep.databases import nothing_recorded, sqlite_file
from mnist_sweep.errors import PreflightError, first_line
from mnist_sweep.locations import (
    FILE,
    FOLDER,
    MISSING,
    local_artifact_folder,
    nearest_existing,
    path_kind,
    path_problem,
)
from mnist_sweep.masking import mask_password
from mnist_sweep.samplers import check_installed as check_sampler_installed
from mnist_sweep.tensorboard_log import check_installed as check_tensorboard_installed

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient


def check_creatable(key: str, value: str, path: Path, *, folder_wanted: bool = False) -> None:
    """`path` exists as what we need (a folder when `folder_wanted`, else a regular file), or its nearest
    existing ancestor is a writable folder. Refused: a path too long to open, a FIFO or a device where a
    file belongs (reading one would hang or never end), a symlink loop or a symlink to nothing."""
    value = mask_password(value)
    problem = path_problem(str(path))
    if problem is not None:
        raise PreflightError(f"{key} = {value!r} {problem}")
    target = path.expanduser().absolute()
    anchor = nearest_existing(target)
    kind = path_kind(anchor)
    wanted = FOLDER if folder_wanted or anchor != target else FILE
    if kind != wanted:
        what = f"{anchor} is {kind}" if anchor == target else f"{anchor}, a parent, is {kind}"
        raise PreflightError(f"{key} = {value!r}: {what}, not {wanted}")
    folder = anchor if kind == FOLDER else anchor.parent
    try:
        # A real file, gone at once: os.access answers yes to root even on a read-only folder.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise PreflightError(f"{key} = {value!r}: cannot write in {folder} ({exc.strerror})") from None


SQLITE_SIDECARS = (".lock", "-wal", "-shm", "-journal")


def check_database(key: str, uri: str) -> None:
    """A sqlite file we can create (or an intact one), or a database server that answers."""
    path = sqlite_file(uri)
    if path is not None:
        check_creatable(key, uri, path)
        # The files sqlite and our schema lock open beside it: a FIFO there would hang the open.
        for suffix in SQLITE_SIDECARS:
            sidecar = path.with_name(path.name + suffix)
            if path_kind(sidecar) not in (MISSING, FILE):
                raise PreflightError(f"{key} = {mask_password(uri)!r}: {sidecar} is {path_kind(sidecar)}, not a file")
        if path.is_file():
            check_sqlite_intact(key, uri, path)
        return
    import sqlalchemy

    try:
        engine = sqlalchemy.create_engine(uri, connect_args=_connect_timeout(uri))
        with engine.connect():
            pass
        engine.dispose()
    except Exception as exc:  # drivers raise their own types; the user needs the first line
        raise PreflightError(mask_password(f"{key} = {uri!r}: cannot connect ({first_line(exc)})")) from None


def check_sqlite_intact(key: str, uri: str, path: Path) -> None:
    """An existing sqlite file is a whole database: a corrupt or truncated one fails here, in one line."""
    if path.stat().st_size == 0:
        return  # created and left empty (a lock taken, nothing written yet): sqlite fills it on first use
    try:
        with contextlib.closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=60)) as db:
            problems = [row[0] for row in db.execute("PRAGMA quick_check(1)")]
    except sqlite3.Error as exc:
        problems = [str(exc)]
    if problems != ["ok"]:
        raise PreflightError(
            f"{key} = {mask_password(uri)!r}: {path} is not an intact sqlite database ({problems[0]}); "
            "restore it from a backup, or move it away to start afresh"
        )


def _connect_timeout(uri: str) -> dict[str, int]:
    return {"connect_timeout": 10} if uri.startswith(("postgresql", "mysql")) else {}


def _credentials_header() -> dict[str, str]:
    """The credentials MLflow's client sends (MLFLOW_TRACKING_TOKEN, or USERNAME and PASSWORD), for the preflight."""
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    if token:
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _refused(uri: str, status: int) -> PreflightError:
    user = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if status == 401 and not _credentials_header():
        why = "asks for credentials (401); set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    elif status == 401:
        why = f"refused the credentials of MLFLOW_TRACKING_USERNAME = {user!r} (401); check the user and password"
    else:
        who = f"user {user!r}" if user else "these credentials"
        why = f"refused access (403): {who} may not read or create experiments; ask the server's admin"
    return PreflightError(f"tracking.uri = {uri!r}: the MLflow server {why}")


def check_tracking_server(uri: str, experiment: str) -> None:
    """An MLflow server answers /health, and lets us (with MLFLOW_TRACKING_* credentials) read experiments."""
    base = uri.rstrip("/")
    headers = _credentials_header()
    # /health is open even on a basic-auth server: the experiment lookup is what needs the credentials.
    query = urllib.parse.urlencode({"experiment_name": experiment})
    for path in ("/health", f"/api/2.0/mlflow/experiments/get-by-name?{query}"):
        try:
            with urllib.request.urlopen(urllib.request.Request(base + path, headers=headers), timeout=10):
                pass
        except urllib.error.HTTPError as exc:
            if exc.code in (401, 403):
                raise _refused(uri, exc.code) from None
            if not (exc.code == 404 and path != "/health"):  # 404: no experiment of that name yet
                raise PreflightError(f"tracking.uri = {uri!r}: {path.split('?')[0]} answered {exc.code}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise PreflightError(f"tracking.uri = {uri!r}: no MLflow server answers ({reason})") from None


def check_all(cfg: SweepConfig) -> None:
    """Everything `run`, `worker` and `finalize` will write to, checked without writing."""
    check_database("study.storage", cfg.study.storage)
    tracking = cfg.tracking
    if tracking.uri.startswith(("http://", "https://")):
        check_tracking_server(tracking.uri, cfg.study.name)
    else:
        check_database("tracking.uri", tracking.uri)
    artifacts = local_artifact_folder(tracking.uri, tracking.artifacts)
    if artifacts is not None:
        check_creatable("tracking.artifacts", tracking.artifacts or str(artifacts), artifacts, folder_wanted=True)
    reports = Path(tracking.reports)
    check_creatable("tracking.reports", tracking.reports, reports, folder_wanted=True)
    check_creatable("tracking.reports", tracking.reports, reports / cfg.study.name, folder_wanted=True)


# Bytes each weight takes while a model trains: itself, its gradient and up to two optimizer moments
# (Adam's), all float32. Activations, the data and TensorFlow's own buffers come on top, so this is a floor.
TRAINING_BYTES_PER_WEIGHT = 4 * 4
# A TensorFlow process training the lecture's network peaks at about 1 GiB resident (ru_maxrss after one
# epoch on 1,000 images, 2026-12-06, this machine's CPU build). Half of it is counted per worker, so that
# only what surely cannot fit is refused (`--workers 1000 --force`), not a tight but workable run.
PROCESS_BYTES = 512 << 20


def network_weights(hidden: list[int]) -> int:
    """The weights and biases of 784 -> hidden... -> 10."""
    sizes = [IMAGE_SIDE * IMAGE_SIDE, *hidden, NUM_CLASSES]
    return sum((inputs + 1) * outputs for inputs, outputs in itertools.pairwise(sizes))


def available_memory() -> int | None:
    """Bytes this process can still take: the kernel's MemAvailable, or a container's (cgroup) limit left."""
    room: list[int] = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                room.append(int(line.split()[1]) * 1024)
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        with contextlib.suppress(OSError, ValueError):
            limit = Path(limit_file).read_text().strip()
            if limit != "max":
                room.append(int(limit) - int(Path(usage_file).read_text()))
    return min(room) if room else None


def check_fits_in_memory(cfg: SweepConfig) -> None:
    """A network whose training cannot fit in memory is refused here, not found out as failed trials."""
    weights = network_weights(cfg.model.hidden)
    workers = cfg.study.workers if isinstance(cfg.study.workers, int) else 1
    needed = (weights * TRAINING_BYTES_PER_WEIGHT + PROCESS_BYTES) * workers
    available = available_memory()
    if available is not None and needed > available:
        hidden = cfg.model.hidden
        shown = str(hidden) if len(hidden) <= 6 else f"[{', '.join(map(str, hidden[:3]))}, ... {len(hidden)} layers]"
        what = f"study.workers = {workers} with model.hidden = {shown}" if workers > 1 else f"model.hidden = {shown}"
        per_worker = f", times {workers} workers" if workers > 1 else ""
        raise PreflightError(
            f"{what}: {weights:,} weights need at least {needed / 2**30:.1f} GiB to train (16 bytes each: "
            f"the weight, its gradient and two optimizer moments, plus 0.5 GiB for the process{per_worker}), "
            f"but {available / 2**30:.1f} GiB of memory is available; make the layers narrower or use fewer workers"
        )


@overload
def prepare(cfg: SweepConfig, *, training: Literal[True]) -> tuple[DataSource, Split]: ...
@overload
def prepare(cfg: SweepConfig, *, training: Literal[False]) -> tuple[DataSource, None]: ...
def prepare(cfg: SweepConfig, *, training: bool) -> tuple[DataSource, Split | None]:
    """Every input of `run`, `worker` or `finalize`, checked once, before anything is written.

    The data source; the training/validation split, read and checked when `training` (handed to the
    flow, which reads it no second time); the test files checked in form, never handed out; and every
    place written to (`check_all`). The flows take what this returns instead of checking again.
    """
    source = resolve_source(cfg.data.path)
    split = None
    if training:
        check_fits_in_memory(cfg)
    if training and cfg.train.tensorboard:
        check_tensorboard_installed()
    if training:
        check_sampler_installed(cfg.study)
    if training:
        split = load_split(source, validation=cfg.data.validation, train_limit=cfg.data.train_limit, seed=cfg.data.seed)
    check_test_split_present(source)
    check_all(cfg)
    check_registered_model(cfg)
    return source, split


def check_registered_model(cfg: SweepConfig) -> None:
    """tracking.registered_model: a name MLflow takes, not another project's model (where the store exists)."""
    from mnist_sweep.registry import check_up_front

    uri = cfg.tracking.uri

    def client() -> MlflowClient:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=uri)

    check_up_front(client if not nothing_recorded(uri) else None, cfg.tracking.registered_model or "")


DISK_FULL_SIGNS = ("No space left on device", "database or disk is full", "Disk quota exceeded")


def disk_full_line(exc: BaseException, cfg: SweepConfig | None) -> str | None:
    """One line naming the full place, if `exc` (or what caused it) is a full disk; else None."""
    cause = _disk_full_cause(exc)
    if cause is None:
        return None
    filename = getattr(cause, "filename", None)
    where = f"writing {Path(os.fsdecode(filename)).absolute()}" if filename else f"in {_fullest_place(cfg)}"
    return (
        f"no space left on device {where}; free space there and rerun the same command: "
        "finished trials are kept and the sweep resumes"
    )


def _disk_full_cause(exc: BaseException) -> BaseException | None:
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    while pending:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT):
            return current
        if any(sign in str(current) for sign in DISK_FULL_SIGNS):
            return current
        linked = (current.__cause__, current.__context__, getattr(current, "orig", None))
        pending += [e for e in linked if isinstance(e, BaseException)]
    return None


def _fullest_place(cfg: SweepConfig | None) -> str:
    """A sqlite error names no file: the configured local folder on the filesystem with the least room."""
    if cfg is None:
        return "the working directory"
    databases = (cfg.study.storage, cfg.tracking.uri)
    candidates = [database.parent for database in map(sqlite_file, databases) if database is not None]
    artifacts = local_artifact_folder(cfg.tracking.uri, cfg.tracking.artifacts)
    if artifacts is not None:
        candidates.append(artifacts)
    candidates.append(Path(cfg.tracking.reports))
    room: list[tuple[int, int, Path]] = []
    for index, path in enumerate(candidates):
        with contextlib.suppress(OSError):
            stats = os.statvfs(nearest_existing(path))
            room.append((stats.f_bavail * stats.f_frsize, index, path.absolute()))
    return str(min(room)[2]) if room else "the working directory"
