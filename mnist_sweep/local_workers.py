"""The N - 1 `mnist-sweep worker` processes that `run --workers N` starts beside itself on one study.

Each child is an ordinary worker (same study, same stores), pinned by its environment (placement.py).
Their lines reach this process's console, prefixed `[worker i]`; their errors its stderr. A signal to `run`
is passed on to each child, which records its running trial as failed (interrupt.py) and exits; the
children run in their own session, so a Ctrl-C at the terminal reaches them once, through `run`, and a
child whose `run` was killed gets SIGTERM from the kernel (placement.pin_this_process).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO

from mnist_sweep import interrupt, placement
from mnist_sweep.config import SweepConfig
from mnist_sweep.console import Echo
from mnist_sweep.errors import ConfigError
from mnist_sweep.placement import PARENT_VAR, Placement
from mnist_sweep.samplers import ENGINE_TRAITS

STOP_SECONDS = 120.0  # a child closes its trial's run and exits; then it is killed


@dataclass(frozen=True)
class LocalWorkers:
    """What `run` starts: the worker command line and one placement per child."""

    command: tuple[str, ...]
    placements: tuple[Placement, ...]


class Children:
    """The running children, their relay threads, and how they end."""

    def __init__(self, spec: LocalWorkers, *, echo: Echo) -> None:
        self.processes: list[tuple[Placement, subprocess.Popen[str]]] = []
        self.relays: list[threading.Thread] = []
        for share in spec.placements:
            env = {**os.environ, **share.environment(), PARENT_VAR: str(os.getpid())}
            process = subprocess.Popen(
                spec.command,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                bufsize=1,
                start_new_session=True,  # the terminal's Ctrl-C goes to `run`, which passes it on once
            )
            self.processes.append((share, process))
            self._relay(process.stdout, f"[worker {share.index}] ", echo)
            self._relay(process.stderr, f"[worker {share.index}] ", _to_stderr)

    def _relay(self, stream: IO[str] | None, prefix: str, write: Callable[[str], None]) -> None:
        def copy() -> None:
            for line in stream or ():
                write(prefix + line.rstrip("\n"))

        thread = threading.Thread(target=copy, daemon=True)
        thread.start()
        self.relays.append(thread)

    def wait(self) -> None:
        """Until every child has exited (their trials done); answers this process's Ctrl-C and SIGTERM."""
        interrupt.poll(lambda: True if all(p.poll() is not None for _, p in self.processes) else None, every=0.5)
        self._finish()

    def stop(self, signum: int) -> None:
        """Pass the signal on, and wait for each child to record its trial and exit (killed after a while)."""
        for _, process in self.processes:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signum)
        for _, process in self.processes:
            try:
                process.wait(timeout=STOP_SECONDS)
            except (subprocess.TimeoutExpired, KeyboardInterrupt):
                process.kill()
                process.wait()
        self._finish()

    def _finish(self) -> None:
        for thread in self.relays:
            thread.join(timeout=10)
        for share, process in self.processes:
            if process.returncode not in (0, None):
                _to_stderr(f"[worker {share.index}] exited with code {process.returncode}")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def start(spec: LocalWorkers | None, *, echo: Echo) -> Children | None:
    """The children, started before this process loads TensorFlow, so they load theirs meanwhile.

    Should this process end before `running` takes them over, the kernel sends them SIGTERM.
    """
    return Children(spec, echo=echo) if spec is not None and spec.placements else None


@contextlib.contextmanager
def running(children: Children | None) -> Iterator[Children | None]:
    """Stops the children on the way out: with this process's signal (SIGTERM on any other error)."""
    if children is None:
        yield None
        return
    try:
        yield children
    except BaseException as exc:
        children.stop(exc.signum if isinstance(exc, interrupt.Interrupted) else signal.SIGTERM)
        raise
    children.stop(signal.SIGTERM)  # none left after wait(); a no-op then


def check(cfg: SweepConfig, *, force: bool) -> list[str] | None:
    """Bad worker counts and GPU requests, before anything is written; returns the GPUs to spread over
    (CUDA_VISIBLE_DEVICES entries as given), [] for none, None to leave CUDA_VISIBLE_DEVICES as it is.

    Several workers need the GPU count before this process loads its backend (it pins itself first): a
    child process asks the backend (environment.backend_gpus_in_child), where the machine has GPU device
    files at all. One worker asks nothing here: it
    is given the first study.gpus GPUs, and `check_gpus_found` checks them once its backend is loaded.
    """
    from mnist_sweep.environment import backend_gpus_in_child, gpu_device_nodes, keras_backend, set_device_order

    set_device_order()  # before any backend loads, here or in a child
    if isinstance(cfg.study.workers, int):
        placement.check_worker_count(cfg.study.workers, cpus=placement.usable_cpus(), force=force)
    gpus = cfg.study.gpus
    if gpus == 0:
        return []
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cfg.study.workers == 1:
        if gpus == "all":
            return None  # today's `run`: the GPUs CUDA_VISIBLE_DEVICES gives, nothing asked
        visible = placement.visible_gpu_ids(len(given.split(",")) if given is not None else int(gpus), given)
        return placement.chosen_gpu_ids(gpus, visible, backend=keras_backend())
    found = backend_gpus_in_child() if gpu_device_nodes() else []
    visible = placement.visible_gpu_ids(len(found), given)
    return placement.chosen_gpu_ids(gpus, visible, backend=keras_backend())


def check_gpus_found(cfg: SweepConfig, *, as_worker: bool) -> None:
    """Once the backend is loaded: GPUs expected (study.gpus = N) but not found end the command (exit 2),
    rather than train on the CPU. A worker (local, compose, k8s) expects one; `run` alone, all N."""
    from mnist_sweep.environment import gpus, keras_backend

    asked = cfg.study.gpus
    if not isinstance(asked, int) or asked == 0:
        return
    expected = 1 if as_worker else asked
    found = len(gpus())
    if found < expected:
        raise ConfigError(placement.gpus_missing_line(asked, found, backend=keras_backend()))


def arrange(
    cfg: SweepConfig, *, gpu_ids: Sequence[str] | None, child_command: Callable[..., tuple[str, ...]], echo: Echo
) -> tuple[SweepConfig, LocalWorkers | None]:
    """The worker count (`auto` measured), this process pinned to its share, and the children to start.

    One worker is today's `run`: nothing pinned, nothing started. `gpu_ids` as `check` returns them.
    """
    cpus = placement.usable_cpus()
    workers = cfg.study.workers
    if workers == "auto" and ENGINE_TRAITS[cfg.study.engine].one_process:
        echo(f"study.workers = 'auto': 1, since study.engine = {cfg.study.engine!r} runs its oracle in one process")
        workers = 1
    if workers == "auto":
        from mnist_sweep.packing import resolve_auto

        workers = resolve_auto(cfg, cpus=cpus, gpu_ids=gpu_ids or (), echo=echo)
    assert isinstance(workers, int)
    cfg = cfg.model_copy(update={"study": cfg.study.model_copy(update={"workers": workers})})
    if workers == 1:
        if gpu_ids is not None:  # the one process on the GPUs study.gpus names (none: 0)
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_ids)
        return cfg, None
    placements = placement.plan(workers, cpus=cpus, gpu_ids=gpu_ids or (), cpu_only=cfg.study.gpus == 0)
    # `run` itself takes worker 0's share directly; the children get theirs in their environment (Children).
    # CUDA_VISIBLE_DEVICES is the one variable set here: CUDA reads it when this process loads its backend.
    if placements[0].gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = placements[0].gpu
    placement.pin_cores(placements[0].cpus)
    echo(f"{workers} local workers: " + "; ".join(p.describe() for p in placements))
    return cfg, LocalWorkers(child_command(workers=workers), tuple(placements[1:]))


def child_command(
    sweep_file: str, overrides: Sequence[str], *, workers: int, loudness: Sequence[str]
) -> tuple[str, ...]:
    """`mnist-sweep worker` with run's sweep file and overrides, and the resolved worker count."""
    sets = [part for assignment in overrides for part in ("--set", assignment)]
    return (
        sys.executable,
        "-m",
        "mnist_sweep",
        "worker",
        sweep_file,
        *sets,
        "--set",
        f"study.workers={workers}",
        *loudness,
    )
