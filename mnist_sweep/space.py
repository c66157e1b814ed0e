"""The search space -> Optuna suggestions (and keras-tuner hyperparameters)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from mnist_sweep.config import Choice, ParamSpec, Range, SearchConfig

if TYPE_CHECKING:
    import keras_tuner
    import optuna


def fixed_params(search: SearchConfig) -> dict[str, Any]:
    """The keys that are not searched, with their single value."""
    return {name: spec.values[0] for name, spec in search.specs().items() if isinstance(spec, Choice) and spec.is_fixed}


def searched_names(search: SearchConfig) -> list[str]:
    """The keys Optuna samples."""
    return [name for name, spec in search.specs().items() if not spec.is_fixed]


def suggest(trial: optuna.trial.BaseTrial, name: str, spec: ParamSpec) -> Any:
    """One Optuna suggestion for one searched key."""
    if isinstance(spec, Range):
        if spec.integer:
            return trial.suggest_int(name, int(spec.low), int(spec.high), log=spec.log)
        return trial.suggest_float(name, spec.low, spec.high, log=spec.log)
    return trial.suggest_categorical(name, list(spec.values))


def sample_params(trial: optuna.trial.BaseTrial, search: SearchConfig) -> dict[str, Any]:
    """All hyperparameters of one trial: the sampled ones and the fixed ones."""
    params = fixed_params(search)
    for name in searched_names(search):
        params[name] = suggest(trial, name, search.specs()[name])
    return params


def to_keras_tuner(search: SearchConfig, *, include_fixed: bool = True) -> keras_tuner.HyperParameters:
    """The same space as keras-tuner hyperparameters (the keras-tuner engine's oracles search the searched keys)."""
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
