"""A trial's artifacts are stored while the next trial trains; a kill right after a trial must never leave a
FINISHED run without them. The real CLI, a real signal, then MLflow and Optuna read back."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from tests.conftest import CliStarter, sweep_args
from tests.in_process import absolute_stores, run_in_process
from tests.stores import all_runs, assert_nothing_running, load_study, raw_trials, tracking_url

pytestmark = pytest.mark.slow
COMPLETE = optuna.trial.TrialState.COMPLETE
REPORT_FILES = {
    "val_confusion_matrix.json",
    "val_confusion_matrix.csv",
    "val_confusion_matrix.png",
    "val_confusion_matrix.html",
    "val_per_class_metrics.csv",
}


def uploads_args(*, background: bool = True) -> list[str]:
    mode = f"tracking.background_uploads={str(background).lower()}"
    return sweep_args("study.heartbeat_seconds=2", mode, trials=2)


def stop_right_after_first_trial(process: subprocess.Popen[str], folder: Path, signum: int) -> None:
    """`signum` the moment Optuna records the first COMPLETE trial, while its artifacts are being stored."""
    deadline = time.monotonic() + 300
    while not any(t["state"] == "COMPLETE" for t in raw_trials(folder)):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "no trial completed"
        time.sleep(0.01)
    process.send_signal(signum)
    process.communicate(timeout=120)


def trial_runs(folder: Path) -> list[Run]:
    return [run for run in all_runs(folder) if run.data.tags.get("mnist_sweep.role") == "trial"]


def assert_artifacts_complete(folder: Path, run: Run) -> None:
    """The run's confusion matrix and per-class metrics are there, and its model loads and predicts."""
    from mnist_sweep.final import load_scored_model

    stored = {item.path for item in MlflowClient(tracking_url(folder)).list_artifacts(run.info.run_id)}
    assert stored >= REPORT_FILES, f"{run.info.run_name}: {sorted(stored)}"
    assert "final_val_accuracy" in run.data.metrics and "upload_seconds" in run.data.metrics
    model = load_scored_model(run.data.tags["model_uri"], tracking_uri=tracking_url(folder))
    probabilities = model.predict(np.zeros((2, 28, 28), dtype=np.float32), verbose=0)
    assert probabilities.shape == (2, 10)


@pytest.mark.parametrize("background", [True, False], ids=["background", "stored at once (default)"])
def test_sigkill_right_after_a_trial_leaves_every_finished_run_complete_and_the_rerun_scores(
    tmp_path: Path, start_cli: CliStarter, mnist_dir: Path, background: bool
) -> None:
    stop_right_after_first_trial(start_cli("run", *uploads_args(background=background)), tmp_path, signal.SIGKILL)

    finished = [run for run in trial_runs(tmp_path) if run.info.status == "FINISHED"]
    for run in finished:
        assert_artifacts_complete(tmp_path, run)

    # The rerun through the CLI's main in this process: its process is not what this checks.
    again = run_in_process(
        "run", *uploads_args(background=background), *absolute_stores(tmp_path), cwd=tmp_path, data=mnist_dir
    )

    assert again.returncode == 0, again.stderr
    assert "test accuracy" in again.stdout
    study, runs = load_study(tmp_path), all_runs(tmp_path)
    assert_nothing_running(study, runs)
    by_id = {run.info.run_id: run for run in runs}
    for trial in study.get_trials(states=(COMPLETE,)):
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        if run.info.status == "FINISHED":
            assert_artifacts_complete(tmp_path, run)
        else:  # killed while storing its artifacts: closed, never scored, its parameters trained again
            assert run.info.status == "KILLED" and "not all stored" in run.data.tags["state_reason"]
            redo = [t for t in study.trials if t.user_attrs.get("redo_of_trial") == trial.number]
            assert [t.params for t in redo] == [trial.params] and redo[0].state == COMPLETE
    scored = study.user_attrs["test_result"]["trial_number"]
    assert by_id[study.trials[scored].user_attrs["mlflow_run_id"]].info.status == "FINISHED"


def test_sigterm_right_after_a_trial_waits_until_its_artifacts_are_stored(
    tmp_path: Path, start_cli: CliStarter
) -> None:
    process = start_cli("run", *uploads_args())
    stop_right_after_first_trial(process, tmp_path, signal.SIGTERM)

    assert process.returncode == 143
    study = load_study(tmp_path)
    by_id = {run.info.run_id: run for run in trial_runs(tmp_path)}
    complete = study.get_trials(states=(COMPLETE,))
    assert complete
    for trial in complete:
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.info.status == "FINISHED", run.data.tags
        assert_artifacts_complete(tmp_path, run)
