"""Shared by the bench scripts: the machine's description, timing helpers, and RESULTS.md."""

from __future__ import annotations

import dataclasses
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def python_path() -> str:
    """PYTHONPATH for a child process: this checkout first, then whatever the parent had (carried wheels)."""
    return os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)


def machine() -> str:
    """Cores, CPU model, device and Keras backend, as one line."""
    from mnist_sweep.environment import cpu_model, device, keras_backend

    return (
        f"{os.cpu_count()} cores, {cpu_model()}, {device()}, Keras backend {keras_backend()}, "
        f"Python {platform.python_version()}"
    )


def load_average() -> str:
    """The 1-minute load average: the machine may be shared while a bench runs."""
    return f"{os.getloadavg()[0]:.2f}"


DEFAULT_TRIAL_PARAMS = {"optimizer": "adam", "learning_rate": 1e-3, "activation": "relu", "dropout": 0.2}


def default_trial_epochs(split: Any, *, batch_size: int, epochs: int) -> tuple[list[float], list[float]]:
    """Seconds of each epoch and the validation accuracy after each, of the default sweep's trial.

    The trial runs as a sweep runs it (mnist_sweep.trial, the default sweep file's train settings) with
    one fixed, good point of its search space; epoch 1 includes tracing and compilation.
    """
    from mnist_sweep.config import load_sweep
    from mnist_sweep.train_settings import TrainSettings
    from mnist_sweep.trial import run_trial

    sweep = TrainSettings.from_config(load_sweep(str(REPO / "sweeps" / "fcn.toml"), []))
    settings = dataclasses.replace(sweep, hidden=(500, 500), epochs=epochs)
    seconds: list[float] = []
    accuracy: list[float] = []
    last = [time.perf_counter()]

    def hook(epoch: int, values: Any) -> None:
        now = time.perf_counter()
        seconds.append(now - last[0])
        accuracy.append(float(values["val_accuracy"]))
        last[0] = now

    params = {**DEFAULT_TRIAL_PARAMS, "batch_size": batch_size}
    last[0] = time.perf_counter()
    run_trial(params=params, split=split, settings=settings, seed=0, epoch_hooks=[hook])
    return seconds, accuracy


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table: what the scripts print and append to RESULTS.md."""

    def cell(value: object) -> str:
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def record(title: str, body: str) -> None:
    """Print the result and append it, with the date, machine and command, to bench/RESULTS.md."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = " ".join(["python", *sys.argv])
    entry = f"\n## {title} — {stamp}\n\nmachine: {machine()}  \ncommand: `{command}`\n\n{body}\n"
    print(entry)
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nAppended by the scripts in bench/; newest last.\n")
    with RESULTS.open("a", encoding="utf-8") as handle:
        handle.write(entry)


def data_dir() -> str:
    location = os.environ.get("MNIST_SWEEP_DATA") or str(REPO.parent / "shared" / "data" / "mnist")
    if not Path(location).exists():
        sys.exit(f"no MNIST at {location}: set MNIST_SWEEP_DATA")
    return location
