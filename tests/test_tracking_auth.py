"""A tracking server that asks for credentials: MLFLOW_TRACKING_USERNAME/PASSWORD are sent, a refusal is one line.

The 401 cases run against MLflow's own basic-auth app (`mlflow server --app-name basic-auth`), whose /health
answers everyone: only an authenticated request finds out. The 403 case uses a small server of our own.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import CliRunner, free_port, required_module, small_sweep_args, write_sweep
from tests.in_process import run_in_process
from tests.servers import mlflow_server
from tests.stores import storage_url

ADMIN_PASSWORD = "Admin-pw-5c1d-not-in-any-output"


@pytest.fixture(scope="module")
def basic_auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server --app-name basic-auth` on 127.0.0.1 with one admin user; yields its URL."""
    required_module("flask_wtf", "MLflow's basic-auth app needs Flask-WTF (the dev extra installs it)")
    folder = tmp_path_factory.mktemp("mlflow-auth")
    env = {"MLFLOW_FLASK_SERVER_SECRET_KEY": "test-only-secret-key", "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD}
    options = ["--app-name", "basic-auth", "--default-artifact-root", str(folder / "artifacts")]
    with mlflow_server(folder, options, env=env) as url:
        yield url


@pytest.fixture
def run_here(mnist_dir: Path) -> CliRunner:
    """`run_cli`'s calls through the CLI's main in this process (tests.in_process): for the refusals a real
    server gives, the process is not what is checked (the refusal of a server that is down is checked in a
    process of its own)."""

    def runner(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return run_in_process(*args, cwd=cwd, data=mnist_dir, env=env)

    return runner


def _run_bad(run_cli: CliRunner, tmp_path: Path, uri: str, env: dict[str, str]) -> tuple[str, Path]:
    work = tmp_path / "work"
    work.mkdir()
    result = run_cli("run", str(write_sweep(tmp_path, "")), "--set", f'tracking.uri="{uri}"', cwd=work, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert list(work.iterdir()) == []
    return lines[0], work


def in_tmp(folder: Path, study: str) -> list[str]:
    """`--set` arguments naming the study and its Optuna storage in `folder`, absolute: the sweeps that train run
    through the CLI's main in the test's process (their process is not what these tests check)."""
    return ["--set", f'study.name="{study}"', "--set", f'study.storage="{storage_url(folder)}"']


NO_CREDENTIALS = {"MLFLOW_TRACKING_USERNAME": "", "MLFLOW_TRACKING_PASSWORD": "", "MLFLOW_TRACKING_TOKEN": ""}


@pytest.mark.slow
@pytest.mark.server
def test_basic_auth_server_without_credentials_is_one_line_pointing_to_the_variables(
    basic_auth_server: str, run_here: CliRunner, tmp_path: Path
) -> None:
    line, _ = _run_bad(run_here, tmp_path, basic_auth_server, NO_CREDENTIALS)
    assert "tracking.uri" in line and basic_auth_server in line and "401" in line
    assert "MLFLOW_TRACKING_USERNAME" in line and "MLFLOW_TRACKING_PASSWORD" in line


@pytest.mark.slow
@pytest.mark.server
def test_basic_auth_server_with_a_wrong_password_is_one_line(
    basic_auth_server: str, run_here: CliRunner, tmp_path: Path
) -> None:
    env = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": "Wrong-pw-0815"}
    line, _ = _run_bad(run_here, tmp_path, basic_auth_server, env)
    assert "tracking.uri" in line and "refused the credentials" in line and "'admin'" in line and "401" in line
    assert "Wrong-pw-0815" not in line


@pytest.mark.slow
@pytest.mark.server
def test_a_sweep_runs_against_a_basic_auth_server_with_credentials_from_the_environment(
    basic_auth_server: str, mnist_dir: Path, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    env = {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": ADMIN_PASSWORD}
    sweep = write_sweep(tmp_path, f'[tracking]\nuri = "{basic_auth_server}"\n')
    args = ["run", str(sweep), *small_sweep_args(trials=1), *in_tmp(tmp_path, "auth")]
    result = run_in_process(*args, cwd=tmp_path, data=mnist_dir, env=env)
    assert result.returncode == 0, result.stderr
    assert ADMIN_PASSWORD not in result.stdout + result.stderr
    os.environ.update(env)
    try:
        client = MlflowClient(tracking_uri=basic_auth_server)
        experiment = client.get_experiment_by_name("auth")
        assert experiment is not None
        assert len(client.search_runs([experiment.experiment_id])) == 3  # the parent, the trial, the lecture's network
    finally:
        for key in env:
            os.environ.pop(key, None)


class _Forbidding(http.server.BaseHTTPRequestHandler):
    """An MLflow-like server that is up (/health) but forbids this user everything else."""

    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/health" else 403)
        self.end_headers()
        self.wfile.write(b"OK" if self.path == "/health" else b"Permission denied")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def forbidding_server() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Forbidding)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.server
def test_tracking_server_answering_403_is_one_line(forbidding_server: str, run_here: CliRunner, tmp_path: Path) -> None:
    env = {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "Bob-pw-1234"}
    line, _ = _run_bad(run_here, tmp_path, forbidding_server, env)
    assert "tracking.uri" in line and forbidding_server in line and "403" in line and "'bob'" in line


def test_tracking_server_that_is_down_is_one_line(run_cli: CliRunner, tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}"
    line, _ = _run_bad(run_cli, tmp_path, down, {})
    assert "tracking.uri" in line and down in line and "no MLflow server answers" in line


def _as_admin(url: str, path: str, body: dict[str, object]) -> None:
    """A request to the basic-auth server as its admin (MLflow's own REST API)."""
    import base64
    import json
    import urllib.request

    token = base64.b64encode(f"admin:{ADMIN_PASSWORD}".encode()).decode()
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Basic {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30):
        pass


@pytest.mark.slow
@pytest.mark.server
def test_a_registry_refusing_after_scoring_is_one_line_and_the_result_stays_sealed(
    basic_auth_server: str, mnist_dir: Path, tmp_path: Path
) -> None:
    """bob may read the admin's registered model (the server's default READ), not add a version to it (403)."""
    import json

    import optuna

    _as_admin(basic_auth_server, "/api/2.0/mlflow/users/create", {"username": "bob", "password": "Bob-pw-5e6f7a"})
    tag = [{"key": "mnist_sweep.registered_by", "value": "mnist-sweep"}]  # an earlier study's, by the admin
    _as_admin(basic_auth_server, "/api/2.0/mlflow/registered-models/create", {"name": "shared", "tags": tag})
    env = {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "Bob-pw-5e6f7a"}
    sweep = write_sweep(tmp_path, f'[tracking]\nuri = "{basic_auth_server}"\nregistered_model = "shared"\n')
    args = [str(sweep), *small_sweep_args(trials=1), *in_tmp(tmp_path, "bob")]
    done = run_in_process("run", *args, cwd=tmp_path, data=mnist_dir, env=env)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert (
        line.startswith("mnist-sweep: tracking.registered_model = 'shared': the MLflow server refused")
        and "403" in line
    )
    assert done.stdout.strip().splitlines()[-1].startswith("test accuracy ")  # scored, and said so first
    study = optuna.load_study(study_name="bob", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    assert study.user_attrs["test_result"]["test_images"] == 10000 and "registered_model" not in study.user_attrs
    written = json.loads((tmp_path / "reports" / "bob" / "test_metrics.json").read_text())
    assert written["test_set_scored"] is True and written["registered_model"] is None
    again = run_in_process("finalize", *args, cwd=tmp_path, data=mnist_dir, env=env)
    assert again.returncode == 2 and "nothing scored again" in again.stdout  # sealed: the refusal is all that is new
