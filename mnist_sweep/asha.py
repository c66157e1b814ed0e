"""Asynchronous successive halving (ASHA, Li et al. 2020) for the Optuna engine: study.pruner = "asha".

Rungs r = 0, 1, ... train each trial to pruner_warmup_epochs · pruner_reduction_factor^r epochs (η = the factor),
the last rung to train.epochs. With study.pruner_budget = "seconds", rung r is pruner_min_seconds · η^r seconds of
fit instead: a trial's epochs are that budget over its seconds per epoch (its source's, measured, for a promotion;
the median of the study's trials of its batch size for a new one; rung r's epochs until one is measured), at most
train.epochs, so a configuration twice as dear per epoch trains half the epochs and is compared at the same cost.

When a trial begins, the best trial of the highest rung that is in the top 1/η of the trials finished at its rung,
and that no trial goes on from yet, is promoted: this trial takes its parameters and its weights and trains on to
the next rung's budget. With none to promote, the study's sampler draws a new trial at rung 0. Nothing waits for a
rung to fill (the asynchronous rule), so several workers never idle. docs/asha.md is the user's page.

Each promotion is its own Optuna trial and MLflow child run, as keras-tuner's hyperband records its promotions:
every trial ends COMPLETE with its model, confusion matrix and per-epoch metrics, and names the trial it goes on
from (user attr `asha_promoted_from`, run tag `asha.promoted_from`). No trial is pruned mid-rung.

How the sampler sees promotions: a promotion's values are fixed as `study.enqueue_trial` fixes them, so the sampler
draws nothing for it and its random stream stays that of the new trials. The promoted trial then enters the
sampler's history as one more observation of the same point, at a larger budget; it lands in TPE's "good" group,
where the point was already (it was in the top 1/η of its rung), so the repetition sharpens TPE around points that
kept winning rather than misleading it. The budget each value was measured at is on every trial (`asha_rung`).

Two workers never promote the same trial: the claim is the promoting trial's user attr, written to the storage and
then read back; a claim counts only where no other trial claims the same one (first writer wins; where two write
before either reads, both give up and draw new trials). A stale trial's retry copies the attr, so it is the claim.

The learning-rate schedule fits the rungs: a rung-0 trial's cosine decay ends at its own budget, and a promotion
restarts the decay over its new segment from the trial's learning rate (a warm restart, SGDR), its weights going on
from the earlier trial's.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_sweep.config import SweepConfig
from mnist_sweep.records import EPOCHS_TRAINED_ATTR, FIT_SECONDS_ATTR, MODEL_URI_KEY, RUN_ID_ATTR
from mnist_sweep.scheduler import Resume
from mnist_sweep.workarounds import fix_trial_params

RUNG_ATTR = "asha_rung"
PROMOTED_FROM_ATTR = "asha_promoted_from"
EPOCHS_ATTR = "asha_epochs"  # the epochs a trial trains to: its rung's, decided at its begin
RUNG_TAG = "asha.rung"
PROMOTED_FROM_TAG = "asha.promoted_from"
PROMOTED_FROM_RUN_TAG = "asha.promoted_from_run"


@dataclass(frozen=True)
class Rungs:
    """Rung r's budget: first · factor^r epochs (capped at `last`), or, with `seconds`, seconds · factor^r seconds."""

    first: int
    factor: int
    last: int
    seconds: float = 0.0  # 0: the rungs count epochs

    @classmethod
    def from_config(cls, cfg: SweepConfig) -> Rungs:
        study = cfg.study
        seconds = study.pruner_min_seconds if study.pruner_budget == "seconds" else 0.0
        return cls(
            first=study.pruner_warmup_epochs,
            factor=study.pruner_reduction_factor,
            last=cfg.train.epochs,
            seconds=seconds,
        )

    def epochs(self, rung: int) -> int:
        """Rung r's epochs where the rungs count epochs."""
        return int(min(self.first * self.factor**rung, self.last))

    def epochs_for(self, rung: int, seconds_per_epoch: float | None, *, after: int = 0) -> int:
        """The epochs a trial at `rung` trains to: more than the `after` it goes on from, at most `last`."""
        if not self.seconds or seconds_per_epoch is None:
            wanted = self.epochs(rung)
        else:
            wanted = round(self.seconds * self.factor**rung / max(seconds_per_epoch, 1e-9))
        return int(min(max(wanted, after + 1, 1), self.last))


def lineage(trials: Sequence[FrozenTrial], trial: FrozenTrial) -> list[FrozenTrial]:
    """`trial`, then the trial it went on from, and so on back to rung 0: every trial that trained its model."""
    by_number = {t.number: t for t in trials}
    chain: list[FrozenTrial] = []
    current: FrozenTrial | None = trial
    while current is not None and current not in chain:
        chain.append(current)
        source = current.user_attrs.get(PROMOTED_FROM_ATTR)
        current = by_number.get(int(source)) if source is not None else None
    return chain


def model_epochs(trials: Sequence[FrozenTrial], trial: FrozenTrial) -> int | None:
    """The epochs `trial`'s model has trained: its own, and for a promotion those of the trials it went on from
    (a promotion's own EPOCHS_TRAINED_ATTR counts its segment only, 11 for one from 9 to 20 epochs)."""
    own = [t.user_attrs.get(EPOCHS_TRAINED_ATTR) for t in lineage(trials, trial)]
    return sum(int(epochs) for epochs in own if epochs is not None) if own[0] is not None else None


def one_rung_notice(cfg: SweepConfig) -> str | None:
    """The line a sweep says when ASHA's first rung already reaches train.epochs (a sweep shrunk by `--epochs`,
    say): one rung, so every trial trains train.epochs and none goes on. Accepted, not refused, so that a quick
    `--epochs 1` run of an ASHA sweep file works; said, so that nobody takes it for successive halving."""
    study = cfg.study
    if study.pruner != "asha" or study.pruner_budget == "seconds" or study.pruner_warmup_epochs < cfg.train.epochs:
        return None
    return (
        f"study.pruner = 'asha' with pruner_warmup_epochs = {study.pruner_warmup_epochs} and train.epochs = "
        f"{cfg.train.epochs}: one rung, every trial trains {cfg.train.epochs} epoch(s) and none goes on"
    )


def seconds_per_epoch(trial: FrozenTrial) -> float | None:
    """What an epoch of `trial`'s own training cost (its first epoch's tracing included), where it recorded it."""
    seconds, epochs = trial.user_attrs.get(FIT_SECONDS_ATTR), trial.user_attrs.get(EPOCHS_TRAINED_ATTR)
    return float(seconds) / int(epochs) if seconds and epochs else None


def promotable(trials: Sequence[FrozenTrial], rungs: Rungs, *, maximize: bool) -> list[FrozenTrial]:
    """The trials that may go on to their next rung now, in the order ASHA takes them: highest rung first, best
    first within a rung. A trial is promotable while it is in the top 1/η of the trials COMPLETE at its rung, has
    epochs left below train.epochs, and no trial (of any state; a given-up claim is None) goes on from it."""
    claimed = {t.user_attrs.get(PROMOTED_FROM_ATTR) for t in trials} - {None}
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None and RUNG_ATTR in t.user_attrs]
    chosen: list[FrozenTrial] = []
    for rung in sorted({int(t.user_attrs[RUNG_ATTR]) for t in done}, reverse=True):
        at_rung = [t for t in done if t.user_attrs[RUNG_ATTR] == rung]
        at_rung.sort(key=lambda t: (-t.value if maximize else t.value, t.number))  # type: ignore[operator]
        top = at_rung[: len(at_rung) // rungs.factor]
        chosen += [t for t in top if t.number not in claimed and _trained_to(t, rungs) < rungs.last]
    return chosen


def _trained_to(trial: FrozenTrial, rungs: Rungs) -> int:
    return int(trial.user_attrs.get(EPOCHS_ATTR, rungs.epochs(int(trial.user_attrs[RUNG_ATTR]))))


def claim(trial: optuna.Trial, source: FrozenTrial) -> bool:
    """Whether `trial` is the one promotion of `source`: its claim written, then no other claim found."""
    trial.set_user_attr(PROMOTED_FROM_ATTR, source.number)
    others = [
        t
        for t in trial.study.get_trials(deepcopy=False)
        if t.number != trial.number and t.user_attrs.get(PROMOTED_FROM_ATTR) == source.number
    ]
    if others:
        trial.set_user_attr(PROMOTED_FROM_ATTR, None)  # given up: the source stays promotable for a later trial
        return False
    return True


class AshaScheduler:
    """The ASHA schedule at the trial run's seam (scheduler.Scheduler): `trial_begins` decides, before the trial's
    values are sampled, whether it is a promotion; `epochs`, once they are, how far it trains. The per-epoch metric
    is reported (the dashboard's curves), never used to prune."""

    def __init__(self, rungs: Rungs, *, maximize: bool) -> None:
        self.rungs = rungs
        self.maximize = maximize
        # A promotion's source, by the promotion's number: it has ended, so it no longer changes, and epochs,
        # warm_start and run_tags each need it (one read of the study's trials a trial, not three).
        self._sources: dict[int, FrozenTrial | None] = {}

    @classmethod
    def from_config(cls, cfg: SweepConfig) -> AshaScheduler:
        return cls(Rungs.from_config(cfg), maximize=cfg.study.direction == "maximize")

    def trial_begins(self, trial: optuna.Trial) -> None:
        """This trial's rung: a promotion's (its values fixed to the source's) where one can be claimed, else 0.
        A stale trial's retry keeps its rung and its claim (Optuna copies its user attrs); an enqueued trial keeps
        its values."""
        if RUNG_ATTR in trial.user_attrs:
            return
        trials = trial.study.get_trials(deepcopy=False)
        if any(t.number == trial.number and t.system_attrs.get("fixed_params") for t in trials):
            # Enqueued with its own values (a redo of a trial whose artifacts were lost): they train, at rung 0.
            trial.set_user_attr(RUNG_ATTR, 0)
            return
        for source in promotable(trials, self.rungs, maximize=self.maximize):
            if claim(trial, source):
                fix_trial_params(trial, dict(source.params))
                trial.set_user_attr(RUNG_ATTR, int(source.user_attrs[RUNG_ATTR]) + 1)
                return
        trial.set_user_attr(RUNG_ATTR, 0)

    def epochs(self, trial: optuna.Trial, default: int) -> int:
        attrs = trial.user_attrs
        if EPOCHS_ATTR not in attrs:  # a retry keeps the epochs its trial was given
            rung, source = int(attrs.get(RUNG_ATTR, 0)), self._source(trial)
            if source is None:
                epochs = self.rungs.epochs_for(rung, self._measured(trial))
            else:
                epochs = self.rungs.epochs_for(rung, seconds_per_epoch(source), after=_trained_to(source, self.rungs))
            trial.set_user_attr(EPOCHS_ATTR, epochs)
            return epochs
        return int(attrs[EPOCHS_ATTR])

    def _measured(self, trial: optuna.Trial) -> float | None:
        """The median seconds per epoch of the study's trials of this trial's batch size (None: none yet)."""
        if not self.rungs.seconds:
            return None
        batch = trial.params.get("batch_size")
        costs = [
            cost
            for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.params.get("batch_size") == batch and (cost := seconds_per_epoch(t)) is not None
        ]
        return statistics.median(costs) if costs else None

    def warm_start(self, trial: optuna.Trial) -> Resume | None:
        source = self._source(trial)
        if source is None or not source.user_attrs.get(MODEL_URI_KEY):
            return None  # a rung-0 trial, or its source left no model: all its epochs from scratch
        return Resume(
            model_uri=str(source.user_attrs[MODEL_URI_KEY]),
            initial_epoch=_trained_to(source, self.rungs),
            restart_schedule=True,
        )

    def run_tags(self, trial: optuna.Trial) -> dict[str, str]:
        tags = {RUNG_TAG: str(trial.user_attrs.get(RUNG_ATTR, 0))}
        source = self._source(trial)
        if source is not None:
            tags[PROMOTED_FROM_TAG] = str(source.number)
            tags[PROMOTED_FROM_RUN_TAG] = str(source.user_attrs.get(RUN_ID_ATTR, ""))
        return tags

    def _source(self, trial: optuna.Trial) -> FrozenTrial | None:
        number = trial.user_attrs.get(PROMOTED_FROM_ATTR)
        if number is None:
            return None
        if trial.number not in self._sources:
            trials = trial.study.get_trials(deepcopy=False)
            self._sources[trial.number] = next((t for t in trials if t.number == number), None)
        return self._sources[trial.number]

    def stop_reason(self, trial: optuna.Trial, *, epoch: int, value: float, last: bool) -> str | None:
        trial.report(value, step=epoch)  # the curve on the trial; a rung is never cut short
        return None

    def trial_ended(self, trial: optuna.Trial, state: TrialState) -> None:
        """Nothing to record: the next trial's begin reads the rungs from the study."""
