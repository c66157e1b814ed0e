"""The trial loop in one process, with real stores: Optuna sqlite with heartbeats, MLflow sqlite.

What a second worker does to this process's trial (fail it as stale and retry its parameters) is done
here through a second storage connection, at a chosen moment of the trial.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

import mnist_sweep.trial
from mnist_sweep.config import SweepConfig, load_sweep
from mnist_sweep.data import Split
from mnist_sweep.errors import TooManyFailures
from mnist_sweep.ledger import StudyLedger
from mnist_sweep.study import StudyContext, make_storage, open_study
from mnist_sweep.tracking import Tracker
from mnist_sweep.trial_loop import run_trials
from mnist_sweep.trial_run import TAKEN_OVER, Trials
from tests.conftest import DEFAULT_SWEEP

FAIL, COMPLETE = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE


@pytest.fixture
def split(synthetic_mnist: tuple[np.ndarray, np.ndarray]) -> Split:
    images, labels = synthetic_mnist
    x = images.astype(np.float32) / 255.0
    return Split(x_train=x[:600], y_train=labels[:600], x_val=x[1000:], y_val=labels[1000:])


def sweep_config(folder: Path, *overrides: str) -> SweepConfig:
    return load_sweep(
        DEFAULT_SWEEP,
        [
            f'study.storage="sqlite:///{folder}/optuna.db"',
            f'tracking.uri="sqlite:///{folder}/mlflow.db"',
            f'tracking.artifacts="{folder}/artifacts"',
            'study.pruner="none"',
            "train.epochs=1",
            "search.batch_size=128",
            *overrides,
        ],
    )


class Sweep:
    """A study, its tracker and this process's trials, as `sweep.run` makes them."""

    def __init__(self, cfg: SweepConfig, split: Split) -> None:
        self.cfg = cfg
        self.storage = make_storage(cfg.study)
        self.tracker = Tracker(uri=cfg.tracking.uri, artifacts=cfg.tracking.artifacts, experiment=cfg.study.name)
        self.study, created = open_study(cfg, self.storage)
        ledger = StudyLedger.open(self.study, self.tracker, created=created, config=cfg.to_dict())
        context = StudyContext(self.study, self.storage, ledger)
        self.trials = Trials(cfg=cfg, split=split, context=context, data_source="synthetic")
        self.lines: list[str] = []

    def run(self) -> int:
        cfg = self.cfg.study
        return run_trials(self.trials, target=cfg.trials, max_failures=cfg.max_failures, echo=self.lines.append)

    def run_status(self, trial: optuna.trial.FrozenTrial) -> tuple[str, dict[str, str]]:
        run = MlflowClient(tracking_uri=self.cfg.tracking.uri).get_run(trial.user_attrs["mlflow_run_id"])
        return run.info.status, run.data.tags


def fail_as_another_worker_would(cfg: SweepConfig) -> None:
    """What fail_stale_trials in another process does to a trial whose heartbeat is late."""
    other = optuna.storages.RDBStorage(cfg.study.storage)
    study = optuna.load_study(study_name=cfg.study.name, storage=other)
    (running,) = study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    other.set_trial_state_values(running._trial_id, state=FAIL)
    optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)(study, other.get_trial(running._trial_id))


def take_over_first_trial(monkeypatch: pytest.MonkeyPatch, cfg: SweepConfig, moment: str) -> None:
    """Another worker fails trial 0 as stale, before its fit or after it (while its model is logged)."""
    real_run_trial = mnist_sweep.trial.run_trial
    calls: list[int] = []

    def run_trial(**kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 1 and moment == "before fit":
            fail_as_another_worker_would(cfg)
        outcome = real_run_trial(**kwargs)
        if len(calls) == 1 and moment == "after fit":
            fail_as_another_worker_would(cfg)
        return outcome

    monkeypatch.setattr(mnist_sweep.trial, "run_trial", run_trial)


@pytest.mark.parametrize("moment", ["before fit", "after fit"])
def test_a_trial_failed_as_stale_by_another_worker_is_retried_and_the_sweep_goes_on(
    tmp_path: Path, split: Split, monkeypatch: pytest.MonkeyPatch, moment: str
) -> None:
    # max_failures = 1: were the taken-over trial counted as this process's failure, the sweep would stop.
    cfg = sweep_config(tmp_path, "study.trials=2", "study.max_failures=1")
    take_over_first_trial(monkeypatch, cfg, moment)
    sweep = Sweep(cfg, split)

    ran = sweep.run()

    trials = sweep.study.get_trials()
    assert [t.state for t in trials] == [FAIL, COMPLETE, COMPLETE]
    assert ran == 3
    taken = trials[0]
    retried = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert [t.params for t in retried] == [taken.params], "the taken-over trial's parameters were not retried"
    status, tags = sweep.run_status(taken)
    assert status == "FAILED" and tags["trial_state"] == "FAIL" and tags["state_reason"] == TAKEN_OVER
    for trial in trials[1:]:
        assert sweep.run_status(trial)[0] == "FINISHED"
    assert sweep.lines[0] == f"trial    0  FAIL      {TAKEN_OVER}  [0/2 finished]"
    assert re.fullmatch(
        r"trial    1  COMPLETE  val_accuracy = [01]\.\d{4}  \(fit \d+\.\d s, tracking \d+\.\d\d s\)  \[1/2 finished\]",
        sweep.lines[1],
    ), sweep.lines[1]
    assert sweep.lines[2].endswith("[2/2 finished]")
    assert trials[1].user_attrs["tracking_seconds"] > 0


def test_failure_budget_stops_the_sweep_with_the_last_error(
    tmp_path: Path, split: Split, monkeypatch: pytest.MonkeyPatch
) -> None:
    def diverging(**kwargs: Any) -> Any:
        raise mnist_sweep.trial.TrialDiverged("loss became nan at epoch 1; the learning rate is probably too high")

    monkeypatch.setattr(mnist_sweep.trial, "run_trial", diverging)
    sweep = Sweep(sweep_config(tmp_path, "study.trials=5", "study.max_failures=2"), split)

    with pytest.raises(TooManyFailures) as raised:
        sweep.run()

    assert str(raised.value) == (
        "2 trials failed in this process (study.max_failures = 2); last error: "
        "TrialDiverged: loss became nan at epoch 1; the learning rate is probably too high"
    )
    trials = sweep.study.get_trials()
    assert [t.state for t in trials] == [FAIL, FAIL]
    assert all(sweep.run_status(t)[0] == "FAILED" for t in trials)
    assert [line.split("  [")[0] for line in sweep.lines] == [
        f"trial    {n}  FAIL      TrialDiverged: loss became nan at epoch 1; the learning rate is probably too high"
        for n in (0, 1)
    ]


def test_a_study_already_at_its_target_runs_no_trial(tmp_path: Path, split: Split) -> None:
    cfg = sweep_config(tmp_path, "study.trials=1")
    assert Sweep(cfg, split).run() == 1

    again = Sweep(cfg, split)
    assert again.run() == 0
    assert len(again.study.get_trials()) == 1 and again.lines == []


def test_models_go_to_the_study_store_and_mlflow_global_uri_is_left_alone(tmp_path: Path, split: Split) -> None:
    elsewhere = f"sqlite:///{tmp_path}/elsewhere.db"
    mlflow.set_tracking_uri(elsewhere)  # what the process that embeds the sweep has chosen
    try:
        sweep = Sweep(sweep_config(tmp_path, "study.trials=1"), split)
        sweep.run()
        assert mlflow.get_tracking_uri() == elsewhere
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]
    assert not (tmp_path / "elsewhere.db").exists()
    (trial,) = sweep.study.get_trials()
    model = MlflowClient(tracking_uri=sweep.cfg.tracking.uri).get_logged_model(
        trial.user_attrs["model_uri"].removeprefix("models:/")
    )
    assert model.experiment_id == sweep.tracker.experiment_id and model.name == "trial-0000"


def test_a_read_only_tracker_makes_nothing(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/not-yet/mlflow.db"
    assert Tracker.existing(uri=uri, experiment="fcn") is None
    assert list(tmp_path.iterdir()) == []


def test_a_pruned_trial_records_the_seconds_it_trained(tmp_path: Path, split: Split) -> None:
    """The sweep's cost counts pruned trials too (bench/search.py): their fit seconds, up to the pruning epoch."""
    sweep = Sweep(sweep_config(tmp_path, "study.trials=1", "train.epochs=3"), split)
    sweep.study.pruner = optuna.pruners.ThresholdPruner(upper=0.0)  # any accuracy above 0 is pruned at epoch 1
    sweep.run()
    (trial,) = sweep.study.trials
    assert trial.state == optuna.trial.TrialState.PRUNED and trial.last_step == 1
    assert trial.user_attrs["fit_seconds"] > 0
