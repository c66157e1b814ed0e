"""Workarounds that reach into third-party internals: every private name of another package, in this one module.

Each was written for the versions in WRITTEN_FOR, which pyproject.toml pins to the same major.minor;
tests/test_workarounds.py fails when the installed versions differ, the pins drift apart, or an internal
has moved, so an upgrade is checked here, not discovered as a slow leak. The leak and the optimizer's
state warn (WorkaroundSkipped) when they cannot apply, and the sweep goes on without them; the others
have no way around them and raise.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras
    import optuna
    from optuna.trial import FrozenTrial

# major.minor, each pinned so in pyproject.toml: tensorflow's gradient registry, keras' compiled/optimizer flip,
# mlflow's table creation and model-name check, keras-tuner's oracle internals, optuna's storage, trial id and
# the module its trial lines are logged from.
WRITTEN_FOR = {"tensorflow": "2.21", "keras": "3.15", "mlflow": "3.17", "keras-tuner": "1.4", "optuna": "5.1"}


class WorkaroundSkipped(UserWarning):
    """A workaround could not apply: the internal it needs is not where it was."""


# --------------------------------------------------------------------------- TensorFlow's gradient registry


class TracedGradients:
    """Work around a TensorFlow leak: ~14 MiB per trial, so memory grew without bound over a sweep.

    Every trace of Keras' train step registers a `tf.custom_gradient` (from the optimizer's all-reduce of
    gradients) in TensorFlow's global gradient registry, which keeps that trial's whole traced graph alive
    forever; clear_session() does not remove it. After clear_session nothing can use an earlier trial's
    graphs, so their entries go. The first call notes what was registered before any trial; `forget`
    drops that note. Other backends have no such registry.
    """

    def __init__(self) -> None:
        self._before_first_trial: set[str] | None = None

    def drop_since_first_trial(self) -> None:
        """Call after keras.backend.clear_session(), before each trial."""
        registry = gradient_registry()
        if registry is None:
            return
        if self._before_first_trial is None:
            self._before_first_trial = set(registry)
            return
        before = self._before_first_trial
        for name in [n for n in registry if n.startswith("CustomGradient-") and n not in before]:
            del registry[name]

    def forget(self) -> None:
        self._before_first_trial = None


def gradient_registry() -> dict[str, Any] | None:
    """TensorFlow's registry of gradient functions (private), or None: another backend, or it moved (warned)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return None
    try:
        from tensorflow.python.framework import ops

        registry = ops.gradient_registry._registry
    except (ImportError, AttributeError) as exc:
        _skipped(f"TensorFlow's gradient registry is not at ops.gradient_registry._registry ({exc})")
        return None
    if not isinstance(registry, dict):
        _skipped(f"TensorFlow's ops.gradient_registry._registry is a {type(registry).__name__}, not a dict")
        return None
    return registry


# --------------------------------------------------------------------------- saving a model without its optimizer


@contextlib.contextmanager
def saved_as_uncompiled(model: keras.Model, *, keep_optimizer: bool) -> Iterator[None]:
    """Within, unless `keep_optimizer`, the model saves as if uncompiled: architecture and weights only.

    Keras 3's .keras format always saves a compiled model's optimizer (it ignores include_optimizer), so
    `model.optimizer` and `model.compiled` are flipped for the save and restored after it. The model loads
    back uncompiled; scoring it needs predict only.
    """
    if keep_optimizer:
        yield
        return
    if not (hasattr(model, "compiled") and hasattr(model, "optimizer")):
        _skipped("the Keras model has no `compiled`/`optimizer` attribute: it is saved with its optimizer state")
        yield
        return
    if not model.compiled:
        yield
        return
    optimizer = model.optimizer
    model.optimizer, model.compiled = None, False
    try:
        yield
    finally:
        model.optimizer, model.compiled = optimizer, True


# --------------------------------------------------------------------------- MLflow: its tables


def create_mlflow_tables(uri: str) -> None:
    """MLflow's tables, made and migrated as MlflowClient would on first use (mlflow.store.db.utils, private):
    called under databases.schema_lock, so workers that start together do not race to create them."""
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables

    engine = sqlalchemy.create_engine(uri, poolclass=sqlalchemy.pool.NullPool)
    try:
        _initialize_tables(engine)  # type: ignore[no-untyped-call]
    finally:
        engine.dispose()


def validate_registered_model_name(name: str) -> None:
    """Raises MlflowException where the Model Registry would refuse `name`: MLflow's own check
    (mlflow.utils.validation, private), run before any trial instead of at registration, after the sweep."""
    from mlflow.utils.validation import _validate_model_name

    _validate_model_name(name)


# --------------------------------------------------------------------------- keras-tuner: its oracles


def set_oracle_project_dir(oracle: Any, folder: str, name: str) -> None:
    """Where the oracle saves and reloads its state: keras-tuner's tuners set it, through a private method."""
    oracle._set_project_dir(folder, name)


# --------------------------------------------------------------------------- Optuna: its trial lines' logger

# The logger `study.optimize` writes each trial's line to, named after its private module: trial_loop.py tells
# Optuna each trial through `study.tell`, which logs none, and writes those lines there itself (`--verbose`).
OPTUNA_TRIAL_LOGGER = "optuna.study._optimize"


# --------------------------------------------------------------------------- Optuna: a sampler's trial attributes


def set_trial_user_attr(study: optuna.Study, trial: FrozenTrial, key: str, value: Any) -> None:
    """A user attribute on a trial a sampler is given as frozen (before_trial), as Optuna's own samplers record
    their state: through the study's private storage and the trial's private id."""
    study._storage.set_trial_user_attr(trial._trial_id, key, value)


def fix_trial_params(trial: optuna.Trial, params: dict[str, Any]) -> None:
    """The values `trial` suggests from now on, as `study.enqueue_trial` fixes them, for a trial already asked (an
    ASHA promotion is decided once the trial is this process's): Optuna reads an enqueued trial's fixed params into
    the private `_fixed_params` when it builds the trial, and records them as the system attr `fixed_params`."""
    trial.storage.set_trial_system_attr(trial._trial_id, "fixed_params", params)
    trial._fixed_params = dict(params)


def _skipped(what: str) -> None:
    warnings.warn(f"mnist-sweep workaround skipped: {what}", WorkaroundSkipped, stacklevel=3)
