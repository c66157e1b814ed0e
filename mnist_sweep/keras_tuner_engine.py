"""keras-tuner as the second engine: its oracle chooses each trial, the Optuna study stays the one ledger.

`OracleSampler` is an Optuna sampler that asks a keras-tuner oracle (random, bayesian or hyperband) through
the oracle's public ask/tell methods: `create_trial` when Optuna starts a trial, `update_trial` with the
trial's per-epoch study metric and `end_trial` when Optuna records how it ended (study.ask and study.tell in
trial_loop.py). Hyperband's plan for a trial (its epochs, and the earlier trial a promotion goes on from)
reaches the trial run through `planned_epochs` and `planned_warm_start`, at the scheduler's seam
(scheduler.OraclePlanScheduler). The trial code, the MLflow logging, resume, the once-only test set, the report
and the leaderboard therefore work as with Optuna. The oracle's state is keras-tuner's own files (`oracle.json`,
`trial_*/trial.json`) in `oracle_dir`, saved by the oracle at each ask and tell and reloaded on a rerun; the
keras-tuner trial id is recorded on the Optuna trial, so each links to the other.

A trial that was running when its process died is in the reloaded oracle's retry queue: the next trial
asked runs its values again (keras-tuner's own resume), so Optuna's retry of stale trials is off for this
engine (`make_storage`), and the dead trial is only failed in the ledger.

keras-tuner's oracle lives in one process: a second process on the same study is refused (`check_workers`
and the lock in `oracle_dir`). keras_tuner (and so Keras) is imported only when an oracle is built.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import optuna
from optuna.distributions import BaseDistribution, FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from mnist_sweep.config import Range, SearchConfig, SweepConfig
from mnist_sweep.databases import sqlite_file
from mnist_sweep.errors import OracleStopped, StudyMismatchError, UserError
from mnist_sweep.records import (
    ENGINE_ATTR,
    FAIL_REASON_ATTR,
    KERAS_TUNER_EPOCHS_ATTR,
    KERAS_TUNER_TRIAL_ID_ATTR,
    MODEL_URI_KEY,
)
from mnist_sweep.samplers import ENGINE_TRAITS, keras_tuner_oracle
from mnist_sweep.space import distributions
from mnist_sweep.workarounds import set_oracle_project_dir, set_trial_user_attr

if TYPE_CHECKING:
    import keras_tuner

TUNER_ID = "mnist-sweep"  # the one client of the oracle: this process
ORACLE_STATE = "oracle.json"
LOCK_FILE = "lock"
# keras-tuner takes seed 0 for "no seed" and draws one at random; study.seed 0 must stay reproducible.
SEED_FOR_ZERO = 2**31 - 1
# The hyperparameters keras-tuner's hyperband adds to a trial's values, and the user attributes they become.
HYPERBAND_VALUES = {
    "tuner/epochs": KERAS_TUNER_EPOCHS_ATTR,
    "tuner/initial_epoch": "keras_tuner_initial_epoch",
    "tuner/bracket": "keras_tuner_bracket",
    "tuner/round": "keras_tuner_round",
    "tuner/trial_id": "keras_tuner_promoted_from",  # the oracle trial whose model this one trains on
}


def engine_label(cfg: SweepConfig) -> str:
    """What the study records as its engine: `optuna`, or `keras-tuner/<oracle>`."""
    return "optuna" if cfg.study.engine == "optuna" else f"keras-tuner/{cfg.study.sampler}"


def check_workers(cfg: SweepConfig, *, workers: int = 1, as_worker: bool = False) -> None:
    """Refuse more than one process on a keras-tuner study (its oracle's state is one process's files)."""
    if not ENGINE_TRAITS[cfg.study.engine].one_process or (workers <= 1 and not as_worker):
        return
    what = "`mnist-sweep worker`" if as_worker else f"--workers {workers}"
    raise UserError(
        f"study.engine = 'keras-tuner' runs in one process (its oracle's state is local files), so {what} is "
        f"refused for study {cfg.study.name!r}; use `mnist-sweep run` alone, or study.engine = 'optuna' for workers"
    )


def check_engine(study: optuna.Study, cfg: SweepConfig) -> None:
    """A study keeps the engine (and keras-tuner oracle) it was created with."""
    stored = str(study.user_attrs.get(ENGINE_ATTR, "optuna"))  # studies from before engines were Optuna's
    wanted = engine_label(cfg)
    if stored != wanted:
        raise StudyMismatchError(
            f"study {cfg.study.name!r} in {cfg.study.storage} was created with engine {stored!r} but the sweep "
            f"file says {wanted!r} (study.engine, study.sampler); use a new study.name"
        )
    if cfg.study.engine == "keras-tuner" and study.get_trials(deepcopy=False):
        state = oracle_dir(cfg) / ORACLE_STATE
        if not state.is_file():
            raise StudyMismatchError(
                f"study {cfg.study.name!r} has trials but its keras-tuner oracle state {state} is missing; "
                "restore that folder or use a new study.name"
            )


def oracle_dir(cfg: SweepConfig) -> Path:
    """Where the oracle keeps its state: `keras-tuner/<study>` beside a sqlite storage, else under mlruns/."""
    database = sqlite_file(cfg.study.storage)
    root = database.parent if database is not None else Path("mlruns")
    return root / "keras-tuner" / cfg.study.name


def planned_epochs(trial: optuna.Trial, default: int) -> int:
    """The epochs a trial trains: hyperband's `tuner/epochs` for it, else train.epochs."""
    sampler = trial.study.sampler
    if isinstance(sampler, OracleSampler):
        return sampler.epochs_for(trial.number, default)
    return default


def planned_warm_start(trial: optuna.Trial) -> tuple[str, int] | None:
    """For a hyperband promotion: the model URI of the trial it goes on from, and that trial's epochs."""
    sampler = trial.study.sampler
    if isinstance(sampler, OracleSampler):
        return sampler.warm_start_for(trial.study, trial.number)
    return None


def keras_tuner_space(search: SearchConfig, *, include_fixed: bool = True) -> keras_tuner.HyperParameters:
    """The space as keras-tuner hyperparameters: the engine's one translation of [search] (its oracles search
    the searched keys; Optuna's distributions of the same keys are space.distributions)."""
    import keras_tuner

    hp = keras_tuner.HyperParameters()
    for name, spec in search.specs().items():
        if spec.is_fixed and not include_fixed:
            continue
        if isinstance(spec, Range):
            sampling = "log" if spec.log else "linear"
            if spec.integer:
                hp.Int(name, int(spec.low), int(spec.high), sampling=sampling)
            else:
                hp.Float(name, spec.low, spec.high, sampling=sampling)
        elif spec.is_fixed:
            hp.Fixed(name, spec.values[0])
        else:
            hp.Choice(name, list(spec.values))
    return hp


def make_oracle(cfg: SweepConfig) -> keras_tuner.Oracle:
    """The oracle `study.sampler` names, on the searched keys of [search], seeded from study.seed."""
    import keras_tuner

    direction = "max" if cfg.study.direction == "maximize" else "min"
    common: dict[str, Any] = {
        "objective": keras_tuner.Objective(cfg.study.metric, direction),
        "hyperparameters": keras_tuner_space(cfg.search, include_fixed=False),
        "seed": cfg.study.seed or SEED_FOR_ZERO,
        "allow_new_entries": False,
        "tune_new_entries": False,
        # study.max_failures ends the sweep; keras-tuner's own limit would raise out of end_trial.
        "max_consecutive_failed_trials": 2**31,
    }
    entry = keras_tuner_oracle(cfg.study)
    oracle_class = getattr(keras_tuner.oracles, entry.oracle)
    oracle = oracle_class(**entry.options(cfg.study, cfg.train.epochs), **common)
    oracle.verbose = 0  # its own trial tables on stdout: our trial lines say it
    return oracle


class OracleSampler(optuna.samplers.BaseSampler):
    """Optuna's trials, their values chosen by a keras-tuner oracle (see the module's docstring)."""

    def __init__(self, cfg: SweepConfig) -> None:
        self.metric = cfg.study.metric
        self.directory = oracle_dir(cfg)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.directory / LOCK_FILE, study=cfg.study.name)
        self.oracle = make_oracle(cfg)
        # keras-tuner's tuners set this; its save() and reload() use the folder (name, project).
        set_oracle_project_dir(self.oracle, str(self.directory.parent), self.directory.name)
        if (self.directory / ORACLE_STATE).is_file():
            self.oracle.reload()
            _check_reloaded(self.oracle, cfg)
        self.search_space = distributions(cfg.search)
        self.asked: dict[int, keras_tuner.engine.trial.Trial] = {}  # Optuna trial number -> oracle trial
        self.stopped = ""  # why the oracle gave no trial, when it did not

    # ---------------------------------------------------------------- ask

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Ask the oracle for this trial (never raises here: Optuna has already stored the trial)."""
        oracle_trial = self.oracle.create_trial(TUNER_ID)
        if oracle_trial.status != "RUNNING":
            self.stopped = f"keras-tuner's oracle gave no trial ({oracle_trial.status}): its search space is exhausted"
            return
        self.stopped = ""
        self.asked[trial.number] = oracle_trial
        values = oracle_trial.hyperparameters.values
        attrs = {KERAS_TUNER_TRIAL_ID_ATTR: oracle_trial.trial_id}
        attrs.update({attr: values[key] for key, attr in HYPERBAND_VALUES.items() if key in values})
        for key, value in attrs.items():  # as Optuna's own samplers record their state on a trial
            set_trial_user_attr(study, trial, key, value)

    def infer_relative_search_space(self, study: optuna.Study, trial: FrozenTrial) -> dict[str, BaseDistribution]:
        return dict(self.search_space)

    def sample_relative(
        self, study: optuna.Study, trial: FrozenTrial, search_space: Mapping[str, BaseDistribution]
    ) -> dict[str, Any]:
        oracle_trial = self.asked.get(trial.number)
        if oracle_trial is None:
            return {}
        values = oracle_trial.hyperparameters.values
        return {name: _within(values[name], search_space[name]) for name in search_space if name in values}

    def sample_independent(
        self, study: optuna.Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        # Reached only when the oracle gave this trial nothing: fail the trial, saying why.
        raise OracleStopped(self.stopped or f"keras-tuner's oracle has no value for {param_name!r}")

    def epochs_for(self, number: int, default: int) -> int:
        oracle_trial = self.asked.get(number)
        if oracle_trial is None:
            return default
        return int(oracle_trial.hyperparameters.values.get("tuner/epochs", default))

    def warm_start_for(self, study: optuna.Study, number: int) -> tuple[str, int] | None:
        oracle_trial = self.asked.get(number)
        if oracle_trial is None:
            return None
        values = oracle_trial.hyperparameters.values
        source, initial_epoch = values.get("tuner/trial_id"), int(values.get("tuner/initial_epoch", 0))
        if source is None or initial_epoch <= 0:
            return None
        for trial in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            attrs = trial.user_attrs
            if attrs.get(KERAS_TUNER_TRIAL_ID_ATTR) == source and attrs.get(KERAS_TUNER_EPOCHS_ATTR) == initial_epoch:
                model_uri = attrs.get(MODEL_URI_KEY)
                return (str(model_uri), initial_epoch) if model_uri else None
        return None  # its trial left no model: this one trains from scratch, all its epochs

    # ---------------------------------------------------------------- tell

    def after_trial(
        self, study: optuna.Study, trial: FrozenTrial, state: TrialState, values: Sequence[float] | None
    ) -> None:
        """Tell the oracle how the trial went: its study metric per epoch, then how it ended.

        Called by Optuna before it stores the trial's state, so the oracle never lacks a trial the
        ledger has. The metrics are told at the end rather than live: the oracle reads them only in
        end_trial, and its saved state then changes once per trial.
        """
        oracle_trial = self.asked.pop(trial.number, None)
        if oracle_trial is None:
            return
        # Optuna's fixed parameters (an enqueued trial) win over the oracle's: tell it what actually ran.
        oracle_trial.hyperparameters.values.update({k: v for k, v in trial.params.items() if k in self.search_space})
        steps = dict(trial.intermediate_values)
        if not steps and values:
            steps = {0: values[0]}
        for step, value in sorted(steps.items()):
            self.oracle.update_trial(oracle_trial.trial_id, {self.metric: value}, step=step)
        # A pruned trial ends as keras-tuner ends a fit cut short by early stopping: complete, scored by its
        # best epoch. A failed or interrupted one is not retried (Optuna does not retry it either).
        finished = state in (TrialState.COMPLETE, TrialState.PRUNED) and bool(steps)
        oracle_trial.status = "COMPLETED" if finished else "FAILED"
        if not finished:
            oracle_trial.message = str(trial.user_attrs.get(FAIL_REASON_ATTR, state.name))
        self.oracle.end_trial(oracle_trial)


def _within(value: Any, dist: BaseDistribution) -> Any:
    """An oracle's value as Optuna's distribution holds it (a log draw can land a rounding error outside)."""
    if isinstance(dist, FloatDistribution):
        return min(max(float(value), dist.low), dist.high)
    if isinstance(dist, IntDistribution):
        return min(max(int(value), dist.low), dist.high)
    return value


def _check_reloaded(oracle: keras_tuner.Oracle, cfg: SweepConfig) -> None:
    """A reloaded hyperband oracle keeps its epochs and factor: its brackets were planned with them."""
    if cfg.study.sampler != "hyperband":
        return
    stored = {"train.epochs": oracle.max_epochs, "study.hyperband_factor": oracle.factor}
    wanted = {"train.epochs": cfg.train.epochs, "study.hyperband_factor": cfg.study.hyperband_factor}
    for key, value in stored.items():
        if not math.isclose(float(value), float(wanted[key])):
            raise StudyMismatchError(
                f"study {cfg.study.name!r}: its hyperband oracle was planned with {key} = {value}, the sweep file "
                f"says {wanted[key]}; use a new study.name"
            )


def _lock(path: Path, *, study: str) -> IO[str] | None:
    """Hold `path` locked while this process lives: a second process on the study is refused."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock (one process is the documented rule)
        return None
    handle = path.open("a", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise UserError(
            f"study {study!r} (study.engine = 'keras-tuner') is being run by another process ({path} is locked); "
            "keras-tuner's oracle runs in one process"
        ) from None
    return handle
