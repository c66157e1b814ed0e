"""Whether a trial goes on: its epoch budget, where it starts from, and after each epoch whether it stops early.

`Scheduler` is the seam a trial run calls at its begin, per-epoch and end hooks (trial_run.TrialRun); a scheduler
that promotes trials or budgets them in seconds (ASHA) plugs in here, not around the loop. `StudyScheduler` is the
one there is today: the study's Optuna pruner (median, percentile, successive halving or none) after each epoch,
and keras-tuner hyperband's plan (each trial's epochs, the earlier trial a promotion goes on from) where its
oracle chooses the trials.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import optuna
from optuna.trial import TrialState

from mnist_sweep.keras_tuner_engine import planned_epochs, planned_warm_start


class Scheduler(Protocol):
    """Decides each trial's budget and whether it goes on after an epoch."""

    def epochs(self, trial: optuna.Trial, default: int) -> int:
        """The epochs `trial` may train (train.epochs unless the scheduler plans otherwise)."""
        ...

    def warm_start(self, trial: optuna.Trial) -> tuple[str, int] | None:
        """For a promoted trial: the model URI of the trial it goes on from, and that trial's epochs."""
        ...

    def stop_reason(self, trial: optuna.Trial, *, epoch: int, value: float, last: bool) -> str | None:
        """After `epoch` (`last`: the trial's final one), why the trial stops here; None: it goes on."""
        ...

    def trial_ended(self, trial: optuna.Trial, state: TrialState) -> None:
        """The trial ended so (COMPLETE, PRUNED, FAIL): what a promoting scheduler records."""
        ...


class StudyScheduler:
    """The study's Optuna pruner: each epoch's metric reported to the trial (keras-tuner's oracle reads them too),
    pruned when the pruner says so. Budgets and promotions are keras-tuner hyperband's plan for the trial where its
    oracle chose it; otherwise every trial trains train.epochs from scratch.
    """

    def __init__(self, metric: str) -> None:
        self.metric = metric  # the study metric, named in the reason

    def epochs(self, trial: optuna.Trial, default: int) -> int:
        return planned_epochs(trial, default)

    def warm_start(self, trial: optuna.Trial) -> tuple[str, int] | None:
        return planned_warm_start(trial)

    def stop_reason(self, trial: optuna.Trial, *, epoch: int, value: float, last: bool) -> str | None:
        trial.report(value, step=epoch)
        # After the last epoch the training is paid for: keep the model rather than prune it.
        if not last and trial.should_prune():
            return pruned_reason(epoch, self.metric, value)
        return None

    def trial_ended(self, trial: optuna.Trial, state: TrialState) -> None:
        """Nothing to record: Optuna's pruner reads the study's trials itself."""


def pruned_reason(epoch: int, metric: str, value: float) -> str:
    """Why a trial was pruned: raised by the pruning hook and shown on the trial's line."""
    return f"pruned at epoch {epoch}: {metric} = {value:.4f}"


class PruningHook:
    """The scheduler as an epoch hook of trial.run_trial: the study metric to it after each epoch, and
    optuna.TrialPruned raised (which stops the fit) when it says stop.

    A trial another worker failed as stale refuses the report (UpdateFinishedTrialError), which stops its fit
    too; the trial run's end finds out why (TrialRun.end).
    """

    def __init__(self, trial: optuna.Trial, metric: str, epochs: int, scheduler: Scheduler | None = None) -> None:
        self.trial = trial
        self.metric = metric
        self.epochs = epochs
        self.scheduler: Scheduler = scheduler or StudyScheduler(metric)
        self.last_epoch = 0

    def __call__(self, epoch: int, values: Mapping[str, float]) -> None:
        if self.metric not in values:
            # KerasPruningCallback only warns here, and then never prunes; fail loudly instead.
            raise KeyError(f"study.metric {self.metric!r} is not among the epoch metrics {sorted(values)}")
        self.last_epoch = epoch
        value = values[self.metric]
        reason = self.scheduler.stop_reason(self.trial, epoch=epoch, value=value, last=epoch >= self.epochs)
        if reason is not None:
            raise optuna.TrialPruned(reason)
