"""Shared fixtures: real MNIST from ../shared (never downloaded), synthetic arrays, and the real CLI."""

from __future__ import annotations

import contextlib
import gzip
import importlib
import io
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
import pytest

if TYPE_CHECKING:
    from tests.finished_sweep import FinishedSweep

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = REPO / "sweeps" / "fcn.toml"
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


def missing_dependency(reason: str) -> NoReturn:
    """Skip the test for want of a real dependency (`reason` says which, and how to get it); with CI=true, fail
    it: CI installs every dependency, so a missing one is a broken CI, not a group of tests to skip in silence."""
    if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true, so this fails instead of skipping: {reason}", pytrace=False)
    pytest.skip(reason)


def required_module(name: str, reason: str) -> Any:
    """The module `name`, imported; if it is not installed, `missing_dependency(reason)`."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing_dependency(reason)


def mnist_location() -> Path | None:
    """$MNIST_SWEEP_DATA if set, else ../shared/data/mnist beside the checkout."""
    configured = os.environ.get("MNIST_SWEEP_DATA")
    candidate = Path(configured) if configured else SHARED_MNIST
    return candidate if candidate.exists() else None


def required_mnist() -> Path:
    """The real MNIST files for a test that trains on them; the test is skipped, saying how, where there are none."""
    location = mnist_location()
    if location is None:
        missing_dependency("no MNIST files: set MNIST_SWEEP_DATA or lay ../shared/data/mnist beside the checkout")
    return location


# The fast tier (`make test-fast`) leaves out every test that starts a process, a server or a browser, or trains
# for seconds. A test that gets one through a fixture is marked here, from the fixture (with the fixtures it
# depends on); one that starts its own carries the marker itself (a module's `pytestmark`, or on the test).
MARKS_OF_FIXTURES = {
    "run_cli": "subprocess",
    "start_cli": "subprocess",
    "finished_sweep": "slow",  # a real sweep, run in this process
    "postgres_server": "server",
    "postgres_password_server": "server",
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        for fixture in MARKS_OF_FIXTURES.keys() & set(getattr(item, "fixturenames", ())):
            item.add_marker(MARKS_OF_FIXTURES[fixture])


@pytest.fixture(autouse=True)
def _no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never download: the Keras fallback raises if anything reaches it."""
    import mnist_sweep.data as data

    def refuse() -> str:
        raise AssertionError("a test tried to download MNIST")

    monkeypatch.setattr(data, "_download_keras_npz", refuse)


@pytest.fixture
def mnist_dir() -> Path:
    return required_mnist()


@pytest.fixture
def synthetic_mnist() -> tuple[np.ndarray, np.ndarray]:
    """1,200 MNIST-shaped uint8 images whose class is written in their brightest row: learnable."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=1200)
    images = rng.integers(0, 40, size=(1200, 28, 28), dtype=np.uint8)
    for index, label in enumerate(labels):
        images[index, 2 + 2 * label, :] = 255
    return images, labels.astype(np.int64)


CliRunner = Callable[..., subprocess.CompletedProcess[str]]
CliStarter = Callable[..., subprocess.Popen[str]]
CLI = [sys.executable, "-m", "mnist_sweep"]


def cli_environment(data: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The CLI's environment: this checkout's code, the real MNIST folder, and `env` on top."""
    return {**os.environ, "MNIST_SWEEP_DATA": str(data), "PYTHONPATH": str(REPO), **(env or {})}


def cli_command(*args: str) -> list[str]:
    return [*CLI, *args]


def cli(
    *args: str,
    cwd: Path,
    data: Path,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    prefix: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """Runs `python -m mnist_sweep ARGS` in `cwd` with this checkout's code and real data."""
    return subprocess.run(
        [*prefix, *cli_command(*args)],
        cwd=cwd,
        env=cli_environment(data, env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def forget_mlflow_stores() -> None:
    """MLflow keeps one store, and one SQLAlchemy engine, per URI for the life of the process: a relative
    `sqlite:///mlruns/mlflow.db` would stay the file of the first working directory that opened it. A process
    runs one command, in one directory; a command run in this process starts, as it would, with none open."""
    if "mlflow" not in sys.modules:
        return
    from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore as RegistryStore
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore as TrackingStore
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    for store in (TrackingStore, RegistryStore):
        for engine in store._engine_map.values():
            engine.dispose()
        store._engine_map.clear()
    tracking_utils._tracking_store_registry._get_store_with_resolved_uri.cache_clear()
    if registry_utils._model_registry_store_registry is not None:
        registry_utils._model_registry_store_registry._get_store_with_resolved_uri.cache_clear()


def cli_in_process(args: Sequence[str], *, cwd: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[int, str]:
    """`mnist_sweep.cli.main(args)`, the entry point `python -m mnist_sweep` runs, in this process and in `cwd`:
    its exit code and stderr. An exception it lets through fails the test, as a traceback would."""
    done = run_in_process(args, cwd=cwd, monkeypatch=monkeypatch)
    return done.returncode, done.stderr


def run_in_process(
    args: Sequence[str], *, cwd: Path, monkeypatch: pytest.MonkeyPatch
) -> subprocess.CompletedProcess[str]:
    """`cli_in_process`, with what it printed on stdout too, as `cli` returns it for a process.

    For a test where the process itself is not under test (no signal, TTY, pipe, exit of a real process, or its
    environment): it pays TensorFlow's import once a pytest process, not once a command."""
    from mnist_sweep import cli as entry_point

    stdout, stderr = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", stdout)  # restored after the test, with whatever main wrapped around it
    monkeypatch.setattr(sys, "stderr", stderr)
    monkeypatch.chdir(cwd)
    forget_mlflow_stores()
    try:
        code = entry_point.main(list(args))
    except SystemExit as exit:  # argparse
        code = exit.code if isinstance(exit.code, int) else 1
    finally:
        forget_mlflow_stores()  # nor does a later command find this one's open
    return subprocess.CompletedProcess(["mnist-sweep", *args], code, stdout.getvalue(), stderr.getvalue())


def cli_here(*args: str, cwd: Path, data: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`cli`, run in this process (run_in_process): for fixtures wider than a test, which have no monkeypatch.
    What the command sets in os.environ (its MLflow defaults) ends with it, as it would with its process."""
    saved = dict(os.environ)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch:
            monkeypatch.setenv("MNIST_SWEEP_DATA", str(data))
            for name, value in (env or {}).items():
                monkeypatch.setenv(name, value)
            return run_in_process(args, cwd=cwd, monkeypatch=monkeypatch)
    finally:
        os.environ.clear()
        os.environ.update(saved)


@pytest.fixture
def run_cli(tmp_path: Path, mnist_dir: Path) -> CliRunner:
    """`cli` bound to tmp_path and the real MNIST folder."""

    def runner(
        *args: str,
        cwd: Path = tmp_path,
        env: dict[str, str] | None = None,
        timeout: float = 600,
        prefix: Sequence[str] = (),
    ) -> subprocess.CompletedProcess[str]:
        return cli(*args, cwd=cwd, data=mnist_dir, env=env, timeout=timeout, prefix=prefix)

    return runner


@pytest.fixture
def run_here(tmp_path: Path, mnist_dir: Path) -> CliRunner:
    """`run_cli`'s commands run in this process (cli_here): same arguments, same answer. A test that trains
    through it carries `slow` itself (it gets no `subprocess` marker)."""

    def runner(*args: str, cwd: Path = tmp_path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return cli_here(*args, cwd=cwd, data=mnist_dir, env=env)

    return runner


def cli_process(*args: str, cwd: Path, data: Path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """Starts `python -m mnist_sweep ARGS` in `cwd` without waiting (for signals and concurrent workers)."""
    return subprocess.Popen(
        cli_command(*args),
        cwd=cwd,
        env=cli_environment(data, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def start_cli(tmp_path: Path, mnist_dir: Path) -> CliStarter:
    """`cli_process` in tmp_path with the real MNIST folder."""

    def starter(*args: str, cwd: Path = tmp_path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return cli_process(*args, cwd=cwd, data=mnist_dir, env=env)

    return starter


# The end-to-end tests that apply to both engines run with each: Optuna's TPE, keras-tuner's bayesian oracle.
ENGINE_ARGS: dict[str, tuple[str, ...]] = {
    "optuna": (),
    # ASHA (the default file's pruner) is the Optuna engine's own: keras-tuner's oracle runs with the median pruner.
    "keras-tuner": (
        "--set",
        'study.engine="keras-tuner"',
        "--set",
        'study.sampler="bayesian"',
        "--set",
        'study.pruner="median"',
    ),
}


def small_sweep_args(
    *extra: str, trials: int = 3, train_limit: int = 2000, validation: int = 1000, epochs: int = 1
) -> list[str]:
    """The default sweep shrunk: few trials, 1 epoch, a small real subset."""
    return [
        "--trials",
        str(trials),
        "--epochs",
        str(epochs),
        "--set",
        f"data.train_limit={train_limit}",
        "--set",
        f"data.validation={validation}",
        *extra,
    ]


def sweep_args(
    *settings: str, trials: int = 3, train_limit: int = 2000, validation: int = 1000, epochs: int = 1
) -> list[str]:
    """The default sweep file and its arguments, shrunk (small_sweep_args), each of `settings` ("key=value") a --set."""
    overrides = [arg for setting in settings for arg in ("--set", setting)]
    shrunk = small_sweep_args(*overrides, trials=trials, train_limit=train_limit, validation=validation, epochs=epochs)
    return [str(DEFAULT_SWEEP), *shrunk]


def unreadable_test_images(mnist_dir: Path, folder: Path) -> Path:
    """MNIST whose test images keep a valid header but lose their pixels."""
    copy = folder / "mnist"
    shutil.copytree(mnist_dir, copy)
    images = copy / "t10k-images-idx3-ubyte.gz"
    images.chmod(0o644)
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:1000]))
    return copy


def write_sweep(folder: Path, text: str, name: str = "sweep.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def created_files(folder: Path, ignore: Sequence[str] = ()) -> list[str]:
    """Every file under `folder`, relative, except those named in `ignore`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in ignore)


# --------------------------------------------------------------------------- one finished sweep a session


@pytest.fixture(scope="session")
def finished_sweep(tmp_path_factory: pytest.TempPathFactory) -> FinishedSweep:
    """The default sweep run once by the real CLI on a small real subset (tests/finished_sweep.py), shared by
    the tests that only read a finished sweep. A test that changes it works on `finished_sweep.copy(...)`."""
    from tests.finished_sweep import run_sweep  # it imports this module: imported once this one is loaded

    return run_sweep(tmp_path_factory.mktemp("finished-sweep"), required_mnist())


# --------------------------------------------------------------------------- a real PostgreSQL server


def _postgres_bin() -> Path | None:
    """The newest /usr/lib/postgresql/*/bin holding initdb, pg_ctl and postgres (Debian's layout)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class PostgresServer:
    """A running throwaway PostgreSQL: its base URL, and `pg_ctl` to stop and start it on the same data."""

    url: str
    pg_ctl: Callable[..., None]

    def stop(self) -> None:
        """Stopped at once, as a crash or a container kill would (open connections are cut)."""
        self.pg_ctl("-m", "immediate", "stop")

    def start(self) -> None:
        self.pg_ctl("-w", "start")


@contextlib.contextmanager
def _postgres(password: str | None) -> Iterator[str]:
    """A throwaway PostgreSQL on 127.0.0.1 (initdb + pg_ctl in a temp dir); yields its base URL."""
    with postgres_server_handle(password) as server:
        yield server.url


@contextlib.contextmanager
def postgres_server_handle(password: str | None = None) -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL on 127.0.0.1 (initdb + pg_ctl in a temp dir); yields it, to stop and start.

    With `password`, the user 'sweep' has it and the server asks for it (scram-sha-256); else trust.
    """
    bin_dir = _postgres_bin()
    if bin_dir is None:
        missing_dependency("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); .ci/run installs it")
    # postgres refuses to run as root: run it as the 'postgres' user the Debian package creates.
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="mnist-sweep-pg-"))
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            missing_dependency("running as root and there is no 'postgres' user to run the server as")
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    data, port = folder / "data", free_port()
    auth = ["-A", "trust"]
    if password is not None:
        password_file = folder / "pwfile"
        password_file.write_text(password + "\n")
        if as_user:
            os.chown(password_file, owner.pw_uid, owner.pw_gid)
        auth = ["-A", "scram-sha-256", f"--pwfile={password_file}"]

    def pg(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, capture_output=True, timeout=120)

    options = f"-h 127.0.0.1 -p {port} -k {folder} -F -c max_connections=200"

    def pg_ctl(*args: str) -> None:
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), *args)

    try:
        pg(str(bin_dir / "initdb"), "-D", str(data), *auth, "-U", "sweep", "--no-sync")
        pg_ctl("-w", "start")
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        missing_dependency(f"could not start PostgreSQL from {bin_dir}: {exc.stderr.decode(errors='replace').strip()}")
    try:
        yield PostgresServer(f"postgresql://sweep@127.0.0.1:{port}", pg_ctl)
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL on 127.0.0.1 that trusts its user; yields its base URL."""
    with _postgres(password=None) as url:
        yield url


POSTGRES_PASSWORD = "Pw-7f3c9e21-not-in-any-output"


@pytest.fixture(scope="session")
def postgres_password_server() -> Iterator[str]:
    """A throwaway PostgreSQL whose user 'sweep' must give POSTGRES_PASSWORD; yields its URL without it."""
    with _postgres(password=POSTGRES_PASSWORD) as url:
        yield url


@pytest.fixture
def postgres_database(postgres_server: str, request: pytest.FixtureRequest) -> str:
    """A fresh database on the test server, named after the test; returns its URL."""
    import psycopg

    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name.lower())[:50]
    with psycopg.connect(f"{postgres_server}/postgres", autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}"')
        connection.execute(f'CREATE DATABASE "{name}"')
    return f"{postgres_server}/{name}"
