"""What the user sees on stdout: lines, a live display on a terminal, and a reader that went away.

Three ways to print, chosen once per command:
- a terminal: a live display at the bottom (trial, epoch, batch, the last val metric, the best so far,
  trials done / target, ETA), with each finished trial's line printed above it, where it stays;
- a pipe or a file (CI, `| tee`): the per-trial lines only, no cursor movement;
- quiet: only the final result line.

The live display is drawn with rich: Keras 3 already depends on it (no new install), and its Live region
keeps the lines printed while it runs above itself, so the trial lines read as in a log.

A closed pipe (`mnist-sweep run ... | head -2`) never stops work: once the reader is gone, stdout is
pointed at /dev/null and the command goes on; trials are recorded in Optuna and MLflow anyway.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, Any, Protocol, TextIO, cast

if TYPE_CHECKING:
    from rich.console import Console as RichConsole
    from rich.console import RenderableType
    from rich.live import Live

REFRESHES_PER_SECOND = 4  # rich redraws from its own thread; the batch hook only stores numbers
# Below this share of a trial, its own pace is mostly the model's compilation: too early to extrapolate.
ETA_MIN_FRACTION = 0.05


class Echo(Protocol):
    """Prints one line for the user; `final` marks the command's result, the only line --quiet keeps."""

    def __call__(self, line: str, *, final: bool = False) -> None: ...


class TrialProgress(Protocol):
    """What the trial loop tells a live display. Batch calls come from Keras' callback thread."""

    def study(self, *, metric: str, finished: int, target: int, best: float | None) -> None: ...

    def trial_started(self, *, number: int, epochs: int) -> None: ...

    def batch(self, epoch: int, done: int, steps: int) -> None: ...

    def epoch(self, epoch: int, values: Mapping[str, float]) -> None: ...

    def trial_ended(self) -> None: ...

    def waiting(
        self, *, trials: Sequence[str], metric: str, finished: int, target: int, best: float | None
    ) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    """No live display (a pipe, --quiet, --verbose): every call does nothing."""

    def study(self, *, metric: str, finished: int, target: int, best: float | None) -> None:
        pass

    def trial_started(self, *, number: int, epochs: int) -> None:
        pass

    def batch(self, epoch: int, done: int, steps: int) -> None:
        pass

    def epoch(self, epoch: int, values: Mapping[str, float]) -> None:
        pass

    def trial_ended(self) -> None:
        pass

    def waiting(self, *, trials: Sequence[str], metric: str, finished: int, target: int, best: float | None) -> None:
        pass

    def close(self) -> None:
        pass


NO_PROGRESS = NoProgress()


class ReaderSafeStream:
    """A text stream that, once its reader has gone (EPIPE), drops what is written instead of raising.

    It stands in for sys.stdout, so a print anywhere (ours, a library's, the interpreter's last flush)
    cannot end the command with a BrokenPipeError.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self.reader_gone = False

    def write(self, text: str) -> int:
        if not self.reader_gone:
            try:
                return self._stream.write(text)
            except (BrokenPipeError, ValueError):  # ValueError: the stream was closed under us
                self._reader_went_away()
        return len(text)

    def flush(self) -> None:
        if not self.reader_gone:
            try:
                self._stream.flush()
            except (BrokenPipeError, ValueError):
                self._reader_went_away()

    def isatty(self) -> bool:
        return not self.reader_gone and self._stream.isatty()

    def _reader_went_away(self) -> None:
        self.reader_gone = True
        # What is still buffered, and whatever else writes to this descriptor later (child processes,
        # the interpreter's flush at exit), goes to /dev/null instead of failing again.
        with contextlib.suppress(OSError, ValueError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)

    def __getattr__(self, name: str) -> Any:  # encoding, fileno, buffer, ...: the real stream's
        return getattr(self._stream, name)


class Console:
    """The command's stdout: an echo for lines, and a live display where there is a terminal."""

    def __init__(self, stream: TextIO, *, quiet: bool = False, live: bool = False) -> None:
        self.stream = stream
        self.quiet = quiet
        self._rich: RichConsole | None = None
        self.progress: TrialProgress = NO_PROGRESS
        if live and not quiet:
            from rich.console import Console as RichConsole

            # The caller checked for a terminal; force it so rich does not second-guess a pty.
            self._rich = RichConsole(file=cast(IO[str], stream), force_terminal=True, highlight=False)
            self.progress = LiveProgress(self._rich)

    def echo(self, line: str, *, final: bool = False) -> None:
        if self.quiet and not final:
            return
        if self._rich is not None:  # printed above the live display, if one is up
            self._rich.print(line, markup=False, highlight=False, emoji=False, soft_wrap=True)
            return
        self.stream.write(line + "\n")
        self.stream.flush()


def wants_live_display(stream: TextIO) -> bool:
    """A terminal that can move its cursor; pipes, files and TERM=dumb get plain lines."""
    return stream.isatty() and os.environ.get("TERM", "") not in ("dumb", "unknown")


def stdout_console(*, quiet: bool, verbose: bool) -> Console:
    """Guard sys.stdout and sys.stderr against a closed pipe and build the console for stdout.

    stderr too, for `run 2>&1 | head -2`. --verbose keeps plain lines: TensorFlow's C++ runtime writes
    to the terminal directly and would tear a live display.
    """
    if not isinstance(sys.stderr, ReaderSafeStream):
        sys.stderr = cast(TextIO, ReaderSafeStream(sys.stderr))
    stream: TextIO = sys.stdout
    if not isinstance(stream, ReaderSafeStream):
        stream = sys.stdout = cast(TextIO, ReaderSafeStream(stream))
    return Console(stream, quiet=quiet, live=not verbose and wants_live_display(stream))


def duration(seconds: float) -> str:
    """0:07:05, the way a user reads a remaining time."""
    whole = max(round(seconds), 0)
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


class LiveProgress:
    """The live display: one row for the running trial, one for the study; redrawn by rich's thread."""

    def __init__(self, console: RichConsole) -> None:
        self.console = console
        self._live: Live | None = None
        self.metric = ""
        self.finished = 0
        self.target = 0
        self.best: float | None = None
        self.number: int | None = None
        self.epochs = 0
        self.current_epoch = 0
        self.batches_done = 0
        self.steps = 0
        self.last_value: float | None = None
        self.trial_started_at = 0.0
        self.trial_seconds: list[float] = []  # of the trials this process finished, for the ETA
        self.workers = 1  # local workers training side by side (`run --workers N`): the trials left share out
        self.waiting_for: str | None = None  # before scoring: the other workers' trials still training

    def study(self, *, metric: str, finished: int, target: int, best: float | None) -> None:
        self.metric, self.finished, self.target, self.best = metric, finished, target, best

    def trial_started(self, *, number: int, epochs: int) -> None:
        self.number, self.epochs = number, epochs
        self.current_epoch, self.batches_done, self.steps, self.last_value = 1, 0, 0, None
        self.trial_started_at = time.monotonic()
        self._start()

    def waiting(self, *, trials: Sequence[str], metric: str, finished: int, target: int, best: float | None) -> None:
        """Before the test set is scored: the trials other workers still train, and the study's row."""
        self.metric, self.finished, self.target, self.best = metric, finished, target, best
        self.waiting_for = ", ".join(trials) if trials else "no trial training; waiting to be sure none starts"
        self._start()

    def _start(self) -> None:
        if self._live is None:
            from rich.live import Live

            self._live = Live(
                console=self.console,
                get_renderable=self.render,
                refresh_per_second=REFRESHES_PER_SECOND,
                transient=True,  # when the loop ends the display goes; the trial lines stay
            )
            self._live.start()

    def batch(self, epoch: int, done: int, steps: int) -> None:
        # Called once per executed step; storing three numbers keeps it negligible beside the step.
        self.current_epoch, self.batches_done, self.steps = epoch, done, steps

    def epoch(self, epoch: int, values: Mapping[str, float]) -> None:
        self.last_value = values.get(self.metric)
        if epoch < self.epochs:
            self.current_epoch, self.batches_done = epoch + 1, 0

    def trial_ended(self) -> None:
        if self.number is not None:
            self.trial_seconds.append(time.monotonic() - self.trial_started_at)
        self.number = None
        if self._live is not None:
            self._live.refresh()  # the finished trial's row goes before its permanent line is printed

    def close(self) -> None:
        self.waiting_for = None
        if self._live is not None:
            self._live.stop()
            self._live = None

    def trial_fraction(self) -> float:
        """How much of the running trial's epochs is done, 0..1."""
        if not self.epochs:
            return 0.0
        within = self.batches_done / self.steps if self.steps else 0.0
        return min(((self.current_epoch - 1) + within) / self.epochs, 1.0)

    def eta_seconds(self) -> float | None:
        """The running trial's remaining time plus the mean trial time for each trial still to run."""
        elapsed = time.monotonic() - self.trial_started_at if self.number is not None else 0.0
        fraction = self.trial_fraction() if self.number is not None else 0.0
        this_trial = elapsed / fraction if fraction >= ETA_MIN_FRACTION else None
        mean = sum(self.trial_seconds) / len(self.trial_seconds) if self.trial_seconds else None
        per_trial = mean if mean is not None else this_trial
        if per_trial is None:
            return None
        remaining_here = max((this_trial if this_trial is not None else per_trial) - elapsed, 0.0)
        still_to_start = max(self.target - self.finished - (1 if self.number is not None else 0), 0)
        return remaining_here + per_trial * still_to_start / self.workers

    def render(self) -> RenderableType:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        grid = Table.grid(padding=(0, 2))
        for _ in range(4):
            grid.add_column()
        if self.number is not None:
            value = f"{self.last_value:.4f}" if self.last_value is not None else "-"
            grid.add_row(
                f"trial {self.number}",
                f"epoch {self.current_epoch}/{self.epochs}",
                ProgressBar(total=max(self.steps, 1), completed=self.batches_done, width=30),
                f"batch {self.batches_done}/{self.steps or '?'}  {self.metric} {value}",
            )
        if self.waiting_for is not None:
            grid.add_row("waiting", "for other workers", "", self.waiting_for)
        eta = self.eta_seconds()
        best = f"{self.best:.4f}" if self.best is not None else "-"
        grid.add_row(
            "study",
            f"{self.finished}/{self.target} trials done",
            ProgressBar(total=max(self.target, 1), completed=self.finished, width=30),
            f"best {self.metric} {best}  ETA {duration(eta) if eta is not None else '-'}",
        )
        return grid
