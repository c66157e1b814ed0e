"""The sweep file, validated into typed, frozen objects.

Every key has a default (the lecture's value where it gives one), so a sweep file holds only what it
changes; unknown keys are errors. This module imports neither TensorFlow nor MLflow, so
`mnist-sweep validate` answers in about a second.
"""

from __future__ import annotations

import math
import os
import re
import sys
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlparse

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from mnist_sweep.databases import sqlite_file
from mnist_sweep.engine_rules import check_engine_keys, check_keras_tuner_space, with_engine_defaults
from mnist_sweep.errors import ConfigError
from mnist_sweep.locations import FILE, is_uri, kind_of_mode, path_problem
from mnist_sweep.masking import mask_password
from mnist_sweep.pydantic_messages import first_error
from mnist_sweep.samplers import DEFAULT_SAMPLER, Engine
from mnist_sweep.toml_text import apply_overrides, dumps_toml

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


OPTIMIZERS = ("sgd", "adam", "rmsprop", "adamw", "nadam")
ACTIVATIONS = ("sigmoid", "relu", "tanh", "elu", "gelu", "selu")
# The one place a metric's direction is decided; study.direction, early stopping and every ranking follow it.
METRIC_DIRECTIONS: dict[str, Literal["maximize", "minimize"]] = {"val_accuracy": "maximize", "val_loss": "minimize"}
POSTGRES_SCHEMES = ("postgresql", "postgresql+psycopg", "postgresql+psycopg2")
STORAGE_SCHEMES = ("sqlite", *POSTGRES_SCHEMES, "mysql", "mysql+pymysql")
TRACKING_SCHEMES = ("sqlite", *POSTGRES_SCHEMES, "mysql", "http", "https")
PLATEAU_KEYS = ("plateau_factor", "plateau_patience", "plateau_min_lr")  # [train] keys of lr_schedule = "plateau"
MAX_STUDY_NAME = 100
SEAL_SUFFIX = ".test-seal"  # the claim on a study's test set is a second study of this name (final.py)
TRACKING_CREDENTIAL_VARIABLES = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
# A sweep file is a few hundred bytes; reading stops past this, so /dev/zero or a log file named by mistake
# is refused instead of read until memory runs out.
MAX_SWEEP_BYTES = 1 << 20
# Every integer is stored by Optuna and MLflow and handed to NumPy and TensorFlow, which hold 64 bits.
INT64 = (-(2**63), 2**63 - 1)
# PostgreSQL stores Optuna's trial numbers as a 32-bit INTEGER.
MAX_TRIALS = 2**31 - 1
# A heartbeat is how soon a dead worker's trial is retried (after two of them): beyond a day it is none,
# and far beyond (about 3e11 s) Optuna's `now - grace period` falls outside datetime and raises.
MAX_HEARTBEAT_SECONDS = 24 * 3600
# ASHA's first rung in fit seconds: a week is no trial's budget, and far beyond the rungs' seconds overflow.
MAX_RUNG_SECONDS = 7 * 24 * 3600
# A fully connected network without normalisation or skip connections does not train at this depth;
# the bound catches a typo (3000 layers) before every trial fails on it.
MAX_HIDDEN_LAYERS = 100
MNIST_TRAIN_IMAGES = 60000  # a batch larger than every training image is never filled


def metric_maximizes(metric: str) -> bool:
    """True where a higher `metric` is better (val_accuracy), False where lower is (val_loss)."""
    return METRIC_DIRECTIONS[metric] == "maximize"


# --------------------------------------------------------------------------- search-space values


@dataclass(frozen=True)
class Choice:
    """A categorical parameter; a single choice is a fixed value that is not searched."""

    values: tuple[str | int | float, ...]

    @property
    def is_fixed(self) -> bool:
        return len(self.values) == 1

    def to_toml_value(self) -> Any:
        return self.values[0] if self.is_fixed else list(self.values)

    def distinct_points(self) -> int | None:
        return len(self.values)

    def value_kinds(self) -> list[str]:
        return sorted({type(v).__name__ for v in self.values})


@dataclass(frozen=True)
class Range:
    """A numeric interval, sampled uniformly or (log = true) log-uniformly."""

    low: float
    high: float
    log: bool
    integer: bool

    @property
    def is_fixed(self) -> bool:
        return False

    def to_toml_value(self) -> Any:
        cast = int if self.integer else float
        return {"low": cast(self.low), "high": cast(self.high), "log": self.log}

    def distinct_points(self) -> int | None:
        """How many values it holds: None for a float range (as many as wanted)."""
        return int(self.high - self.low) + 1 if self.integer else None

    def value_kinds(self) -> list[str]:
        return ["int" if self.integer else "float"]


ParamSpec = Choice | Range


def _describe(value: Any) -> str:
    return repr(value) if not isinstance(value, dict) else "{" + ", ".join(value) + "}"


def _parse_range(value: dict[str, Any], *, integer: bool, minimum: float, maximum: float = math.inf) -> Range:
    unknown = sorted(set(value) - {"low", "high", "log"})
    if unknown:
        raise ValueError(f"unknown range key {unknown[0]!r}; a range takes low, high and log")
    if "low" not in value or "high" not in value:
        raise ValueError(f"a range needs both low and high, got {_describe(value)}")
    low, high, log = value["low"], value["high"], value.get("log", False)
    number_type = (int,) if integer else (int, float)
    for key, bound in (("low", low), ("high", high)):
        if isinstance(bound, bool) or not isinstance(bound, number_type):
            kind = "an integer" if integer else "a number"
            raise ValueError(f"range {key} must be {kind}, got {bound!r}")
    if not isinstance(log, bool):
        raise ValueError(f"range log must be true or false, got {log!r}")
    for key, bound in (("low", low), ("high", high)):
        if not math.isfinite(bound):
            raise ValueError(f"range {key} must be finite, got {bound!r}")
        if bound > maximum:
            raise ValueError(f"range {key} must be <= {maximum}, got {bound!r}")
    if low > high:
        raise ValueError(f"range low must be <= high, got low={low!r} > high={high!r}")
    if log and low <= 0:
        raise ValueError(f"a log range needs low > 0, got low={low!r}")
    if low < minimum:
        raise ValueError(f"range low must be >= {minimum}, got {low!r}")
    return Range(low=float(low), high=float(high), log=log, integer=integer)


def _numeric_param(*, integer: bool, minimum: float, strictly_positive: bool, maximum: float = math.inf) -> Any:
    """A validator for a number: fixed, a list of choices, or {low, high, log}."""
    kind = "an integer" if integer else "a number"

    def check_number(number: Any) -> int | float:
        ok_type = (int,) if integer else (int, float)
        if isinstance(number, bool) or not isinstance(number, ok_type):
            raise ValueError(f"must be {kind}, a list of them or {{low, high, log}}, got {number!r}")
        if isinstance(number, float) and not math.isfinite(number):
            raise ValueError(f"must be finite, got {number!r}")
        if number < minimum or (strictly_positive and number <= 0):
            bound = "> 0" if strictly_positive and minimum <= 0 else f">= {minimum}"
            raise ValueError(f"must be {bound}, got {number!r}")
        if number > maximum:
            raise ValueError(f"must be <= {maximum}, got {number!r}")
        return number

    def parse(value: Any) -> ParamSpec:
        if isinstance(value, (Choice, Range)):
            return value
        if isinstance(value, dict):
            spec = _parse_range(value, integer=integer, minimum=minimum, maximum=maximum)
            if strictly_positive and spec.low <= 0:
                raise ValueError(f"range low must be > 0, got {spec.low!r}")
            return spec
        if isinstance(value, list):
            if not value:
                raise ValueError("is an empty list of choices; give at least one value, got []")
            return Choice(tuple(dict.fromkeys(check_number(v) for v in value)))
        return Choice((check_number(value),))

    return BeforeValidator(parse)


def _name_param(allowed: Sequence[str]) -> Any:
    """A validator for a categorical name: fixed or a list of choices, each from `allowed`."""

    def check_name(name: Any) -> str:
        if not isinstance(name, str) or name.lower() not in allowed:
            raise ValueError(f"must be one of {', '.join(allowed)}, got {name!r}")
        return name.lower()

    def parse(value: Any) -> ParamSpec:
        if isinstance(value, Choice):
            return value
        if isinstance(value, dict):
            raise ValueError(f"is categorical and takes a name or a list of names, got {_describe(value)}")
        if isinstance(value, list):
            if not value:
                raise ValueError("is an empty list of choices; give at least one value, got []")
            return Choice(tuple(dict.fromkeys(check_name(v) for v in value)))
        return Choice((check_name(value),))

    return BeforeValidator(parse)


# --------------------------------------------------------------------------- sections


class _Section(BaseModel):
    # strict: `trials = true` is a boolean, not the integer 1, and "3" is a string, not a number.
    # allow_inf_nan=False: TOML's nan and inf are no setting of any key.
    model_config = ConfigDict(
        extra="forbid", frozen=True, arbitrary_types_allowed=True, strict=True, allow_inf_nan=False
    )


class StudyConfig(_Section):
    """[study]: the Optuna study, which is also the MLflow experiment."""

    name: str = "fcn"
    trials: int = Field(default=30, ge=1, le=MAX_TRIALS)
    # study.direction follows it (METRIC_DIRECTIONS); a sweep file may say it too, and must agree.
    metric: Literal["val_accuracy", "val_loss"] = "val_accuracy"
    engine: Engine = "optuna"  # who chooses each trial's hyperparameters
    # The names each engine offers, and its default (filled in when left out), are the table in
    # mnist_sweep/samplers.py.
    sampler: str = DEFAULT_SAMPLER["optuna"]
    # Left out: the engine's default (samplers.ENGINE_TRAITS)
    # "asha": asynchronous successive halving, each promotion a trial of its own (mnist_sweep/asha.py)
    pruner: Literal["none", "median", "percentile", "successive_halving", "asha"] = "median"
    pruner_startup_trials: int = Field(default=5, ge=0)  # median, percentile: trials before any pruning
    pruner_warmup_epochs: int = Field(default=1, ge=0)  # epochs before a trial can be pruned (halving, asha: rung 0)
    pruner_interval_epochs: int = Field(default=1, ge=1)  # median, percentile: consider pruning every N epochs
    pruner_percentile: float = Field(default=25.0, gt=0, lt=100)  # percentile: keep the top P % at each epoch
    pruner_reduction_factor: int = Field(default=3, ge=2)  # successive_halving, asha: 1 in N goes on at each rung
    # asha: what a rung budgets. "seconds": rung r is pruner_min_seconds · factor^r seconds of fit, turned into each
    # trial's epochs by its batch size's measured seconds per epoch, so a dearer configuration gets fewer epochs.
    pruner_budget: Literal["epochs", "seconds"] = "epochs"
    pruner_min_seconds: float = Field(default=0.0, ge=0, le=MAX_RUNG_SECONDS)  # asha, seconds: rung 0's budget
    hyperband_factor: int = Field(default=3, ge=2)  # keras-tuner hyperband: 1 in N goes on, N times the epochs
    seed: int = Field(default=42, ge=0, lt=2**31)  # NumPy's RandomState (inside the samplers) takes 0 .. 2**32 - 1
    storage: str = "sqlite:///mlruns/optuna.db"
    heartbeat_seconds: int = Field(default=60, ge=1, le=MAX_HEARTBEAT_SECONDS)
    max_failures: int = Field(default=5, ge=1)
    # The lecture's own network, trained once beside the trials (never one of them), so the report shows what the
    # sweep gained over it (baseline.py).
    baseline: bool = True
    # Processes `run` trains in on this machine: itself and N - 1 `worker`s, each pinned to its share of
    # the cores (or to a GPU); "auto" = the count measured fastest here (mnist_sweep/packing.py).
    workers: int | str = 1
    gpus: int | str = "all"  # GPUs the local workers spread over: "all" visible, 0 = CPU only, N = the first N

    @model_validator(mode="before")
    @classmethod
    def _fill_in(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data  # not a table: the model's own validation says so
        study = dict(data)
        _check_direction(study.pop("direction", None), study.get("metric", cls.model_fields["metric"].default))
        return with_engine_defaults(study, cls.model_fields)

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        """Optuna's direction for the study: the metric's (METRIC_DIRECTIONS)."""
        return METRIC_DIRECTIONS[self.metric]

    @model_validator(mode="after")
    def _check(self) -> StudyConfig:
        if self.workers != "auto" and (isinstance(self.workers, str) or self.workers < 1):
            raise ValueError(f'study.workers must be a number of processes >= 1 or "auto", got {self.workers!r}')
        if self.gpus != "all" and (isinstance(self.gpus, str) or self.gpus < 0):
            raise ValueError(f'study.gpus must be "all", 0 (CPU only) or a number of GPUs, got {self.gpus!r}')
        _check_sqlite_path("study.storage", self.storage)
        if len(self.name) > MAX_STUDY_NAME:
            raise ValueError(
                f"study.name must be at most {MAX_STUDY_NAME} characters (it names a folder and an MLflow "
                f"experiment), got {len(self.name)}: {self.name[:20]!r}..."
            )
        if self.name.endswith(SEAL_SUFFIX):
            raise ValueError(
                f"study.name must not end in {SEAL_SUFFIX!r}: the study {self.name.removesuffix(SEAL_SUFFIX)!r} "
                f"records its test-set claim under that name, got {self.name!r}"
            )
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.name):
            raise ValueError(
                f"study.name must be letters, digits, '.', '_' or '-' (it names a folder), got {self.name!r}"
            )
        _check_uri("study.storage", self.storage, STORAGE_SCHEMES)
        check_engine_keys(self)
        if self.pruner_budget == "seconds" and self.pruner != "asha":
            raise ValueError(
                f'study.pruner_budget = "seconds" applies only to study.pruner = "asha", got pruner = {self.pruner!r}'
            )
        if self.pruner_budget == "seconds" and self.pruner_min_seconds <= 0:
            raise ValueError(
                'study.pruner_min_seconds must be > 0 with study.pruner_budget = "seconds" (rung 0\'s fit seconds), '
                f"got {self.pruner_min_seconds!r}"
            )
        if self.pruner_budget == "epochs" and self.pruner_min_seconds:
            raise ValueError(
                f"study.pruner_min_seconds = {self.pruner_min_seconds!r} applies only to study.pruner_budget = "
                '"seconds" (with study.pruner = "asha"); remove it or set pruner_budget = "seconds"'
            )
        if self.pruner in ("successive_halving", "asha") and self.pruner_warmup_epochs < 1:
            raise ValueError(
                f"study.pruner_warmup_epochs is the first rung of study.pruner = {self.pruner!r} and must be >= 1, "
                "got 0"
            )
        return self


def _check_direction(direction: Any, metric: Any) -> None:
    """study.direction, where a sweep file gives it: a name for the direction study.metric already decides."""
    if direction is None:
        return
    if direction not in ("maximize", "minimize"):
        raise ValueError(f'study.direction must be "maximize" or "minimize", got {direction!r}')
    expected = METRIC_DIRECTIONS.get(metric) if isinstance(metric, str) else None
    if expected is not None and direction != expected:
        raise ValueError(
            f"study.direction {direction!r} contradicts study.metric {metric!r}, "
            f"which is {expected}d; set direction = {expected!r} or leave it out"
        )


class DataConfig(_Section):
    """[data]: where MNIST comes from and how the 60k training images are split."""

    path: str = ""
    validation: int = Field(default=5000, ge=1)
    train_limit: int = Field(default=0, ge=0)
    seed: int = Field(default=0, ge=0)  # NumPy's default_rng takes no negative seed

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        if self.path:
            _check_path("data.path", self.path)
        if self.validation >= 60000:
            raise ValueError(f"data.validation must leave training images out of MNIST's 60000, got {self.validation}")
        if self.train_limit > 60000 - self.validation:
            raise ValueError(
                f"data.train_limit must be <= {60000 - self.validation} (60000 minus data.validation), "
                f"got {self.train_limit}"
            )
        return self


class ModelConfig(_Section):
    """[model]: the fully connected network (the lecture's 784 -> 500 -> 500 -> 10)."""

    hidden: list[Annotated[int, Field(ge=1, le=65536)]] = Field(default_factory=lambda: [500, 500])

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if not self.hidden:
            raise ValueError("model.hidden needs at least one layer size, got []")
        if len(self.hidden) > MAX_HIDDEN_LAYERS:
            raise ValueError(
                f"model.hidden has {len(self.hidden)} layers ({self.hidden[:3]}...), at most {MAX_HIDDEN_LAYERS} are "
                "taken: a fully connected network without normalisation or skip connections does not train deeper"
            )
        return self


class TrainConfig(_Section):
    """[train]: how long each trial trains."""

    epochs: int = Field(default=10, ge=1, le=10000)
    early_stopping_patience: int = Field(default=0, ge=0)
    lr_schedule: Literal["constant", "cosine", "plateau"] = "constant"
    # plateau: Keras' ReduceLROnPlateau on study.metric. Keras' own defaults (factor 0.1, patience 10) would
    # never fire within the default sweep's 20 epochs, and a tenfold drop ends Adam's progress at once.
    # Halving after 2 epochs without improvement gives a 20-epoch trial up to ~6 reductions, a gentle
    # staircase much like the cosine decay that measured best; 1e-6 (1/1000 of Adam's 1e-3) is the floor.
    plateau_factor: float = Field(default=0.5, gt=0, lt=1)
    plateau_patience: int = Field(default=2, ge=1)
    plateau_min_lr: float = Field(default=1e-6, ge=0)
    # Batches per compiled step: fewer Python round trips, the same accuracy (bench/epoch.py: see bench/RESULTS.md).
    steps_per_execution: int = Field(default=16, ge=1, le=1024)
    # "mixed_bfloat16": bfloat16 matmuls (AMX/AVX-512 BF16 units where the CPU has them), float32 weights and
    # softmax. Faster at large batches, slower at batch 32 (bench/epoch.py, see bench/RESULTS.md); not yet
    # measured over a whole sweep, so float32 stays the default.
    precision: Literal["float32", "mixed_bfloat16"] = "float32"
    # "compiled": under TensorFlow the training split is one device-resident tensor and each epoch one XLA loop
    # (mnist_sweep/compiled_loop.py); under JAX or torch Keras' fit runs. Same metrics, hooks and schedule either
    # way. "fit" until a whole sweep is measured with it over seeds (bench/search.py --seeds).
    loop: Literal["fit", "compiled"] = "fit"
    # Per-trial TensorBoard event files (loss, accuracy, learning rate per epoch), uploaded to the trial's
    # run as `tensorboard/`. Needs the optional `tensorboard` package.
    tensorboard: bool = False

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.lr_schedule != "plateau":
            for key in PLATEAU_KEYS:
                value, default = getattr(self, key), type(self).model_fields[key].default
                if value != default:
                    raise ValueError(
                        f'train.{key} = {value!r} applies only to train.lr_schedule = "plateau", '
                        f'got lr_schedule = {self.lr_schedule!r}; remove it or set lr_schedule = "plateau"'
                    )
            return self
        # The earliest reduction comes after epoch patience + 1; it must leave an epoch to train at the lower rate.
        if self.plateau_patience > self.epochs - 2:
            raise ValueError(
                f"train.plateau_patience = {self.plateau_patience} leaves no epoch at a reduced rate with "
                f"train.epochs = {self.epochs} (the first reduction comes after epoch patience + 1); "
                f"set it to at most {max(self.epochs - 2, 0)} or train more epochs"
            )
        # Early stopping counts the same epochs without improvement: at or below the plateau patience it ends
        # the trial before the reduced rate is ever used.
        if 0 < self.early_stopping_patience <= self.plateau_patience:
            raise ValueError(
                f"train.early_stopping_patience = {self.early_stopping_patience} stops a trial before "
                f'train.lr_schedule = "plateau" (patience {self.plateau_patience}) reduces the rate; '
                "make it larger than train.plateau_patience, or 0"
            )
        return self


class SearchConfig(_Section):
    """[search]: each key is a fixed value, a list of choices, or {low, high, log}."""

    optimizer: Annotated[ParamSpec, _name_param(OPTIMIZERS)] = Choice(("sgd", "adam", "rmsprop"))
    learning_rate: Annotated[ParamSpec, _numeric_param(integer=False, minimum=0.0, strictly_positive=True)] = Range(
        low=1e-4, high=0.3, log=True, integer=False
    )
    batch_size: Annotated[
        ParamSpec, _numeric_param(integer=True, minimum=1, strictly_positive=False, maximum=MNIST_TRAIN_IMAGES)
    ] = Choice((32, 64, 128, 256))
    activation: Annotated[ParamSpec, _name_param(ACTIVATIONS)] = Choice(("sigmoid", "relu", "tanh"))
    dropout: Annotated[ParamSpec, _numeric_param(integer=False, minimum=0.0, strictly_positive=False)] = Choice((0.0,))
    weight_decay: Annotated[ParamSpec, _numeric_param(integer=False, minimum=0.0, strictly_positive=False)] = Choice(
        (0.0,)
    )
    momentum: Annotated[ParamSpec, _numeric_param(integer=False, minimum=0.0, strictly_positive=False)] = Choice((0.0,))

    @model_validator(mode="after")
    def _check(self) -> SearchConfig:
        for key in ("dropout", "momentum"):
            spec: ParamSpec = getattr(self, key)
            upper = spec.high if isinstance(spec, Range) else max(float(v) for v in spec.values)
            if upper >= 1.0:
                raise ValueError(f"search.{key} must be < 1, got {spec.to_toml_value()!r}")
        return self

    def specs(self) -> dict[str, ParamSpec]:
        return {name: getattr(self, name) for name in type(self).model_fields}

    def fixed_values(self) -> dict[str, str | int | float]:
        """The keys that are not searched, with their single value."""
        return {
            name: spec.values[0] for name, spec in self.specs().items() if isinstance(spec, Choice) and spec.is_fixed
        }


@dataclass(frozen=True)
class Hyperparameters:
    """One trial's [search] values, typed: what the model is built from. A field per [search] key."""

    optimizer: str
    learning_rate: float
    batch_size: int
    activation: str
    dropout: float
    weight_decay: float
    momentum: float

    @classmethod
    def of(cls, params: Mapping[str, Any]) -> Hyperparameters:
        """`params` typed; a key it lacks has [search]'s default where that is one fixed value (the value a
        trial had before the key could be searched), else it is a KeyError."""
        values = {**SearchConfig().fixed_values(), **params}
        return cls(**{f.name: _POINT_TYPES[str(f.type)](values[f.name]) for f in fields(cls)})


_POINT_TYPES: dict[str, Callable[[Any], Any]] = {"str": str, "float": float, "int": int}


class TrackingConfig(_Section):
    """[tracking]: the MLflow tracking store, its artifact root, and where reports are written."""

    uri: str = "sqlite:///mlruns/mlflow.db"
    # "" = the store's own default: a tracking server's artifact store (mlflow-artifacts:), or the folder
    # `artifacts` beside a sqlite store. A folder or a URI of any scheme MLflow knows is used as given.
    artifacts: str = ""
    reports: str = "reports"
    # The logged model is for scoring and serving: architecture and weights. The optimizer's state (Adam's
    # two moments) triples its size and its save time (bench/RESULTS.md).
    model_optimizer_state: bool = False
    # true: a trial's model and reports are stored on a background thread while the next trial trains (its run
    # ends FINISHED only once they are). Off by default: on 2 CPU cores the upload competes with the next fit
    # and no gain was measured (bench/overhead.py: see bench/RESULTS.md).
    background_uploads: bool = False
    # The Model Registry's name for the chosen, once-scored model (alias "champion"); left out: the study's name;
    # "": register nothing (registry.py).
    registered_model: str | None = None

    @model_validator(mode="after")
    def _check(self) -> TrackingConfig:
        if self.uri.startswith("file:"):  # MLflow 3.17 refuses to open a file store (maintenance mode)
            raise ValueError(
                f"tracking.uri = {self.uri!r}: MLflow 3.17 no longer writes to a file store; use "
                "sqlite:///mlruns/mlflow.db or an MLflow server (`mlflow migrate-filestore` moves old runs)"
            )
        _check_uri("tracking.uri", self.uri, TRACKING_SCHEMES)
        _check_sqlite_path("tracking.uri", self.uri)
        if not self.reports:
            raise ValueError("tracking.reports must name a folder, got ''")
        _check_path("tracking.reports", self.reports)
        if is_uri(self.artifacts) and self.artifacts.startswith("file:"):
            _check_path("tracking.artifacts", unquote(urlparse(self.artifacts).path), shown=self.artifacts)
        elif self.artifacts and not is_uri(self.artifacts):
            _check_path("tracking.artifacts", self.artifacts)
        return self


class SweepConfig(_Section):
    """The whole sweep file."""

    study: StudyConfig = Field(default_factory=StudyConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _fill_in(cls, data: Any) -> Any:
        """tracking.registered_model, left out, is the study's name."""
        if not isinstance(data, Mapping):
            return data
        study, tracking = data.get("study", {}), data.get("tracking", {})
        if not isinstance(study, (Mapping, BaseModel)) or not isinstance(tracking, (Mapping, BaseModel)):
            return data  # not a table: the section's own validation says so
        name = dict(study).get("name", StudyConfig.model_fields["name"].default)
        tracking = dict(tracking)
        if isinstance(name, str) and tracking.get("registered_model") is None:
            tracking["registered_model"] = name
        return {**data, "tracking": tracking}

    @model_validator(mode="after")
    def _check(self) -> SweepConfig:
        spec = self.search.learning_rate
        lowest = spec.low if isinstance(spec, Range) else min(float(v) for v in spec.values)
        if self.train.lr_schedule == "plateau" and self.train.plateau_min_lr >= lowest:
            raise ValueError(
                f"train.plateau_min_lr = {self.train.plateau_min_lr!r} is not below the lowest "
                f"search.learning_rate ({lowest!r}): the plateau schedule could never lower that rate; "
                "set a smaller plateau_min_lr"
            )
        if self.study.engine == "keras-tuner":
            check_keras_tuner_space(self.search.specs(), trials=self.study.trials, oracle=self.study.sampler)
        _check_path("tracking.reports", str(Path(self.tracking.reports) / self.study.name), shown=self.tracking.reports)
        _check_separate_stores(self.study.storage, self.tracking.uri)
        return self

    def to_toml(self) -> str:
        """The resolved configuration as a sweep file, every key spelled out."""
        return dumps_toml(self.to_dict())

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Every key and its value, passwords in URIs masked: this is shown and logged, never used to connect."""
        out: dict[str, dict[str, Any]] = {}
        for section_name in type(self).model_fields:
            section: BaseModel = getattr(self, section_name)
            out[section_name] = {
                key: _shown(value) for key, value in ((k, getattr(section, k)) for k in type(section).model_fields)
            }
        # The direction study.metric decides, shown beside it (a sweep file may say it too).
        study = out.pop("study")
        out = {"study": {}, **out}
        for key, value in study.items():
            out["study"][key] = value
            if key == "metric":
                out["study"]["direction"] = self.study.direction
        return out


def _shown(value: Any) -> Any:
    if isinstance(value, (Choice, Range)):
        return value.to_toml_value()
    return mask_password(value) if isinstance(value, str) else value


def _check_uri(key: str, uri: str, schemes: Sequence[str]) -> None:
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    shown = mask_password(uri)
    if scheme not in schemes:
        raise ValueError(f"{key} must start with one of {', '.join(s + '://' for s in schemes)}, got {shown!r}")
    if scheme == "sqlite" and not uri.startswith("sqlite:///"):
        raise ValueError(f"{key} needs a file path: sqlite:///relative/path.db or sqlite:////abs.db, got {shown!r}")
    database = sqlite_file(uri)
    if database is not None and (str(database) in (".", ":memory:") or "mode=memory" in uri):
        raise ValueError(
            f"{key} = {shown!r} is an in-memory database: it vanishes when the process exits, and workers "
            "cannot share it; give a file, e.g. sqlite:///mlruns/optuna.db"
        )
    if scheme in ("http", "https") and "@" in uri.split("://", 1)[1].split("/", 1)[0]:
        raise ValueError(
            f"{key} = {shown!r} holds credentials; put them in {TRACKING_CREDENTIAL_VARIABLES} "
            "instead, and give the URI without user@"
        )


def _check_path(key: str, path: str, *, shown: str | None = None) -> None:
    """A path that can be opened at all: no name, and no whole path, past the kernel's limits."""
    problem = path_problem(path)
    if problem is not None:
        raise ValueError(f"{key} = {mask_password(shown if shown is not None else path)!r} {problem}")


def _check_sqlite_path(key: str, uri: str) -> None:
    database = sqlite_file(uri)
    if database is not None:
        _check_path(key, str(database), shown=uri)


def _check_separate_stores(storage: str, tracking: str) -> None:
    """Optuna and MLflow each keep their schema version in a table named alembic_version: one database
    cannot hold both."""
    same = False
    optuna_file, mlflow_file = sqlite_file(storage), sqlite_file(tracking)
    if optuna_file is not None and mlflow_file is not None:
        first, second = (os.path.realpath(path.expanduser()) for path in (optuna_file, mlflow_file))
        same = first == second
        if not same and os.path.exists(first) and os.path.exists(second):
            same = os.path.samefile(first, second)  # a hard link
    elif optuna_file is None and mlflow_file is None and not tracking.startswith(("http://", "https://")):
        same = _database_address(storage) == _database_address(tracking)
    if same:
        raise ValueError(
            f"study.storage = {mask_password(storage)!r} and tracking.uri = {mask_password(tracking)!r} are the "
            "same database; Optuna and MLflow each need their own (both keep a table alembic_version), "
            "e.g. sqlite:///mlruns/optuna.db and sqlite:///mlruns/mlflow.db"
        )


def _database_address(uri: str) -> tuple[str, str, int | None, str]:
    """(dialect, host, port, database) of a database server URI: the driver, credentials and options aside."""
    parts = urlparse(uri)
    return parts.scheme.split("+")[0], (parts.hostname or "").lower(), parts.port, parts.path.strip("/")


# --------------------------------------------------------------------------- loading


def load_sweep(path: str | Path, overrides: Sequence[str] = ()) -> SweepConfig:
    """Read, merge and validate a sweep file; raises ConfigError with a one-line message."""
    source = Path(path)
    text = _read_sweep(source)
    shown = _shown_path(source)
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{shown}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{shown}: not valid TOML: arrays or tables nested too deeply") from None
    except ValueError as exc:  # an integer of over 4300 digits, which Python refuses to parse
        raise ConfigError(f"{shown}: not valid TOML: {exc}") from None
    return build_config(apply_overrides(document, overrides), origin=shown)


def _read_sweep(source: Path) -> str:
    """The sweep file's text: a regular file of at most MAX_SWEEP_BYTES, read without waiting on a FIFO."""
    shown = _shown_path(source)
    problem = path_problem(str(source))
    if problem is not None:
        raise ConfigError(f"sweep file {shown} {problem}")
    try:
        # Non-blocking: opening a FIFO for reading would wait for a writer forever. Its kind is then taken
        # from the open file, so nothing can be swapped in between the look and the read.
        descriptor = os.open(source, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise ConfigError(f"{shown}: sweep file not found") from None
    except OSError as exc:
        raise ConfigError(f"{shown}: cannot read sweep file ({exc.strerror})") from None
    kind = kind_of_mode(os.fstat(descriptor).st_mode)
    if kind != FILE:
        os.close(descriptor)
        raise ConfigError(f"{shown}: the sweep file is {kind}, not a file")
    with os.fdopen(descriptor, "rb") as handle:
        try:
            raw = handle.read(MAX_SWEEP_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"{shown}: cannot read sweep file ({exc.strerror})") from None
    if len(raw) > MAX_SWEEP_BYTES:
        raise ConfigError(f"{shown}: over {MAX_SWEEP_BYTES >> 20} MiB, too large for a sweep file; is it the one?")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{shown}: cannot read sweep file: not UTF-8 ({exc.reason} at byte {exc.start})") from None


def _shown_path(path: Path) -> str:
    """A path as the one error line shows it: quoted where it holds a newline or another control character."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def build_config(document: Mapping[str, Any], *, origin: str = "<config>") -> SweepConfig:
    """Validate a parsed sweep document."""
    _check_scalars(document, origin=origin)
    try:
        return SweepConfig.model_validate(dict(document))
    except ValidationError as exc:
        raise ConfigError(mask_password(f"{origin}: {first_error(exc, SweepConfig)}")) from None


def _check_scalars(document: Mapping[str, Any], *, origin: str) -> None:
    """Every integer within 64 bits: TOML (and Python) read any size, the stores and NumPy do not. No
    control character in a string: in a path, a URI or a name it is a slip (or an escape sequence that
    would reach the terminal through our output), never a setting."""

    def walk(value: Any, where: str) -> None:
        if isinstance(value, str) and not value.isprintable() and any(unicodedata.category(c) == "Cc" for c in value):
            raise ConfigError(f"{origin}: {where} = {mask_password(value)!r} holds a control character")
        if isinstance(value, int) and not isinstance(value, bool) and not INT64[0] <= value <= INT64[1]:
            # str() of an int past 4300 digits raises in Python >= 3.11: say its size instead.
            shown = str(value) if value.bit_length() <= 100 else f"a {value.bit_length()}-bit number"
            raise ConfigError(f"{origin}: {where} = {shown} is beyond a 64-bit integer, which the stores hold")
        children = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else ()
        for key, child in children:
            walk(child, f"{where}.{key}" if isinstance(key, str) else f"{where}[{key}]")

    for section, values in document.items():
        walk(values, str(section))
