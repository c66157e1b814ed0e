"""After a tiny real sweep: the report in a browser, the leaderboard, the MLflow UI, as a person would check them."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import optuna
import pandas as pd
import pytest

from mnist_sweep import plots
from mnist_sweep.plots import SWEEP_PLOT_TITLES
from mnist_sweep.report import NOT_SCORED
from tests.browser import chromium_page, nothing_listens, read_line_with
from tests.conftest import CLI, CliRunner, cli, cli_environment, cli_in_process, free_port, small_sweep_args
from tests.finished_sweep import SWEEP, TRIAL_RUNS, VALIDATION_IMAGES, FinishedSweep

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

HEATMAPS = ("confusion-counts", "confusion-normalised")
LECTURE_HEATMAPS = ("lecture-confusion-0", "lecture-confusion-1")  # the lecture's network's and the chosen trial's
# Each plot container, and whether plotly drew into it (an SVG or a WebGL canvas).
PLOT_STATE = """() => Object.fromEntries([...document.querySelectorAll('figure.plot')].map(
    f => [f.dataset.plot, f.querySelector('svg.main-svg, canvas') !== null]))"""
ALL_DRAWN = "() => [...document.querySelectorAll('figure.plot')].every(f => f.querySelector('svg.main-svg, canvas'))"


@pytest.fixture
def sweep(finished_sweep: FinishedSweep) -> FinishedSweep:
    """The session's finished sweep (tests/finished_sweep.py): these tests only read it."""
    return finished_sweep


def user_error_lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    """Our own error lines (TensorFlow may add log lines of its own to stderr)."""
    return [line for line in done.stderr.splitlines() if line.startswith("mnist-sweep:")]


def open_report(page: Any, path: Path) -> dict[str, bool]:
    """Open a report page, wait until plotly drew every plot, return which plot drew what."""
    page.goto(path.as_uri())
    page.wait_for_function(ALL_DRAWN, timeout=60_000)
    return dict(page.evaluate(PLOT_STATE))


# --------------------------------------------------------------------------- the report


@pytest.mark.browser
def test_report_opens_offline_in_chromium_and_every_plot_draws(sweep: FinishedSweep) -> None:
    with chromium_page() as (page, problems):
        drawn = open_report(page, sweep.reports / "report.html")
        shown_accuracy = page.inner_text("#test-accuracy")
        notes = page.locator(".plot-note").count()
    assert problems == []
    assert shown_accuracy == f"{sweep.result()['test_accuracy']:.4f}"
    assert drawn == dict.fromkeys([*HEATMAPS, *LECTURE_HEATMAPS, *SWEEP_PLOT_TITLES], True)
    assert notes == 0  # three complete trials with varied hyperparameters: every sweep plot says something


def test_a_study_writes_plotly_js_once_and_its_report_stays_light(sweep: FinishedSweep) -> None:
    parent = sweep.parent()
    logged = Path(urlparse(parent.info.artifact_uri).path) / "report"
    packed = plots.plotly_js_packed().encode()
    for folder in (sweep.reports, logged):  # the report folder, and its copy in the parent run
        files = [p for p in folder.rglob("*") if p.is_file()]
        assert sum(p.read_bytes().count(packed) for p in files) == 1
        assert sum(p.stat().st_size for p in files) <= 3_000_000  # both: <= 6 MB a study


@pytest.mark.browser
def test_trial_confusion_matrix_page_shows_counts_and_row_shares(sweep: FinishedSweep) -> None:
    run = sweep.trial_runs()[0]
    path = Path(urlparse(run.info.artifact_uri).path) / "val_confusion_matrix.html"
    with chromium_page() as (page, problems):
        page.goto(path.as_uri())
        counts = [int(text) for text in page.locator("svg g text").all_text_contents()]
        page.click("#share")
        shares = page.locator("svg g text").all_text_contents()
    assert problems == []
    assert len(counts) == 100 and sum(counts) == VALIDATION_IMAGES  # every validation image, once
    assert all(share.endswith("%") for share in shares)
    assert path.with_suffix(".png").exists()


def test_parent_run_holds_report_plots_and_leaderboard_and_runs_compare_cleanly(sweep: FinishedSweep) -> None:
    client = sweep.mlflow()
    parent = sweep.parent()
    logged = {f.path for f in client.list_artifacts(parent.info.run_id, "report")}
    for name in ("report.html", "report.md", "test_metrics.json", "leaderboard.csv"):
        assert f"report/{name}" in logged
    assert "report/plots" not in logged  # every plot is in report.html
    assert parent.data.metrics["test_accuracy"] == pytest.approx(sweep.result()["test_accuracy"])

    trials = sweep.trial_runs()
    leaderboard = pd.read_csv(sweep.reports / "leaderboard.csv")
    assert sorted(leaderboard["run_id"]) == sorted(run.info.run_id for run in trials)
    assert len({frozenset(run.data.params) for run in trials}) == 1  # identical keys: MLflow's compare view
    assert len({frozenset(run.data.metrics) for run in trials}) == 1
    page = (sweep.reports / "report.html").read_text(encoding="utf-8")
    assert "Plotly.newPlot" in page and not re.search(r"<script[^>]+src=", page)  # plotly.js inline, once


# --------------------------------------------------------------------------- commands


def test_report_command_rewrites_from_records_without_touching_test_data(
    finished_sweep: FinishedSweep, tmp_path: Path
) -> None:
    sweep = finished_sweep.copy(tmp_path / "sweep")  # its report folder goes: a copy, not the shared sweep's
    before = sweep.result()
    shutil.rmtree(sweep.reports)
    # A data path that does not exist: reading any image, test or training, would fail.
    done = sweep.run("report", SWEEP, "--data", str(sweep.folder / "no-mnist-here"))
    assert done.returncode == 0, done.stderr[-2000:]
    after = sweep.result()
    assert (after["test_accuracy"], after["scored_at"]) == (before["test_accuracy"], before["scored_at"])
    assert f"{before['test_accuracy']:.4f}" in (sweep.reports / "report.html").read_text(encoding="utf-8")
    assert "report: reports/fcn/report.html" in done.stdout


def test_trials_prints_the_leaderboard_and_writes_it_as_csv(sweep: FinishedSweep, tmp_path: Path) -> None:
    done = sweep.run("trials", SWEEP, "--csv", str(tmp_path / "board.csv"), "--sort", "val_loss")
    assert done.returncode == 0, done.stderr[-2000:]
    board = pd.read_csv(tmp_path / "board.csv")
    assert list(board.columns) == [
        "trial", "state", "optimizer", "learning_rate", "batch_size", "activation", "dropout",
        "val_accuracy", "val_loss", "val_f1_macro", "epochs", "duration_s", "run_id",
    ]  # fmt: skip
    assert board["val_loss"].tolist() == sorted(board["val_loss"])
    recorded = {t.number: t for t in sweep.study().trials}
    for row in board.itertuples():
        assert row.val_accuracy == pytest.approx(recorded[row.trial].user_attrs["val_accuracy"])
        assert row.run_id == recorded[row.trial].user_attrs["mlflow_run_id"] and row.run_id in done.stdout
        assert row.state == "COMPLETE" and row.epochs == 1

    misspelt = sweep.run("trials", SWEEP, "--sort", "val_los")
    assert misspelt.returncode == 2
    assert len(user_error_lines(misspelt)) == 1 and "got 'val_los'" in misspelt.stderr


def rest(base: str, endpoint: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    payload = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(base + endpoint, data=payload, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return dict(json.loads(response.read()))


def test_ui_serves_the_experiment_and_every_trial_run_over_mlflow_rest(sweep: FinishedSweep, tmp_path: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with (tmp_path / "ui.log").open("w") as log:
        server = subprocess.Popen(
            [*CLI, "ui", SWEEP, "--port", str(port)],
            cwd=sweep.folder,
            env=cli_environment(sweep.data),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        try:
            url = read_line_with(server, "MLflow UI for study", seconds=180)
            experiment = rest(base, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=fcn")["experiment"]
            search = {"experiment_ids": [experiment["experiment_id"]], "filter": TRIAL_RUNS, "max_results": 100}
            runs = rest(base, "/api/2.0/mlflow/runs/search", search)["runs"]
        finally:
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=60)
    runs_table = f"{base}/#/experiments/{experiment['experiment_id']}/runs?workflowType=machine_learning"
    assert url.endswith(f"{runs_table}  (Ctrl-C to stop)")
    served = {run["info"]["run_id"]: run["data"] for run in runs}
    trials = sweep.study().trials
    assert sorted(served) == sorted(t.user_attrs["mlflow_run_id"] for t in trials)
    for trial in trials:
        data = served[trial.user_attrs["mlflow_run_id"]]
        params = {p["key"]: p["value"] for p in data["params"]}
        metrics = {m["key"]: m["value"] for m in data["metrics"]}
        assert {k: params[k] for k in trial.params} == {k: str(v) for k, v in trial.params.items()}
        assert metrics["final_val_accuracy"] == pytest.approx(trial.user_attrs["val_accuracy"])
    assert code == 0
    assert nothing_listens(base)  # the MLflow server went with it


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("command", ["report", "trials", "ui"])
def test_commands_on_a_missing_study_exit_2_and_write_nothing(
    command: str, tmp_path: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = [command, SWEEP, "--set", "study.name=nope"]
    if command == "ui":  # the real process, for its exit code (in this one, a missed check would start a server)
        done = cli(*args, cwd=tmp_path, data=mnist_dir)
        code, stderr = done.returncode, done.stderr
    else:
        code, stderr = cli_in_process(args, cwd=tmp_path, monkeypatch=monkeypatch)
    assert code == 2
    assert [line for line in stderr.splitlines() if line.startswith("mnist-sweep:")] == [
        "mnist-sweep: study 'nope' does not exist in sqlite:///mlruns/optuna.db; run `mnist-sweep run` first"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.browser
def test_report_before_the_test_set_is_scored_is_marked_and_exits_2(run_here: CliRunner, tmp_path: Path) -> None:
    worker = run_here("worker", SWEEP, *small_sweep_args(trials=1, train_limit=1000, validation=500))
    assert worker.returncode == 0, worker.stderr[-2000:]
    done = run_here("report", SWEEP)
    assert done.returncode == 2
    assert user_error_lines(done) == [
        "mnist-sweep: study 'fcn' has no scored test set yet; the report says so "
        "(`mnist-sweep finalize SWEEP` scores it once)"
    ]
    reports = tmp_path / "reports" / "fcn"
    assert json.loads((reports / "test_metrics.json").read_text(encoding="utf-8"))["test_set_scored"] is False
    assert NOT_SCORED in (reports / "report.md").read_text(encoding="utf-8")
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["fcn"]  # no test-set seal
    with chromium_page() as (page, problems):
        drawn = open_report(page, reports / "report.html")
        banner = page.inner_text("#not-scored")
        notes = page.locator(".plot-note").all_inner_texts()
    assert problems == []
    assert NOT_SCORED in banner
    # one trial: the other sweep plots are notes, not crashes; the lecture's network beside the best trial
    assert drawn == {"intermediate_values": True, **dict.fromkeys(LECTURE_HEATMAPS, True)}
    assert len(notes) == 4 and all("not enough trials: 1 complete, 2 needed" in note for note in notes)
