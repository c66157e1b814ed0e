"""The lecture's network as a baseline: which spaces hold it, and the gain line (no training, no MLflow)."""

from __future__ import annotations

import optuna
import pytest

from mnist_sweep.baseline import LECTURE_PARAMS, BaselineSkipped, BaselineValues, baseline_values
from mnist_sweep.config import build_config, load_sweep
from mnist_sweep.report import baseline_gain, gain_line
from mnist_sweep.space import sample_params
from mnist_sweep.study import enqueue_baseline
from tests.conftest import DEFAULT_SWEEP


def test_the_default_space_lacks_the_lecture_values_and_says_which() -> None:
    plan = baseline_values(load_sweep(DEFAULT_SWEEP))
    assert isinstance(plan, BaselineSkipped)
    assert plan.line == (
        "baseline skipped: the lecture's values are outside the space (search.activation lacks 'sigmoid', "
        "search.dropout lacks 0.0); it is not widened: add them to run the baseline, or set study.baseline = false"
    )
    assert "optimizer" not in plan.line and "batch_size" not in plan.line  # those hold the lecture's values


def test_a_space_holding_the_lecture_values_gives_them_for_the_searched_keys_only() -> None:
    cfg = build_config({"search": {"batch_size": {"low": 32, "high": 256}, "dropout": [0, 0.2]}})
    plan = baseline_values(cfg)
    assert plan == BaselineValues(
        {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 128, "activation": "sigmoid", "dropout": 0}
    )
    assert isinstance(plan.values["batch_size"], int)  # an integer range takes an int
    assert "weight_decay" not in plan.values  # fixed at the lecture's 0.0: not searched, nothing to enqueue


@pytest.mark.parametrize(
    ("document", "named"),
    [
        ({"model": {"hidden": [256, 256]}}, "(model.hidden is [256, 256], not [500, 500])"),
        ({"search": {"learning_rate": {"low": 0.01, "high": 0.1}}}, "(search.learning_rate lacks 0.001)"),
        ({"search": {"batch_size": [64, 256]}}, "(search.batch_size lacks 128)"),
        ({"search": {"weight_decay": 1e-4}}, "(search.weight_decay lacks 0.0)"),
    ],
)
def test_one_value_outside_skips_the_baseline_naming_the_key(document: dict, named: str) -> None:  # type: ignore[type-arg]
    plan = baseline_values(build_config(document))
    assert isinstance(plan, BaselineSkipped) and named in plan.line


def test_study_baseline_false_asks_for_nothing() -> None:
    assert baseline_values(build_config({"study": {"baseline": False}})) is None


def test_the_enqueued_trial_is_the_first_with_exactly_the_lecture_values() -> None:
    cfg = build_config({})
    study = optuna.create_study(direction="maximize")
    assert enqueue_baseline(study, cfg).startswith("baseline: the lecture's network runs first")
    trial = study.ask()
    assert sample_params(trial, cfg.search) == LECTURE_PARAMS  # the searched keys enqueued, the fixed ones at 0.0
    assert trial.user_attrs["baseline"] is True


def finished_study(values: list[float | None], *, baseline: int = 0, direction: str = "maximize") -> optuna.Study:
    """A study whose trials ended with `values` (None: pruned); trial `baseline` is marked as the baseline."""
    study = optuna.create_study(direction=direction)
    for number, value in enumerate(values):
        trial = study.ask()
        if number == baseline:
            trial.set_user_attr("baseline", True)
        study.tell(trial, value, state=None if value is not None else optuna.trial.TrialState.PRUNED)
    return study


def test_gain_in_points_of_validation_accuracy() -> None:
    gain = baseline_gain(finished_study([0.9712, 0.9864, 0.98]), metric="val_accuracy")
    assert gain is not None and gain.gain == pytest.approx(0.0152)
    assert gain_line(gain) == (
        "baseline (trial 0, the lecture's network) val_accuracy 0.9712 -> best 0.9864 (trial 1), +1.52 points"
    )


def test_gain_in_validation_loss_goes_down() -> None:
    study = finished_study([0.0950, 0.0512], direction="minimize")
    gain = baseline_gain(study, metric="val_loss")
    assert gain is not None and gain.gain == pytest.approx(0.0438)
    assert gain_line(gain).endswith("val_loss 0.0950 -> best 0.0512 (trial 1), -0.0438 (lower is better)")


def test_a_baseline_that_wins_or_did_not_finish_says_so() -> None:
    best = baseline_gain(finished_study([0.99, 0.98]), metric="val_accuracy")
    assert best is not None and gain_line(best).endswith(
        "is the best trial: the sweep gained nothing over it on validation"
    )
    pruned = baseline_gain(finished_study([None, 0.98]), metric="val_accuracy")
    assert pruned is not None and gain_line(pruned) == (
        "baseline (trial 0, the lecture's network) is pruned: no gain over it to show on validation yet"
    )
    assert baseline_gain(finished_study([0.9, 0.98], baseline=5), metric="val_accuracy") is None


def test_a_retried_baseline_counts_by_its_complete_trial() -> None:
    """A stale baseline is failed and retried with its attributes: the retry's value is the baseline's."""
    study = optuna.create_study(direction="maximize")
    for value, baseline in ((None, True), (0.97, True), (0.98, False)):
        trial = study.ask()
        if baseline:
            trial.set_user_attr("baseline", True)
        study.tell(trial, value, state=optuna.trial.TrialState.FAIL if value is None else None)
    gain = baseline_gain(study, metric="val_accuracy")
    assert gain is not None and (gain.baseline_trial, gain.baseline_value, gain.best_trial) == (1, 0.97, 2)
