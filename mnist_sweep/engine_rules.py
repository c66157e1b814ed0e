"""What each engine accepts in a sweep file: its default sampler and pruner, the keys that belong to the other
engine, and (keras-tuner) the search spaces its hyperparameters can hold. Config validation calls these; they
raise ValueError with the sweep file's one line. Light: neither Optuna nor keras-tuner is imported."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mnist_sweep.samplers import ENGINE_TRAITS, ENGINES, check_name

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from mnist_sweep.config import ParamSpec, StudyConfig

OPTUNA_PRUNER_KEYS = (
    "pruner_startup_trials",
    "pruner_warmup_epochs",
    "pruner_interval_epochs",
    "pruner_percentile",
    "pruner_reduction_factor",
)


def with_engine_defaults(study: Mapping[str, Any], fields: Mapping[str, FieldInfo]) -> dict[str, Any]:
    """[study] as written, its engine's sampler and pruner filled in where it leaves them out.

    A sweep file written for Optuna keeps its pruner keys when it says study.pruner = 'none' (they are as inert
    as with Optuna and no pruner, and --set cannot remove a key from a file); left out, with keras-tuner's
    hyperband such a key is a mistake, refused here, where it is still known whether the file named a pruner.
    """
    filled = dict(study)
    engine = filled.get("engine", fields["engine"].default)
    if engine not in ENGINES:
        return filled  # the field's own validation says so
    traits = ENGINE_TRAITS[engine]
    filled.setdefault("sampler", traits.default_sampler)
    if "pruner" in filled:
        return filled
    filled["pruner"] = traits.default_pruner
    if engine == "keras-tuner" and filled["sampler"] == "hyperband":
        for key in OPTUNA_PRUNER_KEYS:
            if key in filled and filled[key] != fields[key].default:
                raise ValueError(
                    f"study.{key} = {filled[key]!r} belongs to Optuna's pruner, which keras-tuner's hyperband "
                    "oracle replaces; remove it (or set study.pruner = 'none' to keep it, unused)"
                )
    return filled


def check_engine_keys(study: StudyConfig) -> None:
    """Refuse a sampler the engine does not offer, or a key that belongs to the other engine's sampler."""
    check_name(study.engine, study.sampler)
    hyperband = study.engine == "keras-tuner" and study.sampler == "hyperband"
    if not hyperband and study.hyperband_factor != type(study).model_fields["hyperband_factor"].default:
        raise ValueError(
            f"study.hyperband_factor = {study.hyperband_factor} belongs to keras-tuner's hyperband oracle "
            f"(study.engine = 'keras-tuner', study.sampler = 'hyperband'), not to study.engine = {study.engine!r} "
            f"with study.sampler = {study.sampler!r}; remove it"
        )
    if study.engine == "keras-tuner" and study.pruner == "asha":
        raise ValueError(
            "study.pruner = 'asha' chooses which trials go on, which keras-tuner's oracle does for "
            "study.engine = 'keras-tuner'; use study.engine = 'optuna' with it, or another pruner"
        )
    if hyperband and study.pruner != "none":
        raise ValueError(
            f"study.pruner = {study.pruner!r} cannot run with keras-tuner's hyperband oracle, which decides itself "
            "how many epochs each trial trains; leave study.pruner out (or set it to 'none')"
        )


def check_keras_tuner_space(specs: Mapping[str, ParamSpec], *, trials: int, oracle: str) -> None:
    """Refuse what keras-tuner's HyperParameters cannot hold, or an oracle cannot draw `trials` times."""
    points: int | None = 1
    for name, spec in specs.items():
        kinds = spec.value_kinds()
        if len(kinds) > 1:
            raise ValueError(
                f"search.{name} = {spec.to_toml_value()!r}: keras-tuner's Choice holds values of one type, "
                f"got {' and '.join(kinds)} (write 1 as 1.0) for study.engine = 'keras-tuner'"
            )
        count = spec.distinct_points()
        points = None if points is None or count is None else points * count
    # Its random and bayesian oracles never draw a point twice (hyperband's promotions do, on purpose).
    if oracle != "hyperband" and points is not None and points < trials:
        raise ValueError(
            f"search holds {points} distinct points but study.trials = {trials}: keras-tuner's {oracle} oracle "
            "draws each point once; lower study.trials or widen [search]"
        )
