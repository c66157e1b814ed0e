"""With CI=true a test whose real dependency is missing fails; elsewhere it skips, saying what is missing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

MISSING = """
from tests.conftest import missing_dependency, required_module

def test_needs_a_server():
    missing_dependency("PostgreSQL is not installed")

def test_needs_a_module():
    required_module("no_such_module_for_mnist_sweep", "no_such_module is not installed")
"""


@pytest.mark.parametrize(("ci", "outcome"), [("true", "2 failed"), ("", "2 skipped")], ids=["CI=true", "no-CI"])
@pytest.mark.subprocess
def test_a_missing_dependency_fails_under_ci_and_skips_elsewhere(tmp_path: Path, ci: str, outcome: str) -> None:
    (tmp_path / "test_missing.py").write_text(MISSING)
    env = {**os.environ, "PYTHONPATH": str(REPO), "CI": ci}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rfs",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(tmp_path),
            str(tmp_path),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert outcome in result.stdout, result.stdout + result.stderr
    assert "PostgreSQL is not installed" in result.stdout, result.stdout  # the reason, either way


def test_a_test_given_the_cli_by_a_fixture_is_marked_subprocess(
    run_cli: object, request: pytest.FixtureRequest
) -> None:
    """`make test-fast` leaves out the tests that start processes; conftest marks those that get the CLI from a
    fixture, so this one must carry the marker though it spawns nothing itself."""
    assert request.node.get_closest_marker("subprocess") is not None
    assert request.node.get_closest_marker("server") is None
