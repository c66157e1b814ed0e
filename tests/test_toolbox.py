"""The lecture's training toolbox, end to end: the lecture's network trained beside the trials, the plateau schedule
with its learning rate per epoch, and TensorBoard event files uploaded to each trial's run.

One tiny real study (two workers' runs, then finalize), read back from Optuna, MLflow and the report."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from mnist_sweep.baseline import LECTURE_PARAMS
from tests.conftest import REPO, cli, cli_here, required_mnist, write_sweep

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

# A space that holds the lecture's values (sigmoid, adam at 1e-3, batch 128, no dropout); plateau with room to act.
LECTURE_SPACE = """
[study]
name = "lecture"
trials = 2
sampler = "random"
pruner = "none"

[data]
validation = 500
train_limit = 1500

[train]
epochs = 3
lr_schedule = "plateau"
plateau_patience = 1
tensorboard = true

[search]
optimizer = ["adam", "sgd"]
learning_rate = { low = 1e-4, high = 1e-2, log = true }
batch_size = [128, 256]
activation = ["sigmoid", "relu"]
"""
SEARCHED = ("optimizer", "learning_rate", "batch_size", "activation")
EPOCHS = [1, 2, 3]


@dataclass(frozen=True)
class Study:
    folder: Path
    sweep: Path
    first: subprocess.CompletedProcess[str]
    resumed: subprocess.CompletedProcess[str]
    finalized: subprocess.CompletedProcess[str]
    trials: subprocess.CompletedProcess[str]

    def optuna(self) -> optuna.Study:
        return optuna.load_study(study_name="lecture", storage=f"sqlite:///{self.folder}/mlruns/optuna.db")

    def mlflow(self) -> MlflowClient:
        return MlflowClient(tracking_uri=f"sqlite:///{self.folder}/mlruns/mlflow.db")

    def run_of(self, trial: optuna.trial.FrozenTrial):  # type: ignore[no-untyped-def]
        return self.mlflow().get_run(trial.user_attrs["mlflow_run_id"])


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Study:
    """Two trials by one worker, a third by a second (a resume), then finalize and the leaderboard: the real CLI,
    in this process."""
    data = required_mnist()
    folder = tmp_path_factory.mktemp("lecture")
    sweep = write_sweep(folder, LECTURE_SPACE)

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        done = cli_here(*args, cwd=folder, data=data)
        assert done.returncode == 0, done.stderr[-3000:]
        return done

    first = run("worker", str(sweep))
    resumed = run("worker", str(sweep), "--trials", "3")
    finalized = run("finalize", str(sweep), "--trials", "3")
    trials = run("trials", str(sweep), "--trials", "3")
    return Study(folder, sweep, first, resumed, finalized, trials)


def test_the_lecture_network_is_trained_once_beside_the_trials_never_as_one(study: Study) -> None:
    trials = study.optuna().get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3  # study.trials counts the trials alone
    reference = study.optuna().user_attrs["lecture_reference"]
    run = study.mlflow().get_run(reference["run_id"])
    assert run.data.tags["baseline"] == "true" and run.data.tags["mnist_sweep.role"] == "reference"
    assert run.data.tags["mlflow.parentRunId"] == study.optuna().user_attrs["mlflow_parent_run_id"]
    assert run.info.status == "FINISHED" and reference["epochs"] == 5
    assert {name: run.data.params[name] for name in (*SEARCHED, "dropout", "hidden", "epochs")} == {
        "optimizer": "adam",
        "learning_rate": "0.001",
        "batch_size": "128",
        "activation": "sigmoid",
        "dropout": "0.0",
        "hidden": "500-500",
        "epochs": "5",
    }
    assert run.data.metrics["final_val_accuracy"] == pytest.approx(reference["val_accuracy"])
    assert sum(map(sum, reference["val_confusion_matrix"])) == 500  # the whole validation split
    assert all("baseline" not in study.run_of(t).data.tags for t in trials)
    assert "the lecture's network (reference, not a trial)" in study.first.stdout
    assert "lecture" not in study.resumed.stdout.replace("study 'lecture'", "")  # once per study: not on a resume
    assert LECTURE_PARAMS["activation"] == "sigmoid"


def test_report_and_leaderboard_show_the_gain_over_the_lecture_network_on_validation(study: Study) -> None:
    trials = study.optuna().get_trials()
    reference = study.optuna().user_attrs["lecture_reference"]
    baseline = reference["val_accuracy"]
    best = max(trials, key=lambda t: (t.value, -t.number))
    assert best.value is not None
    points = 100 * (best.value - baseline)
    line = (
        f"the lecture's network (reference run, 5 epochs, {reference['fit_seconds']:.1f} s) val_accuracy "
        f"{baseline:.4f} -> best {best.value:.4f} (trial {best.number}), {points:+.2f} points"
    )
    assert line in study.trials.stdout and line in study.finalized.stdout
    reports = study.folder / "reports" / "lecture"
    markdown = (reports / "report.md").read_text(encoding="utf-8")
    assert line in markdown and "### Validation confusion matrix: the lecture's network" in markdown
    assert f"### Validation confusion matrix: trial {best.number} (chosen)" in markdown
    page = (reports / "report.html").read_text(encoding="utf-8")
    assert line.replace("'", "&#x27;").replace(">", "&gt;") in page
    assert 'data-plot="lecture-confusion-0"' in page and 'data-plot="lecture-confusion-1"' in page
    recorded = json.loads((reports / "test_metrics.json").read_text(encoding="utf-8"))
    assert recorded["sweep"]["baseline"]["baseline_value"] == pytest.approx(baseline)
    assert recorded["sweep"]["baseline"]["gain"] == pytest.approx(best.value - baseline)
    # The test set scores the validation winner, which the lecture's network never is: it is no trial.
    assert recorded["trial_number"] == best.number


def plateau_rates(first: float, val_accuracy: list[float], *, factor: float, patience: int) -> list[float]:
    """The rate of each epoch by ReduceLROnPlateau's rule (mode max, min_delta 1e-4), from the logged val_accuracy."""
    rates, rate, best, wait = [], first, -np.inf, 0
    for value in val_accuracy:
        rates.append(rate)
        if value - 1e-4 > best:
            best, wait = value, 0
            continue
        wait += 1
        if wait >= patience:
            rate, wait = max(rate * factor, 1e-6), 0
    return rates


def test_plateau_logs_the_learning_rate_of_every_epoch(study: Study) -> None:
    client = study.mlflow()
    for trial in study.optuna().get_trials():
        run_id = trial.user_attrs["mlflow_run_id"]
        history = client.get_metric_history(run_id, "learning_rate")
        assert [m.step for m in history] == EPOCHS
        accuracy = [m.value for m in client.get_metric_history(run_id, "val_accuracy")]
        expected = plateau_rates(trial.params["learning_rate"], accuracy, factor=0.5, patience=1)
        assert [m.value for m in history] == pytest.approx(expected, rel=1e-6)


def test_each_trial_run_holds_tensorboard_event_files_with_every_epoch(study: Study, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    client = study.mlflow()
    for trial in study.optuna().get_trials():
        run_id = trial.user_attrs["mlflow_run_id"]
        local = Path(client.download_artifacts(run_id, "tensorboard", str(tmp_path / str(trial.number))))
        expected = {
            ("train", "epoch_loss"): "loss",
            ("train", "epoch_accuracy"): "accuracy",
            ("train", "epoch_learning_rate"): "learning_rate",
            ("validation", "epoch_loss"): "val_loss",
            ("validation", "epoch_accuracy"): "val_accuracy",
        }
        for (folder, tag), metric in expected.items():
            events = EventAccumulator(str(local / folder))
            events.Reload()
            scalars = [(e.step, float(make_ndarray(e.tensor_proto))) for e in events.Tensors(tag)]
            logged = [(m.step, m.value) for m in client.get_metric_history(run_id, metric)]
            assert [step for step, _ in scalars] == EPOCHS, (folder, tag)
            assert [value for _, value in scalars] == pytest.approx([value for _, value in logged], rel=1e-6)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "plateau"])
def test_every_schedule_logs_its_learning_rate_per_epoch_to_mlflow(
    schedule: str, synthetic_mnist: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    """One trial through the sweep's objective on synthetic images; the rates read back from its MLflow run."""
    from mnist_sweep.config import build_config
    from mnist_sweep.data import Split
    from mnist_sweep.ledger import StudyLedger
    from mnist_sweep.study import StudyContext
    from mnist_sweep.tracking import Tracker
    from mnist_sweep.trial_loop import run_one_trial
    from mnist_sweep.trial_run import Trials

    images, labels = synthetic_mnist
    x = images.astype(np.float32) / 255.0
    split = Split(x_train=x[:1000], y_train=labels[:1000], x_val=x[1000:], y_val=labels[1000:])
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    # plateau: a rate too small to improve val_accuracy by min_delta, so it is halved after epoch 2
    rate, plateau = (1e-9, {"plateau_patience": 1, "plateau_min_lr": 0.0}) if schedule == "plateau" else (0.01, {})
    cfg = build_config(
        {
            "study": {"baseline": False},
            "model": {"hidden": [16]},
            "train": {"epochs": 3, "lr_schedule": schedule, **plateau},
            "search": {"optimizer": "adam", "learning_rate": rate, "batch_size": 100, "activation": "relu"},
        }
    )
    tracker = Tracker(uri=uri, artifacts=str(tmp_path / "artifacts"), experiment="schedules")
    ledger = StudyLedger.create(tracker, study_name="schedules", config={})
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(direction="maximize", storage=storage)
    context = StudyContext(study, storage, ledger)
    trials = Trials(cfg=cfg, split=split, context=context, data_source="synthetic")
    run_one_trial(trials.context, trials)
    ledger.uploads.wait()

    run_id = study.trials[0].user_attrs["mlflow_run_id"]
    history = MlflowClient(tracking_uri=uri).get_metric_history(run_id, "learning_rate")
    assert [m.step for m in history] == EPOCHS
    expected = {
        "constant": [0.01, 0.01, 0.01],
        "cosine": [0.01 * (0.01 + 0.99 * (1 + np.cos(np.pi * epoch / 3)) / 2) for epoch in EPOCHS],  # at epoch ends
        "plateau": [1e-9, 1e-9, 5e-10],
    }[schedule]
    assert [m.value for m in history] == pytest.approx(expected, rel=1e-4)


def test_tensorboard_not_installed_is_one_line_exit_2_and_creates_nothing(tmp_path: Path) -> None:
    """A `tensorboard` that cannot be imported (first on the path): the key, the fix, nothing written."""
    data = required_mnist()
    shadow = tmp_path / "shadow" / "tensorboard"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'tensorboard'\")\n")
    work = tmp_path / "work"
    work.mkdir()
    sweep = write_sweep(tmp_path, "[train]\ntensorboard = true\n")
    path = f"{tmp_path / 'shadow'}{os.pathsep}{REPO}"

    done = cli("run", str(sweep), "--trials", "1", cwd=work, data=data, env={"PYTHONPATH": path})

    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert "train.tensorboard = true" in lines[0] and "pip install 'mnist-sweep[tensorboard]'" in lines[0]
    assert list(work.iterdir()) == []
