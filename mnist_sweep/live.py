"""Which trials of a study can still change the choice of the trial to score, and what scoring does about them.

A trial is live while it is RUNNING in the study and its worker is alive: a dead worker's trial goes stale
(its heartbeat stops) and is failed and closed here, as every worker does after each trial, so it never
blocks. The test set is scored only once no trial is live: `finalize` refuses in one line naming them
(exit 2, nothing sealed), `finalize --wait` and the end of `run` wait for them, then score.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from mnist_sweep import interrupt
from mnist_sweep.console import Echo, TrialProgress
from mnist_sweep.errors import TrialsLiveError
from mnist_sweep.records import RUN_ID_ATTR
from mnist_sweep.study import StudyContext, count_finished, fail_abandoned, settle_stale
from mnist_sweep.tracking import Tracker

NO_RUN_YET = "worker not known yet: its run is being made"


@dataclass(frozen=True)
class LiveTrial:
    """A trial still training, and the worker training it (its MLflow run's `worker` tag)."""

    number: int
    worker: str

    def __str__(self) -> str:
        return f"trial {self.number} ({self.worker})"


def live_trials(context: StudyContext) -> list[LiveTrial]:
    """The study's RUNNING trials, once dead workers' trials are failed (stale heartbeat) and their runs closed."""
    settle_stale(context)
    fail_abandoned(context.study)
    running = context.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [LiveTrial(t.number, _worker(t.user_attrs.get(RUN_ID_ATTR), context.ledger.tracker)) for t in running]


def _worker(run_id: str | None, tracker: Tracker) -> str:
    worker = tracker.run_worker(run_id) if run_id else None
    return f"worker {worker}" if worker else NO_RUN_YET


def live_line(study_name: str, live: list[LiveTrial]) -> str:
    """The refusal: which trials still train, where, and the two ways on."""
    return (
        f"study {study_name!r} still has {len(live)} live trial(s), which could change the trial to score: "
        f"{', '.join(str(t) for t in live)}; the test set was not scored and nothing was sealed. "
        "Rerun once they have finished, or with --wait to wait for them"
    )


def settle_before_scoring(
    *,
    context: StudyContext,
    metric: str,
    target: int,
    wait: bool,
    quiet_seconds: float,
    poll_seconds: float,
    echo: Echo,
    progress: TrialProgress,
) -> None:
    """Return once no trial of the study is live; without `wait`, raise TrialsLiveError while one is.

    While the study is short of `target`, a worker between two trials holds none live for a moment, so
    waiting also asks that no trial has started for `quiet_seconds` (a heartbeat grace period): that the
    workers are done, not between trials. At `target` no worker starts another (MaxTrialsCallback).
    """
    if not wait:
        live = live_trials(context)
        if live:
            raise TrialsLiveError(live_line(context.study.study_name, live))
        return
    waiting = Waiting(context, metric=metric, target=target, quiet_seconds=quiet_seconds, echo=echo)
    try:
        interrupt.poll(lambda: waiting.settled(progress), every=poll_seconds)
    finally:
        progress.close()


class Waiting:
    """The state of one wait: what was last said, and since when nothing has trained or started."""

    def __init__(
        self,
        context: StudyContext,
        *,
        metric: str,
        target: int,
        quiet_seconds: float,
        echo: Echo,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.context, self.study = context, context.study
        self.metric, self.target, self.quiet_seconds = metric, target, quiet_seconds
        self.echo, self.clock = echo, clock
        self.said = ""
        self.trials = -1
        self.quiet_since = clock()

    def settled(self, progress: TrialProgress) -> bool | None:
        live = live_trials(self.context)
        trials = len(self.study.get_trials(deepcopy=False))
        finished = count_finished(self.study)
        if live or trials != self.trials:  # something trains, or started since the last look
            self.trials, self.quiet_since = trials, self.clock()
        progress.waiting(
            trials=[str(t) for t in live],
            metric=self.metric,
            finished=finished,
            target=self.target,
            best=_best(self.study),
        )
        if not live and (finished >= self.target or self.clock() - self.quiet_since >= self.quiet_seconds):
            return True
        if live:
            self._say(
                f"waiting for {', '.join(str(t) for t in live)} to finish "
                "(a trial whose worker died goes stale and is failed) before scoring the test set"
            )
        else:
            self._say(
                f"no trial is training and the study has {finished}/{self.target} finished: "
                f"scoring once no worker has started another for {self.quiet_seconds:.0f} s"
            )
        return None

    def _say(self, line: str) -> None:
        if line != self.said:  # once per change, not once per poll
            self.echo(line)
            self.said = line


def _best(study: optuna.Study) -> float | None:
    try:
        return float(study.best_value)
    except ValueError:  # no complete trial yet
        return None
