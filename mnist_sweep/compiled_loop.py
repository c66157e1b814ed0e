"""`train.loop = "compiled"`: model.fit's epochs, each as one XLA-compiled loop over device-resident data.

model.fit pays a Python round trip, a data-pipeline hop and a callback dispatch per `steps_per_execution`
batches; for a network this small that is most of an epoch (bench/epoch.py). Here the training and validation
images are converted to tensors once per trial, an epoch's shuffled order goes in as one (steps, batch) array
of indices, and one `tf.function(jit_compile=True)` runs Keras' own `train_step` over all of them in a
`tf.while_loop`; the validation pass is one `test_step` over all the validation images. Everything fit's
callbacks see is kept:
the same logs (loss, accuracy, the confusion counts, their val_ twins) at each epoch's end, the same Keras
callbacks (hooks, plateau, early stopping, History) through Keras' CallbackList, and the optimizer's step
counter drives the learning-rate schedule as in fit. The batch hooks, the Ctrl-C check and the per-batch
divergence check run once per epoch instead of once per `steps_per_execution` batches.

TensorFlow only: trial.py calls this where Keras runs on TensorFlow and uses fit elsewhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from mnist_sweep.data import Split


def fit_compiled(
    model: keras.Model,
    split: Split,
    *,
    batch_size: int,
    epochs: int,
    initial_epoch: int,
    callbacks: Sequence[keras.callbacks.Callback],
    seed: int,
) -> dict[str, list[Any]]:
    """Train like `model.fit(..., validation_data=(x_val, y_val), shuffle=True)`; returns the History dict."""
    # Copied once per trial to the default device (the GPU where there is one) and kept there for every epoch.
    x_train, y_train, x_val, y_val = (
        tf.identity(tf.convert_to_tensor(array)) for array in (split.x_train, split.y_train, split.x_val, split.y_val)
    )
    _build(model, split)
    train = _traced(_steps(model.train_step), jit=True)
    # The last, partial batch is one step: traced, not XLA-compiled, which would cost more than it saves.
    # Validation likewise, as one batch of all its images: the same mean loss, accuracy and counts as fit's
    # batches give, and one forward pass is no loop to compile.
    train_one = _traced(lambda x, y: model.train_step((x, y)), jit=False)
    validate = _traced(lambda x, y: model.test_step((x, y)), jit=False)
    steps = -(-len(split.y_train) // batch_size)
    full = len(split.y_train) // batch_size * batch_size
    hooks = keras.callbacks.CallbackList(list(callbacks), add_history=True, model=model, epochs=epochs, steps=steps)
    model.stop_training = False
    hooks.on_train_begin()
    epoch_logs: dict[str, Any] = {}
    for epoch in range(initial_epoch, epochs):
        model.reset_metrics()
        hooks.on_epoch_begin(epoch)
        # Its own order each epoch, the same for a given trial seed and epoch (a warm start goes on from there).
        order = np.random.default_rng([seed, epoch]).permutation(len(split.y_train)).astype(np.int32)
        if full:
            train(x_train, y_train, tf.constant(order[:full].reshape(-1, batch_size)))
        if full < len(order):
            rest = tf.constant(order[full:])
            train_one(tf.gather(x_train, rest), tf.gather(y_train, rest))
        train_logs = model.get_metrics_result()
        hooks.on_train_batch_end(steps - 1, train_logs)  # once per epoch: the hooks' display, Ctrl-C, divergence
        epoch_logs = dict(train_logs)
        model.reset_metrics()
        validate(x_val, y_val)
        epoch_logs.update({f"val_{name}": value for name, value in model.get_metrics_result().items()})
        hooks.on_epoch_end(epoch, epoch_logs)
        if model.stop_training:
            break
    model.optimizer.finalize_variable_values(model.trainable_weights)  # as fit ends (weight averaging, if any)
    hooks.on_train_end(logs=epoch_logs)
    history: dict[str, list[Any]] = model.history.history
    return history


def _build(model: keras.Model, split: Split) -> None:
    """The optimizer's and the compiled loss's and metrics' variables, made before any function is traced."""
    model.optimizer.build(model.trainable_variables)
    model.test_step((split.x_val[:1], split.y_val[:1]))  # eager, one image: builds the loss and metric objects
    model.reset_metrics()


def _steps(step: Callable[[Any], Any]) -> Callable[[tf.Tensor, tf.Tensor, tf.Tensor], None]:
    """`step` over every row of an int32 (steps, batch) tensor of row indices, in one tf.while_loop."""

    def run(x: tf.Tensor, y: tf.Tensor, indices: tf.Tensor) -> None:
        def body(i: tf.Tensor) -> tf.Tensor:
            rows = indices[i]
            step((tf.gather(x, rows), tf.gather(y, rows)))
            return i + 1

        # One step after another: each reads the weights the previous one wrote.
        tf.while_loop(lambda i: i < tf.shape(indices)[0], body, [tf.constant(0)], parallel_iterations=1)

    return run


def _traced(function: Callable[..., Any], *, jit: bool) -> Callable[..., Any]:
    """`function` as one TensorFlow graph per shape of its tensor arguments (XLA-compiled with `jit`).

    Keras' step code runs as written (no AutoGraph), as under fit. The graphs are called directly: a sweep traces
    this same code for every trial, which tf.function's call counter would report as excessive retracing.
    """
    graph = tf.function(tf.autograph.experimental.do_not_convert(function), jit_compile=jit)
    traced: dict[tuple[tuple[int, ...], ...], Any] = {}

    def call(*tensors: tf.Tensor) -> Any:
        shapes = tuple(tuple(tensor.shape) for tensor in tensors)
        if shapes not in traced:
            traced[shapes] = graph.get_concrete_function(*tensors)
        return traced[shapes](*tensors)

    return call
