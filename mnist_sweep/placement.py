"""Where each local worker of `run --workers N` trains: its share of the cores, or a GPU.

Pure functions plan the shares (tested without a GPU); `pin_this_process` applies a share in the process
that got it, before TensorFlow or JAX is imported, since both size their thread pools once, at import.
Importing this module imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
from collections.abc import Sequence
from dataclasses import dataclass

from mnist_sweep.errors import ConfigError
from mnist_sweep.processes import this_process

# Set by `run` in each local worker's environment (and in its own): read by `pin_this_process`.
WORKER_VAR = "MNIST_SWEEP_WORKER"
CPUS_VAR = "MNIST_SWEEP_CPUS"
PARENT_VAR = "MNIST_SWEEP_PARENT_PID"
# The MLflow tags of each trial run: which worker ran it, on which cores and GPU (DEVICE_TAG names the device).
WORKER_TAG, WORKER_INDEX_TAG, CPUS_TAG, GPU_TAG = "worker", "worker.index", "worker.cpus", "worker.gpu"
WORKER_PROCESS_TAG = "worker.process"  # processes.ProcessId.encode(): read back to judge whether it has ended
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Placement:
    """One local worker's share: its index (0 is `run` itself), its cores, and its GPU (None: no GPU)."""

    index: int
    cpus: tuple[int, ...]
    gpu: str | None = None

    def describe(self) -> str:
        where = f"GPU {self.gpu}, " if self.gpu is not None else ""
        return f"worker {self.index}{' (this process)' if self.index == 0 else ''}: {where}cores {cpu_list(self.cpus)}"

    def environment(self) -> dict[str, str]:
        """Variables that pin a process here: cores, thread pools sized to them, and its GPU."""
        threads = str(len(self.cpus))
        env = {
            WORKER_VAR: str(self.index),
            CPUS_VAR: cpu_list(self.cpus),
            # TensorFlow reads these at import; its XLA CPU code runs on the intra-op pool.
            "TF_NUM_INTRAOP_THREADS": threads,
            "TF_NUM_INTEROP_THREADS": str(max(len(self.cpus), 2)),  # 1 can deadlock tf.data's own ops
            "OMP_NUM_THREADS": threads,
        }
        if len(self.cpus) == 1:  # JAX's XLA sizes its Eigen pool by the machine's cores, not the affinity
            env["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip()
        # Several workers on one GPU take memory as they need it (environment.prepare_backend sets growth).
        env["CUDA_VISIBLE_DEVICES"] = self.gpu if self.gpu is not None else ""
        return env


def cpu_list(cpus: Sequence[int]) -> str:
    """0,1,2,5 as '0-2,5': how the kernel and taskset write a set of cores."""
    ordered = sorted(set(cpus))
    spans: list[str] = []
    start = prev = ordered[0] if ordered else 0
    for cpu in [*ordered[1:], None]:
        if cpu is not None and cpu == prev + 1:
            prev = cpu
            continue
        spans.append(str(start) if start == prev else f"{start}-{prev}")
        if cpu is not None:
            start = prev = cpu
    return ",".join(spans) if ordered else ""


def parse_cpu_list(text: str) -> tuple[int, ...]:
    cpus: list[int] = []
    for span in filter(None, (s.strip() for s in text.split(","))):
        low, _, high = span.partition("-")
        cpus.extend(range(int(low), int(high or low) + 1))
    return tuple(cpus)


def split_cpus(cpus: Sequence[int], workers: int) -> list[tuple[int, ...]]:
    """`workers` contiguous shares of `cpus`, sizes differing by at most one; shared round-robin if too few."""
    if workers > len(cpus):
        return [(cpus[i % len(cpus)],) for i in range(workers)]
    size, extra = divmod(len(cpus), workers)
    shares, start = [], 0
    for index in range(workers):
        end = start + size + (1 if index < extra else 0)
        shares.append(tuple(cpus[start:end]))
        start = end
    return shares


def plan(workers: int, *, cpus: Sequence[int], gpu_ids: Sequence[str]) -> list[Placement]:
    """Each worker's cores and GPU: GPUs round-robin (several workers per GPU), the cores split among all."""
    shares = split_cpus(list(cpus), workers)
    return [
        Placement(index, shares[index], gpu_ids[index % len(gpu_ids)] if gpu_ids else None) for index in range(workers)
    ]


def visible_gpu_ids(count: int, cuda_visible: str | None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value of each of the `count` GPUs this process sees, in its order."""
    if cuda_visible is None:
        return [str(i) for i in range(count)]
    return [key.strip() for key in cuda_visible.split(",") if key.strip()][:count]


def chosen_gpu_ids(asked: int | str, visible: Sequence[str]) -> list[str]:
    """study.gpus applied to the visible GPUs; more asked than visible is bad input."""
    if asked == "all":
        return list(visible)
    assert isinstance(asked, int)
    if asked > len(visible):
        shown = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f" (CUDA_VISIBLE_DEVICES={shown!r})" if shown is not None else ""
        raise ConfigError(f"study.gpus = {asked}: only {len(visible)} GPU(s) visible{where}")
    return list(visible[:asked])


def check_worker_count(workers: int, *, cpus: Sequence[int], force: bool) -> None:
    """More workers than cores slows every one of them down: refused unless --force."""
    if workers > len(cpus) and not force:
        raise ConfigError(
            f"study.workers = {workers}: more than the {len(cpus)} core(s) this process may use "
            f"({cpu_list(cpus)}); pass --force to run them anyway, sharing cores"
        )


def usable_cpus() -> tuple[int, ...]:
    """The cores this process may run on (its affinity, which taskset and cgroups narrow)."""
    return tuple(sorted(os.sched_getaffinity(0)))


# --------------------------------------------------------------------------- in the pinned process


def pin_this_process() -> None:
    """Apply the share `run` gave this process (if any): its cores, and ending with `run` if it dies.

    Called before Keras is imported; the thread variables are in the environment already.
    """
    cpus = os.environ.get(CPUS_VAR)
    if cpus:
        os.sched_setaffinity(0, parse_cpu_list(cpus))
    parent = os.environ.get(PARENT_VAR)
    if parent and os.environ.get(WORKER_VAR, "0") != "0":
        _end_with_parent(int(parent))


def _end_with_parent(parent: int) -> None:
    # A killed `run` (kill -9, a crash) sends its local workers SIGTERM: each records its trial as failed.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the line above
        os.kill(os.getpid(), signal.SIGTERM)


def worker_tags() -> dict[str, str]:
    """Which worker this process is, for every trial run it logs: host:pid/token, its index, cores and GPU."""
    process = this_process()
    tags = {
        WORKER_TAG: process.label,
        WORKER_PROCESS_TAG: process.encode(),
        WORKER_INDEX_TAG: os.environ.get(WORKER_VAR, "0"),
        CPUS_TAG: cpu_list(usable_cpus()),
    }
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpu:
        tags[GPU_TAG] = gpu
    return tags
