"""The report's parts on in-memory Optuna studies: which plots are drawn, the leaderboard, the unscored page."""

from __future__ import annotations

import base64
import gzip
import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mnist_sweep import plots
from mnist_sweep.errors import UsageError
from mnist_sweep.records import RUN_ID_ATTR
from mnist_sweep.report import NOT_SCORED, leaderboard_rows, leaderboard_table, write_report


def make_study(complete: int, *, searched: bool = True, pruned: int = 0, failed: int = 0) -> optuna.Study:
    """A maximising study like a sweep's: each trial reports per epoch and carries its run id."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for number in range(complete + pruned + failed):
        trial = study.ask()
        trial.suggest_categorical("optimizer", ["sgd", "adam"] if searched else ["adam"])
        if searched:
            trial.suggest_float("learning_rate", 1e-4, 0.3, log=True)
        trial.set_user_attr(RUN_ID_ATTR, f"run-{number}")
        value = 0.5 + 0.01 * number
        trial.report(value, step=1)
        if number < complete:
            trial.set_user_attr("val_accuracy", value)
            trial.set_user_attr("val_loss", 1.0 - value)
            trial.set_user_attr("epochs_trained", 1)
            study.tell(trial, value)
        elif number < complete + pruned:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, state=TrialState.FAIL)
    return study


def test_every_sweep_plot_is_drawn_when_there_are_enough_trials() -> None:
    drawn = plots.sweep_plots(make_study(4), metric="val_accuracy")
    assert [p.key for p in drawn] == list(plots.SWEEP_PLOT_TITLES)
    assert all(p.figure is not None and p.figure.data and not p.note for p in drawn)


@pytest.mark.parametrize("complete", [0, 1])
def test_too_few_complete_trials_give_notes_not_errors(complete: int) -> None:
    drawn = {p.key: p for p in plots.sweep_plots(make_study(complete, failed=2), metric="val_accuracy")}
    for key in ("optimization_history", "param_importances", "parallel_coordinate", "slice"):
        assert drawn[key].figure is None
        assert drawn[key].note == f"not enough trials: {complete} complete, 2 needed"


def test_a_search_space_without_varied_values_notes_it() -> None:
    notes = plots.plan_sweep_plots(make_study(3, searched=False).get_trials())
    assert notes["optimization_history"] == ""
    assert "no hyperparameter took two different values" in notes["param_importances"]


def test_pruned_trials_alone_still_draw_learning_curves() -> None:
    notes = plots.plan_sweep_plots(make_study(0, pruned=2).get_trials())
    assert notes["intermediate_values"] == ""
    assert notes["optimization_history"].startswith("not enough trials")


def test_leaderboard_ranks_complete_trials_first_and_fills_pruned_ones_from_mlflow() -> None:
    study = make_study(3, pruned=1, failed=1)
    logged = {"run-3": {"val_accuracy": 0.42, "val_loss": 1.9}, "run-2": {"val_f1_macro": 0.5}}
    rows = leaderboard_rows(study, logged, metric="val_accuracy")
    assert [(r["trial"], r["state"]) for r in rows] == [
        (2, "COMPLETE"),
        (1, "COMPLETE"),
        (0, "COMPLETE"),
        (3, "PRUNED"),
        (4, "FAIL"),
    ]
    assert rows[0]["val_f1_macro"] == 0.5 and rows[0]["run_id"] == "run-2"
    assert rows[3]["val_accuracy"] == 0.42 and rows[3]["epochs"] == 1  # the pruned trial's last epoch
    by_loss = leaderboard_table(rows, sort="val_loss")
    assert by_loss["trial"].tolist()[:3] == [2, 1, 0]  # lowest loss first
    by_accuracy = leaderboard_table(rows, sort="val_accuracy")
    assert by_accuracy["val_accuracy"].tolist()[:4] == [0.52, 0.51, 0.5, 0.42]


def test_leaderboard_rejects_an_unknown_sort_column_naming_it() -> None:
    with pytest.raises(UsageError, match=r"--sort must be one of trial, state, .* got 'val_los'"):
        leaderboard_table(leaderboard_rows(make_study(2), {}, metric="val_accuracy"), sort="val_los")


def test_report_without_a_test_score_says_so(tmp_path: Path) -> None:
    write_report(tmp_path, study=make_study(1), result=None, metric="val_accuracy", run_metrics={})
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert NOT_SCORED in page and 'id="test-accuracy"' not in page
    assert "not enough trials: 1 complete, 2 needed" in page
    assert NOT_SCORED in (tmp_path / "report.md").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "test_metrics.json").read_text(encoding="utf-8"))["test_set_scored"] is False
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == ["leaderboard.csv", "report.html", "report.md", "test_metrics.json"]


def test_a_report_carries_plotly_js_once_and_stays_light(tmp_path: Path) -> None:
    write_report(tmp_path, study=make_study(6, pruned=1), result=None, metric="val_accuracy", run_metrics={})
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    packed = plots.plotly_js_packed()
    copies = sum(p.read_text(encoding="utf-8").count(packed) for p in files)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert copies == 1 and packed in page  # one page, self-contained, the bundle once
    assert page.count('class="plotly-figure"') == 5  # every sweep plot drawn in it
    assert gzip.decompress(base64.b64decode(packed)).decode() == plots.plotly_js()
    assert sum(p.stat().st_size for p in files) <= 3_000_000
