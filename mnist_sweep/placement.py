"""Where each local worker of `run --workers N` trains: its share of the cores, or a GPU; and how many threads
every training process uses, however it was started.

Pure functions plan the shares (tested without a GPU); `pin_this_process` applies a share in the process
that got it, and `size_threads` sizes the thread pools to the CPUs the process may use (its affinity and its
cgroup's CPU quota: a container's `cpus` limit, a pod's CPU limit), before TensorFlow or JAX is imported,
since both size their thread pools once, at import. Importing this module imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import signal
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mnist_sweep.errors import ConfigError
from mnist_sweep.processes import this_process

# Set by `run` in each local worker's environment (it takes its own share directly): read by `pin_this_process`.
WORKER_VAR = "MNIST_SWEEP_WORKER"
CPUS_VAR = "MNIST_SWEEP_CPUS"
PARENT_VAR = "MNIST_SWEEP_PARENT_PID"
# The MLflow tags of each trial run: which worker ran it, on which cores and GPU (DEVICE_TAG names the device),
# and how many threads its thread pools were given.
WORKER_TAG, WORKER_INDEX_TAG, CPUS_TAG, GPU_TAG = "worker", "worker.index", "worker.cpus", "worker.gpu"
THREADS_TAG = "worker.threads"
WORKER_PROCESS_TAG = "worker.process"  # processes.ProcessId.encode(): read back to judge whether it has ended
PR_SET_PDEATHSIG = 1
# The one thread policy a study records today (study.WorkerPolicy): as many threads as CPUs the process may use.
THREADS_CPU_LIMIT = "cpu_limit"
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_MEMBERSHIP = Path("/proc/self/cgroup")


@dataclass(frozen=True)
class Placement:
    """One local worker's share: its index (0 is `run` itself), its cores, and its GPU (None: no GPU)."""

    index: int
    cpus: tuple[int, ...]
    gpu: str | None = None  # a CUDA_VISIBLE_DEVICES entry as given (index, GPU-uuid, MIG-uuid); "" hides every GPU

    def describe(self) -> str:
        where = f"GPU {self.gpu}, " if self.gpu else "CPU only, " if self.gpu == "" else ""
        return f"worker {self.index}{' (this process)' if self.index == 0 else ''}: {where}cores {cpu_list(self.cpus)}"

    def environment(self) -> dict[str, str]:
        """Variables that pin a process here: its cores and its GPU (its threads: `size_threads`, there).

        No GPU found is no reason to hide one: CUDA_VISIBLE_DEVICES is left as inherited unless the share
        names a GPU, or is CPU only (study.gpus = 0).
        """
        env = {WORKER_VAR: str(self.index), CPUS_VAR: cpu_list(self.cpus)}
        if self.gpu is not None:
            # Several workers on one GPU take memory as they need it (environment.prepare_backend sets growth).
            env["CUDA_VISIBLE_DEVICES"] = self.gpu
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


def plan(workers: int, *, cpus: Sequence[int], gpu_ids: Sequence[str], cpu_only: bool = False) -> list[Placement]:
    """Each worker's cores and GPU: GPUs round-robin (several workers per GPU), the cores split among all.

    Without GPUs, `cpu_only` (study.gpus = 0) hides them; otherwise CUDA_VISIBLE_DEVICES is left alone.
    """
    shares = split_cpus(list(cpus), workers)
    return [
        Placement(index, shares[index], gpu_ids[index % len(gpu_ids)] if gpu_ids else "" if cpu_only else None)
        for index in range(workers)
    ]


def visible_gpu_ids(count: int, cuda_visible: str | None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES entry of each GPU the backend found (`count`), as given: indices, UUIDs, MIG ids.

    Unset, the GPUs are 0 .. count - 1 (in PCI bus order: environment.set_device_order). MIG instances are
    all kept however many the backend counted: CUDA shows a process one MIG instance, so the backend counts
    one, and each local worker given one of them gets its own.
    """
    if cuda_visible is None:
        return [str(i) for i in range(count)]
    entries = [key.strip() for key in cuda_visible.split(",") if key.strip()]
    if count and any(entry.startswith("MIG-") for entry in entries):
        return entries
    return entries[:count]


def chosen_gpu_ids(asked: int | str, visible: Sequence[str], *, backend: str = "") -> list[str]:
    """study.gpus applied to the visible GPUs; more asked than visible is bad input."""
    if asked == "all":
        return list(visible)
    assert isinstance(asked, int)
    if asked > len(visible):
        raise ConfigError(gpus_missing_line(asked, len(visible), backend=backend))
    return list(visible[:asked])


def gpus_missing_line(asked: int, found: int, *, backend: str) -> str:
    """The one line of a run that expected GPUs (study.gpus = N) and found fewer: exit 2, not a CPU run."""
    shown = os.environ.get("CUDA_VISIBLE_DEVICES")
    where = f" (CUDA_VISIBLE_DEVICES={shown!r})" if shown is not None else ""
    to = f" to the Keras backend ({backend})" if backend else ""
    return f"study.gpus = {asked}: only {found} GPU(s) visible{to}{where}; set study.gpus = 0 to train on the CPU"


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


# --------------------------------------------------------------------------- the CPU limit and the threads


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, membership: Path = CGROUP_MEMBERSHIP) -> float | None:
    """The CPUs' worth of time this process's cgroups allow (quota / period, the tightest), None if unlimited.

    cgroup v2: `cpu.max` ("max 100000" or "150000 100000"); v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us`
    (quota -1: none). Read in the process's own cgroup and each one above it, since a parent's quota binds
    too. Inside a container the cgroup namespace makes the mount its own cgroup: where the path that
    /proc/self/cgroup names is not under the mount, the mount's root is read.
    """
    limits: list[float] = []
    for hierarchy, controllers, path in _memberships(membership):
        if hierarchy == "0" and not controllers:  # the v2 (unified) hierarchy
            mount = next((m for m in (root, root / "unified") if (m / "cgroup.controllers").is_file()), None)
            limits += [limit for folder in _up_from(mount, path) if (limit := _v2_limit(folder)) is not None]
        elif "cpu" in controllers.split(","):
            mount = next((m for m in (root / controllers, root / "cpu", root / "cpu,cpuacct") if m.is_dir()), None)
            limits += [limit for folder in _up_from(mount, path) if (limit := _v1_limit(folder)) is not None]
    return min(limits, default=None)


def _memberships(membership: Path) -> Iterator[tuple[str, str, str]]:
    """(hierarchy id, controllers, path) per line of /proc/self/cgroup."""
    try:
        lines = membership.read_text(encoding="utf-8").splitlines()
    except OSError:
        return
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            yield parts[0], parts[1], parts[2]


def _up_from(mount: Path | None, path: str) -> list[Path]:
    """The cgroup folder for `path` under `mount` and every folder above it up to the mount (those missing
    are read as no limit: in a cgroup namespace the mount itself is this process's cgroup)."""
    if mount is None:
        return []
    folder = Path(os.path.normpath(mount / path.strip("/")))
    if not folder.is_relative_to(mount):  # a path outside the mount ("/../x" in a namespace): the mount is ours
        return [mount]
    chain = [folder]
    while chain[-1] != mount and chain[-1] != chain[-1].parent:
        chain.append(chain[-1].parent)
    return chain


def _v2_limit(folder: Path) -> float | None:
    try:
        quota, _, period = (folder / "cpu.max").read_text(encoding="utf-8").strip().partition(" ")
        return None if quota == "max" else int(quota) / int(period or "100000")
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _v1_limit(folder: Path) -> float | None:
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text(encoding="utf-8"))
        period = int((folder / "cpu.cfs_period_us").read_text(encoding="utf-8"))
        return None if quota <= 0 else quota / period
    except (OSError, ValueError, ZeroDivisionError):
        return None


def cpu_budget(cpus: Sequence[int], limit: float | None) -> int:
    """Threads for a process on `cpus` under a CPU quota of `limit` CPUs: the smaller, rounded down, at least 1.

    Down: a 1.5-CPU quota with 2 busy threads is throttled every period.
    """
    count = len(cpus) if limit is None else min(len(cpus), math.floor(limit))
    return max(1, count)


def thread_environment(threads: int) -> dict[str, str]:
    """The variables TensorFlow, OpenMP and JAX size their CPU thread pools by, at import."""
    env = {
        "TF_NUM_INTRAOP_THREADS": str(threads),  # TensorFlow's XLA CPU code runs on the intra-op pool
        "TF_NUM_INTEROP_THREADS": str(max(threads, 2)),  # 1 can deadlock tf.data's own ops
        "OMP_NUM_THREADS": str(threads),
    }
    given = os.environ.get("XLA_FLAGS", "")
    flags = " ".join(f for f in given.split() if "xla_cpu_multi_thread_eigen" not in f)
    if threads == 1:  # JAX's XLA sizes its Eigen pool by the machine's cores, not the affinity or the quota
        flags = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    if flags != given:
        env["XLA_FLAGS"] = flags
    return env


def size_threads(policy: str = THREADS_CPU_LIMIT) -> int:
    """Apply the study's thread policy in this process before the backend loads; returns the threads.

    `cpu_limit`: the cores this process may run on (after `run`'s pinning, if any), capped by its cgroup's
    CPU quota. So a compose replica with `cpus: 2` or a pod with a 2-CPU limit uses 2 threads, whatever
    the host's core count, and `run --workers N`'s workers use their share.
    """
    if policy != THREADS_CPU_LIMIT:
        raise ConfigError(f"the study's worker policy says threads = {policy!r}, unknown to this version")
    pin_this_process()
    threads = cpu_budget(usable_cpus(), cgroup_cpu_limit())
    os.environ.update(thread_environment(threads))
    return threads


# --------------------------------------------------------------------------- in the pinned process


def pin_this_process() -> None:
    """Apply the share `run` gave this local worker in its environment (if any): its cores, and ending with `run`
    if it dies.

    Called before Keras is imported; the thread variables are in the environment already.
    """
    cpus = os.environ.get(CPUS_VAR)
    if cpus:
        pin_cores(parse_cpu_list(cpus))
    parent = os.environ.get(PARENT_VAR)
    if parent and os.environ.get(WORKER_VAR, "0") != "0":
        _end_with_parent(int(parent))


def pin_cores(cpus: Sequence[int]) -> None:
    """This process, and the threads it starts from now on, on `cpus` only."""
    os.sched_setaffinity(0, cpus)


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
    threads = os.environ.get("TF_NUM_INTRAOP_THREADS")  # set by size_threads, before the backend loaded
    if threads:
        tags[THREADS_TAG] = threads
    gpu = os.environ.get("CUDA_VISIBLE_DEVICES")
    if gpu:
        tags[GPU_TAG] = gpu
    return tags
