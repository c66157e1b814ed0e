"""One ranking of trials: the leaderboard's order and the trial the test set scores come from rank_trials."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from mnist_sweep.final import FinalizeError, choose_trial, rank_trials
from mnist_sweep.records import MODEL_URI_KEY, RUN_ID_ATTR
from mnist_sweep.report import leaderboard_rows

# (state, value): trial numbers are the positions.
TRIALS = [
    (TrialState.COMPLETE, 0.5),
    (TrialState.FAIL, None),
    (TrialState.COMPLETE, 0.9),
    (TrialState.PRUNED, None),
    (TrialState.COMPLETE, 0.2),
    (TrialState.COMPLETE, 0.9),  # ties with trial 2: the earlier trial ranks first
]


def make_study(direction: str, *, without_model: tuple[int, ...] = ()) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction=direction)
    for number, (state, value) in enumerate(TRIALS):
        attrs = {RUN_ID_ATTR: f"run-{number}"}
        if state == TrialState.COMPLETE and number not in without_model:
            attrs[MODEL_URI_KEY] = f"models:/m-{number}"
        intermediate = {1: 0.1} if state == TrialState.PRUNED else {}
        study.add_trial(create_trial(state=state, value=value, user_attrs=attrs, intermediate_values=intermediate))
    return study


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ("val_accuracy", [2, 5, 0, 4, 1, 3]),  # higher first; the 0.9 tie to trial 2; FAIL, PRUNED by number
        ("val_loss", [4, 0, 2, 5, 1, 3]),  # lower first; the tie again to the earlier trial
    ],
)
def test_complete_trials_rank_in_the_metrics_direction_then_the_others_by_number(
    metric: str, expected: list[int]
) -> None:
    direction = "maximize" if metric == "val_accuracy" else "minimize"
    trials = make_study(direction).get_trials()
    assert [t.number for t in rank_trials(trials, metric=metric)] == expected
    assert [t.number for t in rank_trials(list(reversed(trials)), metric=metric)] == expected


@pytest.mark.parametrize("metric", ["val_accuracy", "val_loss"])
def test_the_scored_trial_is_the_leaderboards_first_row(metric: str) -> None:
    study = make_study("maximize" if metric == "val_accuracy" else "minimize")
    assert choose_trial(study, metric).number == leaderboard_rows(study, {}, metric=metric)[0]["trial"]


def test_a_trial_without_a_logged_model_is_passed_over_and_none_at_all_is_one_line() -> None:
    assert choose_trial(make_study("maximize", without_model=(2,)), "val_accuracy").number == 5
    study = make_study("maximize", without_model=(0, 2, 4, 5))
    with pytest.raises(FinalizeError, match="has no complete trial with a logged model to score"):
        choose_trial(study, "val_accuracy")
