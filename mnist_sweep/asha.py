"""Asynchronous successive halving (ASHA, Li et al. 2020) for the Optuna engine: study.pruner = "asha".

Rungs r = 0, 1, ... train each trial to pruner_warmup_epochs · pruner_reduction_factor^r epochs (η = the factor),
the last rung to train.epochs. When a trial begins, the best trial of the highest rung that is in the top 1/η of the
trials finished at its rung, and that no trial goes on from yet, is promoted: this trial takes its parameters and its
weights and trains on to the next rung's budget. With none to promote, the study's sampler draws a new trial at rung
0. Nothing waits for a rung to fill (the asynchronous rule), so several workers never idle.

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

from collections.abc import Sequence
from dataclasses import dataclass

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_sweep.config import SweepConfig
from mnist_sweep.records import MODEL_URI_KEY, RUN_ID_ATTR
from mnist_sweep.scheduler import Resume
from mnist_sweep.workarounds import fix_trial_params

RUNG_ATTR = "asha_rung"
PROMOTED_FROM_ATTR = "asha_promoted_from"
RUNG_TAG = "asha.rung"
PROMOTED_FROM_TAG = "asha.promoted_from"
PROMOTED_FROM_RUN_TAG = "asha.promoted_from_run"


@dataclass(frozen=True)
class Rungs:
    """The epochs each rung trains to: first · factor^r, the last rung capped at `last`."""

    first: int
    factor: int
    last: int

    @classmethod
    def from_config(cls, cfg: SweepConfig) -> Rungs:
        study = cfg.study
        return cls(first=study.pruner_warmup_epochs, factor=study.pruner_reduction_factor, last=cfg.train.epochs)

    def epochs(self, rung: int) -> int:
        return int(min(self.first * self.factor**rung, self.last))

    @property
    def top(self) -> int:
        """The highest rung: the first whose budget reaches `last`."""
        rung = 0
        while self.epochs(rung) < self.last:
            rung += 1
        return rung


def promotable(trials: Sequence[FrozenTrial], rungs: Rungs, *, maximize: bool) -> list[FrozenTrial]:
    """The trials that may go on to their next rung now, in the order ASHA takes them: highest rung first, best
    first within a rung. A trial is promotable while it is in the top 1/η of the trials COMPLETE at its rung and no
    trial (of any state but a lost claim) goes on from it."""
    claimed = {t.user_attrs.get(PROMOTED_FROM_ATTR) for t in trials} - {None}
    chosen: list[FrozenTrial] = []
    for rung in reversed(range(rungs.top)):
        done = [
            t
            for t in trials
            if t.state == TrialState.COMPLETE and t.user_attrs.get(RUNG_ATTR) == rung and t.value is not None
        ]
        done.sort(key=lambda t: (-t.value if maximize else t.value, t.number))  # type: ignore[operator]
        chosen += [t for t in done[: len(done) // rungs.factor] if t.number not in claimed]
    return chosen


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
    values are sampled, whether it is a promotion; the per-epoch metric is reported (the dashboard's
    curves), never used to prune."""

    def __init__(self, rungs: Rungs, *, maximize: bool) -> None:
        self.rungs = rungs
        self.maximize = maximize

    @classmethod
    def from_config(cls, cfg: SweepConfig) -> AshaScheduler:
        return cls(Rungs.from_config(cfg), maximize=cfg.study.direction == "maximize")

    def trial_begins(self, trial: optuna.Trial) -> None:
        """This trial's rung: a promotion's (its values fixed to the source's) where one can be claimed, else 0.
        A stale trial's retry keeps its rung and its claim (Optuna copies its user attrs)."""
        if RUNG_ATTR in trial.user_attrs:
            return
        study = trial.study
        for source in promotable(study.get_trials(deepcopy=False), self.rungs, maximize=self.maximize):
            if claim(trial, source):
                fix_trial_params(trial, dict(source.params))
                trial.set_user_attr(RUNG_ATTR, int(source.user_attrs[RUNG_ATTR]) + 1)
                return
        trial.set_user_attr(RUNG_ATTR, 0)

    def epochs(self, trial: optuna.Trial, default: int) -> int:
        return self.rungs.epochs(int(trial.user_attrs.get(RUNG_ATTR, 0)))

    def warm_start(self, trial: optuna.Trial) -> Resume | None:
        source = self._source(trial)
        if source is None or not source.user_attrs.get(MODEL_URI_KEY):
            return None  # a rung-0 trial, or its source left no model: all its epochs from scratch
        return Resume(
            model_uri=str(source.user_attrs[MODEL_URI_KEY]),
            initial_epoch=self.rungs.epochs(int(source.user_attrs[RUNG_ATTR])),
            restart_schedule=True,
        )

    def run_tags(self, trial: optuna.Trial) -> dict[str, str]:
        attrs = trial.user_attrs
        tags = {RUNG_TAG: str(attrs.get(RUNG_ATTR, 0))}
        source = self._source(trial)
        if source is not None:
            tags[PROMOTED_FROM_TAG] = str(source.number)
            tags[PROMOTED_FROM_RUN_TAG] = str(source.user_attrs.get(RUN_ID_ATTR, ""))
        return tags

    def _source(self, trial: optuna.Trial) -> FrozenTrial | None:
        number = trial.user_attrs.get(PROMOTED_FROM_ATTR)
        if number is None:
            return None
        return next((t for t in trial.study.get_trials(deepcopy=False) if t.number == number), None)

    def stop_reason(self, trial: optuna.Trial, *, epoch: int, value: float, last: bool) -> str | None:
        trial.report(value, step=epoch)  # the curve on the trial; a rung is never cut short
        return None

    def trial_ended(self, trial: optuna.Trial, state: TrialState) -> None:
        """Nothing to record: the next trial's begin reads the rungs from the study."""
