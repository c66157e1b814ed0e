"""train.loop = "compiled": an epoch as one XLA loop, against model.fit on the same synthetic arrays."""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import optuna
import pytest

from mnist_sweep.data import Split
from mnist_sweep.errors import TrialDiverged
from mnist_sweep.metrics import confusion_matrix
from mnist_sweep.scheduler import PrunerScheduler, PruningHook
from mnist_sweep.trial import FitClock, TrialOutcome, WarmStart, compiled_loop_runs, run_trial
from tests.conftest import REPO, cli_environment
from tests.test_backends import needs
from tests.test_trial import train_settings

PARAMS = {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 64, "activation": "relu", "dropout": 0.2}
Seen = list[tuple[int, dict[str, float]]]

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the compiled loop is TensorFlow's")


@pytest.fixture
def split(synthetic_mnist: tuple[np.ndarray, np.ndarray]) -> Split:
    """1,000 training images (not a multiple of 64: a partial last batch) and 200 validation images."""
    images, labels = synthetic_mnist
    x = images.astype(np.float32) / 255.0
    return Split(x_train=x[:1000], y_train=labels[:1000], x_val=x[1000:], y_val=labels[1000:])


def trained(split: Split, loop: str, **settings: object) -> tuple[Seen, TrialOutcome]:
    seen: Seen = []
    options = {"hidden": (64,), "epochs": 3, "lr_schedule": "cosine", **settings}
    outcome = run_trial(
        params=PARAMS,
        split=split,
        settings=train_settings(loop=loop, **options),
        seed=1,
        epoch_hooks=[lambda epoch, values: seen.append((epoch, dict(values)))],
    )
    return seen, outcome


def test_the_compiled_loop_logs_what_fit_logs_and_learns(split: Split) -> None:
    assert compiled_loop_runs("compiled") and not compiled_loop_runs("fit")
    fit_seen, fit = trained(split, "fit")
    seen, outcome = trained(split, "compiled")

    assert [epoch for epoch, _ in seen] == [1, 2, 3]
    assert [set(values) for _, values in seen] == [set(values) for _, values in fit_seen]
    losses = [values["loss"] for _, values in seen]
    assert losses[0] > losses[1] > losses[2]
    # The same steps per epoch, the partial batch included: the cosine schedule is where fit's is.
    rates = [values["learning_rate"] for _, values in seen]
    assert rates == pytest.approx([values["learning_rate"] for _, values in fit_seen], rel=1e-6)
    assert outcome.model.optimizer.iterations.numpy() == fit.model.optimizer.iterations.numpy() == 3 * 16
    # Another shuffle than fit's, the same training: within tolerance of it.
    assert outcome.val_loss == pytest.approx(fit.val_loss, abs=0.1)
    assert outcome.val_accuracy == pytest.approx(fit.val_accuracy, abs=0.05)
    # The confusion matrix of the reported epoch, counted in the validation pass: predictions agree with it.
    assert outcome.report.matrix.sum() == len(split.y_val)
    predicted = np.argmax(outcome.model.predict(split.x_val, verbose=0), axis=1)
    np.testing.assert_array_equal(outcome.report.matrix, confusion_matrix(split.y_val, predicted))
    assert outcome.val_accuracy == pytest.approx(seen[-1][1]["val_accuracy"], abs=1e-6)


def test_the_compiled_loop_is_reproducible_and_calls_the_batch_hooks_once_per_epoch(split: Split) -> None:
    first, _ = trained(split, "compiled", epochs=2)
    second: Seen = []
    batches: list[tuple[int, int, int]] = []
    run_trial(
        params=PARAMS,
        split=split,
        settings=train_settings(hidden=(64,), epochs=2, lr_schedule="cosine", loop="compiled"),
        seed=1,
        epoch_hooks=[lambda epoch, values: second.append((epoch, dict(values)))],
        batch_hooks=[lambda epoch, done, steps: batches.append((epoch, done, steps))],
    )
    assert first == second
    assert batches == [(1, 16, 16), (2, 16, 16)]  # the live display: the whole epoch done, at its end


def test_a_pruner_stops_the_compiled_loop_at_its_epoch_and_the_clock_has_its_cost(split: Split) -> None:
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(upper=0.0))
    trial = study.ask()
    clock = FitClock()
    with pytest.raises(optuna.TrialPruned, match="pruned at epoch 1"):
        run_trial(
            params=PARAMS,
            split=split,
            settings=train_settings(hidden=(32,), epochs=4, loop="compiled"),
            seed=0,
            epoch_hooks=[PruningHook(trial, "val_accuracy", epochs=4, scheduler=PrunerScheduler("val_accuracy"))],
            clock=clock,
        )
    assert list(trial.storage.get_trial(trial._trial_id).intermediate_values) == [1]
    assert clock.epochs == 1 and clock.seconds > 0


def test_a_diverging_loss_stops_the_compiled_loop_after_its_epoch(split: Split) -> None:
    params = {"optimizer": "sgd", "learning_rate": 1e12, "batch_size": 32, "activation": "relu"}
    clock = FitClock()
    with pytest.raises(TrialDiverged, match=r"loss became (nan|inf) at epoch 1, batch 31"):
        run_trial(
            params=params,
            split=split,
            settings=train_settings(hidden=(32,), epochs=3, loop="compiled"),
            seed=0,
            clock=clock,
        )
    assert clock.epochs == 0  # stopped at its first epoch's end, before the epoch hooks


def test_early_stopping_and_plateau_run_as_under_fit(split: Split) -> None:
    rates: list[float] = []
    outcome = run_trial(
        params={**PARAMS, "learning_rate": 1e-9},
        split=split,
        settings=train_settings(
            hidden=(32,),
            epochs=4,
            lr_schedule="plateau",
            plateau_factor=0.5,
            plateau_patience=1,
            plateau_min_lr=0.0,
            loop="compiled",
        ),
        seed=0,
        epoch_hooks=[lambda epoch, values: rates.append(values["learning_rate"])],
    )
    assert rates == pytest.approx([1e-9, 1e-9, 5e-10, 2.5e-10], rel=1e-5)  # halved after each flat epoch
    stopped = run_trial(
        params={**PARAMS, "learning_rate": 0.05},
        split=split,
        settings=train_settings(hidden=(32,), epochs=6, early_stopping_patience=1, monitor="val_loss", loop="compiled"),
        seed=3,
    )
    assert stopped.val_loss == pytest.approx(min(stopped.history["val_loss"]))
    assert stopped.best_epoch == int(np.argmin(stopped.history["val_loss"])) + 1
    assert outcome.epochs_trained == 4


def test_a_warm_start_goes_on_from_its_weights_and_schedule(split: Split) -> None:
    settings = train_settings(hidden=(32,), epochs=3, lr_schedule="cosine", loop="compiled")
    first: Seen = []
    earlier = run_trial(
        params=PARAMS,
        split=split,
        settings=settings,
        seed=0,
        epoch_hooks=[lambda epoch, values: first.append((epoch, dict(values)))],
    )
    went_on: Seen = []
    weights = earlier.model.get_weights()
    later = run_trial(
        params=PARAMS,
        split=split,
        settings=settings,
        seed=0,
        epoch_hooks=[lambda epoch, values: went_on.append((epoch, dict(values)))],
        warm_start=WarmStart(weights=weights, initial_epoch=2),
    )
    assert [epoch for epoch, _ in went_on] == [3]
    assert went_on[0][1]["learning_rate"] == pytest.approx(first[2][1]["learning_rate"], rel=1e-6)
    assert later.epochs_trained == 1 and later.best_epoch == 3
    assert went_on[0][1]["loss"] < first[0][1]["loss"]  # it started from trained weights


@pytest.mark.backend
@pytest.mark.subprocess
def test_under_jax_the_compiled_setting_trains_with_fit_and_never_imports_tensorflow() -> None:
    needs("jax")
    code = (
        "import dataclasses, sys, numpy as np\n"
        "from mnist_sweep.environment import prepare_backend\n"
        "prepare_backend()  # as the CLI starts: TensorFlow hidden under another backend\n"
        "from mnist_sweep.data import Split\n"
        "from mnist_sweep.config import SweepConfig\n"
        "from mnist_sweep.train_settings import TrainSettings\n"
        "from mnist_sweep.trial import compiled_loop_runs, run_trial\n"
        "x = np.random.default_rng(0).random((300, 28, 28), dtype=np.float32)\n"
        "y = np.arange(300) % 10\n"
        "split = Split(x_train=x[:200], y_train=y[:200], x_val=x[200:], y_val=y[200:])\n"
        "params = {'optimizer': 'adam', 'learning_rate': 1e-3, 'batch_size': 64, 'activation': 'relu'}\n"
        "settings = TrainSettings.from_config(SweepConfig())\n"
        "settings = dataclasses.replace(settings, hidden=(16,), epochs=2, loop='compiled')\n"
        "outcome = run_trial(params=params, split=split, settings=settings, seed=0)\n"
        "print(compiled_loop_runs('compiled'), outcome.epochs_trained, sorted(outcome.history))\n"
        "print(sys.modules['tensorflow'] is not None, 'mnist_sweep.compiled_loop' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=cli_environment(REPO, {"KERAS_BACKEND": "jax"}),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == [
        "False 2 ['accuracy', 'loss', 'val_accuracy', 'val_loss']",
        "False False",
    ]
