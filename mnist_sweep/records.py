"""What a sweep records, in one place: Optuna attribute keys, MLflow tag keys, a trial run's params, the test result.

A key written by one module and read by another is named here once, so a rename cannot miss a reader. The run
params are encoded and decoded by one pair (`RunParams`), used by the objective that logs them and by `replay`
that reads them back. This module imports neither Optuna nor MLflow nor Keras.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mnist_sweep.config import Choice, SearchConfig, SweepConfig
from mnist_sweep.errors import MissingParamError
from mnist_sweep.toml_text import typed_value
from mnist_sweep.train_settings import TrainSettings

# --------------------------------------------------------------------------- Optuna: a trial's user attributes

RUN_ID_ATTR = "mlflow_run_id"
MODEL_URI_KEY = "model_uri"  # a trial's user attribute and its MLflow run's tag
MODEL_SHA256_TAG = "model_sha256"  # a trial run's tag: the sha256 of its model file as logged, checked before scoring
SEED_ATTR = "seed"
EPOCHS_TRAINED_ATTR = "epochs_trained"
VAL_LOSS_ATTR = "val_loss"
VAL_ACCURACY_ATTR = "val_accuracy"
FIT_SECONDS_ATTR = "fit_seconds"
TRACKING_SECONDS_ATTR = "tracking_seconds"
FAIL_REASON_ATTR = "fail_reason"
VAL_CONFUSION_ATTR = "val_confusion_matrix"  # a complete trial's validation confusion matrix (rows true)
# study.engine = "keras-tuner": the oracle's trial id, and (hyperband) the epochs the oracle gave the trial
KERAS_TUNER_TRIAL_ID_ATTR = "keras_tuner_trial_id"
KERAS_TUNER_EPOCHS_ATTR = "keras_tuner_epochs"

# --------------------------------------------------------------------------- Optuna: the study's user attributes

PARENT_RUN_ATTR = "mlflow_parent_run_id"
ENGINE_ATTR = "engine"  # "optuna" or "keras-tuner/<oracle>": a rerun must use the same
# "asha" or "in-trial" (any pruner that stops a trial inside its epochs): a rerun must use the same kind, since ASHA
# reads every trial's rung (asha.py) and a pruner inside the epochs would compare its promotions' short segments.
SCHEDULE_ATTR = "schedule"
TEST_RESULT_ATTR = "test_result"
REGISTERED_MODEL_ATTR = "registered_model"  # the chosen model's Model Registry version (Registration.to_dict)
LECTURE_REFERENCE_ATTR = "lecture_reference"  # the lecture's network trained beside the trials (LectureReference)
# On the seal study (`<study>.test-seal`): who claimed the test set (processes.ProcessId.encode), when, and the
# claimant's last heartbeat while it scores (final.py).
CLAIMED_BY_ATTR = "claimed_by"
CLAIMED_AT_ATTR = "claimed_at"
CLAIM_HEARTBEAT_ATTR = "heartbeat_at"

# --------------------------------------------------------------------------- MLflow: tags

ROLE_TAG = "mnist_sweep.role"
STUDY_ROLE, TRIAL_ROLE = "study", "trial"  # the values of ROLE_TAG
STUDY_TAG = "optuna.study_name"
TRIAL_NUMBER_TAG = "optuna.trial_number"
STATE_TAG = "trial_state"
STATE_REASON_TAG = "state_reason"
PRUNED_AT_EPOCH_TAG = "pruned_at_epoch"
PARENT_TAG = "mlflow.parentRunId"
TEST_SCORED_TAG = "test_set_scored"
TEST_SCORED_TRIAL_TAG = "test_scored_trial"
TEST_SCORED_AT_TAG = "test_scored_at"
TEST_SCORED_RUN_ID_TAG = "test_scored_run_id"
# MLflow 3's UI opens an experiment of no kind on its GenAI overview (traces, token usage); this kind opens
# the runs table, the place to compare trials.
EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"  # a run's description in the UI (Markdown)
BASELINE_TAG = "baseline"  # "true" on the lecture reference's run: filter the UI by tags.baseline = 'true'
REFERENCE_ROLE = "reference"  # ROLE_TAG of the lecture's network's run: beside the trials, never one of them
# On a registered model: made by this tool, so later studies may add versions to it; a name without it is
# another project's model, and is left alone.
REGISTERED_BY_TAG, REGISTERED_BY = "mnist_sweep.registered_by", "mnist-sweep"
PARENT_RUN_ID_TAG = "parent_run_id"  # on a registered model version: the study's MLflow parent run
BACKEND_TAG = "keras_backend"
DEVICE_TAG = "device"  # "GPU: <name, memory>" or "CPU: <model>"

# --------------------------------------------------------------------------- MLflow: metrics

FINAL_PREFIX = "final_"  # a trial run's final validation metrics: final_val_loss, final_val_accuracy


def final_metric(name: str) -> str:
    """The MLflow metric holding a trial's final value of `name` (val_loss, val_accuracy)."""
    return FINAL_PREFIX + name


# --------------------------------------------------------------------------- MLflow: a trial run's params


def encode_hidden(hidden: Sequence[int]) -> str:
    """[500, 500] -> "500-500"."""
    return "-".join(str(units) for units in hidden)


def decode_hidden(text: str) -> tuple[int, ...]:
    """ "500-500" -> (500, 500)."""
    return tuple(int(units) for units in text.split("-"))


# A run param's name where it is not the TrainSettings field's (runs have always logged these names).
_SETTING_PARAM = {"monitor": "early_stopping_monitor"}
# [data] keys a trial run logs, each as `data_<key>`: the split it trained on.
_DATA_KEYS = ("validation", "train_limit", "seed")
_READ: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "str": str, "tuple[int, ...]": decode_hidden}


def _setting_param(name: str) -> str:
    return _SETTING_PARAM.get(name, name)


@dataclass(frozen=True)
class RunParams:
    """A trial run's MLflow params: everything needed to retrain the trial exactly.

    The study's train settings and data split, the trial's hyperparameters and seed. `encode` gives the
    strings MLflow stores; `decode` reads them back, with the config's defaults for keys older runs lack.
    """

    settings: TrainSettings
    data_validation: int
    data_train_limit: int
    data_seed: int
    data_source: str
    n_train: int
    n_val: int
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    seed: int = 0

    # What a run must hold to be retrained; the others fall back to the config's defaults.
    REQUIRED = ("hidden", "epochs", "seed", "data_validation", "data_train_limit", "data_seed", "n_train", "n_val")

    @classmethod
    def from_config(cls, cfg: SweepConfig, *, data_source: str, n_train: int, n_val: int) -> RunParams:
        """The study's part, from the sweep file; `for_trial` adds a trial's hyperparameters and seed."""
        split = {f"data_{key}": getattr(cfg.data, key) for key in _DATA_KEYS}
        return cls(
            settings=TrainSettings.from_config(cfg), data_source=data_source, n_train=n_train, n_val=n_val, **split
        )

    def for_trial(self, hyperparameters: Mapping[str, Any], seed: int, *, epochs: int | None = None) -> RunParams:
        """A trial's params: its hyperparameters and seed, and its epochs where its engine plans them."""
        settings = self.settings if epochs is None else dataclasses.replace(self.settings, epochs=epochs)
        return dataclasses.replace(self, settings=settings, hyperparameters=dict(hyperparameters), seed=seed)

    def encode(self) -> dict[str, str]:
        """The MLflow params: the hyperparameters, then the settings, the split and the seed, as strings."""
        settings: dict[str, Any] = {
            _setting_param(f.name): getattr(self.settings, f.name) for f in dataclasses.fields(TrainSettings)
        }
        settings["hidden"] = encode_hidden(self.settings.hidden)
        study = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in _NOT_PARAMS}
        return {key: str(value) for key, value in {**self.hyperparameters, **settings, **study}.items()}

    @classmethod
    def decode(cls, params: Mapping[str, str]) -> RunParams:
        """A run's params back as they were logged, with `filled_in`'s defaults for the keys an older run lacks;
        raises MissingParamError naming the first key it must hold and does not."""
        missing = [key for key in cls.REQUIRED if key not in params]
        missing += [key for key in SearchConfig.model_fields if key not in params and _fixed_default(key) is None]
        if missing:
            raise MissingParamError(missing[0])
        merged = {**cls.filled_in(params), **params}
        settings = TrainSettings(
            **{f.name: _READ[str(f.type)](merged[_setting_param(f.name)]) for f in dataclasses.fields(TrainSettings)}
        )
        study = {
            f.name: _READ[str(f.type)](merged[f.name]) for f in dataclasses.fields(cls) if f.name not in _NOT_PARAMS
        }
        hyperparameters = {key: typed_value(merged[key]) for key in SearchConfig.model_fields}
        return cls(settings=settings, hyperparameters=hyperparameters, **study)

    @classmethod
    def filled_in(cls, params: Mapping[str, str]) -> dict[str, str]:
        """The keys a run logged before they existed lacks, with the defaults `decode` gives them: a train
        setting's from the sweep file's defaults, a searched key's where its default is one fixed value (the
        value every trial had before the key could be searched)."""
        defaults = cls.from_config(SweepConfig(), data_source="", n_train=0, n_val=0).encode()
        for key in SearchConfig.model_fields:
            fixed = _fixed_default(key)
            if fixed is not None:
                defaults[key] = str(fixed)
        return {key: value for key, value in defaults.items() if key not in params and key not in cls.REQUIRED}


_NOT_PARAMS = ("settings", "hyperparameters")  # RunParams fields encoded key by key, not as one param


def _fixed_default(key: str) -> str | int | float | None:
    """The one value [search] gives `key` when a sweep file leaves it out; None where its default is searched."""
    spec = SearchConfig.model_fields[key].default
    return spec.values[0] if isinstance(spec, Choice) and spec.is_fixed else None


# --------------------------------------------------------------------------- the lecture's network, for reference


@dataclass(frozen=True)
class LectureReference:
    """The lecture's network trained once beside a study's trials (baseline.py): what the report compares with."""

    run_id: str
    epochs: int
    fit_seconds: float
    val_loss: float
    val_accuracy: float
    val_confusion_matrix: tuple[tuple[int, ...], ...]

    def metric(self, name: str) -> float:
        return {"val_loss": self.val_loss, "val_accuracy": self.val_accuracy}[name]

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "val_confusion_matrix": [list(r) for r in self.val_confusion_matrix]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> LectureReference | None:
        if not data:
            return None
        fields = {f.name: data[f.name] for f in dataclasses.fields(cls)}
        fields["val_confusion_matrix"] = tuple(tuple(int(v) for v in row) for row in data["val_confusion_matrix"])
        return cls(**fields)


# --------------------------------------------------------------------------- the Model Registry

CHAMPION = "champion"  # the alias of the version a study chose and scored: models:/<name>@champion


@dataclass(frozen=True)
class Registration:
    """The chosen trial's model as a version of a registered model, with its alias."""

    name: str
    version: str
    alias: str = CHAMPION

    @property
    def uri(self) -> str:
        """What serving and scoring load it by: models:/<name>@<alias>."""
        return f"models:/{self.name}@{self.alias}"

    def line(self) -> str:
        return f"registered model {self.name!r} version {self.version}, alias {self.alias} ({self.uri})"

    def to_dict(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "alias": self.alias}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Registration | None:
        return None if not data else cls(name=str(data["name"]), version=str(data["version"]), alias=str(data["alias"]))


# --------------------------------------------------------------------------- the test result


@dataclass(frozen=True)
class TestResult:
    """The chosen trial's one score on the held-out test set, as stored on the study and in test_metrics.json."""

    __test__ = False  # not a pytest test class, whatever its name

    study: str
    trial_number: int
    run_id: str | None
    model_uri: str
    params: Mapping[str, Any]
    metric: str
    val_loss: float | None
    val_accuracy: float | None
    epochs_trained: int | None
    test_images: int
    test_loss: float
    test_accuracy: float
    test_accuracy_ci95: tuple[float, float]
    test_confusion_matrix: tuple[tuple[int, ...], ...]
    test_per_class: tuple[dict[str, Any], ...]
    scored_at: str
    scored_by: str
    environment: Mapping[str, str] | None = None  # results scored before it was recorded lack it
    # The finished trials the chosen one was ranked among when the study was sealed; a trial that finishes
    # later (it was asked for just before the seal) is recorded but never chosen. Older results lack it.
    counted_trials: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data, the keys in the order test_metrics.json has always had them."""
        return {
            "study": self.study,
            "trial_number": self.trial_number,
            "run_id": self.run_id,
            "model_uri": self.model_uri,
            "params": dict(self.params),
            "metric": self.metric,
            "val_loss": self.val_loss,
            "val_accuracy": self.val_accuracy,
            "epochs_trained": self.epochs_trained,
            "test_images": self.test_images,
            "test_loss": self.test_loss,
            "test_accuracy": self.test_accuracy,
            "test_accuracy_ci95": list(self.test_accuracy_ci95),
            "test_confusion_matrix": [list(row) for row in self.test_confusion_matrix],
            "test_per_class": [dict(row) for row in self.test_per_class],
            "scored_at": self.scored_at,
            "scored_by": self.scored_by,
            **({} if self.environment is None else {"environment": dict(self.environment)}),
            **({} if self.counted_trials is None else {"counted_trials": list(self.counted_trials)}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TestResult:
        """Read back what `to_dict` wrote (from the study's user attribute or test_metrics.json)."""
        names = {f.name for f in dataclasses.fields(cls)}
        fields = {key: value for key, value in data.items() if key in names}
        low, high = fields["test_accuracy_ci95"]
        fields["test_accuracy_ci95"] = (low, high)
        fields["test_confusion_matrix"] = tuple(tuple(row) for row in fields["test_confusion_matrix"])
        fields["test_per_class"] = tuple(dict(row) for row in fields["test_per_class"])
        fields["params"] = dict(fields["params"])
        if fields.get("environment") is not None:
            fields["environment"] = dict(fields["environment"])
        if fields.get("counted_trials") is not None:
            fields["counted_trials"] = tuple(fields["counted_trials"])
        return cls(**fields)

    def gaps(self) -> dict[str, float | None]:
        """Validation minus test accuracy (positive: the test set scored lower), and test minus validation loss."""
        return {
            "accuracy": None if self.val_accuracy is None else self.val_accuracy - self.test_accuracy,
            "loss": None if self.val_loss is None else self.test_loss - self.val_loss,
        }
