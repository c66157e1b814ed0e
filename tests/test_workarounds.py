"""The workarounds of third-party internals, pinned to the versions they were written for.

When TensorFlow or Keras is upgraded, the version test fails first: check that each workaround still
applies (the tests below), then update WRITTEN_FOR in mnist_sweep/workarounds.py.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import zipfile
from pathlib import Path
from typing import Any

import keras
import numpy as np
import optuna
import pytest
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from mnist_sweep import workarounds
from mnist_sweep.trial import TrialSession
from mnist_sweep.workarounds import WRITTEN_FOR, TracedGradients, WorkaroundSkipped, saved_as_uncompiled
from tests.conftest import REPO

tensorflow_backend = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="TensorFlow's gradient registry exists on its backend only"
)


def small_compiled_model() -> keras.Model:
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    return model


def fit_once() -> keras.Model:
    model = small_compiled_model()
    model.fit(np.zeros((8, 4), dtype="float32"), np.zeros(8, dtype="int64"), epochs=1, verbose=0)
    return model


def custom_gradients() -> set[str]:
    from tensorflow.python.framework import ops

    return {name for name in ops.gradient_registry._registry if name.startswith("CustomGradient-")}


@pytest.mark.parametrize("package", sorted(WRITTEN_FOR))
def test_installed_versions_are_the_ones_the_workarounds_were_written_for(package: str) -> None:
    installed = importlib.metadata.version(package)
    assert installed.split(".")[:2] == WRITTEN_FOR[package].split("."), (
        f"{package} {installed} is installed; mnist_sweep/workarounds.py was written for {WRITTEN_FOR[package]}: "
        "check that each workaround still applies (this file's tests), then update WRITTEN_FOR"
    )


def pyproject_requirements() -> dict[str, SpecifierSet]:
    from packaging.requirements import Requirement

    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    document = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    requirements = [Requirement(line) for line in document["project"]["dependencies"]]
    return {canonicalize_name(r.name): r.specifier for r in requirements}


@pytest.mark.parametrize("package", sorted(WRITTEN_FOR))
def test_pyproject_pins_each_package_to_the_version_its_workarounds_were_written_for(package: str) -> None:
    """Every release pyproject.toml allows is one the workarounds were written for: X.Y.*, nothing either side."""
    specifier = pyproject_requirements()[canonicalize_name(package)]
    major, minor = (int(part) for part in WRITTEN_FOR[package].split("."))
    allowed = [f"{major}.{minor}.0", f"{major}.{minor}.99"]
    refused = [f"{major}.{minor + 1}.0", f"{major + 1}.0.0", *([f"{major}.{minor - 1}.99"] if minor else [])]
    assert all(specifier.contains(v) for v in allowed), f"pyproject.toml: {package}{specifier} refuses {allowed}"
    assert not any(specifier.contains(v) for v in refused), (
        f"pyproject.toml: {package}{specifier} allows releases other than {WRITTEN_FOR[package]}.*, which "
        "mnist_sweep/workarounds.py was not written for: pin it, or check the workarounds and widen both"
    )


def test_every_private_name_of_another_package_is_where_a_workaround_reaches_for_it() -> None:
    import keras_tuner
    import mlflow.store.db.utils
    import mlflow.utils.validation

    study = optuna.create_study()
    trial = study.ask()
    frozen = study.get_trials(deepcopy=False)[0]
    assert callable(mlflow.store.db.utils._initialize_tables)
    assert callable(mlflow.utils.validation._validate_model_name)
    for oracle in (keras_tuner.oracles.RandomSearchOracle, keras_tuner.oracles.BayesianOptimizationOracle):
        assert callable(oracle._set_project_dir)
    workarounds.set_trial_user_attr(study, frozen, "k", 1)
    assert study.trials[trial.number].user_attrs == {"k": 1}
    # An asked trial's values fixed afterwards (ASHA's promotion): suggest returns them, as an enqueued trial's.
    workarounds.fix_trial_params(trial, {"x": 0.25})
    assert trial.suggest_float("x", 0.0, 1.0) == 0.25 and study.trials[trial.number].params == {"x": 0.25}
    # The logger `study.optimize` writes its trial lines to, which trial_loop writes them to in its stead.
    assert importlib.import_module(workarounds.OPTUNA_TRIAL_LOGGER)._logger.name == workarounds.OPTUNA_TRIAL_LOGGER


@tensorflow_backend
def test_tensorflow_gradient_registry_is_where_the_workaround_reaches_for_it() -> None:
    from tensorflow.python.framework import ops

    assert isinstance(ops.gradient_registry._registry, dict)
    assert workarounds.gradient_registry() is ops.gradient_registry._registry


@tensorflow_backend
def test_traced_gradients_of_earlier_trials_are_dropped() -> None:
    session = TrialSession()
    try:
        session.fresh(0)
        before = custom_gradients()
        fit_once()
        traced = custom_gradients() - before
        assert traced, "Keras' train step no longer registers a tf.custom_gradient: is the workaround still needed?"

        session.fresh(0)

        assert custom_gradients() == before
    finally:
        session.reset()


@tensorflow_backend
def test_a_moved_gradient_registry_is_warned_about_and_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    from tensorflow.python.framework import ops

    monkeypatch.delattr(ops.gradient_registry, "_registry")
    with pytest.warns(WorkaroundSkipped, match="gradient registry"):
        TracedGradients().drop_since_first_trial()


def test_a_model_saves_without_its_optimizer_and_stays_compiled(tmp_path: Path) -> None:
    model = fit_once()
    optimizer = model.optimizer

    with saved_as_uncompiled(model, keep_optimizer=False):
        model.save(tmp_path / "model.keras")

    assert model.optimizer is optimizer and model.compiled
    with zipfile.ZipFile(tmp_path / "model.keras") as saved, saved.open("model.weights.h5") as weights:
        import h5py

        assert "optimizer" not in h5py.File(weights, "r"), "the optimizer's state was saved"
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    assert not reloaded.compiled


def test_a_model_keeps_its_optimizer_when_asked(tmp_path: Path) -> None:
    model = fit_once()

    with saved_as_uncompiled(model, keep_optimizer=True):
        model.save(tmp_path / "model.keras")

    with zipfile.ZipFile(tmp_path / "model.keras") as saved, saved.open("model.weights.h5") as weights:
        import h5py

        assert "optimizer" in h5py.File(weights, "r")
    assert keras.saving.load_model(tmp_path / "model.keras").compiled


def test_a_model_without_the_attributes_is_warned_about_and_saved_as_it_is() -> None:
    class NotKeras:
        pass

    thing: Any = NotKeras()
    with pytest.warns(WorkaroundSkipped, match="compiled"), saved_as_uncompiled(thing, keep_optimizer=False):
        pass
