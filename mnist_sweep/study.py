"""The Optuna study: storage, sampler, pruner, worker policy, and dead workers' trials settled (their runs:
dead_runs.py).

The loop that runs trials is trial_loop.py; one trial, trial_run.py."""

from __future__ import annotations

import contextlib
import datetime
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.trial import TrialState

from mnist_sweep import databases
from mnist_sweep.asha import RUNG_ATTR
from mnist_sweep.config import StudyConfig, SweepConfig
from mnist_sweep.errors import StorageError, StudyMismatchError, first_line
from mnist_sweep.keras_tuner_engine import OracleSampler, check_engine, engine_label
from mnist_sweep.outages import BeatThroughOutages
from mnist_sweep.placement import THREADS_CPU_LIMIT, WORKER_VAR
from mnist_sweep.records import ENGINE_ATTR, RUN_ID_ATTR, SCHEDULE_ATTR
from mnist_sweep.samplers import ENGINE_TRAITS, optuna_sampler, takes_constant_liar

if TYPE_CHECKING:
    from mnist_sweep.ledger import StudyLedger

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
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
    """Optuna retries a dead worker's trial; an engine whose sampler reruns its own (keras-tuner's oracle) gets none."""
    if not ENGINE_TRAITS[study.engine].retries_stale_trials:
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
      leaves out), so a 1-worker run samples the points it sampled before (tests/test_study_workers.py).
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
SAMPLER_TAG = "sampler.class"  # each trial run's: the class that chose its hyperparameters (trial_run.begin)


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
    # ASHA prunes nothing mid-rung: its scheduler decides at each trial's begin which trial goes on (asha.py).
    if study.pruner in ("none", "asha"):
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
        check_schedule(existing, cfg)
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
            direction=cfg.study.direction,
            load_if_exists=False,
        )
        created = True
        study.set_user_attr(WORKER_POLICY_ATTR, policy.to_attr())  # before any worker can sample from it
        study.set_user_attr(ENGINE_ATTR, engine_label(cfg))
        study.set_user_attr(SCHEDULE_ATTR, schedule_label(cfg.study))
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
    if stored != cfg.study.direction:
        raise StudyMismatchError(
            f"study {cfg.study.name!r} in {cfg.study.storage} was created to {stored} "
            f"but the sweep file says study.direction = {cfg.study.direction!r}; use a new study.name"
        )
    return study, created


def schedule_label(study: StudyConfig) -> str:
    """How the study's trials are budgeted: ASHA's rungs, or every trial to train.epochs unless pruned inside."""
    return "asha" if study.pruner == "asha" else "in-trial"


def check_schedule(study: optuna.Study, cfg: SweepConfig) -> None:
    """A study keeps ASHA, or keeps without it: ASHA reads each trial's rung, which other trials do not have."""
    stored = study.user_attrs.get(SCHEDULE_ATTR)
    if stored is None:  # a study from before the attribute: its trials say, and a study without trials takes any
        trials = study.get_trials(deepcopy=False)
        if not trials:
            return
        stored = "asha" if any(RUNG_ATTR in t.user_attrs for t in trials) else "in-trial"
    wanted = schedule_label(cfg.study)
    if stored == wanted:
        return
    name = cfg.study.name
    if stored == "asha":
        was, fix = "study.pruner = 'asha'", "--set study.pruner=asha to go on with it"
    else:
        was, fix = "a pruner inside each trial's epochs (not 'asha')", "--set study.pruner=median to go on with it"
    raise StudyMismatchError(
        f"study {name!r} in {cfg.study.storage} was run with {was} but the sweep file says study.pruner = "
        f"{cfg.study.pruner!r}; use a new study name (--set study.name={name}-{cfg.study.pruner}) or {fix}"
    )


def _sampler(cfg: SweepConfig, policy: WorkerPolicy, *, seed_offset: int) -> optuna.samplers.BaseSampler:
    if cfg.study.engine == "keras-tuner":
        return OracleSampler(cfg)
    return make_sampler(cfg.study, seed_offset=seed_offset, constant_liar=policy.constant_liar)


def count_finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


@dataclass(frozen=True)
class StudyContext:
    """The study, its storage and its MLflow ledger (bound to its parent run): what every step after opening the
    study works on, together."""

    study: optuna.Study
    storage: optuna.storages.BaseStorage
    ledger: StudyLedger


def settle_stale(context: StudyContext) -> None:
    """Fail the trials of dead workers (stale heartbeat; their parameters are retried), end their runs."""
    from mnist_sweep.dead_runs import close_stale_runs  # MLflow: not loaded where only the policy is read

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(context.study)
    close_stale_runs(context)


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


def worker_salt() -> int:
    """Decorrelates the samplers of workers that start at the same moment."""
    local = os.environ.get(WORKER_VAR)
    if local:  # a local worker of `run --workers N`: distinct, and the same when the command is rerun
        return int(local) * 7919
    return os.getpid() + int.from_bytes(os.urandom(2), "little")
