"""The loop that runs trials, in layers as Optuna's own: run until the study has its trials → one trial (ask,
run it with a heartbeat, tell) → after it, its line, the failure budget, dead workers' trials settled, a signal
or a failed upload acted on, a sealed study stopped.

Optuna's heartbeats fail the trials of killed workers, and RetryHeartbeatStaleTrialCallback (study.make_storage)
retries their parameters.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import warnings
from collections.abc import Callable, Iterator

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_sweep.asha import EPOCHS_ATTR, PROMOTED_FROM_ATTR
from mnist_sweep.console import TrialProgress
from mnist_sweep.errors import TooManyFailures
from mnist_sweep.heartbeat import beating
from mnist_sweep.interrupt import raise_if_requested
from mnist_sweep.records import FAIL_REASON_ATTR, FIT_SECONDS_ATTR, TRACKING_SECONDS_ATTR
from mnist_sweep.scheduler import pruned_reason
from mnist_sweep.study import StudyContext, count_finished, settle_stale
from mnist_sweep.trial_run import TAKEN_OVER, TrialEnd, Trials
from mnist_sweep.workarounds import OPTUNA_TRIAL_LOGGER


def run_trials(
    trials: Trials,
    *,
    target: int,
    max_failures: int,
    echo: Callable[[str], None],
    sealed: Callable[[], bool] = lambda: False,
) -> int:
    """Run trials until the study has `target` finished ones (COMPLETE or PRUNED, from every worker), the
    study is `sealed` (its test set scored), `max_failures` trials of this process have failed, or a Ctrl-C or
    SIGTERM arrives; returns how many ran here. Every upload is waited for before it returns or raises."""
    context = trials.context
    lines = TrialLines(trials.progress, echo, metric=trials.cfg.study.metric, target=target)
    seal = SealWatch(sealed, echo, study_name=context.study.study_name)
    budget = FailureBudget(max_failures)
    uploads = context.ledger.uploads
    try:
        raise_if_requested()
        settle_stale(context)
        while not seal.seen() and lines.show_study(context.study) < target:
            frozen, ended = run_one_trial(context, trials)
            after_trial(context, frozen, ended, lines=lines, budget=budget)
            uploads.raise_if_failed()
    except BaseException:
        uploads.wait(raise_errors=False)  # a FINISHED run has its artifacts (BackgroundUploads)
        raise
    else:
        uploads.wait()
    finally:
        trials.progress.close()  # before any later line or error, so the display does not linger
    return lines.ran


def run_one_trial(context: StudyContext, trials: Trials) -> tuple[FrozenTrial | None, TrialEnd]:
    """Ask → run → tell; the frozen trial as Optuna recorded it (None where another worker took it over)."""
    with warnings.catch_warnings():  # Optuna expects heartbeats only in its own loop; this one beats them too
        warnings.filterwarnings("ignore", message="Heartbeat of storage", category=UserWarning)
        trial = context.study.ask()
    with heartbeat(context.storage, trial):
        ended = trials.run(trial)
    if ended.taken_over:
        return None, ended
    frozen = context.study.tell(trial, ended.value, state=ended.state, skip_if_finished=True)
    if frozen.state != ended.state:  # failed as stale by another worker since the run's end looked: taken over
        return None, dataclasses.replace(ended, state=None)
    return frozen, ended


def after_trial(
    context: StudyContext,
    frozen: FrozenTrial | None,
    ended: TrialEnd,
    *,
    lines: TrialLines,
    budget: FailureBudget,
) -> None:
    """What follows each trial of this process, in order. A signal that stopped the trial is raised once it is
    recorded; the trial prints no line then (the process is stopping), unless another worker took it over."""
    if frozen is None:
        lines.taken_over(context.study, ended.number)
    else:
        if ended.interrupt is not None:
            raise ended.interrupt
        lines.trial(context.study, frozen)
        log_as_optuna(context.study, frozen, metric=lines.metric)
        budget.count(frozen)
    settle_stale(context)  # this process may be the one to find a dead worker's trials
    if ended.interrupt is not None:
        raise ended.interrupt
    raise_if_requested()  # a Ctrl-C or SIGTERM that arrived during the trial's last steps: stop before the next


# Optuna's own logger: `--verbose` shows these lines, as `study.optimize` logged them before this loop was ours.
_optuna_log = optuna.logging.get_logger(OPTUNA_TRIAL_LOGGER)


def log_as_optuna(study: optuna.Study, trial: FrozenTrial, *, metric: str) -> None:
    """Optuna's INFO/WARNING line for a trial told through `study.tell`, which (unlike `study.optimize`) logs none."""
    if not _optuna_log.isEnabledFor(logging.WARNING):  # the default (cli: ERROR): no query for the best trial
        return
    if trial.state == TrialState.COMPLETE:
        best = study.best_trial
        _optuna_log.info(
            f"Trial {trial.number} finished with value: {trial.value} and parameters: {trial.params}. "
            f"Best is trial {best.number} with value: {best.value}."
        )
    elif trial.state == TrialState.PRUNED and trial.last_step is not None and trial.value is not None:
        _optuna_log.info(f"Trial {trial.number} pruned. {pruned_reason(trial.last_step, metric, trial.value)}")
    elif trial.state == TrialState.FAIL:
        reason = trial.user_attrs.get(FAIL_REASON_ATTR, "unknown")
        _optuna_log.warning(
            f"Trial {trial.number} failed with parameters: {trial.params} because of the following error: {reason}."
        )


@contextlib.contextmanager
def heartbeat(storage: optuna.storages.BaseStorage, trial: optuna.Trial) -> Iterator[None]:
    """The trial's heartbeat recorded every study.heartbeat_seconds while it runs, as `study.optimize` does,
    so another worker fails it as stale only once this process stops beating."""
    interval = storage.get_heartbeat_interval() if isinstance(storage, optuna.storages.RDBStorage) else None
    if interval is None or not isinstance(storage, optuna.storages.RDBStorage):
        yield
        return
    rdb: optuna.storages.RDBStorage = storage
    study_id = rdb.get_study_id_from_name(trial.study.study_name)
    trial_id = rdb.get_trial_id_from_study_id_trial_number(study_id, trial.number)
    with beating(lambda: rdb.record_heartbeat(trial_id), every=interval, name="mnist-sweep-heartbeat"):
        yield


class TrialLines:
    """After each trial of this process: its line above the live display, and the study's count and best."""

    def __init__(self, progress: TrialProgress, echo: Callable[[str], None], *, metric: str, target: int) -> None:
        self.progress = progress
        self.echo = echo
        self.metric = metric
        self.target = target
        self.ran = 0

    def trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._print(study, trial.number, trial.state.name, self._body(trial))

    def taken_over(self, study: optuna.Study, number: int) -> None:
        self._print(study, number, "FAIL", TAKEN_OVER)

    def show_study(self, study: optuna.Study) -> int:
        """The study's finished trials (from every worker), also told to the live display with the best value."""
        finished = count_finished(study)
        try:
            best: float | None = float(study.best_value)
        except ValueError:  # no complete trial yet
            best = None
        self.progress.study(metric=self.metric, finished=finished, target=self.target, best=best)
        return finished

    def _print(self, study: optuna.Study, number: int, state: str, body: str) -> None:
        self.ran += 1
        finished = self.show_study(study)
        self.progress.trial_ended()
        self.echo(f"trial {number:4d}  {state:<8}  {body}  [{finished}/{self.target} finished]")

    def _body(self, trial: FrozenTrial) -> str:
        if trial.state == TrialState.COMPLETE:
            fit, tracking = (
                trial.user_attrs.get(FIT_SECONDS_ATTR, 0.0),
                trial.user_attrs.get(TRACKING_SECONDS_ATTR, 0.0),
            )
            line = f"{self.metric} = {trial.value:.4f}  (fit {fit:.1f} s, tracking {tracking:.2f} s)"
            source = trial.user_attrs.get(PROMOTED_FROM_ATTR)  # an ASHA promotion: whose weights it went on from
            return (
                line if source is None else f"{line}  on from trial {source} to {trial.user_attrs[EPOCHS_ATTR]} epochs"
            )
        if trial.state == TrialState.PRUNED and trial.last_step is not None and trial.value is not None:
            return pruned_reason(trial.last_step, self.metric, trial.value)
        return str(trial.user_attrs.get(FAIL_REASON_ATTR, trial.state.name.lower()))


class FailureBudget:
    """Stops the sweep once `max_failures` trials of this process have failed."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.failures = 0

    def count(self, trial: FrozenTrial) -> None:
        if trial.state != TrialState.FAIL:
            return
        self.failures += 1
        if self.failures >= self.max_failures:
            raise TooManyFailures(
                f"{self.failures} trials failed in this process (study.max_failures = {self.max_failures}); "
                f"last error: {trial.user_attrs.get(FAIL_REASON_ATTR, 'unknown')}"
            )


class SealWatch:
    """Stops this process's trials once the study is sealed: a trial begun after the seal can never be chosen.

    Checked before each trial, so a worker that joins or goes on after `finalize` took the seal starts nothing;
    one that asked for its trial just before the seal (a race) trains it, and it is recorded, but the test
    result names the trials it was chosen among (`TestResult.counted_trials`).
    """

    def __init__(self, sealed: Callable[[], bool], echo: Callable[[str], None], *, study_name: str) -> None:
        self.sealed = sealed
        self.echo = echo
        self.study_name = study_name
        self._seen = False

    def seen(self) -> bool:
        """Whether the study is sealed (said once, in one line)."""
        if not self._seen and self.sealed():
            self._seen = True
            self.echo(f"study {self.study_name!r} is sealed (its test set scored): this process starts no more trials")
        return self._seen
