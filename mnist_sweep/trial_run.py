"""One trial from begin to end, keras-tuner's hooks around it: begin (sample, open its MLflow run) → per epoch
(log, report to the scheduler, prune; a trial taken over by another worker stops there) → end (artifacts, close
the run) → the outcome the loop tells Optuna (trial_loop.py).

`TrialRun` holds one trial's state and nothing else does; `Trials` holds what this process's trials share.
MLflow is reached through the study's ledger only: this module does not import mlflow.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from mnist_sweep.config import SweepConfig
from mnist_sweep.console import NO_PROGRESS, TrialProgress
from mnist_sweep.data import Split, withholding_test_split
from mnist_sweep.records import (
    EPOCHS_TRAINED_ATTR,
    FAIL_REASON_ATTR,
    FIT_SECONDS_ATTR,
    MODEL_URI_KEY,
    RUN_ID_ATTR,
    SEED_ATTR,
    TRACKING_SECONDS_ATTR,
    VAL_ACCURACY_ATTR,
    VAL_CONFUSION_ATTR,
    VAL_LOSS_ATTR,
    RunParams,
)
from mnist_sweep.scheduler import PruningHook, Scheduler, make_scheduler
from mnist_sweep.space import sample_params
from mnist_sweep.study import SAMPLER_TAG, StudyContext
from mnist_sweep.tensorboard_log import ARTIFACT_PATH as TENSORBOARD_ARTIFACT
from mnist_sweep.tensorboard_log import EpochEvents

if TYPE_CHECKING:
    from mnist_sweep.train_settings import TrainSettings
    from mnist_sweep.trial import FitClock, TrialOutcome, WarmStart

TAKEN_OVER = (
    "another worker failed this trial as stale (its heartbeat was late) and will retry its parameters; "
    "a larger study.heartbeat_seconds avoids this on a busy machine"
)


@dataclass(frozen=True)
class TrialEnd:
    """How one trial ended here: the state and value the loop tells Optuna.

    `state` is None for a trial another worker took over (it failed it as stale): Optuna has its ending
    already. `interrupt`: the signal that stopped it, raised by the loop once the trial is recorded.
    """

    number: int
    state: TrialState | None
    value: float | None = None
    interrupt: KeyboardInterrupt | None = None

    @property
    def taken_over(self) -> bool:
        return self.state is None


class Trials:
    """What every trial of this process shares: the config, the split, the Keras session, the study, the
    live display, the scheduler. `run(trial)` runs one trial from begin to end; nothing is kept between trials."""

    def __init__(
        self,
        *,
        cfg: SweepConfig,
        split: Split,
        context: StudyContext,
        data_source: str,
        progress: TrialProgress = NO_PROGRESS,
        run_tags: Mapping[str, str] | None = None,
        scheduler: Scheduler | None = None,
    ) -> None:
        self.cfg = cfg
        self.split = split
        self.context = context
        self.progress = progress
        self.run_tags = dict(run_tags or {})  # every trial run's, besides the machine's (the worker policy's)
        self.scheduler: Scheduler = scheduler or make_scheduler(cfg)
        # TensorFlow loads here, after every input check: bad input fails fast and prints one line.
        from mnist_sweep.trial import TrialSession

        self.session = TrialSession()  # what this process's trials share (gc freeze, TF's registry)
        # What every trial run logs as params besides its hyperparameters and seed; replay decodes them.
        self.run_params = RunParams.from_config(
            cfg, data_source=data_source, n_train=len(split.y_train), n_val=len(split.y_val)
        )
        self.settings: TrainSettings = self.run_params.settings

    def run(self, trial: optuna.Trial) -> TrialEnd:
        """One trial asked of the study, run to its end here; the caller tells Optuna how it ended."""
        ended = TrialRun(trial, self).run()
        if ended.state is not None:
            self.scheduler.trial_ended(trial, ended.state)
        return ended


class TrialRun:
    """One trial: begin → fit with per-epoch hooks → end. Owns its MLflow run from opening to closing."""

    def __init__(self, trial: optuna.Trial, trials: Trials) -> None:
        self.trial = trial
        self.trials = trials
        self.ledger = trials.context.ledger
        self.metric = trials.cfg.study.metric
        self.run_id = ""
        self.tracking_seconds = 0.0  # the MLflow calls on the training thread: the tracking overhead
        self.events: EpochEvents | None = None

    def run(self) -> TrialEnd:
        try:
            params, seed, epochs = self.begin()
        except Exception as exc:  # no run yet (the tracking store failed): the trial fails, and counts
            return self._failed_outside_fit(exc)
        self.events = EpochEvents() if self.trials.cfg.train.tensorboard else None  # its own temporary folder
        try:
            return self.fit_and_end(params, seed, epochs)
        except Exception as exc:  # closing the run failed (the store): the trial fails, and counts
            return self._failed_outside_fit(exc)
        finally:
            if self.events is not None:
                self.events.discard()

    def _failed_outside_fit(self, exc: Exception) -> TrialEnd:
        with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # taken over meanwhile: Optuna's
            self.trial.set_user_attr(FAIL_REASON_ATTR, reason(exc)[:1000])
        return TrialEnd(self.trial.number, TrialState.FAIL)

    # ------------------------------------------------------------------ begin

    def begin(self) -> tuple[dict[str, Any], int, int]:
        """Sample the hyperparameters, open the trial's MLflow run; returns (params, seed, epochs)."""
        cfg, trial, scheduler = self.trials.cfg, self.trial, self.trials.scheduler
        scheduler.trial_begins(trial)  # an ASHA promotion takes its earlier trial's values: decided before sampling
        params = sample_params(trial, cfg.search)
        epochs = scheduler.epochs(trial, cfg.train.epochs)  # hyperband and ASHA give each trial its own
        seed = trial_seed(cfg.study.seed, trial.number)
        run_params = self.trials.run_params.for_trial(params, seed, epochs=epochs)
        self.run_id = self.ledger.start_trial_run(
            trial_number=trial.number,
            params=run_params.encode(),
            tags={
                **self.trials.run_tags,
                **scheduler.run_tags(trial),
                SAMPLER_TAG: type(trial.study.sampler).__name__,
            },
        )
        trial.set_user_attr(RUN_ID_ATTR, self.run_id)
        trial.set_user_attr(SEED_ATTR, seed)
        return params, seed, epochs

    # ------------------------------------------------------------------ per epoch

    def fit_and_end(self, params: dict[str, Any], seed: int, epochs: int) -> TrialEnd:
        """Fit with the per-epoch hooks (progress, MLflow, TensorBoard, the scheduler), then end however it went."""
        from mnist_sweep import trial as trial_code  # looked up at each trial: tests put a stand-in there

        clock = trial_code.FitClock()  # a pruned trial's fit seconds count in the sweep's cost (bench/search.py)
        pruning = PruningHook(self.trial, self.metric, epochs, self.trials.scheduler)
        self.trials.progress.trial_started(number=self.trial.number, epochs=epochs)
        try:
            warm_start = self._warm_start()
            with withholding_test_split():
                outcome = trial_code.run_trial(
                    params=params,
                    split=self.trials.split,
                    settings=dataclasses.replace(self.trials.settings, epochs=epochs),
                    seed=seed,
                    epoch_hooks=self._epoch_hooks(pruning),
                    # an earlier trial's failed upload (a full disk) stops this one within a few steps
                    batch_hooks=[self.trials.progress.batch, self.ledger.uploads.raise_if_failed],
                    session=self.trials.session,
                    warm_start=warm_start,
                    clock=clock,
                )
            model_id, value = self._record_outcome(outcome)
        except (Exception, KeyboardInterrupt) as exc:
            return self.end_early(exc, clock=clock, pruned_epoch=pruning.last_epoch)
        return self.end(outcome, model_id=model_id, value=value)

    def _epoch_hooks(self, pruning: PruningHook) -> list[Callable[[int, Mapping[str, float]], None]]:
        events = [self.events] if self.events is not None else []
        return [self.trials.progress.epoch, self._log_epoch, *events, pruning]

    def _log_epoch(self, epoch: int, values: Mapping[str, float]) -> None:
        started = time.perf_counter()
        self.ledger.log_epoch(self.run_id, epoch, values)
        self.tracking_seconds += time.perf_counter() - started

    def _warm_start(self) -> WarmStart | None:
        """A promoted trial (keras-tuner's hyperband, ASHA) goes on from an earlier trial's logged model: its weights,
        as keras-tuner does."""
        resume = self.trials.scheduler.warm_start(self.trial)
        if resume is None:
            return None
        from mnist_sweep.final import load_scored_model
        from mnist_sweep.trial import WarmStart

        self.ledger.uploads.wait()  # that model may be this process's upload still in flight
        weights = load_scored_model(resume.model_uri, tracking_uri=self.trials.cfg.tracking.uri).get_weights()
        return WarmStart(weights=weights, initial_epoch=resume.initial_epoch, restart_schedule=resume.restart_schedule)

    def _record_outcome(self, outcome: TrialOutcome) -> tuple[str, float]:
        """The outcome on the Optuna trial, and its model reserved, so its URI is known before Optuna is told."""
        started = time.perf_counter()
        model_id, model_uri = self.ledger.reserve_model(self.run_id)
        attrs = {
            MODEL_URI_KEY: model_uri,
            EPOCHS_TRAINED_ATTR: outcome.epochs_trained,
            VAL_LOSS_ATTR: outcome.val_loss,
            VAL_ACCURACY_ATTR: outcome.val_accuracy,
            VAL_CONFUSION_ATTR: outcome.report.matrix.tolist(),  # the report shows it beside the lecture's
            FIT_SECONDS_ATTR: round(outcome.fit_seconds, 3),
        }
        for key, attr in attrs.items():
            self.trial.set_user_attr(key, attr)
        self.tracking_seconds += time.perf_counter() - started
        self.trial.set_user_attr(TRACKING_SECONDS_ATTR, round(self.tracking_seconds, 3))
        return model_id, outcome.metric(self.metric)

    # ------------------------------------------------------------------ end

    def end(self, outcome: TrialOutcome, *, model_id: str, value: float) -> TrialEnd:
        """A fit that ran its course: the run ends FINISHED once the uploads have stored the artifacts, which
        overlaps the next trial (uploads.BackgroundUploads)."""
        self._store_events()
        if not still_running(self.trial):
            return self._taken_over(None)
        self.ledger.queue_outcome(
            self.run_id, outcome, model_id=model_id, metrics={"tracking_seconds": self.tracking_seconds}
        )
        return TrialEnd(self.trial.number, TrialState.COMPLETE, value)

    def end_early(self, error: BaseException, *, clock: FitClock, pruned_epoch: int) -> TrialEnd:
        """Pruned, failed or interrupted: the run closed as it ended here, unless another worker has failed the
        trial meanwhile. The TensorBoard events go up first, whatever the ending: a pruned curve is worth seeing."""
        interrupt = error if isinstance(error, KeyboardInterrupt) else None
        if isinstance(error, optuna.TrialPruned):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # taken over: said below
                self.trial.set_user_attr(FIT_SECONDS_ATTR, round(clock.seconds, 3))
        self._store_events()
        if not still_running(self.trial):
            return self._taken_over(interrupt)
        if isinstance(error, optuna.TrialPruned):
            self.ledger.close_run(self.run_id, state="PRUNED", message=str(error), pruned_epoch=pruned_epoch)
            return TrialEnd(self.trial.number, TrialState.PRUNED)
        message = (str(error) or "interrupted") if interrupt else reason(error)
        self.trial.set_user_attr(FAIL_REASON_ATTR, message[:1000])  # Optuna records both as FAIL
        if interrupt is None:
            self.ledger.log_traceback(self.run_id, "".join(traceback.format_exception(error)))
        self.ledger.close_run(self.run_id, state="KILLED" if interrupt else "FAIL", message=message)
        return TrialEnd(self.trial.number, TrialState.FAIL, interrupt=interrupt)

    def _taken_over(self, interrupt: KeyboardInterrupt | None) -> TrialEnd:
        """MLflow agrees with Optuna, where another worker failed the trial: FAIL (KILLED if a signal stopped it
        here too). Its parameters are retried (RetryHeartbeatStaleTrialCallback): no failure of this process."""
        self.ledger.close_run(self.run_id, state="KILLED" if interrupt else "FAIL", message=TAKEN_OVER)
        return TrialEnd(self.trial.number, None, interrupt=interrupt)

    def _store_events(self) -> None:
        if self.events is not None:  # its folder goes when this trial returns: uploaded here, not in the background
            self.ledger.log_folder(self.run_id, self.events.close(), TENSORBOARD_ARTIFACT)


def reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def still_running(trial: optuna.Trial) -> bool:
    """Whether the trial is still this process's: RUNNING in the storage, not failed as stale elsewhere."""
    running = trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return any(t.number == trial.number for t in running)


def trial_seed(study_seed: int, trial_number: int) -> int:
    return (study_seed * 1_000_003 + trial_number) % (2**31 - 1)
