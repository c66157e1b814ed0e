"""`mnist-sweep dashboard` refusing what it cannot serve (the page itself: tests/test_ui.py)."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import optuna
import pytest

from tests.browser import DASHBOARD_MISSING
from tests.conftest import CLI, DEFAULT_SWEEP, REPO, cli_environment, free_port, required_module, run_in_process

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]  # each test starts the real CLI (TensorFlow and MLflow imports)

SWEEP = str(DEFAULT_SWEEP)


def make_study(folder: Path) -> None:
    """An empty stored study named as in the default sweep: enough for `dashboard` to open."""
    (folder / "mlruns").mkdir()
    optuna.create_study(study_name="fcn", storage=f"sqlite:///{folder}/mlruns/optuna.db", direction="maximize")


def dashboard(folder: Path, port: int, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    command = [*CLI, "dashboard", SWEEP, "--port", str(port)]
    return subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=300)


def user_errors(done: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("mnist-sweep:")]


def test_dashboard_without_the_extra_exits_2_naming_it(tmp_path: Path, mnist_dir: Path) -> None:
    make_study(tmp_path)
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "optuna_dashboard.py").write_text("raise ImportError('hidden by the test')\n", encoding="utf-8")
    done = dashboard(tmp_path, free_port(), cli_environment(mnist_dir, {"PYTHONPATH": f"{hidden}:{REPO}"}))
    assert done.returncode == 2
    assert user_errors(done) == ["mnist-sweep: optuna-dashboard is not installed; pip install 'mnist-sweep[dashboard]'"]
    assert done.stdout == ""


def test_dashboard_on_a_port_in_use_exits_2_naming_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    required_module("optuna_dashboard", DASHBOARD_MISSING)
    make_study(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # In this process: the process adds nothing here, and nothing serves where the port is taken.
        done = run_in_process(["dashboard", SWEEP, "--port", str(port)], cwd=tmp_path, monkeypatch=monkeypatch)
    assert done.returncode == 2
    reason = "Address already in use"
    assert user_errors(done) == [f"mnist-sweep: --port {port}: cannot listen on 127.0.0.1:{port} ({reason})"]
    assert done.stdout == ""
