"""The lecture's own network as a study's first trial: its values, and whether the searched space holds them.

Engine-neutral: the Optuna study enqueues `BaselineValues.values` (study.py); a keras-tuner oracle takes the
same values as its first. Imports neither Optuna nor Keras nor MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mnist_sweep.config import Choice, ParamSpec, Range, SweepConfig

# The lecture (seed/lecture.txt), "MNIST: All in all" (lines 761-779): 784 -> Dense(500, sigmoid) ->
# Dense(500, sigmoid) -> Dense(10, softmax) (also lines 424-432), compiled with optimizer='adam' (Keras' default
# rate 1e-3, line 772). That slide's fit passes no batch size (Keras would take 32); the lecture's own batch
# size is its data-preparation slide's `batch size = 128` (line 568). No dropout, weight decay or momentum.
LECTURE_HIDDEN = (500, 500)
LECTURE_PARAMS: dict[str, str | int | float] = {
    "optimizer": "adam",
    "learning_rate": 1e-3,
    "batch_size": 128,
    "activation": "sigmoid",
    "dropout": 0.0,
    "weight_decay": 0.0,
    "momentum": 0.0,
}


@dataclass(frozen=True)
class BaselineValues:
    """The lecture's values inside the searched space: what an engine enqueues as the first trial."""

    values: dict[str, Any]  # the searched keys only, each in its space's own type ("searched" = not fixed)


@dataclass(frozen=True)
class BaselineSkipped:
    """The lecture's values lie outside the searched space; `line` says which, for the user."""

    line: str


def baseline_values(cfg: SweepConfig) -> BaselineValues | BaselineSkipped | None:
    """The baseline trial's values, why it is skipped, or None where study.baseline is false.

    The space is never widened: a lecture value it lacks skips the baseline, and the line names every such key.
    """
    if not cfg.study.baseline:
        return None
    outside = []
    if tuple(cfg.model.hidden) != LECTURE_HIDDEN:
        outside.append(f"model.hidden is {list(cfg.model.hidden)}, not {list(LECTURE_HIDDEN)}")
    values: dict[str, Any] = {}
    for name, spec in cfg.search.specs().items():
        found = _within(spec, LECTURE_PARAMS[name])
        if found is None:
            outside.append(f"search.{name} lacks {LECTURE_PARAMS[name]!r}")
        elif not spec.is_fixed:
            values[name] = found
    if outside:
        return BaselineSkipped(
            f"baseline skipped: the lecture's values are outside the space ({', '.join(outside)}); "
            "it is not widened: add them to run the baseline, or set study.baseline = false"
        )
    return BaselineValues(values)


def _within(spec: ParamSpec, value: str | int | float) -> Any:
    """`value` as the space holds it (a choice's own value, a range's type), or None where it lies outside."""
    if isinstance(spec, Range):
        if isinstance(value, str) or not spec.low <= value <= spec.high:
            return None
        return int(value) if spec.integer else float(value)
    assert isinstance(spec, Choice)
    for choice in spec.values:  # "0" is no 0, and 0 is 0.0
        if choice == value and isinstance(choice, str) == isinstance(value, str):
            return choice
    return None
