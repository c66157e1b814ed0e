"""One finished sweep: the default sweep file run by the real CLI on a small real subset, read back from MLflow
and Optuna as a user would. The CLI runs in the test process (`cli_here`): no test here is about the process.

`tests/conftest.py` runs it once a session (the `finished_sweep` fixture) for every test that only reads a
finished sweep: test_sweep, test_report_command, test_registry, test_ui. A test that changes the folder
works on `copy()` of it; one that needs another sweep (another engine, another space) calls `run_sweep`.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from tests.conftest import DEFAULT_SWEEP, cli_here, small_sweep_args
from tests.stores import storage_url, tracking_url

SWEEP = str(DEFAULT_SWEEP)
STUDY = "fcn"  # the default sweep file's study.name
# Three trials: the default pruner's startup trials, so all three run in full and each is COMPLETE.
TRIALS = 3
TRAIN_IMAGES = 2000
VALIDATION_IMAGES = 1000
ARGS = small_sweep_args(trials=TRIALS, train_limit=TRAIN_IMAGES, validation=VALIDATION_IMAGES)
TRIAL_RUNS = "tags.`mnist_sweep.role` = 'trial'"
STUDY_RUN = "tags.`mnist_sweep.role` = 'study'"


@dataclass(frozen=True)
class FinishedSweep:
    """A folder where `mnist-sweep run` finished, the MNIST folder it read, and what that run printed."""

    folder: Path
    data: Path
    first: subprocess.CompletedProcess[str]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        """The real CLI in this sweep's folder, in this process."""
        return cli_here(*args, cwd=self.folder, data=self.data)

    def copy(self, folder: Path) -> FinishedSweep:
        """This sweep's folder copied to `folder`, for a test that changes what it reads.

        MLflow recorded the artifact location as an absolute path: the copy's runs keep their artifacts in the
        original folder, so a command in the copy that logs to a run writes there."""
        shutil.copytree(self.folder, folder)
        return FinishedSweep(folder, self.data, self.first)

    @property
    def tracking_uri(self) -> str:
        return tracking_url(self.folder)

    @property
    def storage(self) -> str:
        return storage_url(self.folder)

    @property
    def reports(self) -> Path:
        return self.folder / "reports" / STUDY

    def mlflow(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.tracking_uri)

    def study(self) -> optuna.Study:
        return optuna.load_study(study_name=STUDY, storage=self.storage)

    def result(self) -> dict[str, Any]:
        """reports/fcn/test_metrics.json."""
        return dict(json.loads((self.reports / "test_metrics.json").read_text(encoding="utf-8")))

    def experiment_id(self) -> str:
        experiment = self.mlflow().get_experiment_by_name(STUDY)
        assert experiment is not None
        return str(experiment.experiment_id)

    def runs(self, filter_string: str = "") -> list[Run]:
        return list(self.mlflow().search_runs([self.experiment_id()], filter_string, max_results=100))

    def trial_runs(self) -> list[Run]:
        """The trials' runs, in trial order."""
        return sorted(self.runs(TRIAL_RUNS), key=lambda run: run.info.run_name)

    def parent(self) -> Run:
        (parent,) = self.runs(STUDY_RUN)
        return parent


def run_sweep(folder: Path, data: Path, *extra: str) -> FinishedSweep:
    """`mnist-sweep run` of the default sweep, shrunk to ARGS (and `extra` on top), in `folder`."""
    first = cli_here("run", SWEEP, *ARGS, *extra, cwd=folder, data=data)
    assert first.returncode == 0, first.stderr[-3000:]
    return FinishedSweep(folder, data, first)
