"""The machine a sweep runs on: the Keras backend, its GPUs (or the CPU model), and package versions.

Importing this module imports nothing heavy. `prepare_backend` is called once by the training commands
before Keras is imported: it sizes the thread pools, numbers the GPUs as nvidia-smi does, lets several
workers share one GPU and keeps TensorFlow out of a process that trains with another backend.

GPUs are found by the backend (TensorFlow's or JAX's device list, torch's CUDA count): a GPU it cannot use
is none. nvidia-smi only adds names and memory. A process that must know before it loads its backend
(`run --workers N` planning its workers) asks a child process: `python -m mnist_sweep.environment`.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import platform
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mnist_sweep.placement import THREADS_CPU_LIMIT

BACKEND_PACKAGES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
REPORTED_PACKAGES = ("keras", "optuna", "mlflow", "numpy", "pandas", "plotly")
GIB = 1024**3
PROBE_SECONDS = 300  # a first TensorFlow import on a cold disk takes a while


@dataclass(frozen=True)
class Gpu:
    """One GPU this process trains on."""

    name: str
    memory_bytes: int | None = None  # total memory, where the backend or nvidia-smi tells it

    def describe(self) -> str:
        return self.name if self.memory_bytes is None else f"{self.name}, {self.memory_bytes / GIB:.0f} GiB"


# --------------------------------------------------------------------------- the Keras backend


def keras_backend() -> str:
    """The backend Keras uses (or will use): asked of Keras once loaded, else read as Keras reads it."""
    if "keras" in sys.modules:
        import keras

        return str(keras.backend.backend())
    chosen = os.environ.get("KERAS_BACKEND")
    if chosen:
        return chosen
    home = os.environ.get("KERAS_HOME") or str(Path.home() / ".keras")
    try:
        configured = json.loads((Path(home) / "keras.json").read_text(encoding="utf-8")).get("backend")
    except (OSError, ValueError, AttributeError):
        configured = None
    return str(configured or "tensorflow")


def prepare_backend(threads_policy: str = THREADS_CPU_LIMIT) -> str:
    """Set the process up for its Keras backend before Keras is imported; returns the backend's name.

    - Its thread pools are sized by the study's thread policy (placement.size_threads).
    - GPUs are shared: JAX allocates as it needs instead of taking 75 % of the GPU at start
      (XLA_PYTHON_CLIENT_PREALLOCATE), TensorFlow grows its memory (set_memory_growth); torch
      allocates on demand already. So several workers can train on one GPU.
    - With another backend, TensorFlow is hidden: Keras imports it whenever it is installed (to seed
      it in set_random_seed, to serialise TensorShapes when saving), which costs seconds, a GiB of
      memory and CUDA start-up noise. Hidden, this process runs exactly as on a machine without it.
    """
    from mnist_sweep.placement import size_threads

    # Its cores (a local worker of `run --workers N`) and its threads, before the thread pools are sized.
    size_threads(threads_policy)
    set_device_order()
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")  # as set_memory_growth, for every GPU
    backend = keras_backend()
    if backend != "tensorflow":
        # Python's own way to make a module absent: `import` raises ModuleNotFoundError and
        # importlib.util.find_spec answers None, as where it is not installed.
        sys.modules.setdefault("tensorflow", None)  # type: ignore[arg-type]
    import keras

    backend = str(keras.backend.backend())
    if backend == "tensorflow":
        _tensorflow_memory_growth()
    return backend


def _tensorflow_memory_growth() -> None:
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        with contextlib.suppress(RuntimeError):  # initialised already: its growth can no longer change
            tf.config.experimental.set_memory_growth(gpu, True)


# MLflow's settings it reads from the environment when used. A tracking server that does not answer costs
# seconds, not MLflow's default minutes of retries. With a server MLflow prints two "View run ... at" lines per
# run to stdout: one per trial, between ours, and through --quiet (the printed UI URL and `mnist-sweep ui` say
# where to look). Downloading a model for scoring prints one line per step, not a progress bar.
MLFLOW_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


def set_mlflow_defaults() -> None:
    """MLFLOW_DEFAULTS, each where the user's environment does not say otherwise: before MLflow is used."""
    for name, value in MLFLOW_DEFAULTS.items():
        os.environ.setdefault(name, value)


def set_device_order() -> None:
    """CUDA numbers GPUs fastest first unless told otherwise; nvidia-smi, by PCI bus. Told, the numbers
    in CUDA_VISIBLE_DEVICES, nvidia-smi's rows and the backend's devices name the same cards (here and in
    every child, which inherits it)."""
    os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"


# --------------------------------------------------------------------------- the device


def gpus() -> list[Gpu]:
    """The GPUs this process trains on (those CUDA_VISIBLE_DEVICES leaves it).

    Asked of the Keras backend when Keras is loaded: a GPU that the backend cannot use (a CPU-only
    wheel, a missing CUDA library) is not one it trains on. Otherwise nvidia-smi answers, without
    importing anything.
    """
    if "keras" not in sys.modules:
        return visible_nvidia_gpus()
    backend = keras_backend()
    if backend == "torch":
        import torch

        if not torch.cuda.is_available():
            return []
        properties = [torch.cuda.get_device_properties(i) for i in range(torch.cuda.device_count())]
        return [Gpu(str(p.name), int(p.total_memory)) for p in properties]
    if backend == "jax":
        import jax

        names = [str(d.device_kind) for d in jax.devices() if d.platform == "gpu"]
    elif backend == "tensorflow":
        import tensorflow as tf

        found = tf.config.list_physical_devices("GPU")
        names = [str(tf.config.experimental.get_device_details(d).get("device_name", d.name)) for d in found]
    else:
        return visible_nvidia_gpus()
    return _with_memory(names, visible_nvidia_gpus())


GPU_DEVICE_NODES = ("/dev/nvidia[0-9]*", "/dev/dxg", "/dev/kfd")  # CUDA, CUDA under WSL2, ROCm


def gpu_device_nodes() -> bool:
    """Whether this machine (container) has the device files any GPU needs: without them no backend finds
    one, and asking it costs a backend import for nothing."""
    return any(glob.glob(pattern) for pattern in GPU_DEVICE_NODES)


def backend_gpus_in_child() -> list[Gpu]:
    """The GPUs the Keras backend finds, asked of a child process: this one loads no backend before it has
    pinned itself and sized its threads. Costs one backend import (measured in docs/backends.md)."""
    from mnist_sweep.errors import CommandError

    set_device_order()
    command = [sys.executable, "-m", "mnist_sweep.environment"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=PROBE_SECONDS)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CommandError(f"the GPU probe (python -m mnist_sweep.environment) did not answer: {exc}") from None
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise CommandError(f"the GPU probe (python -m mnist_sweep.environment) failed: {last}")
    return [Gpu(str(g["name"]), g.get("memory_bytes")) for g in json.loads(lines[-1])]


def _with_memory(names: Sequence[str], smi: Sequence[Gpu]) -> list[Gpu]:
    """The backend's GPU names, with nvidia-smi's memory where both list the GPUs in the same order."""
    if [g.name for g in smi] == list(names):
        return list(smi)
    return [Gpu(name) for name in names]


def visible_nvidia_gpus() -> list[Gpu]:
    """nvidia-smi's GPUs, less those CUDA_VISIBLE_DEVICES hides; [] without nvidia-smi."""
    if shutil.which("nvidia-smi") is None:
        return []
    query = ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total", "--format=csv,noheader,nounits"]
    try:
        found = subprocess.run(query, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return []
    if found.returncode != 0:
        return []
    return parse_nvidia_smi(found.stdout, os.environ.get("CUDA_VISIBLE_DEVICES"))


def parse_nvidia_smi(text: str, visible: str | None) -> list[Gpu]:
    """Rows of `index, uuid, name, memory MiB`, in CUDA_VISIBLE_DEVICES order when it is set."""
    rows = [[cell.strip() for cell in line.split(",")] for line in text.splitlines() if line.count(",") >= 3]
    by_key: dict[str, Gpu] = {}
    ordered: list[Gpu] = []
    for index, uuid, name, memory in ((r[0], r[1], ",".join(r[2:-1]), r[-1]) for r in rows):
        gpu = Gpu(name, int(float(memory) * 1024**2) if memory.replace(".", "", 1).isdigit() else None)
        by_key[index] = by_key[uuid] = gpu
        ordered.append(gpu)
    if visible is None:
        return ordered
    chosen: list[Gpu] = []
    for key in (k.strip() for k in visible.split(",")):
        match = by_key.get(key) or next((g for u, g in by_key.items() if key and u.startswith(key)), None)
        if match is None:  # CUDA stops at the first device it cannot find
            break
        chosen.append(match)
    return chosen


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device(found: Sequence[Gpu] | None = None) -> str:
    """'GPU: <name, memory>' (several joined by '; ') or 'CPU: <model>'."""
    found = gpus() if found is None else found
    return "GPU: " + "; ".join(g.describe() for g in found) if found else f"CPU: {cpu_model()}"


def device_line(found: Sequence[Gpu]) -> str:
    """The one line a training process prints at start."""
    if not found:
        return f"no GPU found, training on CPU ({cpu_model()})"
    return "training on GPU: " + "; ".join(g.describe() for g in found)


# --------------------------------------------------------------------------- the whole environment


def package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def environment() -> dict[str, str]:
    """Python, the Keras backend and its package, the device and package versions."""
    backend = keras_backend()
    packages = {name: package_version(name) for name in ("keras", BACKEND_PACKAGES.get(backend, backend))}
    packages.update({name: package_version(name) for name in REPORTED_PACKAGES})
    return {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "device": device(),
        "keras_backend": backend,
        **packages,
    }


if __name__ == "__main__":  # the GPU probe: this process loads the backend so that its parent need not
    prepare_backend()
    print(json.dumps([{"name": g.name, "memory_bytes": g.memory_bytes} for g in gpus()]), flush=True)
