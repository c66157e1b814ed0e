"""The search space -> Optuna: one distribution per searched key, and one trial's hyperparameters, typed.

This is the space's one translation for Optuna (and for keras-tuner's oracle behind Optuna's sampler seam);
keras-tuner's own HyperParameters are built by the keras-tuner engine (keras_tuner_engine.hyperparameters).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution

from mnist_sweep.config import ParamSpec, Range, SearchConfig

if TYPE_CHECKING:
    import optuna


def fixed_params(search: SearchConfig) -> dict[str, Any]:
    """The keys that are not searched, with their single value."""
    return search.fixed_values()


def searched_names(search: SearchConfig) -> list[str]:
    """The keys Optuna samples."""
    return [name for name, spec in search.specs().items() if not spec.is_fixed]


def distribution(spec: ParamSpec) -> BaseDistribution:
    """The Optuna distribution of one searched key."""
    if isinstance(spec, Range):
        if spec.integer:
            return IntDistribution(int(spec.low), int(spec.high), log=spec.log)
        return FloatDistribution(spec.low, spec.high, log=spec.log)
    return CategoricalDistribution(list(spec.values))


def distributions(search: SearchConfig) -> dict[str, BaseDistribution]:
    """The searched keys and their Optuna distributions (what `study.ask` takes)."""
    specs = search.specs()
    return {name: distribution(specs[name]) for name in searched_names(search)}


def suggest(trial: optuna.trial.BaseTrial, name: str, dist: BaseDistribution) -> Any:
    """One Optuna suggestion for one searched key, from its distribution."""
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high, log=dist.log)
    if isinstance(dist, FloatDistribution):
        return trial.suggest_float(name, dist.low, dist.high, log=dist.log)
    assert isinstance(dist, CategoricalDistribution), dist
    return trial.suggest_categorical(name, list(dist.choices))


def sample_params(trial: optuna.trial.BaseTrial, search: SearchConfig) -> dict[str, Any]:
    """All hyperparameters of one trial: the sampled ones and the fixed ones."""
    params = fixed_params(search)
    for name, dist in distributions(search).items():
        params[name] = suggest(trial, name, dist)
    return params
