"""Search space, model builder and one trial on synthetic MNIST-shaped arrays (no MLflow involved)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import optuna
import pytest

from mnist_sweep.config import SweepConfig, build_config
from mnist_sweep.data import Split
from mnist_sweep.metrics import confusion_matrix
from mnist_sweep.model import build_model, compiled_model
from mnist_sweep.scheduler import PrunerScheduler, PruningHook
from mnist_sweep.space import fixed_params, sample_params, searched_names
from mnist_sweep.train_settings import TrainSettings
from mnist_sweep.trial import TrialDiverged, TrialSession, WarmStart, run_trial

PARAMS = {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 64, "activation": "relu"}


def train_settings(**changes: Any) -> TrainSettings:
    """What a sweep with the schema's defaults trains with, shrunk (a smaller network, fewer epochs)."""
    return dataclasses.replace(TrainSettings.from_config(SweepConfig()), **changes)


@pytest.fixture
def split(synthetic_mnist: tuple[np.ndarray, np.ndarray]) -> Split:
    images, labels = synthetic_mnist
    x = images.astype(np.float32) / 255.0
    return Split(x_train=x[:1000], y_train=labels[:1000], x_val=x[1000:], y_val=labels[1000:])


def test_search_space_maps_to_optuna_distributions() -> None:
    cfg = build_config({"search": {"batch_size": {"low": 16, "high": 256, "log": True}, "dropout": [0.0, 0.2]}})
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    params = sample_params(trial, cfg.search)
    assert set(searched_names(cfg.search)) == {"optimizer", "learning_rate", "batch_size", "activation", "dropout"}
    assert fixed_params(cfg.search) == {"weight_decay": 0.0, "momentum": 0.0}
    assert isinstance(trial.distributions["batch_size"], optuna.distributions.IntDistribution)
    assert trial.distributions["batch_size"].log
    assert isinstance(trial.distributions["learning_rate"], optuna.distributions.FloatDistribution)
    assert 1e-4 <= params["learning_rate"] <= 0.3 and params["optimizer"] in ("sgd", "adam", "rmsprop")
    assert params["weight_decay"] == 0.0 and "weight_decay" not in trial.params  # fixed keys are not searched


def test_model_is_the_lecture_network() -> None:
    model = build_model(hidden=[500, 500], activation="sigmoid")
    assert [layer.units for layer in model.layers if hasattr(layer, "units")] == [500, 500, 10]
    assert model.count_params() == 784 * 500 + 500 + 500 * 500 + 500 + 500 * 10 + 10
    assert model.output_shape == (None, 10)


def test_trial_fits_reports_every_epoch_and_measures_validation(split: Split) -> None:
    seen: list[tuple[int, Mapping[str, float]]] = []
    outcome = run_trial(
        params=PARAMS,
        split=split,
        settings=train_settings(hidden=(64,), epochs=2),
        seed=1,
        epoch_hooks=[lambda epoch, values: seen.append((epoch, dict(values)))],
    )
    assert [epoch for epoch, _ in seen] == [1, 2]
    assert set(seen[0][1]) == {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate"}
    assert [values["learning_rate"] for _, values in seen] == pytest.approx([1e-3, 1e-3])  # constant
    assert outcome.epochs_trained == 2 and outcome.best_epoch == 2
    assert outcome.report.matrix.sum() == len(split.y_val)
    # the confusion matrix and Keras agree on the validation accuracy
    assert outcome.val_accuracy == pytest.approx(seen[-1][1]["val_accuracy"], abs=1e-6)
    assert outcome.val_accuracy > 0.5, "the synthetic classes are learnable"
    # counted during fit's validation pass; the same as predicting the validation images afterwards
    predicted = np.argmax(outcome.model.predict(split.x_val, verbose=0), axis=1)
    np.testing.assert_array_equal(outcome.report.matrix, confusion_matrix(split.y_val, predicted))


def test_same_seed_same_result(split: Split) -> None:
    settings = train_settings(hidden=(32,), epochs=1)
    first = run_trial(params=PARAMS, split=split, settings=settings, seed=7)
    second = run_trial(params=PARAMS, split=split, settings=settings, seed=7)
    assert first.val_loss == pytest.approx(second.val_loss, rel=1e-5)


def test_early_stopping_reports_the_restored_epoch(split: Split) -> None:
    outcome = run_trial(
        params={**PARAMS, "learning_rate": 0.05},
        split=split,
        settings=train_settings(hidden=(32,), epochs=6, early_stopping_patience=1, monitor="val_loss"),
        seed=3,
    )
    assert outcome.val_loss == pytest.approx(min(outcome.history["val_loss"]))
    assert outcome.best_epoch == int(np.argmin(outcome.history["val_loss"])) + 1


def test_plateau_lowers_the_rate_after_patience_epochs_without_improvement(split: Split) -> None:
    """A rate too small to move val_loss by ReduceLROnPlateau's min_delta: every `patience` epochs it is halved."""
    rates: list[float] = []
    run_trial(
        params={**PARAMS, "learning_rate": 1e-9},
        split=split,
        settings=train_settings(
            hidden=(32,), epochs=4, lr_schedule="plateau", plateau_factor=0.5, plateau_patience=1, plateau_min_lr=0.0
        ),
        seed=0,
        epoch_hooks=[lambda epoch, values: rates.append(values["learning_rate"])],
    )
    # epoch 1 sets the best; no improvement in epoch 2 -> halved for epoch 3, and again for epoch 4
    assert rates == pytest.approx([1e-9, 1e-9, 5e-10, 2.5e-10], rel=1e-5)


def test_cosine_rate_reported_per_epoch_decays(split: Split) -> None:
    rates: list[float] = []
    run_trial(
        params=PARAMS,
        split=split,
        settings=train_settings(hidden=(32,), epochs=3, lr_schedule="cosine"),
        seed=0,
        epoch_hooks=[lambda epoch, values: rates.append(values["learning_rate"])],
    )
    assert 1e-3 > rates[0] > rates[1] > rates[2] == pytest.approx(1e-5, rel=1e-3)  # 1 % of it after the last step


def test_diverging_loss_stops_the_trial(split: Split) -> None:
    params = {"optimizer": "sgd", "learning_rate": 1e12, "batch_size": 32, "activation": "relu"}
    with pytest.raises(TrialDiverged, match="loss became (nan|inf)"):
        run_trial(params=params, split=split, settings=train_settings(hidden=(32,), epochs=3), seed=0)


def study_with_two_good_trials() -> optuna.Study:
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    )
    for value in (0.9, 0.95):
        good = study.ask()
        good.report(value, step=1)
        study.tell(good, value)
    return study


def test_pruning_hook_prunes_a_trial_below_the_median() -> None:
    study = study_with_two_good_trials()
    hook = PruningHook(study.ask(), "val_accuracy", epochs=3, scheduler=PrunerScheduler("val_accuracy"))
    with pytest.raises(optuna.TrialPruned, match="pruned at epoch 1"):
        hook(1, {"val_accuracy": 0.1, "val_loss": 2.0})


def test_pruning_hook_keeps_a_trial_that_reached_its_last_epoch() -> None:
    study = study_with_two_good_trials()
    PruningHook(study.ask(), "val_accuracy", epochs=1, scheduler=PrunerScheduler("val_accuracy"))(
        1, {"val_accuracy": 0.1}
    )  # no TrialPruned


def test_pruning_hook_refuses_a_missing_metric() -> None:
    hook = PruningHook(optuna.create_study().ask(), "val_accuracy", epochs=3, scheduler=PrunerScheduler("val_accuracy"))
    with pytest.raises(KeyError, match="not among the epoch metrics"):
        hook(1, {"loss": 1.0})


def test_compiled_model_takes_every_optimizer() -> None:
    expected = {"sgd": "SGD", "adam": "Adam", "rmsprop": "RMSprop", "adamw": "AdamW", "nadam": "Nadam"}
    for name, class_name in expected.items():
        params = {**PARAMS, "optimizer": name, "momentum": 0.5, "dropout": 0.1, "weight_decay": 1e-4}
        model = compiled_model(params, (8,))
        assert type(model.optimizer).__name__ == class_name


def test_cosine_schedule_decays_to_one_percent() -> None:
    from mnist_sweep.model import learning_rate

    schedule = learning_rate(0.1, schedule="cosine", total_steps=100)
    assert float(schedule(0)) == pytest.approx(0.1)
    assert float(schedule(100)) == pytest.approx(0.001)
    assert learning_rate(0.1, schedule="constant", total_steps=100) == 0.1


def test_early_stopping_on_accuracy_keeps_the_most_accurate_epoch(split: Split) -> None:
    settings = train_settings(hidden=(32,), epochs=4, early_stopping_patience=1)
    outcome = run_trial(params={**PARAMS, "learning_rate": 0.05}, split=split, settings=settings, seed=3)
    assert outcome.best_epoch == int(np.argmax(outcome.history["val_accuracy"])) + 1


def test_trials_leave_no_graphs_behind(split: Split) -> None:
    """Memory stays flat over a sweep: nothing keeps an earlier trial's model or traced graphs alive."""
    import gc
    import weakref

    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the leak worked around is TensorFlow's gradient registry")
    from tensorflow.python.framework import ops

    settings = train_settings(hidden=(32,), epochs=1)
    registry_sizes, models = [], []
    session = TrialSession()  # what a sweep's trials share, as the study's objective passes it
    try:
        for seed in range(4):
            outcome = run_trial(params=PARAMS, split=split, settings=settings, seed=seed, session=session)
            registry_sizes.append(len(ops.gradient_registry._registry))
            models.append(weakref.ref(outcome.model))
            del outcome
        gc.collect()
    finally:
        session.reset()
    # Each trial registers its own traced gradients; the next trial's fresh session drops them.
    assert registry_sizes[1] == registry_sizes[2] == registry_sizes[3], registry_sizes
    assert all(model() is None for model in models)


def test_mixed_bfloat16_trains_in_bfloat16_with_float32_outputs(split: Split) -> None:
    import keras

    settings = train_settings(hidden=(32,), epochs=1, precision="mixed_bfloat16")
    outcome = run_trial(params=PARAMS, split=split, settings=settings, seed=0)
    hidden, output = outcome.model.layers[1], outcome.model.layers[-1]
    assert (hidden.compute_dtype, hidden.variable_dtype) == ("bfloat16", "float32")
    assert output.compute_dtype == "float32"
    assert outcome.val_accuracy > 0.5
    assert keras.mixed_precision.dtype_policy().name == "float32", "the global policy is restored"


@pytest.mark.parametrize("loop", ["fit", "compiled"])
def test_a_warm_restart_starts_from_the_weights_and_its_cosine_ends_at_its_own_last_epoch(
    split: Split, loop: str
) -> None:
    """ASHA's promotion: the earlier trial's weights, and a cosine decay over the new segment only."""
    settings = train_settings(hidden=(32,), epochs=2, lr_schedule="cosine", loop=loop)
    earlier_epochs: list[Mapping[str, float]] = []
    earlier = run_trial(
        params=PARAMS, split=split, settings=settings, seed=0, epoch_hooks=[lambda e, v: earlier_epochs.append(v)]
    )
    rate = 1e-9  # the weights barely move in the new segment: its first epoch scores as the earlier trial's last
    seen: list[tuple[int, Mapping[str, float]]] = []
    run_trial(
        params={**PARAMS, "learning_rate": rate},
        split=split,
        settings=dataclasses.replace(settings, epochs=5),
        seed=1,
        epoch_hooks=[lambda epoch, values: seen.append((epoch, dict(values)))],
        warm_start=WarmStart(weights=earlier.model.get_weights(), initial_epoch=2, restart_schedule=True),
    )
    assert [epoch for epoch, _ in seen] == [3, 4, 5]
    assert seen[0][1]["val_loss"] == pytest.approx(earlier_epochs[-1]["val_loss"], rel=1e-4)
    assert earlier_epochs[-1]["learning_rate"] == pytest.approx(0.01 * PARAMS["learning_rate"], rel=1e-4)
    # CosineDecay(alpha 0.01) over 3 epochs, from the trial's own rate: 1/3, 2/3 and all of the way down.
    cosine = [0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * k / 3)) for k in (1, 2, 3)]
    assert [values["learning_rate"] / rate for _, values in seen] == pytest.approx(cosine, rel=1e-4)
