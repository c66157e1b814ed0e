"""Whether a trial goes on: its epoch budget, where it starts from, and after each epoch whether it stops early.

`Scheduler` is the seam a trial run calls at its begin, per-epoch and end hooks (trial_run.TrialRun); `make_scheduler`
chooses the one a sweep file asks for, in one place:
- `PrunerScheduler`: every trial trains train.epochs from scratch, the study's Optuna pruner (median, percentile,
  successive halving or none) asked after each epoch;
- `OraclePlanScheduler`: keras-tuner's oracle chooses the trials, and hyperband's plan gives each its epochs and the
  earlier trial a promotion goes on from (keras_tuner_engine); the pruner as above;
- `asha.AshaScheduler` (study.pruner = "asha"): asynchronous successive halving, each promotion its own trial.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import optuna
from optuna.trial import TrialState

from mnist_sweep.config import SweepConfig
from mnist_sweep.keras_tuner_engine import planned_epochs, planned_warm_start


@dataclass(frozen=True)
class Resume:
    """Where a promoted trial goes on from: the earlier trial's logged model, after its `initial_epoch` epochs.

    `restart_schedule`: the learning-rate schedule starts again over the epochs left (a warm restart, ASHA's new
    segment) rather than going on where the earlier trial's steps left it (keras-tuner's hyperband)."""

    model_uri: str
    initial_epoch: int
    restart_schedule: bool = False


class Scheduler(Protocol):
    """Decides each trial's budget and whether it goes on after an epoch."""

    def trial_begins(self, trial: optuna.Trial) -> None:
        """Before the trial's values are sampled: a promoting scheduler decides here what the trial is."""
        ...

    def epochs(self, trial: optuna.Trial, default: int) -> int:
        """The epochs `trial` trains to (train.epochs unless the scheduler plans otherwise)."""
        ...

    def warm_start(self, trial: optuna.Trial) -> Resume | None:
        """For a promoted trial: the earlier trial it goes on from."""
        ...

    def run_tags(self, trial: optuna.Trial) -> dict[str, str]:
        """What the trial's MLflow run records of its place in the schedule (its rung, the trial it goes on from)."""
        ...

    def stop_reason(self, trial: optuna.Trial, *, epoch: int, value: float, last: bool) -> str | None:
        """After `epoch` (`last`: the trial's final one), why the trial stops here; None: it goes on."""
        ...

    def trial_ended(self, trial: optuna.Trial, state: TrialState) -> None:
        """The trial ended so (COMPLETE, PRUNED, FAIL): what a promoting scheduler records."""
        ...


def make_scheduler(cfg: SweepConfig) -> Scheduler:
    """The scheduler the sweep file asks for (see the module's docstring)."""
    if cfg.study.pruner == "asha":
        from mnist_sweep.asha import AshaScheduler  # it imports this module's Resume

        return AshaScheduler.from_config(cfg)
    if cfg.study.engine == "keras-tuner":
        return OraclePlanScheduler(cfg.study.metric)
    return PrunerScheduler(cfg.study.metric)


class PrunerScheduler:
    """Every trial trains train.epochs from scratch; the study's Optuna pruner is asked after each epoch (each
    epoch's metric reported to the trial first), and the trial stops where it says so."""

    def __init__(self, metric: str) -> None:
        self.metric = metric  # the study metric, named in the reason

    def trial_begins(self, trial: optuna.Trial) -> None:
        """Nothing to decide: the sampler draws the trial."""

    def epochs(self, trial: optuna.Trial, default: int) -> int:
        return default

    def warm_start(self, trial: optuna.Trial) -> Resume | None:
        return None

    def run_tags(self, trial: optuna.Trial) -> dict[str, str]:
        return {}

    def stop_reason(self, trial: optuna.Trial, *, epoch: int, value: float, last: bool) -> str | None:
        trial.report(value, step=epoch)
        # After the last epoch the training is paid for: keep the model rather than prune it.
        if not last and trial.should_prune():
            return pruned_reason(epoch, self.metric, value)
        return None

    def trial_ended(self, trial: optuna.Trial, state: TrialState) -> None:
        """Nothing to record: Optuna's pruner reads the study's trials itself."""


class OraclePlanScheduler(PrunerScheduler):
    """keras-tuner's oracle chooses the trials: hyperband's plan gives each its epochs and the earlier trial a
    promotion goes on from (its schedule going on where that trial's steps left it, as keras-tuner does)."""

    def epochs(self, trial: optuna.Trial, default: int) -> int:
        return planned_epochs(trial, default)

    def warm_start(self, trial: optuna.Trial) -> Resume | None:
        planned = planned_warm_start(trial)
        if planned is None:
            return None
        model_uri, initial_epoch = planned
        return Resume(model_uri=model_uri, initial_epoch=initial_epoch)


def pruned_reason(epoch: int, metric: str, value: float) -> str:
    """Why a trial was pruned: raised by the pruning hook and shown on the trial's line."""
    return f"pruned at epoch {epoch}: {metric} = {value:.4f}"


class PruningHook:
    """The scheduler as an epoch hook of trial.run_trial: the study metric to it after each epoch, and
    optuna.TrialPruned raised (which stops the fit) when it says stop.

    A trial another worker failed as stale refuses the report (UpdateFinishedTrialError), which stops its fit
    too; the trial run's end finds out why (TrialRun.end).
    """

    def __init__(self, trial: optuna.Trial, metric: str, epochs: int, scheduler: Scheduler) -> None:
        self.trial = trial
        self.metric = metric
        self.epochs = epochs
        self.scheduler = scheduler
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
