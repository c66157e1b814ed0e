"""SIGINT and SIGTERM, acted on at safe points instead of wherever the signal happens to land.

Python raises KeyboardInterrupt in whatever code runs when the signal arrives: inside a garbage
collector callback it is printed and swallowed, and the sweep went on as if nothing happened. So the
handlers only record the signal; training checks after every batch, the trial loop before every trial,
and the exception raised there closes the running trial as failed in Optuna and MLflow. A second signal
acts at once, for a process stuck where nothing checks.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import TypeVar

T = TypeVar("T")
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(KeyboardInterrupt):
    """The user asked the process to stop (SIGINT or SIGTERM)."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(signal.Signals(self.signum), 128 + self.signum)


class _PendingSignals:
    """The signals recorded and not yet acted on. Signal handlers are the process's, so this is too: the one
    instance below, written only by `_record` and cleared only by `deferred_signals` and `acknowledge`."""

    def __init__(self) -> None:
        self._signals: list[int] = []

    def record(self, signum: int) -> None:
        self._signals.append(signum)

    def clear(self) -> None:
        self._signals.clear()

    def first(self) -> Interrupted | None:
        return Interrupted(self._signals[0]) if self._signals else None


_pending = _PendingSignals()


def _record(signum: int, frame: FrameType | None) -> None:
    _pending.record(signum)
    # The next one stops the process the ordinary way, wherever it is.
    signal.signal(signum, signal.default_int_handler if signum == signal.SIGINT else signal.SIG_DFL)


def raise_if_requested() -> None:
    """Raise Interrupted if a signal arrived since the handlers were installed."""
    stop = _pending.first()
    if stop is not None:
        raise stop


def record_until_exit() -> None:
    """For the process's own run: a signal that lands after the command returned, while the libraries tear
    down (atexit, where Python drops a KeyboardInterrupt), still ends the process with its exit code."""
    for signum in EXIT_CODES:
        signal.signal(signum, _record)
    atexit.register(_exit_if_requested)  # registered before the libraries' hooks, so it runs after them


def acknowledge() -> None:
    """The signals so far were acted on (the command exits with their code): nothing left for atexit."""
    _pending.clear()


def _exit_if_requested() -> None:
    stop = _pending.first()
    if stop is not None:
        sys.stdout.flush()
        print(f"mnist-sweep: {stop} while shutting down; everything was recorded", file=sys.stderr, flush=True)
        os._exit(stop.exit_code)


def sleep(seconds: float) -> None:
    """time.sleep that answers a deferred SIGINT or SIGTERM within a fraction of a second."""
    deadline = time.monotonic() + seconds
    while True:
        raise_if_requested()
        left = deadline - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.2))


def poll(check: Callable[[], T | None], *, every: float, timeout: float | None = None) -> T | None:
    """Calls `check` until it returns something other than None, and returns that; None after `timeout`
    seconds (None: no limit). A deferred SIGINT or SIGTERM is answered before each try and while waiting."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        raise_if_requested()
        found = check()
        if found is not None:
            return found
        if deadline is not None and time.monotonic() >= deadline:
            return None
        sleep(every)


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Within: SIGINT and SIGTERM are recorded and acted on by `raise_if_requested`."""
    previous = {signum: signal.signal(signum, _record) for signum in EXIT_CODES}
    _pending.clear()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _raise_now(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def immediate_signals() -> Iterator[None]:
    """Within: SIGINT and SIGTERM raise Interrupted at once (commands with no trial to close)."""
    previous = {signum: signal.signal(signum, _raise_now) for signum in EXIT_CODES}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
