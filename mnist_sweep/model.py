"""The lecture's fully connected network, built from a dict of hyperparameters."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import keras

from mnist_sweep.config import OPTIMIZERS, Hyperparameters
from mnist_sweep.data import IMAGE_SIDE, NUM_CLASSES


def build_model(
    *,
    hidden: Sequence[int],
    activation: str,
    dropout: float = 0.0,
    weight_decay: float = 0.0,
) -> keras.Model:
    """784 -> hidden... -> 10 softmax; dropout after each hidden layer and L2 on the kernels if > 0."""
    regularizer = keras.regularizers.L2(weight_decay) if weight_decay > 0 else None
    layers: list[keras.layers.Layer] = [keras.Input(shape=(IMAGE_SIDE, IMAGE_SIDE)), keras.layers.Flatten()]
    for units in hidden:
        layers.append(keras.layers.Dense(units, activation=activation, kernel_regularizer=regularizer))
        if dropout > 0:
            layers.append(keras.layers.Dropout(dropout))
    # float32 softmax even under a mixed-precision policy: stable probabilities and loss.
    layers.append(keras.layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32"))
    return keras.Sequential(layers, name="fcn")


def build_optimizer(
    *, name: str, learning_rate: float | keras.optimizers.schedules.LearningRateSchedule, momentum: float = 0.0
) -> keras.optimizers.Optimizer:
    """The optimizer by its sweep-file name; momentum applies to sgd and rmsprop only."""
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)
    if name == "rmsprop":
        return keras.optimizers.RMSprop(learning_rate=learning_rate, momentum=momentum)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if name == "adamw":
        return keras.optimizers.AdamW(learning_rate=learning_rate)
    if name == "nadam":
        return keras.optimizers.Nadam(learning_rate=learning_rate)
    raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


def learning_rate(
    initial: float, *, schedule: str, total_steps: int
) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """Cosine decay to 1 % of the rate over the whole training run; otherwise the rate itself ("constant", and
    "plateau", whose callback lowers it during training)."""
    if schedule == "cosine":
        return keras.optimizers.schedules.CosineDecay(initial, decay_steps=max(total_steps, 1), alpha=0.01)
    return initial


def compiled_model(
    params: Hyperparameters | Mapping[str, object],
    hidden: Sequence[int],
    *,
    schedule: str = "constant",
    total_steps: int = 1,
    steps_per_execution: int = 1,
    metrics: Sequence[str | keras.metrics.Metric] = ("accuracy",),
) -> keras.Model:
    """A fresh, compiled model for one trial's hyperparameters (a key `params` lacks: [search]'s fixed default)."""
    point = params if isinstance(params, Hyperparameters) else Hyperparameters.of(params)
    model = build_model(
        hidden=hidden, activation=point.activation, dropout=point.dropout, weight_decay=point.weight_decay
    )
    rate = learning_rate(point.learning_rate, schedule=schedule, total_steps=total_steps)
    optimizer = build_optimizer(name=point.optimizer, learning_rate=rate, momentum=point.momentum)
    model.compile(
        optimizer=optimizer,
        loss="sparse_categorical_crossentropy",
        metrics=list(metrics),
        steps_per_execution=supported_steps_per_execution(steps_per_execution),
    )
    return model


def supported_steps_per_execution(requested: int) -> int:
    """The requested steps per execution; 1 under torch, where Keras runs one step at a time only.

    A speed setting, not a hyperparameter: the numbers trained are the same either way.
    """
    return 1 if keras.backend.backend() == "torch" else requested
