"""Errors live in one module, and the CLI maps them to exit codes by their base class alone."""

from __future__ import annotations

import http.server
import importlib
import inspect
import pkgutil
import threading
from pathlib import Path

import pytest

import mnist_sweep
from mnist_sweep import cli, errors
from tests.conftest import DEFAULT_SWEEP, CliRunner, small_sweep_args

# Not an error of ours to map: a signal, which ends the command with the signal's own exit code.
SIGNALS = {"mnist_sweep.interrupt.Interrupted"}


def test_every_exception_class_of_the_package_is_defined_in_errors() -> None:
    defined_elsewhere = []
    for module_info in pkgutil.iter_modules(mnist_sweep.__path__):
        if module_info.name == "__main__":  # runs the CLI on import
            continue
        module = importlib.import_module(f"mnist_sweep.{module_info.name}")
        for _, value in inspect.getmembers(module, inspect.isclass):
            where = f"{value.__module__}.{value.__qualname__}"
            ours = value.__module__.startswith("mnist_sweep")
            error = issubclass(value, BaseException) and not issubclass(value, Warning)  # warnings: no exit
            if ours and error and value.__module__ != "mnist_sweep.errors":
                defined_elsewhere.append(where)
    assert sorted(set(defined_elsewhere) - SIGNALS) == []


@pytest.mark.parametrize(
    "error",
    [cls for cls in vars(errors).values() if inspect.isclass(cls) and issubclass(cls, errors.UserError)],
)
@pytest.mark.subprocess
def test_every_user_error_ends_in_exit_2_with_one_masked_line(
    error: type[errors.UserError], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(*_: object) -> int:
        raise error("study.storage = 'postgresql://sweeper:s3cret@db/optuna': no")

    monkeypatch.setattr(cli, "_dispatch", fail)
    assert cli.main(["trials", str(DEFAULT_SWEEP)]) == errors.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mnist-sweep: study.storage = ")
    assert "s3cret" not in err


@pytest.mark.subprocess
def test_too_many_failures_ends_in_exit_1_and_a_bug_keeps_its_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    raised: list[Exception] = [errors.TooManyFailures("3 trials failed in a row"), errors.WithheldTestSplitError("bug")]

    def fail(*_: object) -> int:
        raise raised.pop(0)

    monkeypatch.setattr(cli, "_dispatch", fail)
    assert cli.main(["trials", str(DEFAULT_SWEEP)]) == errors.EXIT_FAILED
    assert capsys.readouterr().err == "mnist-sweep: 3 trials failed in a row\n"
    with pytest.raises(errors.WithheldTestSplitError):
        cli.main(["trials", str(DEFAULT_SWEEP)])


def test_first_line_of_an_exception() -> None:
    assert errors.first_line(ValueError("  one\ntwo ")) == "one"
    assert errors.first_line(KeyError()) == "KeyError"


def test_a_sweep_file_path_is_escaped_once_for_toml(tmp_path: Path) -> None:
    from mnist_sweep.toml_text import parse_override, toml_string

    path = str(tmp_path / 'a "quoted" \\ folder')
    assert parse_override("data.path=" + toml_string(path)) == (["data", "path"], path)


class _CountingServer(http.server.BaseHTTPRequestHandler):
    """Up (/health), no experiment yet (404), and refuses to create one: the command stops after its checks."""

    health_calls = 0

    def do_GET(self) -> None:
        if self.path == "/health":
            type(self).health_calls += 1
        self._answer(200 if self.path == "/health" else 404)

    def do_POST(self) -> None:
        self._answer(400)

    def _answer(self, status: int) -> None:
        body = b"OK" if status == 200 else b'{"error_code": "INVALID_PARAMETER_VALUE", "message": "test server"}'
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "finalize"])
def test_inputs_are_checked_once_one_health_call_per_command(command: str, run_here: CliRunner) -> None:
    _CountingServer.health_calls = 0
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _CountingServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        uri = f"http://127.0.0.1:{server.server_address[1]}"
        done = run_here(
            command,
            str(DEFAULT_SWEEP),
            *small_sweep_args(trials=1),
            "--set",
            f'tracking.uri="{uri}"',
            env={"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
        )
    finally:
        server.shutdown()
        server.server_close()
    assert done.returncode == 2, done.stderr  # the server refuses the experiment: after the checks, not in them
    assert _CountingServer.health_calls == 1


def test_a_store_that_stopped_answering_is_named_by_the_key_it_came_from_and_a_local_file_is_no_outage() -> None:
    import sqlalchemy.exc
    from mlflow.exceptions import MlflowException

    from mnist_sweep.config import load_sweep
    from mnist_sweep.outages import outage_line

    server = load_sweep(
        DEFAULT_SWEEP,
        ['study.storage="postgresql://u:Pw-secret-1@127.0.0.1:5432/optuna"', 'tracking.uri="http://127.0.0.1:5000"'],
    )
    refused = sqlalchemy.exc.OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))
    try:
        raise RuntimeError("commit failed") from refused
    except RuntimeError as exc:
        optuna_line = outage_line(exc, server)
    gone = MlflowException("API request to http://127.0.0.1:5000/api/2.0/mlflow/runs/update: Max retries exceeded")
    mlflow_line = outage_line(gone, server)

    assert optuna_line is not None and optuna_line.startswith("study.storage = 'postgresql://u:***@127.0.0.1")
    assert "Pw-secret-1" not in optuna_line and "connection refused" in optuna_line
    assert mlflow_line is not None
    assert mlflow_line.startswith("tracking.uri = 'http://127.0.0.1:5000' stopped answering mid-run (max retries")
    assert outage_line(refused, load_sweep(DEFAULT_SWEEP)) is None  # the default sqlite file: no server to wait for
    assert outage_line(ValueError("Connection refused"), server) is None  # not a store's error
