"""What a sweep records: a trial run's params encoded and decoded by one pair, the test result's round trip."""

from __future__ import annotations

import json

import pytest

from mnist_sweep.config import SweepConfig, build_config
from mnist_sweep.records import MissingParamError, RunParams, TestResult

HYPERPARAMETERS = {
    "optimizer": "adam",
    "learning_rate": 0.00123,
    "batch_size": 64,
    "activation": "relu",
    "dropout": 0.1,
    "weight_decay": 0.0,
    "momentum": 0.0,
}


def logged_params(cfg: SweepConfig) -> dict[str, str]:
    study_part = RunParams.from_config(cfg, data_source="idx:/data", n_train=900, n_val=100)
    return study_part.for_trial(HYPERPARAMETERS, 77).encode()


def test_a_trial_run_logs_these_params_as_strings() -> None:
    cfg = build_config({"model": {"hidden": [64, 32]}, "train": {"epochs": 3}, "study": {"metric": "val_loss"}})
    assert logged_params(cfg) == {
        "optimizer": "adam",
        "learning_rate": "0.00123",
        "batch_size": "64",
        "activation": "relu",
        "dropout": "0.1",
        "weight_decay": "0.0",
        "momentum": "0.0",
        "hidden": "64-32",
        "epochs": "3",
        "early_stopping_patience": "0",
        "early_stopping_monitor": "val_loss",
        "lr_schedule": "constant",
        "plateau_factor": "0.5",
        "plateau_patience": "2",
        "plateau_min_lr": "1e-06",
        "steps_per_execution": "16",
        "precision": "float32",
        "loop": "fit",
        "data_validation": "5000",
        "data_train_limit": "0",
        "data_seed": "0",
        "data_source": "idx:/data",
        "n_train": "900",
        "n_val": "100",
        "seed": "77",
    }


def test_decoding_the_logged_params_gives_back_the_trial_with_its_types() -> None:
    train = {"lr_schedule": "plateau", "plateau_factor": 0.25, "plateau_patience": 3, "steps_per_execution": 4}
    cfg = build_config({"model": {"hidden": [64, 32]}, "train": train})
    logged = RunParams.from_config(cfg, data_source="idx:/data", n_train=900, n_val=100).for_trial(HYPERPARAMETERS, 77)

    decoded = RunParams.decode(logged.encode())

    assert decoded == logged
    assert decoded.hyperparameters == HYPERPARAMETERS
    assert isinstance(decoded.hyperparameters["batch_size"], int) and decoded.settings.hidden == (64, 32)
    assert decoded.settings.steps_per_execution == 4
    assert (decoded.settings.plateau_factor, decoded.settings.plateau_patience) == (0.25, 3)


def test_keys_an_older_run_lacks_come_from_the_configs_defaults() -> None:
    params = logged_params(SweepConfig())
    for key in ("steps_per_execution", "early_stopping_monitor", "lr_schedule", "precision", "plateau_factor"):
        del params[key]

    decoded = RunParams.decode(params)

    defaults = SweepConfig()
    assert decoded.settings.steps_per_execution == defaults.train.steps_per_execution == 16
    assert decoded.settings.monitor == defaults.study.metric
    assert (decoded.settings.lr_schedule, decoded.settings.precision) == (
        defaults.train.lr_schedule,
        defaults.train.precision,
    )
    assert decoded.settings.plateau_factor == defaults.train.plateau_factor


@pytest.mark.parametrize("key", ["hidden", "seed", "n_train", "learning_rate"])
def test_a_run_without_a_needed_param_names_it(key: str) -> None:
    params = logged_params(SweepConfig())
    del params[key]
    with pytest.raises(MissingParamError) as raised:
        RunParams.decode(params)
    assert raised.value.args[0] == key


def make_result(**changes: object) -> TestResult:
    fields: dict[str, object] = {
        "study": "fcn",
        "trial_number": 3,
        "run_id": "abc",
        "model_uri": "models:/m-1",
        "params": {"optimizer": "adam", "learning_rate": 0.001},
        "metric": "val_accuracy",
        "val_loss": 0.2,
        "val_accuracy": 0.95,
        "epochs_trained": 2,
        "test_images": 10,
        "test_loss": 0.25,
        "test_accuracy": 0.9,
        "test_accuracy_ci95": (0.6, 0.98),
        "test_confusion_matrix": ((5, 0), (1, 4)),
        "test_per_class": ({"class": "0", "precision": 0.83, "support": 5},),
        "scored_at": "2026-11-28T17:00:00+00:00",
        "scored_by": "host:1",
        "environment": {"python": "3.11"},
    }
    fields.update(changes)
    return TestResult(**fields)  # type: ignore[arg-type]


def test_the_test_result_survives_json_with_the_keys_test_metrics_json_always_had() -> None:
    result = make_result()
    stored = json.loads(json.dumps(result.to_dict()))  # as Optuna's user attribute and test_metrics.json hold it

    assert list(stored) == [
        "study",
        "trial_number",
        "run_id",
        "model_uri",
        "params",
        "metric",
        "val_loss",
        "val_accuracy",
        "epochs_trained",
        "test_images",
        "test_loss",
        "test_accuracy",
        "test_accuracy_ci95",
        "test_confusion_matrix",
        "test_per_class",
        "scored_at",
        "scored_by",
        "environment",
    ]
    assert stored["test_accuracy_ci95"] == [0.6, 0.98] and stored["test_confusion_matrix"] == [[5, 0], [1, 4]]
    assert TestResult.from_dict(stored) == result


def test_a_result_recorded_without_environment_reads_back_and_writes_no_such_key() -> None:
    stored = make_result().to_dict()
    del stored["environment"]
    result = TestResult.from_dict(stored)
    assert result.environment is None and "environment" not in result.to_dict()


def test_gaps_are_validation_minus_test_accuracy_and_test_minus_validation_loss() -> None:
    assert make_result().gaps() == pytest.approx({"accuracy": 0.05, "loss": 0.05})
    assert make_result(val_loss=None).gaps()["loss"] is None
