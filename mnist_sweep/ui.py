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
import time
import urllib.request
from collections.abc import Callable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

Echo = Callable[[str], None]
HOST = "127.0.0.1"
UI_WORKERS = 1  # one person browsing; MLflow's default of 4 workers would crowd small machines
UI_START_SECONDS = 120.0
DASHBOARD_EXTRA = "pip install 'mnist-sweep[dashboard]'"


class ServeError(RuntimeError):
    """A browser view cannot be served as asked; the message is one line for the user."""


def check_port(port: int) -> None:
    """A TCP port a server can listen on; 0 would pick a random one the user never learns."""
    if not 1 <= port <= 65535:
        raise ServeError(f"--port must be a TCP port from 1 to 65535, got {port}")


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
