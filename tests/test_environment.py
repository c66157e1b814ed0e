"""The machine probe: Keras backend, GPUs given by CUDA_VISIBLE_DEVICES, the start-up line, bench/gpu.py."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mnist_sweep import environment
from mnist_sweep.environment import GIB, Gpu, device, device_line, parse_nvidia_smi
from tests.conftest import REPO, cli_environment, mnist_location

SMI = """0, GPU-1111aaaa-0000-0000-0000-000000000000, NVIDIA H200, 143771
1, GPU-2222bbbb-0000-0000-0000-000000000000, NVIDIA A100-SXM4-80GB, 81920
"""
H200 = Gpu("NVIDIA H200", 143771 * 1024**2)
A100 = Gpu("NVIDIA A100-SXM4-80GB", 81920 * 1024**2)


@pytest.mark.parametrize(
    ("visible", "expected"),
    [
        (None, [H200, A100]),  # not set: every GPU
        ("", []),  # set empty: none, as CUDA does
        ("-1", []),
        ("1", [A100]),
        ("1,0", [A100, H200]),  # CUDA's order is the variable's order
        ("GPU-2222bbbb", [A100]),  # a UUID prefix
        ("0,7,1", [H200]),  # CUDA stops at the first device it cannot find
    ],
)
def test_the_gpus_are_those_cuda_visible_devices_gives(visible: str | None, expected: list[Gpu]) -> None:
    assert parse_nvidia_smi(SMI, visible) == expected


def test_device_names_the_gpu_and_its_memory_or_the_cpu_model() -> None:
    assert Gpu("NVIDIA H200", 140 * GIB).describe() == "NVIDIA H200, 140 GiB"
    assert device([H200]) == "GPU: NVIDIA H200, 140 GiB"
    assert device([H200, A100]) == "GPU: NVIDIA H200, 140 GiB; NVIDIA A100-SXM4-80GB, 80 GiB"
    assert device([]) == f"CPU: {environment.cpu_model()}"
    assert environment.cpu_model()  # /proc/cpuinfo's model name, or the platform's


def test_the_start_line_says_where_training_runs() -> None:
    assert device_line([]) == f"no GPU found, training on CPU ({environment.cpu_model()})"
    assert device_line([H200]) == "training on GPU: NVIDIA H200, 140 GiB"


def test_the_backend_is_read_as_keras_reads_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delitem(sys.modules, "keras", raising=False)  # not loaded: read without importing it
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    assert environment.keras_backend() == "tensorflow"  # Keras' default
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "torch"}))
    assert environment.keras_backend() == "torch"
    monkeypatch.setenv("KERAS_BACKEND", "jax")
    assert environment.keras_backend() == "jax"
    assert "keras" not in sys.modules


def test_the_environment_names_the_backend_and_its_package() -> None:
    import keras

    found = environment.environment()
    backend = keras.backend.backend()
    assert found["keras_backend"] == backend
    assert found[environment.BACKEND_PACKAGES[backend]] == environment.package_version(backend)
    assert found["device"] == environment.device()
    assert {"python", "keras", "optuna", "mlflow", "numpy"} <= set(found)


def test_tensorflow_grows_its_gpu_memory_and_stays_importable() -> None:
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the test process runs another Keras backend")
    assert environment.prepare_backend() == "tensorflow"
    assert sys.modules.get("tensorflow") is not None
    assert environment.gpus() == []  # this machine has none: TensorFlow sees none


JAX_PROCESS = """
import importlib.util, os, sys
from mnist_sweep.environment import gpus, prepare_backend
backend = prepare_backend()
try:
    import tensorflow
    imported = True
except ModuleNotFoundError:
    imported = False
import keras
print(backend, keras.backend.backend(), os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"], imported,
      importlib.util.find_spec("tensorflow"), gpus())
"""


@pytest.mark.backend
@pytest.mark.subprocess
def test_under_jax_memory_is_not_preallocated_and_tensorflow_is_absent() -> None:
    if importlib.util.find_spec("jax") is None:
        pytest.skip("jax is not installed: pip install -e '.[jax]' (make install-dev does)")
    env = {**cli_environment(REPO), "KERAS_BACKEND": "jax", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("XLA_PYTHON_CLIENT_PREALLOCATE", None)
    done = subprocess.run([sys.executable, "-c", JAX_PROCESS], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["jax", "jax", "false", "False", "None", "[]"]


def run_gpu_bench(backend: str) -> subprocess.CompletedProcess[str]:
    data = mnist_location() or REPO
    env = {**cli_environment(data), "KERAS_BACKEND": backend, "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py")], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
@pytest.mark.subprocess
def test_bench_gpu_without_a_gpu_says_so_and_records_nothing(backend: str) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    results = REPO / "bench" / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    done = run_gpu_bench(backend)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"bench/gpu: no GPU found (Keras backend {backend}, CUDA_VISIBLE_DEVICES=''")
    assert "nothing measured, nothing recorded" in done.stdout and done.stdout.count("\n") == 1
    assert (results.read_bytes() if results.exists() else None) == before


@pytest.mark.slow
@pytest.mark.subprocess
def test_bench_gpu_runs_every_step_on_the_cpu_when_asked_and_records_nothing(mnist_dir: Path) -> None:
    backend = "jax" if importlib.util.find_spec("jax") is not None else "tensorflow"  # the GPU machines' backend
    results = REPO / "bench" / "RESULTS.md"
    before = results.read_bytes()
    small = ["--batch-sizes", "256", "--epochs", "2", "--workers", "2", "--worker-epochs", "1"]
    small += ["--trials-per-worker", "1", "--train-limit", "500", "--check-on-cpu"]
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu.py"), *small],
        env={**cli_environment(mnist_dir), "KERAS_BACKEND": backend, "CUDA_VISIBLE_DEVICES": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert "NOT recorded (no GPU)" in done.stdout
    (row,) = [line for line in done.stdout.splitlines() if line.startswith("| 2 |")]
    assert row.startswith("| 2 | 2 |"), row  # both workers finished their trial, on the CPU, and say so
    assert row.endswith(f"ran on CPU: {environment.cpu_model()} |")
    assert results.read_bytes() == before


# --------------------------------------------------------------------------- the backend finds the GPUs


class FakeTensorFlowGpus:
    """What TensorFlow reports on a machine with `names` GPUs: its device list and each device's details."""

    def __init__(self, names: list[str]) -> None:
        import tensorflow as tf

        gpu = tf.config.PhysicalDevice
        self.devices = [gpu(name=f"/physical_device:GPU:{i}", device_type="GPU") for i in range(len(names))]
        self.details = {d.name: {"device_name": name} for d, name in zip(self.devices, names, strict=True)}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import tensorflow as tf

        monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: self.devices if kind == "GPU" else [])
        monkeypatch.setattr(tf.config.experimental, "get_device_details", lambda device: self.details[device.name])


def tensorflow_backend() -> None:
    import keras

    if keras.backend.backend() != "tensorflow":
        pytest.skip("the test process runs another Keras backend")


def test_the_backend_finds_the_gpus_and_nvidia_smi_adds_their_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    tensorflow_backend()
    FakeTensorFlowGpus(["NVIDIA H200", "NVIDIA A100-SXM4-80GB"]).install(monkeypatch)
    monkeypatch.setattr(environment, "visible_nvidia_gpus", lambda: [H200, A100])
    assert environment.gpus() == [H200, A100]


def test_a_gpu_the_backend_finds_counts_without_nvidia_smi_or_with_ids_it_cannot_match(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tensorflow_backend()
    FakeTensorFlowGpus(["NVIDIA A100-SXM4-80GB MIG 1g.10gb"]).install(monkeypatch)
    monkeypatch.setattr(environment, "visible_nvidia_gpus", lambda: [])  # absent, or a MIG id it cannot match
    assert environment.gpus() == [Gpu("NVIDIA A100-SXM4-80GB MIG 1g.10gb")]
    assert device_line(environment.gpus()) == "training on GPU: NVIDIA A100-SXM4-80GB MIG 1g.10gb"


def test_gpus_nvidia_smi_lists_but_the_backend_cannot_use_are_none(monkeypatch: pytest.MonkeyPatch) -> None:
    tensorflow_backend()
    FakeTensorFlowGpus([]).install(monkeypatch)  # a CPU-only wheel, a missing CUDA library
    monkeypatch.setattr(environment, "visible_nvidia_gpus", lambda: [H200, A100])
    assert environment.gpus() == []


def test_mig_ids_in_cuda_visible_devices_match_no_nvidia_smi_row_and_stop_nothing_else() -> None:
    # nvidia-smi --query-gpu lists whole GPUs: a MIG instance is no row of it, so only the backend names it.
    assert parse_nvidia_smi(SMI, "MIG-11111111-2222-3333-4444-555555555555") == []


DEVICE_ORDER_PROCESS = """
import os, sys
from mnist_sweep.environment import prepare_backend
os.environ.pop("CUDA_DEVICE_ORDER", None)
prepare_backend()
print(os.environ["CUDA_DEVICE_ORDER"], os.environ["TF_NUM_INTRAOP_THREADS"], sorted(os.sched_getaffinity(0)))
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_backend_loads_with_pci_bus_order_and_threads_sized_to_the_affinity() -> None:
    core = min(os.sched_getaffinity(0))
    env = {**cli_environment(REPO), "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        ["taskset", "-c", str(core), sys.executable, "-c", DEVICE_ORDER_PROCESS],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["PCI_BUS_ID", "1", f"[{core}]"]
