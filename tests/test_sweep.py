"""The real CLI on a small real MNIST subset, read back from MLflow and Optuna."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import (
    DEFAULT_SWEEP,
    ENGINE_ARGS,
    REPO,
    CliRunner,
    created_files,
    required_mnist,
    small_sweep_args,
)
from tests.finished_sweep import FinishedSweep, run_sweep

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]


# The same checks with train.loop = "compiled" (an epoch as one XLA loop): everything is tracked as with fit.
SWEEP_ARGS = {**ENGINE_ARGS, "compiled-loop": ("--set", 'train.loop="compiled"')}


@pytest.fixture(scope="module", params=list(SWEEP_ARGS))
def sweep(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FinishedSweep:
    """The session's finished sweep for Optuna (tests/finished_sweep.py); for the others, the same sweep run here."""
    if not SWEEP_ARGS[request.param]:
        shared: FinishedSweep = request.getfixturevalue("finished_sweep")
        return shared
    return run_sweep(tmp_path_factory.mktemp("sweep"), required_mnist(), *SWEEP_ARGS[request.param])


def test_run_prints_one_line_per_trial_and_the_test_accuracy(sweep: FinishedSweep) -> None:
    out = sweep.first.stdout
    assert out.count("COMPLETE") + out.count("PRUNED") == 3
    assert "test accuracy 0." in out
    assert "Traceback" not in sweep.first.stderr


def test_three_child_runs_under_one_parent(sweep: FinishedSweep) -> None:
    parent, children = sweep.parent(), sweep.trial_runs()
    assert [c.info.run_name for c in children] == ["trial-0000", "trial-0001", "trial-0002"]
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parent.info.run_id}
    assert sweep.study().user_attrs["mlflow_parent_run_id"] == parent.info.run_id
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["trial_state"] in ("COMPLETE", "PRUNED")
        assert child.data.tags["optuna.study_name"] == "fcn"


def test_params_and_per_epoch_metrics(sweep: FinishedSweep) -> None:
    client, param_keys = sweep.mlflow(), None
    for child in sweep.trial_runs():
        params = child.data.params
        assert {"optimizer", "learning_rate", "batch_size", "activation", "hidden", "epochs", "seed"} <= set(params)
        assert params["hidden"] == "500-500" and params["n_train"] == "2000" and params["n_val"] == "1000"
        param_keys = param_keys or set(params)
        assert set(params) == param_keys, "identical param keys make MLflow's compare view work"
        history = client.get_metric_history(child.info.run_id, "val_accuracy")
        assert [m.step for m in history] == [1]
        for key in ("loss", "accuracy", "val_loss"):
            assert len(client.get_metric_history(child.info.run_id, key)) == 1
        # sweeps/fcn.toml decays the rate by cosine to 1 % of it: after the only epoch, that is where it is
        (rate,) = client.get_metric_history(child.info.run_id, "learning_rate")
        assert (rate.step, rate.value) == (1, pytest.approx(0.01 * float(params["learning_rate"]), rel=1e-4))
        if child.data.tags["trial_state"] == "COMPLETE":
            metrics = child.data.metrics
            assert metrics["final_val_accuracy"] == pytest.approx(history[0].value, abs=1e-6)
            assert 0.0 <= metrics["val_f1_macro"] <= 1.0 and "val_iou_class_7" in metrics


def test_optuna_and_mlflow_point_at_each_other(sweep: FinishedSweep) -> None:
    runs = {r.info.run_id: r for r in sweep.trial_runs()}
    trials = sweep.study().get_trials()
    assert len(trials) == 3
    for trial in trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.params["optimizer"] == trial.params["optimizer"]


def test_confusion_matrix_artifacts_and_loadable_model(sweep: FinishedSweep, tmp_path: Path) -> None:
    import mlflow.keras

    complete = [c for c in sweep.trial_runs() if c.data.tags["trial_state"] == "COMPLETE"]
    assert complete
    child = complete[0]
    names = {a.path for a in sweep.mlflow().list_artifacts(child.info.run_id)}
    assert {
        "val_confusion_matrix.csv",
        "val_confusion_matrix.json",
        "val_confusion_matrix.png",
        "val_per_class_metrics.csv",
    } <= names
    local = sweep.mlflow().download_artifacts(child.info.run_id, "val_confusion_matrix.json", str(tmp_path))
    counts = np.array(json.loads(Path(local).read_text())["counts"])
    assert counts.shape == (10, 10) and counts.sum() == 1000
    assert np.trace(counts) / 1000 == pytest.approx(child.data.metrics["final_val_accuracy"], abs=1e-9)
    mlflow.set_tracking_uri(sweep.tracking_uri)  # models:/ URIs resolve through the tracking store
    model = mlflow.keras.load_model(child.data.tags["model_uri"])
    assert model.predict(np.zeros((2, 28, 28), np.float32), verbose=0).shape == (2, 10)
    assert not model.compiled, "saved without optimizer state (tracking.model_optimizer_state = false)"
    logged = sweep.mlflow().get_logged_model(child.data.tags["model_uri"].removeprefix("models:/"))
    linked = {m.key: m.value for m in logged.metrics or []}
    assert linked["final_val_accuracy"] == pytest.approx(child.data.metrics["final_val_accuracy"])


def test_every_logged_model_is_filed_under_the_study_experiment(sweep: FinishedSweep) -> None:
    """The experiment's Models tab lists each complete trial's model; nothing lands in "Default" (0)."""
    client = sweep.mlflow()
    experiment = client.get_experiment_by_name("fcn")
    assert experiment is not None
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    complete = {c.info.run_id for c in sweep.trial_runs() if c.data.tags["trial_state"] == "COMPLETE"}
    assert complete and {m.source_run_id for m in models} == complete
    names = {c.info.run_id: c.info.run_name for c in sweep.trial_runs()}
    assert all(m.name == names[m.source_run_id] for m in models), "each model is named after its trial"
    assert all(m.experiment_id == experiment.experiment_id for m in models)
    assert client.search_logged_models(experiment_ids=["0"]) == []
    artifacts = sweep.folder / "mlruns" / "artifacts"
    assert experiment.artifact_location == artifacts.resolve().as_uri()
    assert any(artifacts.rglob("MLmodel")), "the models sit in the artifact folder beside the store"


def test_test_set_scored_once_on_the_parent(sweep: FinishedSweep) -> None:
    parent = sweep.parent()
    result = sweep.study().user_attrs["test_result"]
    assert parent.data.tags["test_set_scored"] == "true"
    assert parent.data.metrics["test_accuracy"] == pytest.approx(result["test_accuracy"])
    assert result["test_images"] == 10000 and sum(map(sum, result["test_confusion_matrix"])) == 10000
    best = max((t for t in sweep.study().get_trials() if t.state.name == "COMPLETE"), key=lambda t: t.value)
    assert result["trial_number"] == best.number
    report = json.loads((sweep.folder / "reports" / "fcn" / "test_metrics.json").read_text())
    assert report["test_accuracy"] == pytest.approx(result["test_accuracy"])
    assert "test accuracy" in (sweep.folder / "reports" / "fcn" / "report.md").read_text()
    names = {a.path for a in sweep.mlflow().list_artifacts(parent.info.run_id)}
    assert {"test_confusion_matrix.csv", "test_confusion_matrix.png", "report"} <= names


def test_rerun_trains_nothing_and_scores_nothing(sweep: FinishedSweep) -> None:
    before = {r.info.run_id for r in sweep.runs()}
    scored_at = sweep.study().user_attrs["test_result"]["scored_at"]
    again = sweep.run("run", str(DEFAULT_SWEEP), *small_sweep_args())
    assert again.returncode == 0, again.stderr
    assert "already scored" in again.stdout and "test accuracy" in again.stdout
    assert {r.info.run_id for r in sweep.runs()} == before
    assert sweep.study().user_attrs["test_result"]["scored_at"] == scored_at
    final = sweep.run("finalize", str(DEFAULT_SWEEP), *small_sweep_args())
    assert final.returncode == 0 and "already scored" in final.stdout
    assert sweep.study().user_attrs["test_result"]["scored_at"] == scored_at


def test_scored_study_refuses_more_trials(sweep: FinishedSweep) -> None:
    more = sweep.run("run", str(DEFAULT_SWEEP), *small_sweep_args(trials=4))
    assert more.returncode == 2
    assert "start a new study name" in more.stderr and more.stderr.count("\n") == 1
    assert len(sweep.study().get_trials()) == 3


def test_reading_commands_load_neither_keras_nor_tensorflow(sweep: FinishedSweep) -> None:
    """`trials`, then `report`, in one fresh process: after each, neither is imported."""
    code = (
        "import sys; from mnist_sweep.cli import main\n"
        "for command in ('trials', 'report'):\n"
        "    rc = main([command, *sys.argv[1:]])\n"
        "    heavy = [m for m in ('tensorflow', 'keras') if sys.modules.get(m) is not None]\n"
        "    assert not heavy, (command, heavy)\n"
        "    assert rc == 0, (command, rc)\n"
    )
    args = [str(DEFAULT_SWEEP), *small_sweep_args()]
    env = {**os.environ, "MNIST_SWEEP_DATA": str(sweep.data), "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=sweep.folder, env=env
    )
    assert done.returncode == 0, done.stderr


def test_validate_answers_without_tensorflow_or_mlflow() -> None:
    code = (
        "import sys; from mnist_sweep.cli import main; rc = main(['validate', sys.argv[1]]); "
        "heavy = [m for m in ('tensorflow', 'keras', 'mlflow', 'optuna') if m in sys.modules]; "
        "assert not heavy, heavy; sys.exit(rc)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(DEFAULT_SWEEP)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "[search]" in done.stdout and "learning_rate = { low = 0.0003, high = 0.003, log = true }" in done.stdout


# The real process for two kinds of bad input: one the sweep file's check refuses, one found only by reaching for
# a server. test_bad_inputs.py checks every case (these two, an unknown activation and a missing data folder
# among them) through `cli.main` in this process.
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "study.trails=3"], "unknown key 'study.trails'"),
        (["--set", "tracking.uri='http://127.0.0.1:9'"], "tracking.uri"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(
    run_cli, tmp_path: Path, args: list[str], expected: str
) -> None:  # type: ignore[no-untyped-def]
    done = run_cli("run", str(DEFAULT_SWEEP), *args)
    assert done.returncode == 2
    assert expected in done.stderr and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert created_files(tmp_path) == []


def test_failed_trial_is_recorded_and_the_study_goes_on(run_here: CliRunner, tmp_path: Path) -> None:
    done = run_here(
        "run",
        str(DEFAULT_SWEEP),
        *small_sweep_args(trials=2, train_limit=1000, validation=500),
        "--set",
        "search.optimizer='sgd'",
        "--set",
        "search.learning_rate=[0.05, 1e12]",
        "--set",
        "search.activation='relu'",
        "--set",
        "study.sampler='random'",
        "--set",
        "study.max_failures=10",
    )
    assert done.returncode == 0, done.stderr
    study = optuna.load_study(study_name="fcn", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    states = [t.state.name for t in study.get_trials()]
    assert states.count("COMPLETE") == 2 and "FAIL" in states
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    for trial in study.get_trials(states=(optuna.trial.TrialState.FAIL,)):
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED" and run.data.tags["trial_state"] == "FAIL"
        assert "became" in run.data.tags["state_reason"]
        assert "error_traceback.txt" in {a.path for a in client.list_artifacts(run.info.run_id)}
