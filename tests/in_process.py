"""The CLI's entry point run in the test's own process, for a sweep whose process is not what a test checks.

A subprocess pays Python's and TensorFlow's start-up (about 6 s here) for every command; a test that only needs
a sweep trained, resumed or scored runs `mnist_sweep.cli.main` here instead and reads back the same stores.
Tests of signals, kills, exit of the process itself or concurrency between real processes keep the subprocess.

MLflow keeps one store per tracking URI in a process, and a relative sqlite URI names the file of whichever
folder first used it: a command run here is given absolute store locations (`absolute_stores`).
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

from tests.stores import storage_url, tracking_url


def absolute_stores(folder: Path) -> list[str]:
    """`--set` arguments for the default sweep's stores, laid out in `folder` as its relative paths would be."""
    return ["--set", f'study.storage="{storage_url(folder)}"', "--set", f'tracking.uri="{tracking_url(folder)}"']


@contextlib.contextmanager
def _as_a_command(cwd: Path, env: Mapping[str, str]) -> Iterator[tuple[io.StringIO, io.StringIO]]:
    """cwd, environment and standard streams of a command, restored afterwards: what the command sets in
    os.environ (its MLflow defaults) ends with it, as it would with its process."""
    saved_env, saved_cwd, saved_streams = dict(os.environ), Path.cwd(), (sys.stdout, sys.stderr)
    stdout, stderr = io.StringIO(), io.StringIO()
    os.environ.update(env)
    os.chdir(cwd)
    sys.stdout, sys.stderr = stdout, stderr
    try:
        yield stdout, stderr
    finally:
        sys.stdout, sys.stderr = saved_streams
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)


def run_in_process(
    *args: str, cwd: Path, data: Path, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`mnist-sweep ARGS` through `mnist_sweep.cli.main` in this process, in `cwd`, with the MNIST folder `data`:
    its exit code and output as `tests.conftest.cli` returns them. An exception main lets through fails the test,
    as a traceback would."""
    from mnist_sweep import cli as entry_point

    with _as_a_command(cwd, {"MNIST_SWEEP_DATA": str(data), **(env or {})}) as (stdout, stderr):
        try:
            code = entry_point.main(list(args))
        except SystemExit as exit:  # argparse
            code = exit.code if isinstance(exit.code, int) else 1
    return subprocess.CompletedProcess(["mnist-sweep", *args], code, stdout.getvalue(), stderr.getvalue())
