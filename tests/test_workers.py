"""Several workers on one study, for real: concurrent CLI processes, then Optuna and MLflow read back."""

from __future__ import annotations

import subprocess
from pathlib import Path

import optuna
import pytest

from tests.conftest import DEFAULT_SWEEP, CliStarter, small_sweep_args
from tests.stores import all_runs, assert_nothing_running, assert_runs_linked, assert_scored_once

pytestmark = pytest.mark.slow
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def sweep_args(storage: str, trials: int) -> list[str]:
    # Five processes share two cores here: a 2 s heartbeat would be late now and then (that case is
    # handled, the trial is retried, but it wastes the run's time).
    overrides = ("--set", f'study.storage="{storage}"', "--set", "study.heartbeat_seconds=5")
    return [str(DEFAULT_SWEEP), *small_sweep_args(*overrides, trials=trials, train_limit=1000, validation=500)]


def all_succeed(processes: list[subprocess.Popen[str]]) -> list[str]:
    """Wait for every process; each must exit 0 with no "database is locked"; returns their stdout."""
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, err
        assert "database is locked" not in err
        outputs.append(out)
    return outputs


def check_study(folder: Path, storage: str, trials: int, outputs: list[str]) -> None:
    study = optuna.load_study(study_name="fcn", storage=storage)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(len(numbers))), "duplicate or missing trial numbers"
    assert len(study.get_trials(states=FINISHED)) >= trials
    runs = all_runs(folder)
    assert_nothing_running(study, runs)
    assert_runs_linked(study, runs)
    assert_scored_once(folder, study, runs, outputs)


def test_two_workers_and_two_runs_share_the_local_sqlite_study(tmp_path: Path, start_cli: CliStarter) -> None:
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    args = sweep_args(storage, trials=4)
    processes = [start_cli(command, *args) for command in ("worker", "worker", "run", "run")]

    outputs = all_succeed(processes)

    check_study(tmp_path, storage, 4, outputs)


@pytest.mark.postgres
def test_three_workers_and_two_runs_share_a_postgres_study(
    tmp_path: Path, start_cli: CliStarter, postgres_database: str
) -> None:
    args = sweep_args(postgres_database, trials=6)
    processes = [start_cli(command, *args) for command in ("worker", "worker", "worker", "run", "run")]

    outputs = all_succeed(processes)

    check_study(tmp_path, postgres_database, 6, outputs)
