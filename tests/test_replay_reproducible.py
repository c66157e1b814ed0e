"""Same seeds, same sweep: two fresh runs agree, and `replay` retrains a logged trial to its numbers."""

from __future__ import annotations

import contextlib
import re
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import CliRunner, unreadable_test_images
from tests.finished_sweep import ARGS, SWEEP, FinishedSweep
from tests.stores import load_study

pytestmark = pytest.mark.slow


def everything_under(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if "-wal" not in p.name}


def settle_write_ahead_logs(folder: Path) -> None:
    """Fold the sweep's sqlite write-ahead logs into their databases, as the last reader to close would.

    A reader that closes last folds them in too, which changes the files' sizes but not what they hold:
    settled first, such housekeeping cannot pass for a write.
    """
    for database in folder.rglob("*.db"):
        with contextlib.closing(sqlite3.connect(database)) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_two_fresh_runs_agree_and_replay_matches_the_logged_metrics(
    finished_sweep: FinishedSweep, tmp_path: Path, run_cli: CliRunner, run_here: CliRunner, mnist_dir: Path
) -> None:
    # The first run is the session's finished sweep, run in this process; the second runs the same sweep file
    # with the same arguments in a fresh process and a folder of its own.
    args = [SWEEP, *ARGS]
    second = tmp_path / "second"
    second.mkdir()
    result = run_cli("run", *args, cwd=second)
    assert result.returncode == 0, result.stderr

    first, again = finished_sweep.study(), load_study(second)
    assert [t.params for t in first.trials] == [t.params for t in again.trials]
    for one, other in zip(first.trials, again.trials, strict=True):
        assert other.user_attrs["val_accuracy"] == pytest.approx(one.user_attrs["val_accuracy"], abs=1e-6)
        assert other.user_attrs["val_loss"] == pytest.approx(one.user_attrs["val_loss"], rel=1e-5)

    # The fresh process's best trial replayed in this one, with test images that cannot be read: it succeeds,
    # so it never touched them.
    broken = unreadable_test_images(mnist_dir, tmp_path / "inputs")
    settle_write_ahead_logs(second)
    before = everything_under(second)
    run_id = again.best_trial.user_attrs["mlflow_run_id"]
    replayed = run_here("replay", *args, run_id, "--data", str(broken), cwd=second)

    assert replayed.returncode == 0, replayed.stderr
    differences = [float(d) for d in re.findall(r"difference ([-+0-9.e]+)", replayed.stdout)]
    assert len(differences) == 2, replayed.stdout
    assert all(abs(d) < 1e-5 for d in differences), replayed.stdout
    assert everything_under(second) == before


def test_replay_of_an_unknown_run_is_one_line(finished_sweep: FinishedSweep) -> None:
    result = finished_sweep.run("replay", SWEEP, *ARGS, "0123456789abcdef0123456789abcdef")

    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "0123456789abcdef0123456789abcdef" in result.stderr
