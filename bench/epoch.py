"""Epoch time of the 500-500 FCN against its arithmetic floor, for the fit options Keras offers.

floor = FLOP of one epoch / this machine's matmul rate (both measured in this run).
One epoch of 55,000 images: forward 2·(784·500 + 500·500 + 500·10) FLOP per image, backward twice that.

    python bench/epoch.py [--batch-sizes 32 128 256] [--train-limit 0]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from _common import data_dir, record, table

FORWARD_FLOP_PER_IMAGE = 2 * (784 * 500 + 500 * 500 + 500 * 10)
TRAIN_FLOP_PER_IMAGE = 3 * FORWARD_FLOP_PER_IMAGE  # the backward pass costs about twice the forward


def matmul_rate(size: int = 2048, repeats: int = 10) -> float:
    """Sustained float32 matmul FLOP/s through the Keras backend (the kernels fit uses)."""
    import keras

    a = keras.ops.convert_to_tensor(np.random.default_rng(0).random((size, size), dtype=np.float32))
    b = keras.ops.convert_to_tensor(np.random.default_rng(1).random((size, size), dtype=np.float32))
    keras.ops.convert_to_numpy(keras.ops.matmul(a, b))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        keras.ops.convert_to_numpy(keras.ops.matmul(a, b))
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best


class EpochClock:
    """Wall time of each epoch and the validation accuracy after each."""

    def __init__(self) -> None:
        import keras

        outer = self

        class Callback(keras.callbacks.Callback):  # type: ignore[misc]
            def on_epoch_begin(self, epoch: int, logs: Any = None) -> None:
                outer.started = time.perf_counter()

            def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
                outer.seconds.append(time.perf_counter() - outer.started)
                outer.val_accuracy.append(float((logs or {}).get("val_accuracy", float("nan"))))

        self.started = 0.0
        self.seconds: list[float] = []
        self.val_accuracy: list[float] = []
        self.callback = Callback()


def fit_variant(split: Any, batch_size: int, compile_kwargs: dict[str, Any], with_sweep_callback: bool) -> EpochClock:
    """Two epochs; the first pays for tracing and XLA compilation, the second is the steady state."""
    import keras

    from mnist_sweep.model import build_model, build_optimizer
    from mnist_sweep.trial import _EpochCallback, fresh_session

    fresh_session(0)
    model = build_model(hidden=[500, 500], activation="relu")
    model.compile(
        optimizer=build_optimizer(name="adam", learning_rate=1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        **compile_kwargs,
    )
    clock = EpochClock()
    callbacks: list[keras.callbacks.Callback] = [clock.callback]
    if with_sweep_callback:
        callbacks.append(_EpochCallback([]))
    model.fit(
        split.x_train,
        split.y_train,
        batch_size=batch_size,
        epochs=2,
        validation_data=(split.x_val, split.y_val),
        callbacks=callbacks,
        verbose=0,
    )
    return clock


VARIANTS: dict[str, tuple[dict[str, Any], bool]] = {
    "keras default (jit auto = XLA)": ({}, False),
    "jit_compile=False": ({"jit_compile": False}, False),
    "steps_per_execution=16": ({"steps_per_execution": 16}, False),
    "mnist-sweep trial callbacks": ({}, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128, 256])
    parser.add_argument("--train-limit", type=int, default=0, help="0 = all 55,000 training images")
    args = parser.parse_args()

    from mnist_sweep.data import load_split, resolve_source

    split = load_split(resolve_source(data_dir()), validation=5000, train_limit=args.train_limit, seed=0)
    images = len(split.y_train)
    rate = matmul_rate()
    floor = images * TRAIN_FLOP_PER_IMAGE / rate
    rows: list[list[object]] = []
    run: Callable[[int, str], EpochClock] = lambda bs, name: fit_variant(split, bs, *VARIANTS[name])  # noqa: E731
    for batch_size in args.batch_sizes:
        for name in VARIANTS:
            clock = run(batch_size, name)
            steady = clock.seconds[1]
            rows.append([batch_size, name, clock.seconds[0], steady, steady / floor, clock.val_accuracy[0]])
    header = ["batch", "variant", "epoch 1 s (compile)", "epoch 2 s", "epoch 2 / floor", "val acc after epoch 1"]
    body = (
        f"{images} training images; {images * TRAIN_FLOP_PER_IMAGE:.3g} FLOP per epoch; measured matmul rate "
        f"{rate / 1e9:.1f} GFLOP/s (2048² float32 through keras.ops); floor = {floor:.2f} s per epoch.\n\n"
        + table(header, rows)
    )
    record("bench/epoch: epoch time against the arithmetic floor", body)


if __name__ == "__main__":
    main()
