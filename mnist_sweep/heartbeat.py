"""A heartbeat: one small write repeated on a thread of its own while a block runs, so other processes can tell
a live holder (of a trial, of the test set's claim) from a dead one."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def beating(beat: Callable[[], None], *, every: float, name: str, at_start: bool = True) -> Iterator[None]:
    """`beat()` every `every` seconds while within (first at once, unless not `at_start`), on a daemon thread:
    a process that exits without leaving the block must not hang on it."""
    stop = threading.Event()

    def run() -> None:
        if at_start:
            beat()
        while not stop.wait(every):
            beat()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
