"""One trial: build the model, fit it, evaluate it on the validation images.

This module knows neither Optuna nor MLflow: the study passes epoch hooks (pruning, metric logging)
that are called after every epoch with the Keras logs, batch hooks (the live display), and gets a
TrialOutcome back.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from mnist_sweep.config import Hyperparameters
from mnist_sweep.data import NUM_CLASSES, Split
from mnist_sweep.errors import TrialDiverged
from mnist_sweep.interrupt import raise_if_requested
from mnist_sweep.metrics import ClassificationReport, classification_report
from mnist_sweep.model import compiled_model
from mnist_sweep.train_settings import TrainSettings
from mnist_sweep.workarounds import TracedGradients

EpochHook = Callable[[int, Mapping[str, float]], None]
"""Called with the 1-based epoch number and that epoch's loss, accuracy, val_loss, val_accuracy and
learning_rate (the optimizer's rate at the epoch's end, before a plateau reduction)."""

BatchHook = Callable[[int, int, int], None]
"""Called with the 1-based epoch, the batches done in it and the batches per epoch, on Keras' callback
thread; with steps_per_execution = N, once per N batches. Keep it cheap (a live display stores numbers)."""

EPOCH_METRICS = ("loss", "accuracy", "val_loss", "val_accuracy")
LEARNING_RATE = "learning_rate"


@dataclass(frozen=True)
class WarmStart:
    """Go on from an earlier trial of the same hyperparameters: its weights, after its `initial_epoch` epochs.

    `restart_schedule`: the learning-rate schedule runs anew over the epochs left (a warm restart), so a cosine
    decay ends where this trial's training does; otherwise it goes on from step initial_epoch of a schedule over
    all the epochs (keras-tuner's hyperband)."""

    weights: list[np.ndarray]
    initial_epoch: int
    restart_schedule: bool = False


@dataclass
class FitClock:
    """The seconds spent in fit up to the last epoch's end, and the epochs trained: for a caller whose epoch hook
    stopped the fit (a pruned trial returns no TrialOutcome, and its cost still counts in the sweep's)."""

    seconds: float = 0.0
    epochs: int = 0


@dataclass
class TrialOutcome:
    """What one finished fit produced."""

    history: dict[str, list[float]]
    epochs_trained: int
    best_epoch: int
    val_loss: float
    val_accuracy: float
    report: ClassificationReport
    fit_seconds: float
    model: keras.Model = field(repr=False)

    def metric(self, name: str) -> float:
        return {"val_loss": self.val_loss, "val_accuracy": self.val_accuracy}[name]


class _EpochCallback(keras.callbacks.Callback):  # type: ignore[misc]
    """Feeds epoch logs to the hooks and stops at once when the loss diverges."""

    # A batch hook makes Keras convert every batch's logs on the training thread (a device sync per
    # batch) unless the callback is declared safe to run on Keras' callback thread; these checks are.
    # Their exceptions surface on the training thread a step or two later. With steps_per_execution = N
    # Keras calls the batch hook once per N batches.
    async_safe = True

    def __init__(
        self, hooks: Sequence[EpochHook], batch_hooks: Sequence[BatchHook] = (), clock: FitClock | None = None
    ) -> None:
        super().__init__()
        self.hooks = hooks
        self.batch_hooks = batch_hooks
        self.clock = clock or FitClock()
        self.epoch = 0
        self.started = 0.0

    def on_train_begin(self, logs: Mapping[str, Any] | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_begin(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
        raise_if_requested()  # a Ctrl-C or SIGTERM stops the fit within a step
        if logs and "loss" in logs:  # already plain floats here: Keras converted them on this thread
            _check_finite("loss", float(logs["loss"]), self.epoch, batch)
        if self.batch_hooks:
            steps = int(self.params.get("steps") or 0)  # Keras' batches per epoch
            done = min(batch + 1, steps) if steps else batch + 1
            for hook in self.batch_hooks:
                hook(self.epoch, done, steps)

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self.clock.seconds = time.perf_counter() - self.started  # before the hooks: a pruning hook ends the fit
        self.clock.epochs += 1
        values = {k: float(v) for k, v in (logs or {}).items() if k in EPOCH_METRICS}
        values[LEARNING_RATE] = current_learning_rate(self.model)
        for key in ("loss", "val_loss"):
            if key in values:
                _check_finite(key, values[key], epoch + 1, None)
        for hook in self.hooks:
            hook(epoch + 1, values)


class ConfusionCounts(keras.metrics.Metric):  # type: ignore[misc]
    """The confusion matrix (rows true, columns predicted) as a Keras metric.

    Counted during the validation pass fit already makes after every epoch, so a trial needs no extra
    prediction pass over the validation images for its confusion matrix and per-class metrics.
    """

    def __init__(self, classes: int = NUM_CLASSES, name: str = "confusion_counts") -> None:
        super().__init__(name=name)
        self.classes = classes
        self.counts = self.add_variable(shape=(classes, classes), initializer="zeros", name="counts")

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        ops = keras.ops
        true = ops.one_hot(ops.reshape(ops.cast(y_true, "int32"), (-1,)), self.classes)
        predicted = ops.one_hot(ops.argmax(y_pred, axis=-1), self.classes)
        self.counts.assign_add(ops.matmul(ops.transpose(true), predicted))  # float32: exact below 2**24

    def result(self) -> Any:
        return keras.ops.copy(self.counts)  # a tensor, not the variable: logs turn it into NumPy

    def reset_state(self) -> None:
        self.counts.assign(keras.ops.zeros((self.classes, self.classes)))


def current_learning_rate(model: keras.Model) -> float:
    """The optimizer's rate now: a schedule's value at the current step, or the rate a plateau set."""
    rate = model.optimizer.learning_rate  # a Keras variable (constant, plateau) or a tensor (a schedule's value)
    # A variable's own numpy(): NumPy 2 converts it otherwise only with a DeprecationWarning.
    return float(rate.numpy() if isinstance(rate, keras.Variable) else keras.ops.convert_to_numpy(rate))


def _check_finite(name: str, value: float, epoch: int, batch: int | None) -> None:
    if not math.isfinite(value):
        where = f"epoch {epoch}" + (f", batch {batch}" if batch is not None else "")
        raise TrialDiverged(f"{name} became {value} at {where}; the learning rate is probably too high")


class TrialSession:
    """What the trials of one process share; made by whoever runs several trials and passed to each.

    Before the first trial it moves what is alive (modules, TensorFlow, the data, the stores), which lives
    as long as the process, out of the garbage collector's sight: each trial's full collection then scans
    only the trial's own objects (measured 0.2-0.65 s -> 0.03 s per trial). Before later trials it drops
    what TensorFlow keeps of earlier ones (workarounds.TracedGradients). `reset` undoes both.
    """

    def __init__(self) -> None:
        self._frozen = False
        self._traced_gradients = TracedGradients()

    def fresh(self, seed: int) -> None:
        """No state leaks from the previous trial, and what outlives every trial is frozen once."""
        self._traced_gradients.drop_since_first_trial()
        clean_start(seed)
        if not self._frozen:
            gc.freeze()
            self._frozen = True

    def reset(self) -> None:
        """Back to before the first trial: the frozen objects collectable again, no registry snapshot."""
        if self._frozen:
            gc.unfreeze()
            self._frozen = False
        self._traced_gradients.forget()


def clean_start(seed: int) -> None:
    """A clean Keras session, the previous trial's garbage collected, and seeded RNGs."""
    keras.backend.clear_session()
    gc.collect()
    keras.utils.set_random_seed(seed)


def run_trial(
    *,
    params: Mapping[str, Any],
    split: Split,
    settings: TrainSettings,
    seed: int,
    epoch_hooks: Sequence[EpochHook] = (),
    batch_hooks: Sequence[BatchHook] = (),
    session: TrialSession | None = None,
    warm_start: WarmStart | None = None,
    clock: FitClock | None = None,
) -> TrialOutcome:
    """Fit one model with `params` on `split` and measure it on the validation images.

    `session` is the process's when it runs several trials (a sweep); without one the trial runs alone.
    `warm_start`: train epochs initial_epoch + 1 .. settings.epochs from those weights (keras-tuner's hyperband).
    `clock`: kept up to date after every epoch, for a caller whose hook may stop the fit.
    """
    if session is not None:
        session.fresh(seed)
    else:
        clean_start(seed)
    point = Hyperparameters.of(params)
    batch_size = point.batch_size
    steps_per_epoch = -(-len(split.y_train) // batch_size)
    with _dtype_policy(settings.precision):  # layers take the policy when built
        model = compiled_model(
            point,
            settings.hidden,
            schedule=settings.lr_schedule,
            total_steps=_scheduled_epochs(settings.epochs, warm_start) * steps_per_epoch,
            steps_per_execution=settings.steps_per_execution,
            metrics=("accuracy", ConfusionCounts()),
        )
    initial_epoch = _go_on_from(warm_start, model, steps_per_epoch) if warm_start else 0
    callbacks = _callbacks(settings, epoch_hooks, batch_hooks, clock)
    started = time.perf_counter()
    if compiled_loop_runs(settings.loop):
        from mnist_sweep.compiled_loop import fit_compiled  # imports TensorFlow itself

        history = fit_compiled(
            model,
            split,
            batch_size=batch_size,
            epochs=settings.epochs,
            initial_epoch=initial_epoch,
            callbacks=callbacks,
            seed=seed,
        )
    else:
        history = model.fit(
            split.x_train,
            split.y_train,
            batch_size=batch_size,
            epochs=settings.epochs,
            initial_epoch=initial_epoch,
            validation_data=(split.x_val, split.y_val),
            callbacks=callbacks,
            verbose=0,
        ).history
    fit_seconds = time.perf_counter() - started
    return _evaluate(model, history, fit_seconds, settings, initial_epoch=initial_epoch)


def compiled_loop_runs(loop: str) -> bool:
    """Whether train.loop = "compiled" applies: under TensorFlow; JAX and torch train with Keras' fit."""
    return loop == "compiled" and keras.backend.backend() == "tensorflow"


def _scheduled_epochs(epochs: int, warm_start: WarmStart | None) -> int:
    """The epochs the learning-rate schedule spans: the epochs left after a warm restart, else all of them."""
    if warm_start is not None and warm_start.restart_schedule:
        return max(epochs - warm_start.initial_epoch, 1)
    return epochs


def _go_on_from(warm_start: WarmStart, model: keras.Model, steps_per_epoch: int) -> int:
    """The earlier trial's weights in `model`; returns the epoch fit starts after."""
    model.set_weights(warm_start.weights)
    # A fresh optimizer (keras-tuner reloads weights only): its learning-rate schedule where it was, or at its start
    # for a warm restart (the optimizer counts steps from 0).
    if not warm_start.restart_schedule:
        model.optimizer.iterations.assign(warm_start.initial_epoch * steps_per_epoch)
    return warm_start.initial_epoch


def _callbacks(
    settings: TrainSettings,
    epoch_hooks: Sequence[EpochHook],
    batch_hooks: Sequence[BatchHook],
    clock: FitClock | None = None,
) -> list[keras.callbacks.Callback]:
    """The hooks, the plateau schedule and early stopping (both on the study metric) where configured.

    The hooks come first: they see the rate the epoch trained with, before a plateau lowers it.
    """
    callbacks: list[keras.callbacks.Callback] = [_EpochCallback(epoch_hooks, batch_hooks, clock)]
    mode = "max" if settings.monitor_maximizes else "min"
    if settings.lr_schedule == "plateau":
        callbacks.append(
            keras.callbacks.ReduceLROnPlateau(
                monitor=settings.monitor,
                mode=mode,
                factor=settings.plateau_factor,
                patience=settings.plateau_patience,
                min_lr=settings.plateau_min_lr,
            )
        )
    if settings.early_stopping_patience:
        callbacks.append(
            keras.callbacks.EarlyStopping(
                monitor=settings.monitor,
                mode=mode,
                patience=settings.early_stopping_patience,
                restore_best_weights=True,
            )
        )
    return callbacks


@contextlib.contextmanager
def _dtype_policy(name: str) -> Iterator[None]:
    previous = keras.mixed_precision.dtype_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _evaluate(
    model: keras.Model,
    history: Mapping[str, list[float]],
    fit_seconds: float,
    settings: TrainSettings,
    *,
    initial_epoch: int = 0,
) -> TrialOutcome:
    epochs_trained = len(history["loss"])  # this trial's own epochs (not a warm start's earlier ones)
    # With early stopping the weights are the best epoch's, so report that epoch's numbers.
    restored = settings.early_stopping_patience > 0 and epochs_trained > 0
    choose = np.argmax if settings.monitor_maximizes else np.argmin
    best = int(choose(history[settings.monitor])) if restored else epochs_trained - 1
    # The validation pass of the reported epoch counted it; no second pass over the images.
    matrix = np.rint(np.asarray(history["val_confusion_counts"][best])).astype(np.int64)
    report = classification_report(matrix)
    return TrialOutcome(
        history={k: [float(v) for v in values] for k, values in history.items() if k in EPOCH_METRICS},
        epochs_trained=epochs_trained,
        best_epoch=initial_epoch + best + 1,
        val_loss=float(history["val_loss"][best]),
        val_accuracy=report.overall_accuracy,
        report=report,
        fit_seconds=fit_seconds,
        model=model,
    )
