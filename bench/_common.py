"""Shared by the bench scripts: the machine's description, timing helpers, and RESULTS.md."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "RESULTS.md"
sys.path.insert(0, str(REPO))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def machine() -> str:
    """Cores, CPU model and accelerator, as one line."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    accelerator = "no GPU"
    if "keras" in sys.modules:
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_physical_devices("GPU")
            accelerator = ", ".join(g.name for g in gpus) or "no GPU"
    return f"{os.cpu_count()} cores, {cpu}, {accelerator}, Python {platform.python_version()}"


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
