"""The engines and the samplers each offers: one table that config validation, `study.make_sampler` and the
keras-tuner engine all read, so a name is accepted only where something builds it.

Adding a sampler is one entry here (and its line in docs/sweep-file.md). Light on purpose: Optuna and keras-tuner
are imported only when a sampler or oracle is built, so `mnist-sweep validate` stays fast.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from mnist_sweep.errors import PreflightError

if TYPE_CHECKING:
    import optuna

    from mnist_sweep.config import StudyConfig

Engine = Literal["optuna", "keras-tuner"]


@dataclass(frozen=True, kw_only=True)
class SamplerEntry:
    """What every entry of the table says. `requires`: modules it imports that the project's dependencies do
    not bring (checked before anything is written), with the pip extra that installs them."""

    requires: tuple[str, ...] = ()
    install: str = ""
    constant_liar: bool = False  # whether it takes the study's constant_liar (it lies for running trials)


@dataclass(frozen=True)
class OptunaSampler(SamplerEntry):
    """An Optuna sampler: `build(seed, constant_liar)`."""

    build: Callable[[int, bool], optuna.samplers.BaseSampler]


def _unlimited(study: StudyConfig, epochs: int) -> dict[str, Any]:
    return {"max_trials": None}  # study.trials ends the sweep, not the oracle


@dataclass(frozen=True)
class KerasTunerOracle(SamplerEntry):
    """A keras-tuner oracle: its class in `keras_tuner.oracles`, and its own arguments from the study and
    train.epochs."""

    oracle: str
    options: Callable[[StudyConfig, int], dict[str, Any]] = _unlimited


def _tpe(seed: int, constant_liar: bool) -> optuna.samplers.BaseSampler:
    import optuna

    # Several workers at once: a running trial counts as a poor result, so TPE does not hand its point out again.
    return optuna.samplers.TPESampler(seed=seed, constant_liar=constant_liar)


def _random(seed: int, constant_liar: bool) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.RandomSampler(seed=seed)


def _gp(seed: int, constant_liar: bool) -> optuna.samplers.BaseSampler:
    import optuna

    return optuna.samplers.GPSampler(seed=seed)  # handles categorical keys itself


def _cmaes(seed: int, constant_liar: bool) -> optuna.samplers.BaseSampler:
    import optuna

    # CMA-ES searches the numeric keys only; the categorical ones (optimizer, activation, batch_size) go to
    # its independent sampler, seeded so a rerun draws them again. That is by design here, so the warning it
    # would give for each such key in every trial is off.
    return optuna.samplers.CmaEsSampler(
        seed=seed, independent_sampler=optuna.samplers.RandomSampler(seed=seed), warn_independent_sampling=False
    )


def _hyperband(study: StudyConfig, epochs: int) -> dict[str, Any]:
    # hyperband_iterations=None: brackets go on until study.trials are done.
    return {"max_epochs": epochs, "factor": study.hyperband_factor, "hyperband_iterations": None}


OPTUNA_SAMPLERS: Mapping[str, OptunaSampler] = {
    "tpe": OptunaSampler(_tpe, constant_liar=True),
    "random": OptunaSampler(_random),
    "gp": OptunaSampler(_gp, requires=("torch", "scipy"), install="pip install -e '.[torch]'"),
    "cmaes": OptunaSampler(_cmaes, requires=("cmaes",)),
}
KERAS_TUNER_ORACLES: Mapping[str, KerasTunerOracle] = {
    "random": KerasTunerOracle("RandomSearchOracle"),
    "bayesian": KerasTunerOracle("BayesianOptimizationOracle"),
    "hyperband": KerasTunerOracle("HyperbandOracle", options=_hyperband),
}
ENGINES: Mapping[Engine, Mapping[str, SamplerEntry]] = {
    "optuna": OPTUNA_SAMPLERS,
    "keras-tuner": KERAS_TUNER_ORACLES,
}


@dataclass(frozen=True)
class EngineTraits:
    """What an engine does besides offering its samplers: read where the two engines differ, instead of
    asking which engine it is."""

    default_sampler: str
    default_pruner: str
    one_process: bool  # its sampler's state is this process's files: no second process on the study
    retries_stale_trials: bool  # Optuna retries a dead worker's trial; keras-tuner's oracle reruns its own


ENGINE_TRAITS: Mapping[Engine, EngineTraits] = {
    "optuna": EngineTraits("tpe", "median", one_process=False, retries_stale_trials=True),
    # Its oracle decides how long a trial trains (hyperband), so no pruner unless asked for.
    "keras-tuner": EngineTraits("bayesian", "none", one_process=True, retries_stale_trials=False),
}
DEFAULT_SAMPLER: Mapping[Engine, str] = {name: traits.default_sampler for name, traits in ENGINE_TRAITS.items()}


def check_name(engine: Engine, sampler: str) -> None:
    """Raises ValueError (the sweep file's one line) where `sampler` is not one of `engine`'s."""
    names = ENGINES[engine]
    if sampler in names:
        return
    other = next(name for name in ENGINES if name != engine)
    hint = f" (set study.engine = {other!r} to use it)" if sampler in ENGINES[other] else ""
    raise ValueError(
        f"study.sampler = {sampler!r} is not a sampler of study.engine = {engine!r}, which offers "
        f"{', '.join(names)}{hint}"
    )


def sampler_entry(study: StudyConfig) -> SamplerEntry:
    """The table's entry for the study's engine and sampler; a name not in it is a KeyError, never another
    sampler (config refuses it first)."""
    return ENGINES[study.engine][study.sampler]


def optuna_sampler(study: StudyConfig) -> OptunaSampler:
    """The table's entry for the study's Optuna sampler."""
    entry = sampler_entry(study)
    assert isinstance(entry, OptunaSampler), study
    return entry


def keras_tuner_oracle(study: StudyConfig) -> KerasTunerOracle:
    """The table's entry for the study's keras-tuner oracle."""
    entry = sampler_entry(study)
    assert isinstance(entry, KerasTunerOracle), study
    return entry


def takes_constant_liar(study: StudyConfig) -> bool:
    """Whether the study's sampler lies about running trials (keras-tuner's oracles have no lies to tell)."""
    return sampler_entry(study).constant_liar


def check_installed(study: StudyConfig) -> None:
    """Raises PreflightError (exit 2, nothing written) where the study's sampler needs a module not installed."""
    entry = sampler_entry(study)
    missing = [name for name in entry.requires if importlib.util.find_spec(name) is None]
    if missing:
        how = entry.install or f"pip install {' '.join(missing)}"
        others = ", ".join(name for name in ENGINES[study.engine] if name != study.sampler)
        raise PreflightError(
            f"study.sampler = {study.sampler!r} needs the Python package {' and '.join(missing)}, which is not "
            f"installed ({how}); or choose another sampler: {others}"
        )
