"""Trials' artifacts stored on one background thread while the next trial trains (tracking.background_uploads)."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable


class BackgroundUploads:
    """One thread that stores finished trials' artifacts while the next trial trains.

    The model, the confusion matrix and the per-class metrics took ~0.08 s of a 2 s trial (4 %) on the
    training thread. Here they overlap the next fit. What a crash leaves stays consistent because a trial's
    run ends FINISHED only as the last step of its upload: a process killed mid-upload leaves its run
    RUNNING, the next `run` closes it as KILLED (once UPLOAD_GRACE_SECONDS have passed since its Optuna
    trial completed, at once if its process has provably ended: processes.ended), and finalize never scores a
    trial whose run is not FINISHED. Ctrl-C, SIGTERM, an error and the end of the loop all wait for the
    uploads first (trial_loop.run_trials). An upload that fails ends its run FAILED and is raised on the
    training thread within a few steps of the next trial and after it, as the same error a synchronous upload
    would have raised (a full disk: one line, and rerun).
    """

    def __init__(self, *, background: bool, on_failure: Callable[[str, BaseException], None]) -> None:
        """`background` False: each upload runs at once on the caller's thread (tracking.background_uploads).
        `on_failure(run_id, error)`: what becomes of the run whose upload failed (the ledger ends it FAILED)."""
        self.background = background
        self._on_failure = on_failure
        self._jobs: queue.Queue[tuple[str, Callable[[], None]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._errors: list[BaseException] = []

    def submit(self, run_id: str, job: Callable[[], None]) -> None:
        if not self.background:
            self.wait()
            self._run(run_id, job)
            self.raise_if_failed()
            return
        if self._thread is None:
            # A daemon: a process that exits without waiting (a second signal) must not hang; its run stays
            # RUNNING, never FINISHED without its artifacts.
            self._thread = threading.Thread(target=self._work, name="mnist-sweep-uploads", daemon=True)
            self._thread.start()
        self._jobs.put((run_id, job))

    def wait(self, *, raise_errors: bool = True) -> None:
        """Until every submitted upload is stored or has failed; then the first failure, if any, is raised."""
        self._jobs.join()
        if raise_errors:
            self.raise_if_failed()

    def raise_if_failed(self, *args: object) -> None:
        """Raise the first upload failure, every time (the process is to stop); takes and ignores a hook's args."""
        if self._errors:
            raise self._errors[0]

    def _work(self) -> None:
        while True:
            run_id, job = self._jobs.get()
            try:
                self._run(run_id, job)
            finally:
                self._jobs.task_done()

    def _run(self, run_id: str, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # kept for the training thread to raise
            self._errors.append(exc)
            with contextlib.suppress(Exception):  # the store may be what failed: then the run stays RUNNING
                self._on_failure(run_id, exc)
