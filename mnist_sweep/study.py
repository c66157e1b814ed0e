"""The Optuna study: storage, sampler, pruner, the objective, and the loop that runs trials."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import time
import traceback
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_sweep import databases, interrupt
from mnist_sweep.config import StudyConfig, SweepConfig
from mnist_sweep.console import NO_PROGRESS, TrialProgress
from mnist_sweep.data import Split, sealed_test_set
from mnist_sweep.errors import StorageError, StudyMismatchError, TooManyFailures, first_line
from mnist_sweep.interrupt import raise_if_requested
from mnist_sweep.keras_tuner_engine import (
    OracleSampler,
    check_engine,
    engine_label,
    planned_epochs,
    planned_warm_start,
)
from mnist_sweep.outages import BeatThroughOutages
from mnist_sweep.placement import THREADS_CPU_LIMIT, WORKER_VAR
from mnist_sweep.records import (
    ENGINE_ATTR,
    EPOCHS_TRAINED_ATTR,
    FAIL_REASON_ATTR,
    FIT_SECONDS_ATTR,
    MODEL_URI_KEY,
    PARENT_RUN_ATTR,
    RUN_ID_ATTR,
    SEED_ATTR,
    TRACKING_SECONDS_ATTR,
    VAL_ACCURACY_ATTR,
    VAL_CONFUSION_ATTR,
    VAL_LOSS_ATTR,
    RunParams,
)
from mnist_sweep.samplers import optuna_sampler, takes_constant_liar
from mnist_sweep.space import sample_params
from mnist_sweep.tensorboard_log import ARTIFACT_PATH as TENSORBOARD_ARTIFACT
from mnist_sweep.tensorboard_log import EpochEvents
from mnist_sweep.tracking import Tracker

if TYPE_CHECKING:
    from mnist_sweep.trial import TrainSettings, TrialOutcome, WarmStart

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PARENT_WAIT_SECONDS = 60.0
ABANDONED_SECONDS = 600.0


def make_storage(study: StudyConfig) -> optuna.storages.RDBStorage:
    """An RDB storage with heartbeats, so trials of a killed worker are failed and retried."""
    try:
        with warnings.catch_warnings(), databases.schema_lock(study.storage):
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return BeatThroughOutages(
                study.storage,
                engine_kwargs=databases.engine_kwargs(study.storage),
                heartbeat_interval=study.heartbeat_seconds,
                grace_period=2 * study.heartbeat_seconds,
                heartbeat_stale_trial_callback=_stale_trial_retry(study),
            )
    except Exception as exc:  # sqlalchemy raises many kinds; the user needs one line
        raise StorageError(f"study.storage = {study.storage!r}: cannot open ({first_line(exc)})") from None


def _stale_trial_retry(study: StudyConfig) -> optuna.storages.RetryHeartbeatStaleTrialCallback | None:
    # keras-tuner's oracle reruns its own trials that were running when their process died.
    if study.engine == "keras-tuner":
        return None
    return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)


WORKER_POLICY_ATTR = "worker_policy"  # the study's user attribute: what every worker of it does


@dataclass(frozen=True)
class WorkerPolicy:
    """What every worker of a study does, however it was started (`run`, `run --workers N`, `worker` by hand,
    a compose replica, a k8s pod): recorded on the study when it is created, read by each worker from there.

    - constant_liar: TPE counts another worker's running trial as a poor result, so it does not hand the
      same point out twice. On for every TPE study, since any study can be joined by `worker` at any time;
      with one worker it changes nothing (the only running trial is the one being sampled, which TPE
      leaves out), so a 1-worker run samples the points it sampled before (tests/test_workers.py).
    - threads: how each worker sizes its thread pools; "cpu_limit" = the CPUs it may use (its affinity,
      capped by its cgroup's CPU quota: placement.size_threads).
    """

    constant_liar: bool
    threads: str = THREADS_CPU_LIMIT

    def to_attr(self) -> dict[str, Any]:
        return {"constant_liar": self.constant_liar, "threads": self.threads}

    def tags(self) -> dict[str, str]:
        """The MLflow tags of each trial run of a worker that applies it."""
        return {CONSTANT_LIAR_TAG: str(self.constant_liar).lower()}


CONSTANT_LIAR_TAG = "sampler.constant_liar"
SAMPLER_TAG = "sampler.class"  # each trial run's: the class that chose its hyperparameters


def new_study_policy(study: StudyConfig) -> WorkerPolicy:
    """What a study created now records (only the samplers the table marks take constant_liar)."""
    return WorkerPolicy(constant_liar=takes_constant_liar(study))


def recorded_policy(user_attrs: Mapping[str, Any], study: StudyConfig) -> WorkerPolicy:
    """The study's record; a study created before studies recorded one gets what a new one records (its
    trials were sampled by one process at a time, where constant_liar changes nothing, or by `run --workers
    N`, which turned it on)."""
    record = user_attrs.get(WORKER_POLICY_ATTR)
    if not isinstance(record, dict):
        return new_study_policy(study)
    return WorkerPolicy(
        constant_liar=bool(record.get("constant_liar")), threads=str(record.get("threads", THREADS_CPU_LIMIT))
    )


def worker_policy(cfg: SweepConfig) -> WorkerPolicy:
    """The policy this process applies, read before it loads its backend: the study's record, or what a new
    study records where there is no study yet (this process or another creates it with that record).
    Opens the storage without creating anything in it."""
    if databases.nothing_recorded(cfg.study.storage):
        return new_study_policy(cfg.study)
    try:
        storage = optuna.storages.RDBStorage(
            cfg.study.storage, engine_kwargs=databases.engine_kwargs(cfg.study.storage), skip_table_creation=True
        )
        study = optuna.load_study(study_name=cfg.study.name, storage=storage)
    except Exception:  # no study (KeyError) or no tables yet; a broken store is reported by open_study, in one line
        return new_study_policy(cfg.study)
    return recorded_policy(study.user_attrs, cfg.study)


def make_sampler(study: StudyConfig, *, seed_offset: int, constant_liar: bool) -> optuna.samplers.BaseSampler:
    """Seeded by study.seed plus the trials already in the study, so a resumed run draws new points."""
    seed = (study.seed + seed_offset) % 2**32  # a worker's salt must not push it past NumPy's range
    return optuna_sampler(study).build(seed, constant_liar)


def make_pruner(study: StudyConfig) -> optuna.pruners.BasePruner:
    if study.pruner == "none":
        return optuna.pruners.NopPruner()
    if study.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=study.pruner_warmup_epochs, reduction_factor=study.pruner_reduction_factor
        )
    percentile = 50.0 if study.pruner == "median" else study.pruner_percentile
    return optuna.pruners.PercentilePruner(
        percentile,
        n_startup_trials=study.pruner_startup_trials,
        n_warmup_steps=study.pruner_warmup_epochs,
        interval_steps=study.pruner_interval_epochs,
    )


def load_existing_study(cfg: SweepConfig, storage: optuna.storages.BaseStorage) -> optuna.Study | None:
    """The stored study of this name, or None if there is none yet."""
    try:
        return optuna.load_study(study_name=cfg.study.name, storage=storage)
    except KeyError:
        return None


def open_study(
    cfg: SweepConfig, storage: optuna.storages.BaseStorage, *, worker_salt: int = 0
) -> tuple[optuna.Study, bool]:
    """Create the study, or load it if it exists; returns (study, created_here)."""
    existing = load_existing_study(cfg, storage)
    if existing is not None:
        check_engine(existing, cfg)
    offset = len(existing.get_trials(deepcopy=False)) if existing is not None else 0
    policy = new_study_policy(cfg.study)  # a study that exists already: its record decides, below
    pruner = make_pruner(cfg.study)
    sampler = _sampler(cfg, policy, seed_offset=offset + worker_salt)
    created = False
    try:
        study = optuna.create_study(
            study_name=cfg.study.name,
            storage=storage,
            sampler=sampler,
            pruner=pruner,
            direction=cfg.study.goal,
            load_if_exists=False,
        )
        created = True
        study.set_user_attr(WORKER_POLICY_ATTR, policy.to_attr())  # before any worker can sample from it
        study.set_user_attr(ENGINE_ATTR, engine_label(cfg))
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and still so in 5
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([cfg.study.metric])  # optuna-dashboard's axes name the metric
    except optuna.exceptions.DuplicatedStudyError:
        # Created a moment ago by another worker, or long ago: its record, not this process's config, decides.
        attrs = optuna.load_study(study_name=cfg.study.name, storage=storage).user_attrs
        recorded = recorded_policy(attrs, cfg.study)
        if recorded != policy and cfg.study.engine == "optuna":  # keras-tuner's oracle ignores the policy
            sampler = _sampler(cfg, recorded, seed_offset=offset + worker_salt)
        policy = recorded
        study = optuna.load_study(study_name=cfg.study.name, storage=storage, sampler=sampler, pruner=pruner)
        if WORKER_POLICY_ATTR not in attrs:  # made before studies recorded it: from now on it is written down
            study.set_user_attr(WORKER_POLICY_ATTR, policy.to_attr())
    stored = study.direction.name.lower()
    if stored != cfg.study.goal:
        raise StudyMismatchError(
            f"study {cfg.study.name!r} in {cfg.study.storage} was created to {stored} "
            f"but the sweep file says study.direction = {cfg.study.goal!r}; use a new study.name"
        )
    return study, created


def _sampler(cfg: SweepConfig, policy: WorkerPolicy, *, seed_offset: int) -> optuna.samplers.BaseSampler:
    if cfg.study.engine == "keras-tuner":
        return OracleSampler(cfg)
    return make_sampler(cfg.study, seed_offset=seed_offset, constant_liar=policy.constant_liar)


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def parent_run_id(study: optuna.Study, tracker: Tracker, *, created: bool, config: Mapping[str, Any]) -> str:
    """The study's MLflow parent run: made once by the process that created the study."""
    if created:
        run_id = tracker.create_parent_run(study_name=study.study_name, config=config)
        study.set_user_attr(PARENT_RUN_ATTR, run_id)
        return run_id
    stored = interrupt.poll(lambda: _stored_parent(study, tracker), every=0.5, timeout=PARENT_WAIT_SECONDS)
    if stored:
        return stored
    # The creator died before making it, or the run was deleted: make a new one.
    fresh = tracker.create_parent_run(study_name=study.study_name, config=config)
    study.set_user_attr(PARENT_RUN_ATTR, fresh)
    return fresh


def _stored_parent(study: optuna.Study, tracker: Tracker) -> str | None:
    """The stored parent run's id once it is there; "" if it was deleted (make another); None while waiting."""
    stored = study.user_attrs.get(PARENT_RUN_ATTR)
    if not stored:
        return None
    return str(stored) if tracker.parent_exists(stored) else ""


def settle_stale(study: optuna.Study, tracker: Tracker, parent_run_id: str) -> None:
    """Fail the trials of dead workers (stale heartbeat; their parameters are retried), end their runs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    close_stale_runs(study, tracker, parent_run_id)


def close_stale_runs(study: optuna.Study, tracker: Tracker, parent_run_id: str) -> int:
    """Trial runs still RUNNING in MLflow whose Optuna trial has ended (its worker died) end as KILLED."""
    running_runs = tracker.running_trial_runs(parent_run_id)
    if not running_runs:
        return 0
    # Found by MLflow's trial-number tag, so a run made just before a kill, not yet linked, is found too.
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    closed = 0
    for run_id, number in running_runs:
        trial = trials.get(number)
        state = trial.state if trial else None
        if state != TrialState.RUNNING and not _uploading(trial, tracker, run_id):
            reason = f"its worker stopped; Optuna recorded trial {number} as {state.name if state else 'missing'}"
            if state == TrialState.COMPLETE and trial is not None:
                # Optuna cannot take a COMPLETE back: finalize skips it, and its parameters train again, unless
                # keras-tuner's oracle chooses the trials (it has this one as completed, and asks no values twice).
                redo = str(study.user_attrs.get(ENGINE_ATTR, "optuna")) == "optuna"
                reason += f", but its model and reports were not all stored; {REDONE if redo else NOT_REDONE}"
                if tracker.close_orphaned_run(run_id, reason):
                    if redo:
                        study.enqueue_trial(trial.params, user_attrs={REDO_OF_ATTR: number})
                    closed += 1
                continue
            closed += tracker.close_orphaned_run(run_id, reason)
    return closed


REDO_OF_ATTR = "redo_of_trial"  # a trial that trains again the parameters of one whose artifacts were lost
REDONE = "finalize never scores it and its parameters are trained again"
NOT_REDONE = "finalize never scores it (keras-tuner's oracle has it as completed: not trained again)"


def _uploading(trial: FrozenTrial | None, tracker: Tracker, run_id: str) -> bool:
    """A COMPLETE trial's run still RUNNING may be a live worker storing its artifacts (BackgroundUploads)."""
    if trial is None or trial.state != TrialState.COMPLETE:
        return False
    return tracker.upload_may_be_running(run_id, completed=trial.datetime_complete)


def fail_abandoned(study: optuna.Study, *, older_than_seconds: float = ABANDONED_SECONDS) -> None:
    """Fail RUNNING trials that never got their MLflow run and are older than `older_than_seconds`."""
    # A process stopped between Optuna's ask and its first heartbeat leaves a trial that never goes
    # stale; it never got as far as its MLflow run, so a missing run id after a long while marks it.
    now = datetime.datetime.now()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = trial.datetime_start or now
        if RUN_ID_ATTR not in trial.user_attrs and (now - started).total_seconds() > older_than_seconds:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError, ValueError):
                study.tell(trial.number, state=TrialState.FAIL)


def trial_seed(study_seed: int, trial_number: int) -> int:
    return (study_seed * 1_000_003 + trial_number) % (2**31 - 1)


class TrialTakenOver(BaseException):
    """Another worker failed this process's running trial as stale (its heartbeat was late).

    Its parameters are retried (RetryHeartbeatStaleTrialCallback), so this is no error of the trial.
    Optuna cannot record the trial's own ending any more: it refuses to tell a finished trial and stops
    its optimize loop (optuna#5470). So, like KeyboardInterrupt, this derives from BaseException and
    passes by Optuna's handling of failed trials; `run_trials` prints the trial's line and goes on.
    """

    def __init__(self, number: int, interrupt: KeyboardInterrupt | None = None) -> None:
        super().__init__(TAKEN_OVER)
        self.number = number
        self.interrupt = interrupt  # a signal that arrived too: acted on once the trial is recorded


TAKEN_OVER = (
    "another worker failed this trial as stale (its heartbeat was late) and will retry its parameters; "
    "a larger study.heartbeat_seconds avoids this on a busy machine"
)


def pruned_reason(epoch: int, metric: str, value: float) -> str:
    """Why a trial was pruned: raised by the pruning hook and shown on the trial's line."""
    return f"pruned at epoch {epoch}: {metric} = {value:.4f}"


class PruningHook:
    """Reports the study metric to Optuna after each epoch and prunes when the pruner says so."""

    def __init__(self, trial: optuna.Trial, metric: str, epochs: int) -> None:
        self.trial = trial
        self.metric = metric
        self.epochs = epochs
        self.last_epoch = 0

    def __call__(self, epoch: int, values: Mapping[str, float]) -> None:
        if self.metric not in values:
            # KerasPruningCallback only warns here, and then never prunes; fail loudly instead.
            raise KeyError(f"study.metric {self.metric!r} is not among the epoch metrics {sorted(values)}")
        self.last_epoch = epoch
        self.trial.report(values[self.metric], step=epoch)
        # After the last epoch the training is paid for: keep the model rather than prune it.
        if epoch < self.epochs and self.trial.should_prune():
            raise optuna.TrialPruned(pruned_reason(epoch, self.metric, values[self.metric]))


class TimedHook:
    """Wraps an epoch hook and adds up the seconds it takes (the tracking overhead)."""

    def __init__(self, hook: Callable[[int, Mapping[str, float]], None]) -> None:
        self.hook = hook
        self.seconds = 0.0

    def __call__(self, epoch: int, values: Mapping[str, float]) -> None:
        started = time.perf_counter()
        self.hook(epoch, values)
        self.seconds += time.perf_counter() - started


class Objective:
    """One Optuna trial: sample, open its MLflow run, fit, log, and close the run however it ends.

    How the trial ended is recorded on the trial itself (its state, value and user attributes), where
    the loop's callbacks read it; the objective keeps nothing from one trial to the next.
    """

    def __init__(
        self,
        *,
        cfg: SweepConfig,
        split: Split,
        tracker: Tracker,
        parent_run_id: str,
        data_source: str,
        progress: TrialProgress = NO_PROGRESS,
        run_tags: Mapping[str, str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.run_tags = dict(run_tags or {})  # every trial run's, besides the machine's (the worker policy's)
        self.progress = progress
        self.split = split
        self.tracker = tracker
        self.parent_run_id = parent_run_id
        # TensorFlow loads here, after every input check: bad input fails fast and prints one line.
        from mnist_sweep.trial import TrainSettings, TrialSession

        self.session = TrialSession()  # what this process's trials share (gc freeze, TF's registry)

        # What every trial run logs as params besides its hyperparameters and seed; replay decodes them.
        self.run_params = RunParams.from_config(
            cfg, data_source=data_source, n_train=len(split.y_train), n_val=len(split.y_val)
        )
        self.settings: TrainSettings = TrainSettings(**self.run_params.train_settings())

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            params = sample_params(trial, self.cfg.search)
            epochs = planned_epochs(trial, self.cfg.train.epochs)  # hyperband gives each trial its own
            seed = trial_seed(self.cfg.study.seed, trial.number)
            run_params = dataclasses.replace(self.run_params.for_trial(params, seed), epochs=epochs)
            run_id = self.tracker.start_trial_run(
                parent_run_id=self.parent_run_id,
                study_name=trial.study.study_name,
                trial_number=trial.number,
                params=run_params.encode(),
                tags={**self.run_tags, SAMPLER_TAG: type(trial.study.sampler).__name__},
            )
            trial.set_user_attr(RUN_ID_ATTR, run_id)
            trial.set_user_attr(SEED_ATTR, seed)
        except Exception as exc:  # no run yet (the tracking store failed): the trial fails, and counts
            trial.set_user_attr(FAIL_REASON_ATTR, _reason(exc)[:1000])
            raise
        return self._run(trial, run_id, params, seed, epochs)

    def _run(self, trial: optuna.Trial, run_id: str, params: dict[str, Any], seed: int, epochs: int) -> float:
        events = EpochEvents() if self.cfg.train.tensorboard else None  # its own temporary folder
        try:
            return self._fit(trial, run_id, params, seed, epochs, events)
        finally:
            if events is not None:
                events.discard()

    def _fit(
        self,
        trial: optuna.Trial,
        run_id: str,
        params: dict[str, Any],
        seed: int,
        epochs: int,
        events: EpochEvents | None,
    ) -> float:
        logging_hook = TimedHook(lambda epoch, values: self.tracker.log_epoch(run_id, epoch, values))
        pruning_hook = PruningHook(trial, self.cfg.study.metric, epochs)
        from mnist_sweep.trial import FitClock, run_trial

        clock = FitClock()  # a pruned trial's fit seconds count in the sweep's cost (bench/search.py)

        self.progress.trial_started(number=trial.number, epochs=epochs)
        try:
            warm_start = self._warm_start(trial)
            with sealed_test_set():
                outcome = run_trial(
                    params=params,
                    split=self.split,
                    settings=dataclasses.replace(self.settings, epochs=epochs),
                    seed=seed,
                    epoch_hooks=[self.progress.epoch, logging_hook, *([events] if events else []), pruning_hook],
                    # an earlier trial's failed upload (a full disk) stops this one within a few steps
                    batch_hooks=[self.progress.batch, self.tracker.uploads.raise_if_failed],
                    session=self.session,
                    warm_start=warm_start,
                    clock=clock,
                )
            model_id, value = self._log_outcome(trial, run_id, outcome, logging_hook)
        except optuna.TrialPruned as exc:
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):  # taken over: _end says so
                trial.set_user_attr(FIT_SECONDS_ATTR, round(clock.seconds, 3))
            self._end(
                trial, run_id, state="PRUNED", message=str(exc), pruned_epoch=pruning_hook.last_epoch, events=events
            )
            raise
        except KeyboardInterrupt as exc:
            self._end(trial, run_id, state="KILLED", message=str(exc) or "interrupted", interrupt=exc, events=events)
            raise
        except Exception as exc:
            self._end(
                trial, run_id, state="FAIL", message=_reason(exc), traceback_text=traceback.format_exc(), events=events
            )
            raise
        if events is not None:  # its folder goes when this trial returns: uploaded here, not in the background
            self.tracker.log_folder(run_id, events.close(), TENSORBOARD_ARTIFACT)
        if not _still_running(trial):
            self._end(trial, run_id, state="COMPLETE")  # raises TrialTakenOver
        # The run ends FINISHED once the uploads thread has stored the artifacts, overlapping the next trial.
        self.tracker.finish_trial_run(
            run_id, outcome, model_id=model_id, metrics={"tracking_seconds": logging_hook.seconds}
        )
        return value

    def _warm_start(self, trial: optuna.Trial) -> WarmStart | None:
        """keras-tuner's hyperband goes on from an earlier trial's logged model (weights, as keras-tuner does)."""
        planned = planned_warm_start(trial)
        if planned is None:
            return None
        from mnist_sweep.final import load_scored_model
        from mnist_sweep.trial import WarmStart

        self.tracker.uploads.wait()  # that model may be this process's upload still in flight
        model_uri, initial_epoch = planned
        weights = load_scored_model(model_uri, tracking_uri=self.cfg.tracking.uri).get_weights()
        return WarmStart(weights=weights, initial_epoch=initial_epoch)

    def _log_outcome(
        self, trial: optuna.Trial, run_id: str, outcome: TrialOutcome, logging_hook: TimedHook
    ) -> tuple[str, float]:
        started = time.perf_counter()
        model_id, model_uri = self.tracker.reserve_model(run_id)
        trial.set_user_attr(MODEL_URI_KEY, model_uri)
        trial.set_user_attr(EPOCHS_TRAINED_ATTR, outcome.epochs_trained)
        trial.set_user_attr(VAL_LOSS_ATTR, outcome.val_loss)
        trial.set_user_attr(VAL_ACCURACY_ATTR, outcome.val_accuracy)
        trial.set_user_attr(
            VAL_CONFUSION_ATTR, outcome.report.matrix.tolist()
        )  # the report shows it beside the lecture's
        trial.set_user_attr(FIT_SECONDS_ATTR, round(outcome.fit_seconds, 3))
        logging_hook.seconds += time.perf_counter() - started
        trial.set_user_attr(TRACKING_SECONDS_ATTR, round(logging_hook.seconds, 3))
        return model_id, outcome.metric(self.cfg.study.metric)

    def _end(
        self,
        trial: optuna.Trial,
        run_id: str,
        *,
        state: str,
        message: str = "",
        traceback_text: str = "",
        interrupt: KeyboardInterrupt | None = None,
        events: EpochEvents | None = None,
        **run_extras: Any,
    ) -> None:
        """Close the trial's run as it ended here, unless another worker has failed the trial meanwhile.

        The TensorBoard events go up first, whatever the ending: a pruned trial's curve is worth seeing too.
        """
        if events is not None:
            self.tracker.log_folder(run_id, events.close(), TENSORBOARD_ARTIFACT)
        if not _still_running(trial):
            # MLflow agrees with Optuna: FAIL (KILLED if a signal stopped it here too).
            self.tracker.end_trial_run(run_id, state="KILLED" if interrupt else "FAIL", message=TAKEN_OVER)
            raise TrialTakenOver(trial.number, interrupt)
        if state in ("FAIL", "KILLED"):  # Optuna records both as FAIL
            trial.set_user_attr(FAIL_REASON_ATTR, message[:1000])
        if traceback_text:
            self.tracker.log_traceback(run_id, traceback_text)
        self.tracker.end_trial_run(run_id, state=state, message=message, **run_extras)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _still_running(trial: optuna.Trial) -> bool:
    """Whether the trial is still this process's: RUNNING in the storage, not failed as stale elsewhere."""
    running = trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return any(t.number == trial.number for t in running)


def run_trials(
    study: optuna.Study,
    objective: Objective,
    *,
    target: int,
    max_failures: int,
    echo: Callable[[str], None],
    sealed: Callable[[], bool] = lambda: False,
) -> int:
    """Run trials until the study has `target` finished ones, from every worker; returns how many ran here.

    One `study.optimize`, stopped by MaxTrialsCallback once `target` trials are COMPLETE or PRUNED, and
    after each trial of this process its callbacks: the console line, the failure budget, dead workers'
    trials failed and their runs closed, a Ctrl-C or SIGTERM acted on, and a study `sealed` meanwhile (its test
    set scored) stopped. Optuna's heartbeats fail the trials of killed workers, and RetryHeartbeatStaleTrialCallback
    (make_storage) retries their parameters.
    """
    lines = TrialLines(objective.progress, echo, metric=objective.cfg.study.metric, target=target)
    settler = StaleTrialsSettler(objective.tracker, objective.parent_run_id)
    seal = SealWatch(sealed, echo, study_name=study.study_name)
    callbacks: list[Callable[[optuna.Study, FrozenTrial], None]] = [
        lines,
        seal,
        FailureBudget(max_failures),
        settler,
        stop_if_interrupted,
        objective.tracker.uploads.raise_if_failed,
        optuna.study.MaxTrialsCallback(target, states=FINISHED),
    ]
    try:
        stop_if_interrupted(study, None)
        settler(study, None)
        # Re-entered only after a trial taken over by another worker: Optuna's loop cannot go on past it.
        while not seal.seen() and lines.show_study(study) < target:
            try:
                study.optimize(objective, catch=(Exception,), callbacks=callbacks, gc_after_trial=False)
            except TrialTakenOver as taken:
                lines.taken_over(study, taken.number)
                settler(study, None)
                if taken.interrupt is not None:
                    raise taken.interrupt from None
                stop_if_interrupted(study, None)
    except BaseException:
        objective.tracker.uploads.wait(raise_errors=False)  # a FINISHED run has its artifacts (BackgroundUploads)
        raise
    else:
        objective.tracker.uploads.wait()
    finally:
        objective.progress.close()  # before any later line or error, so the display does not linger
    return lines.ran


class TrialLines:
    """After each trial of this process: its line above the live display, and the study's count and best."""

    def __init__(self, progress: TrialProgress, echo: Callable[[str], None], *, metric: str, target: int) -> None:
        self.progress = progress
        self.echo = echo
        self.metric = metric
        self.target = target
        self.ran = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
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
            return f"{self.metric} = {trial.value:.4f}  (fit {fit:.1f} s, tracking {tracking:.2f} s)"
        if trial.state == TrialState.PRUNED and trial.last_step is not None and trial.value is not None:
            return pruned_reason(trial.last_step, self.metric, trial.value)
        return str(trial.user_attrs.get(FAIL_REASON_ATTR, trial.state.name.lower()))


class FailureBudget:
    """Stops the sweep once `max_failures` trials of this process have failed."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.failures = 0

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
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

    Checked before the first trial and after each, so a worker that joins or goes on after `finalize` took the
    seal starts nothing; one that asked for its trial just before the seal (a race) trains it, and it is
    recorded, but the test result names the trials it was chosen among (`TestResult.counted_trials`).
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

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        if self.seen():
            study.stop()


class StaleTrialsSettler:
    """Fails dead workers' trials and ends their MLflow runs; this trial may be the one to find them stale."""

    def __init__(self, tracker: Tracker, parent_run_id: str) -> None:
        self.tracker = tracker
        self.parent_run_id = parent_run_id

    def __call__(self, study: optuna.Study, trial: FrozenTrial | None) -> None:
        settle_stale(study, self.tracker, self.parent_run_id)


def stop_if_interrupted(study: optuna.Study, trial: FrozenTrial | None) -> None:
    """A Ctrl-C or SIGTERM that arrived during a trial's last steps: stop before the next trial."""
    raise_if_requested()


def worker_salt() -> int:
    """Decorrelates the samplers of workers that start at the same moment."""
    local = os.environ.get(WORKER_VAR)
    if local:  # a local worker of `run --workers N`: distinct, and the same when the command is rerun
        return int(local) * 7919
    return os.getpid() + int.from_bytes(os.urandom(2), "little")
