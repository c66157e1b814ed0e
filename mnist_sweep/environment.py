"""The machine a sweep runs on: the Keras backend, its GPUs (or the CPU model), and package versions.

Importing this module imports nothing heavy. `prepare_backend` is called once by the training commands
before Keras is imported: it lets several workers share one GPU and keeps TensorFlow out of a process
that trains with another backend.
"""

from __future__ import annotations

import contextlib
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

BACKEND_PACKAGES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}
REPORTED_PACKAGES = ("keras", "optuna", "mlflow", "numpy", "pandas", "plotly")
GIB = 1024**3


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


def prepare_backend() -> str:
    """Set the process up for its Keras backend before Keras is imported; returns the backend's name.

    - GPUs are shared: JAX allocates as it needs instead of taking 75 % of the GPU at start
      (XLA_PYTHON_CLIENT_PREALLOCATE), TensorFlow grows its memory (set_memory_growth); torch
      allocates on demand already. So several workers can train on one GPU.
    - With another backend, TensorFlow is hidden: Keras imports it whenever it is installed (to seed
      it in set_random_seed, to serialise TensorShapes when saving), which costs seconds, a GiB of
      memory and CUDA start-up noise. Hidden, this process runs exactly as on a machine without it.
    """
    from mnist_sweep.placement import pin_this_process

    pin_this_process()  # a local worker of `run --workers N`: its cores, before the thread pools are sized
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
