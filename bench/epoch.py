"""Epoch time of the 500-500 FCN against its arithmetic floor, for the fit options Keras offers.

floor = FLOP of one epoch / this machine's matmul rate (both measured in this run).
One epoch of 55,000 images: forward 2·(784·500 + 500·500 + 500·10) FLOP per image, backward twice that.

    python bench/epoch.py [--batch-sizes 64 128 256] [--train-limit 0]
    python bench/epoch.py --only-trial --epochs 3    # only mnist-sweep's two loops (fit, compiled): a short run

Targets (issue 21, TensorFlow, float32): the compiled loop at <= 1.5x the floor at batch 128, <= 2.5x at 64.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from _common import data_dir, load_average, median, record, table

FORWARD_FLOP_PER_IMAGE = 2 * (784 * 500 + 500 * 500 + 500 * 10)
TRAIN_FLOP_PER_IMAGE = 3 * FORWARD_FLOP_PER_IMAGE  # the backward pass costs about twice the forward


def matmul_rate(size: int = 2048, repeats: int = 10, *, clock: Callable[[], float] = time.perf_counter) -> float:
    """Sustained float32 matmul FLOP/s through the Keras backend (the kernels fit uses), by `clock`'s seconds."""
    import keras

    a = keras.ops.convert_to_tensor(np.random.default_rng(0).random((size, size), dtype=np.float32))
    b = keras.ops.convert_to_tensor(np.random.default_rng(1).random((size, size), dtype=np.float32))
    keras.ops.convert_to_numpy(keras.ops.matmul(a, b))  # warm-up
    best = float("inf")
    for _ in range(repeats):
        started = clock()
        keras.ops.convert_to_numpy(keras.ops.matmul(a, b))
        best = min(best, clock() - started)
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
        self.cpu_seconds: list[float] = []  # the process's CPU seconds (its trial rows only)
        self.val_accuracy: list[float] = []
        self.callback = Callback()


def fit_variant(split: Any, batch_size: int, variant: Variant) -> EpochClock:
    """Two epochs; the first pays for tracing and XLA compilation, the second is the steady state."""
    import keras

    from mnist_sweep.model import build_model, build_optimizer
    from mnist_sweep.trial import clean_start

    clean_start(0)  # as a trial run alone starts (fit_trial)
    keras.mixed_precision.set_global_policy(variant.policy)
    try:
        model = build_model(hidden=[500, 500], activation="relu")
        model.compile(
            optimizer=build_optimizer(name="adam", learning_rate=1e-3),
            loss="sparse_categorical_crossentropy",
            metrics=["accuracy"],
            **variant.compile_kwargs,
        )
        clock = EpochClock()
        callbacks: list[keras.callbacks.Callback] = [clock.callback]
        if variant.tf_data:
            import tensorflow as tf

            train = (
                tf.data.Dataset.from_tensor_slices((split.x_train, split.y_train))
                .cache()
                .shuffle(len(split.y_train), seed=0)
                .batch(batch_size)
                .prefetch(tf.data.AUTOTUNE)
            )
            model.fit(train, epochs=2, validation_data=(split.x_val, split.y_val), callbacks=callbacks, verbose=0)
        else:
            model.fit(
                split.x_train,
                split.y_train,
                batch_size=batch_size,
                epochs=2,
                validation_data=(split.x_val, split.y_val),
                callbacks=callbacks,
                verbose=0,
            )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    return clock


def fit_trial(
    split: Any, batch_size: int, *, loop: str = "fit", epochs: int = 2, precision: str = "float32"
) -> EpochClock:
    """The same epochs through mnist-sweep's own trial (its callbacks and defaults), timed by an epoch hook."""
    from mnist_sweep.config import SweepConfig
    from mnist_sweep.train_settings import TrainSettings
    from mnist_sweep.trial import run_trial

    clock = EpochClock()
    last = [time.perf_counter(), time.process_time()]

    def hook(epoch: int, values: Any) -> None:
        now = [time.perf_counter(), time.process_time()]
        clock.seconds.append(now[0] - last[0])
        clock.cpu_seconds.append(now[1] - last[1])
        clock.val_accuracy.append(float(values["val_accuracy"]))
        last[:] = now

    defaults = TrainSettings.from_config(SweepConfig())
    settings = dataclasses.replace(
        defaults, hidden=(500, 500), epochs=epochs, steps_per_execution=16, loop=loop, precision=precision
    )
    run_trial(params={**PARAMS, "batch_size": batch_size}, split=split, settings=settings, seed=0, epoch_hooks=[hook])
    return clock


PARAMS = {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 128, "activation": "relu"}


@dataclass(frozen=True)
class Variant:
    compile_kwargs: dict[str, Any] = field(default_factory=dict)
    tf_data: bool = False  # a cached, shuffled, prefetched tf.data pipeline instead of NumPy arrays
    policy: str = "float32"


VARIANTS: dict[str, Variant] = {
    "keras default (jit auto = XLA)": Variant(),
    "jit_compile=False": Variant({"jit_compile": False}),
    "steps_per_execution=16": Variant({"steps_per_execution": 16}),
    "steps_per_execution=64": Variant({"steps_per_execution": 64}),
    "tf.data pipeline, steps_per_execution=16": Variant({"steps_per_execution": 16}, tf_data=True),
    "mixed_bfloat16 (AMX), steps_per_execution=16": Variant({"steps_per_execution": 16}, policy="mixed_bfloat16"),
}
TRIAL = "mnist-sweep trial (its defaults: XLA, steps_per_execution=16)"
COMPILED = "mnist-sweep trial, train.loop = compiled (one XLA loop per epoch)"
COMPILED_BF16 = "mnist-sweep trial, train.loop = compiled, train.precision = mixed_bfloat16 (AMX)"
TARGETS = {128: 1.5, 64: 2.5}  # the compiled loop's epoch against the floor (issue 21)


THREADS = [(2, 1), (1, 1)]  # (intra-op, inter-op) against TensorFlow's default of one pool per core


def with_threads(batch_size: int, intra: int, inter: int, train_limit: int, epochs: int) -> EpochClock:
    """Thread pools are fixed when TensorFlow starts, so each setting runs in a process of its own."""
    command = [sys.executable, __file__, "--batch-sizes", str(batch_size), "--train-limit", str(train_limit)]
    command += ["--epochs", str(epochs)]
    command += ["--threads-child", str(intra), str(inter)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    child = json.loads(output.strip().splitlines()[-1])
    clock = EpochClock()
    clock.seconds, clock.val_accuracy = child["seconds"], child["val_accuracy"]
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--epochs", type=int, default=2, help="per row; the steady epoch is the median after the first")
    parser.add_argument("--only-trial", action="store_true", help="only the trial's fit and compiled loops")
    parser.add_argument("--train-limit", type=int, default=0, help="0 = all 55,000 training images")
    parser.add_argument("--threads-child", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()

    from mnist_sweep.environment import keras_backend

    if keras_backend() != "tensorflow":  # tf.data, thread pools and XLA's auto-jit are TensorFlow's options
        sys.exit(f"bench/epoch.py compares TensorFlow fit options, not {keras_backend()}: see bench/backends.py")

    from mnist_sweep.data import load_split, resolve_source

    split = load_split(resolve_source(data_dir()), validation=5000, train_limit=args.train_limit, seed=0)
    if args.threads_child:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(args.threads_child[0])
        tf.config.threading.set_inter_op_parallelism_threads(args.threads_child[1])
        clock = fit_trial(split, args.batch_sizes[0], epochs=args.epochs)
        print(json.dumps({"seconds": clock.seconds, "val_accuracy": clock.val_accuracy}))
        return
    images = len(split.y_train)
    rate = matmul_rate()
    floor = images * TRAIN_FLOP_PER_IMAGE / rate
    rows: list[list[object]] = []
    run: Callable[[int, str], EpochClock] = lambda bs, name: (  # noqa: E731
        fit_trial(split, bs, epochs=args.epochs)
        if name == TRIAL
        else fit_trial(split, bs, loop="compiled", epochs=args.epochs)
        if name == COMPILED
        else fit_trial(split, bs, loop="compiled", epochs=args.epochs, precision="mixed_bfloat16")
        if name == COMPILED_BF16
        else fit_variant(split, bs, VARIANTS[name])
    )
    names = [TRIAL, COMPILED, COMPILED_BF16] if args.only_trial else [*VARIANTS, TRIAL, COMPILED, COMPILED_BF16]
    # Each row's floor is measured just before it, in wall and in CPU seconds: on a shared machine the load
    # changes between rows, and CPU seconds (the process's own) hide most of it.
    floors: dict[tuple[int, str], tuple[float, float]] = {}
    flop = images * TRAIN_FLOP_PER_IMAGE
    for batch_size in args.batch_sizes:
        clocks = {}
        for name in names:
            floors[batch_size, name] = (
                flop / matmul_rate(repeats=5),
                flop / matmul_rate(repeats=5, clock=time.process_time),
            )
            clocks[name] = run(batch_size, name)
        for intra, inter in [] if args.only_trial else THREADS:
            name = f"mnist-sweep trial, {intra} intra-op / {inter} inter-op threads"
            clocks[name] = with_threads(batch_size, intra, inter, args.train_limit, args.epochs)
        for name, clock in clocks.items():
            steady = median(clock.seconds[1:])
            target = f"≤ {TARGETS[batch_size]}" if name == COMPILED and batch_size in TARGETS else ""
            wall_floor, cpu_floor = floors.get((batch_size, name), (floor, float("nan")))
            cpu = median(clock.cpu_seconds[1:]) / cpu_floor if clock.cpu_seconds else float("nan")
            row = [batch_size, name, clock.seconds[0], steady, wall_floor, steady / wall_floor, cpu, target]
            rows.append([*row, clock.val_accuracy[0]])
    header = ["batch", "variant", "epoch 1 s (compile)", "later epochs s (median)", "floor s", "÷ floor"]
    header += ["CPU s ÷ CPU floor", "target", "val acc 1"]
    body = (
        f"{images} training images; {flop:.3g} FLOP per epoch; measured matmul rate "
        f"{rate / 1e9:.1f} GFLOP/s (2048² float32 through keras.ops) at the start: floor = {floor:.2f} s per epoch. "
        "Each row's own floor is measured just before it, by the wall clock and by the process's CPU seconds. "
        f"Each row: a fresh model, {args.epochs} epochs; epoch 1 pays for tracing and compilation. "
        f"1-minute load average at the end: {load_average()} on {os.cpu_count()} cores.\n\n" + table(header, rows)
    )
    record("bench/epoch: epoch time against the arithmetic floor", body)


if __name__ == "__main__":
    main()
