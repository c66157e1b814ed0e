"""The study in a browser: the MLflow UI on its tracking store, optuna-dashboard on its Optuna storage.

Both listen on 127.0.0.1 only and serve until Ctrl-C. stdout gets the URL to open (one line, for scripts)
and the goodbye; the servers' access logs stay out of it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from mnist_sweep import interrupt
from mnist_sweep.errors import ServeError, UsageError

Echo = Callable[[str], None]
HOST = "127.0.0.1"
UI_WORKERS = 1  # one person browsing; MLflow's default of 4 workers would crowd small machines
UI_START_SECONDS = 120.0
DASHBOARD_EXTRA = "pip install 'mnist-sweep[dashboard]'"


def check_port(port: int) -> None:
    """A TCP port a server can listen on; 0 would pick a random one the user never learns."""
    if not 1 <= port <= 65535:
        raise UsageError(f"--port must be a TCP port from 1 to 65535, got {port}")


# --------------------------------------------------------------------------- the MLflow UI


def runs_table_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table, in the UI's model-training layout.

    MLflow 3.17 opens an experiment's bare URL on its GenAI overview (traces, token usage), and takes its
    layout (GenAI or model training) from `workflowType` in the URL, else from the browser's last choice.
    """
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def serve_mlflow_ui(*, uri: str, artifacts: str, experiment: str, port: int, echo: Echo) -> None:
    """The MLflow UI on the sweep's tracking store and artifact root, on 127.0.0.1, until Ctrl-C."""
    from mnist_sweep.locations import artifact_location
    from mnist_sweep.tracking import find_experiment_id

    check_port(port)
    experiment_id = find_experiment_id(uri=uri, experiment=experiment)
    if experiment_id is None:
        raise ServeError(f"tracking.uri = {uri!r} has no MLflow experiment {experiment!r}; run `mnist-sweep run`")
    if uri.startswith(("http://", "https://")):
        echo(f"the sweep's tracking server serves the UI: {runs_table_url(uri, experiment_id)}")
        return
    _check_port_free(port)
    base = f"http://{HOST}:{port}"
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri]
    location = artifact_location(uri, artifacts)
    command += ["--default-artifact-root", location] if location else []
    command += ["--host", HOST, "--port", str(port), "--workers", str(UI_WORKERS)]
    # A session of its own: Ctrl-C reaches only us, and stopping the group ends MLflow's workers too.
    # Its access log goes to stderr, so our stdout holds only the URL (for scripts) and the goodbye.
    server = subprocess.Popen(command, start_new_session=True, stdout=2)
    try:
        _wait_until_serving(server, base)
        echo(f"MLflow UI for study {experiment!r}: {runs_table_url(base, experiment_id)}  (Ctrl-C to stop)")
        code = server.wait()
        raise ServeError(f"the MLflow UI server stopped by itself (exit code {code})")
    except KeyboardInterrupt:
        echo("MLflow UI stopped")
    finally:
        stop_process_group(server)


def _check_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will
        try:
            probe.bind((HOST, port))
        except OSError as exc:
            raise ServeError(f"--port {port}: cannot listen on {HOST}:{port} ({exc.strerror})") from None


def _wait_until_serving(server: subprocess.Popen[bytes], base: str) -> None:
    def serving() -> bool | None:
        if server.poll() is not None:
            raise ServeError(f"the MLflow UI server exited at start (exit code {server.returncode})")
        try:
            with urllib.request.urlopen(base + "/health", timeout=2) as response:
                return True if response.status == 200 else None
        except OSError:
            return None  # not listening yet

    if interrupt.poll(serving, every=0.5, timeout=UI_START_SECONDS) is None:
        raise ServeError(f"the MLflow UI server did not answer on {base} within {UI_START_SECONDS:.0f} s")


def stop_process_group(server: subprocess.Popen[bytes]) -> None:
    """SIGTERM to a server started in a session of its own (its workers too); SIGKILL after 15 s."""
    if server.poll() is not None:
        return
    os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=15)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


# --------------------------------------------------------------------------- optuna-dashboard


class _ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a browser's open request never holds up Ctrl-C


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # one line per request would bury the URL
        pass


def serve_dashboard(*, storage: Any, study_name: str, port: int, echo: Echo) -> None:
    """optuna-dashboard on the study's Optuna storage, on 127.0.0.1, until Ctrl-C."""
    check_port(port)
    try:
        import optuna_dashboard
    except ImportError:
        raise ServeError(f"optuna-dashboard is not installed; {DASHBOARD_EXTRA}") from None
    study_id = storage.get_study_id_from_name(study_name)
    app = optuna_dashboard.wsgi(storage)
    with _listening(port, app) as server:
        url = f"http://{HOST}:{port}/dashboard/studies/{study_id}"
        echo(f"optuna-dashboard for study {study_name!r}: {url}  (Ctrl-C to stop)")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            echo("optuna-dashboard stopped")


@contextlib.contextmanager
def _listening(port: int, app: Any) -> Iterator[WSGIServer]:
    try:
        server = make_server(HOST, port, app, server_class=_ThreadedServer, handler_class=_QuietHandler)
    except OSError as exc:
        raise ServeError(f"--port {port}: cannot listen on {HOST}:{port} ({exc.strerror})") from None
    try:
        yield server
    finally:
        server.server_close()
