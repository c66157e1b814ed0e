"""The CLI's entry point run in the test's own process, for a sweep whose process is not what a test checks.

A subprocess pays Python's and TensorFlow's start-up (about 6 s here) for every command; a test that only needs
a sweep trained, resumed or scored runs `mnist_sweep.cli.main` here instead and reads back the same stores.
Tests of signals, kills, exit of the process itself or concurrency between real processes keep the subprocess.

MLflow keeps one store per tracking URI in a process; conftest's `cli_here` forgets them around each command.
`absolute_stores` names the default sweep's stores by absolute paths, for tests that read them from elsewhere.
"""

from __future__ import annotations

import subprocess
from collections.abc import Mapping
from pathlib import Path

from tests.stores import storage_url, tracking_url


def absolute_stores(folder: Path) -> list[str]:
    """`--set` arguments for the default sweep's stores, laid out in `folder` as its relative paths would be."""
    return ["--set", f'study.storage="{storage_url(folder)}"', "--set", f'tracking.uri="{tracking_url(folder)}"']


def run_in_process(
    *args: str, cwd: Path, data: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`mnist-sweep ARGS` through `mnist_sweep.cli.main` in this process, in `cwd`, with the MNIST folder `data`:
    its exit code and output as `tests.conftest.cli` returns them (conftest's `cli_here`)."""
    from tests.conftest import cli_here

    return cli_here(*args, cwd=cwd, data=data, env=dict(env or {}))
