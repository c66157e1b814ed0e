"""`--workers auto`: the number of local workers that trains fastest on this machine, measured, not guessed.

The probe trains the sweep's network on random images at each of the sweep's batch sizes, once as one
process on all the cores (or one per GPU) and once as one process per core (or two per GPU), all of them
at the same time, and compares the samples per second of the two layouts. The answer is kept in
`packing.json` beside the study's sqlite store (mlruns/ otherwise), keyed by machine, cores, GPUs, Keras
backend and network, so it is measured once per machine and backend: delete the file to measure again.

Run as `python -m mnist_sweep.packing JSON`, this module is one probe process (placement.py pins it).
"""

from __future__ import annotations

import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from mnist_sweep import interrupt
from mnist_sweep.config import Choice, SweepConfig
from mnist_sweep.console import Echo
from mnist_sweep.databases import sqlite_file
from mnist_sweep.placement import Placement, cpu_list, plan

CACHE_NAME = "packing.json"
PROBE_SAMPLES = 16_384  # per batch size and process, timed after a warm-up pass that compiles
PROBE_REPEATS = 2


@dataclass(frozen=True)
class Measured:
    """Samples per second of all of a layout's processes together, per batch size."""

    workers: int
    throughput: dict[int, float]


def candidate_layouts(cpus: Sequence[int], gpu_ids: Sequence[str]) -> list[tuple[int, list[Placement]]]:
    """(workers for the whole machine, the processes the probe runs) for one and for several per device.

    On GPUs, the first GPU stands for all: 1 or 2 processes on it, times the number of GPUs.
    """
    if gpu_ids:
        return [(n * len(gpu_ids), plan(n, cpus=cpus, gpu_ids=gpu_ids[:1])) for n in (1, 2)]
    if len(cpus) < 2:
        return [(1, plan(1, cpus=cpus, gpu_ids=()))]
    return [(1, plan(1, cpus=cpus, gpu_ids=())), (len(cpus), plan(len(cpus), cpus=cpus, gpu_ids=()))]


def choose(measured: Sequence[Measured], batch_sizes: Sequence[int]) -> tuple[int, str]:
    """The layout that trains the sweep's batch sizes fastest (the mean time per sample), and why."""

    def seconds_per_sample(m: Measured) -> float:
        return statistics.fmean(1.0 / m.throughput[b] for b in batch_sizes)

    ranked = sorted(measured, key=seconds_per_sample)
    best = ranked[0]
    if len(ranked) == 1:
        return best.workers, "one core: no other layout to measure"
    single = next(m for m in measured if m.workers == min(x.workers for x in measured))
    speedup = seconds_per_sample(single) / seconds_per_sample(best)
    per_batch = ", ".join(f"{b}: {m.throughput[b]:.0f}/s" for m in measured for b in batch_sizes if m is best)
    base = ", ".join(f"{b}: {single.throughput[b]:.0f}/s" for b in batch_sizes)
    return best.workers, (
        f"{speedup:.2f}x the samples per second of {single.workers} worker(s) over batch sizes "
        f"{', '.join(map(str, batch_sizes))} ({best.workers} workers: {per_batch}; {single.workers}: {base})"
    )


def sweep_batch_sizes(cfg: SweepConfig) -> list[int]:
    spec = cfg.search.batch_size
    if isinstance(spec, Choice):
        return sorted(int(v) for v in spec.values)
    return sorted({int(spec.low), int(spec.high)})


def cache_file(cfg: SweepConfig) -> Path:
    database = sqlite_file(cfg.study.storage)
    return (database.parent if database is not None else Path("mlruns")) / CACHE_NAME


def machine_key(cfg: SweepConfig, cpus: Sequence[int], gpu_ids: Sequence[str]) -> str:
    from mnist_sweep.environment import cpu_model, keras_backend, package_version, visible_nvidia_gpus

    gpus = "; ".join(g.describe() for g in visible_nvidia_gpus()) if gpu_ids else "none"
    network = "-".join(map(str, cfg.model.hidden))
    return (
        f"{cpu_model()} | cores {cpu_list(cpus)} | GPUs {gpus} | {keras_backend()} "
        f"(keras {package_version('keras')}) | {network}, steps_per_execution {cfg.train.steps_per_execution}"
    )


def resolve_auto(cfg: SweepConfig, *, cpus: Sequence[int], gpu_ids: Sequence[str], echo: Echo) -> int:
    """The measured best worker count: from the cache, or measured now (about a minute) and cached."""
    batch_sizes = sweep_batch_sizes(cfg)
    path, key = cache_file(cfg), machine_key(cfg, cpus, gpu_ids)
    cache = _read(path)
    entry = cache.get(key, {})
    measured = [Measured(int(n), {int(b): v for b, v in t.items()}) for n, t in entry.get("layouts", {}).items()]
    fresh = not measured or any(b not in m.throughput for m in measured for b in batch_sizes)
    if fresh:
        echo(f"workers auto: measuring 1 vs several workers at batch sizes {batch_sizes} (once for this machine)")
        measured = [
            Measured(n, measure(layout, cfg, batch_sizes=batch_sizes)) for n, layout in candidate_layouts(cpus, gpu_ids)
        ]
        entry = {"measured_at": time.strftime("%Y-%m-%d %H:%M"), "layouts": {m.workers: m.throughput for m in measured}}
        cache[key] = entry
        _write(path, cache)
    workers, why = choose(measured, batch_sizes)
    source = "measured now" if fresh else f"measured {entry.get('measured_at', '')}"
    echo(f"workers auto: {workers}, {why}; {source}, kept in {path}")
    return workers


def _read(path: Path) -> dict[str, Any]:
    try:
        found = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _write(path: Path, cache: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")
    partial.write_text(json.dumps(cache, indent=1), encoding="utf-8")
    partial.replace(path)  # readers see the old file or the new one, never half of one


def measure(
    layout: Sequence[Placement], cfg: SweepConfig, *, batch_sizes: Sequence[int], samples: int = PROBE_SAMPLES
) -> dict[int, float]:
    """Samples per second of the layout's processes running at once, summed, per batch size."""
    job = {
        "batch_sizes": list(batch_sizes),
        "samples": samples,
        "hidden": list(cfg.model.hidden),
        "steps_per_execution": cfg.train.steps_per_execution,
    }
    command = [sys.executable, "-m", "mnist_sweep.packing", json.dumps(job)]
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in layout]  # TensorFlow's start-up lines
        processes = [
            subprocess.Popen(
                command, env={**os.environ, **p.environment()}, stdout=subprocess.PIPE, stderr=log, text=True
            )
            for p, log in zip(layout, logs, strict=True)
        ]
        try:
            interrupt.poll(lambda: True if all(p.poll() is not None for p in processes) else None, every=0.2)
        finally:
            for process in processes:
                if process.poll() is None:
                    process.kill()
        seconds = [_probe_result(process, log) for process, log in zip(processes, logs, strict=True)]
    return {b: sum(samples / s[b] for s in seconds) for b in batch_sizes}


def _probe_result(process: subprocess.Popen[str], log: IO[str]) -> dict[int, float]:
    out = process.stdout.read() if process.stdout is not None else ""
    if process.returncode != 0 or not out.strip():
        log.seek(0)
        last = (log.read().strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the packing probe failed (exit {process.returncode}): {last}")
    return {int(b): float(s) for b, s in json.loads(out.strip().splitlines()[-1]).items()}


def probe(job: dict[str, Any]) -> dict[int, float]:
    """In a probe process: seconds to train `samples` random images at each batch size (after a warm-up)."""
    import numpy as np

    from mnist_sweep.environment import prepare_backend

    prepare_backend()  # pinned to its share, its threads sized to it
    from mnist_sweep.model import compiled_model

    rng = np.random.default_rng(0)
    samples = int(job["samples"])
    x = rng.random((samples, 28, 28), dtype=np.float32)
    y = rng.integers(0, 10, size=samples)
    params = {"optimizer": "adam", "learning_rate": 1e-3, "activation": "relu"}
    seconds: dict[int, float] = {}
    for batch in job["batch_sizes"]:
        point = {**params, "batch_size": batch}
        model = compiled_model(point, job["hidden"], steps_per_execution=int(job["steps_per_execution"]))
        warm = min(samples, batch * int(job["steps_per_execution"]) * 2)
        model.fit(x[:warm], y[:warm], batch_size=batch, epochs=1, verbose=0)
        passes = []
        for _ in range(PROBE_REPEATS):  # the fastest pass: the least disturbed by whatever else runs
            started = time.perf_counter()
            model.fit(x, y, batch_size=batch, epochs=1, verbose=0, shuffle=False)
            passes.append(time.perf_counter() - started)
        seconds[batch] = min(passes)
    return seconds


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    print(json.dumps(probe(json.loads(sys.argv[1]))), flush=True)
