"""A real `mlflow server` on 127.0.0.1 for the tests that need one; always stopped afterwards."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from tests.conftest import free_port

# MLflow's job runner (a huey consumer per job queue: four more processes, each importing MLflow) runs jobs no
# test asks of a server; started with every server, it doubled the start-up time on a loaded 2-core machine.
WITHOUT_JOBS = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def wait_for_health(url: str, process: subprocess.Popen[bytes], *, timeout: float = 180) -> None:
    """Until `url`/health answers 200; fails if the server exits first or never answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"mlflow server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise AssertionError(f"mlflow server did not answer on {url} within {timeout:.0f} s")


@contextlib.contextmanager
def mlflow_server(
    folder: Path, options: Sequence[str], *, env: Mapping[str, str] | None = None, port: int | None = None
) -> Iterator[str]:
    """`mlflow server OPTIONS` in `folder` (sqlite backend there), one worker and no job runner (WITHOUT_JOBS;
    `env` on top), on `port` (else a free one); yields its URL, then stops it at once, as a crash or a container
    kill would (its clients' connections cut). Started again on the same folder and port, it is the same server
    restarted."""
    port = port or free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}"]
    command += [*options, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    process = subprocess.Popen(
        command,
        cwd=folder,
        env={**os.environ, **WITHOUT_JOBS, **(env or {})},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its workers go with it
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, process)
        yield url
    finally:
        # SIGKILL, not a graceful stop: that waited out mnist_sweep.ui.stop_process_group's 15 s limit here (uvicorn
        # lets the open connections of a sweep's MLflow client finish), and nothing checks a server after its stop.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
