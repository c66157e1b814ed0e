"""`mnist-sweep ui` in headless Chromium, on one finished tiny sweep: what a user comparing trials sees."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from tests.browser import (
    DASHBOARD_MISSING,
    EXPAND,
    ROWS,
    Served,
    chromium_page,
    nothing_listens,
    open_runs_table,
    serving,
)
from tests.conftest import CLI, cli, cli_environment, free_port, required_module, run_in_process
from tests.finished_sweep import SWEEP, TRIALS, FinishedSweep

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]  # each test starts the real CLI (TensorFlow and MLflow imports)

# Each run's cells by column id, e.g. {"<run id>": {"metrics.`final_val_accuracy`": "0.806", ...}}.
CELLS = """() => Object.fromEntries([...document.querySelectorAll('.ag-center-cols-container .ag-row')].map(
    r => [r.getAttribute('row-id'), Object.fromEntries([...r.querySelectorAll('.ag-cell')].map(
        c => [c.getAttribute('col-id'), c.innerText.trim()]))]))"""
PARCOORDS = """() => [...document.querySelectorAll('.js-plotly-plot')].filter(p => p.querySelector('svg.main-svg'))
    .flatMap(p => (p.data || []).filter(d => d.type === 'parcoords'))
    .map(d => d.dimensions.map(dim => [dim.label, dim.values.length]))"""


class Study:
    """The finished sweep as MLflow recorded it, and the UI serving it."""

    def __init__(self, folder: Path, served: Served) -> None:
        self.folder, self.served = folder, served
        self.client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlruns/mlflow.db")
        experiment = self.client.get_experiment_by_name("fcn")
        assert experiment is not None
        self.experiment = experiment
        runs = self.client.search_runs([experiment.experiment_id])
        self.parent = next(r for r in runs if r.data.tags.get("mnist_sweep.role") == "study")
        self.trials = sorted(
            (r for r in runs if r.data.tags.get("mnist_sweep.role") == "trial"), key=lambda r: r.info.run_name
        )
        # The lecture's network, trained before the trials beside them: the oldest child of the study's run.
        (self.reference,) = [r for r in runs if r.data.tags.get("mnist_sweep.role") == "reference"]

    @property
    def origin(self) -> str:
        return re.sub(r"/#/.*$", "", self.served.url)

    def page_url(self, route: str) -> str:
        return f"{self.origin}/#/experiments/{self.experiment.experiment_id}/{route}?workflowType=machine_learning"


@pytest.fixture(scope="module")
def study(finished_sweep: FinishedSweep, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Study]:
    """The session's finished sweep served by `mnist-sweep ui` for the MLflow tests, then stopped with Ctrl-C."""
    command = [*CLI, "ui", SWEEP, "--port", str(free_port())]
    with serving(
        command,
        cwd=finished_sweep.folder,
        env=cli_environment(finished_sweep.data),
        needle="MLflow UI for study 'fcn'",
        goodbye="MLflow UI stopped",
        log=tmp_path_factory.mktemp("ui") / "ui.log",
    ) as served:
        yield Study(finished_sweep.folder, served)
    assert served.exit_code == 0 and nothing_listens(served.url)  # Ctrl-C stopped MLflow's server too


@pytest.fixture
def browser(study: Study, tmp_path: Path) -> Iterator[Any]:
    """A Chromium page that may reach the UI's server only; a screenshot of where it ended, to look at."""
    with chromium_page(allow=study.origin) as (page, problems):
        page.set_viewport_size({"width": 2200, "height": 1000})  # room for added columns beside the defaults
        yield page
        page.screenshot(path=tmp_path / "end.png")
    assert [p for p in problems if p.startswith(("network request", "page error"))] == []


def shown_rows(page: Any) -> list[tuple[str, str]]:
    rows = page.locator(ROWS)
    return [(row.get_attribute("row-id"), row.inner_text()) for row in rows.all()]


def expand_study(page: Any, study: Study) -> None:
    page.locator(f'{ROWS}[row-id="{study.parent.info.run_id}"] {EXPAND}').click()
    page.locator(f'{ROWS}[row-id="{study.trials[-1].info.run_id}"]').wait_for()


# --------------------------------------------------------------------------- what the study recorded for the UI


@pytest.mark.server
def test_the_experiment_is_model_training_and_the_study_run_describes_itself(study: Study) -> None:
    assert study.experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    description = study.parent.data.tags["mlflow.note.content"]
    for fact in (f"from `{SWEEP}`", f"{TRIALS} trials", "`val_accuracy`", "`learning_rate`", "`optimizer`"):
        assert fact in description
    assert study.parent.info.status == "FINISHED"
    assert study.parent.info.end_time >= study.trials[-1].info.end_time  # the study's duration covers its trials


# --------------------------------------------------------------------------- in the browser


@pytest.mark.browser
@pytest.mark.server
def test_the_printed_url_opens_the_runs_table_on_the_study_run(study: Study, browser: Any) -> None:
    assert study.served.url == study.page_url("runs")
    open_runs_table(browser, study.served.url)
    rows = shown_rows(browser)
    heading = browser.get_by_role("heading", level=2).first.inner_text()
    duration = browser.evaluate(CELLS)[study.parent.info.run_id]["duration"]
    assert heading == "Runs"  # not the GenAI "Overview" (traces, token usage)
    assert [run_id for run_id, _ in rows] == [study.parent.info.run_id]  # the trials are nested under it
    assert "fcn" in rows[0][1]
    assert re.fullmatch(r"[\d.]+(s|min|h)", duration)  # the study run has an end, so a duration


@pytest.mark.browser
@pytest.mark.server
def test_expanding_the_study_run_shows_every_trial(study: Study, browser: Any) -> None:
    open_runs_table(browser, study.served.url)
    expand_study(browser, study)
    rows = shown_rows(browser)
    children = [*reversed(study.trials), study.reference]  # newest first
    assert [run_id for run_id, _ in rows[1:]] == [r.info.run_id for r in children]
    assert all(run.info.run_name in text for run, (_, text) in zip(children, rows[1:], strict=True))


@pytest.mark.browser
@pytest.mark.server
def test_a_trials_val_metric_and_searched_param_are_columns_to_add(study: Study, browser: Any) -> None:
    open_runs_table(browser, study.served.url)
    browser.get_by_role("button", name="Columns").click()
    search = browser.get_by_placeholder("Search columns")
    for column in ("final_val_accuracy", "learning_rate"):
        search.fill(column)
        # learning_rate is both a searched param and a per-epoch metric (the rate each epoch trained with):
        # the tree lists both, and both become columns.
        nodes = browser.locator(".du-bois-light-tree-treenode", has=browser.get_by_text(column, exact=True))
        for index in range(nodes.count()):
            nodes.nth(index).locator(".du-bois-light-tree-checkbox").click()
    browser.keyboard.press("Escape")
    expand_study(browser, study)
    browser.wait_for_function(
        "() => document.querySelector('.ag-center-cols-container [col-id=\"params.`learning_rate`\"]') !== null"
    )
    cells = browser.evaluate(CELLS)
    for run in study.trials:
        shown = cells[run.info.run_id]
        assert float(shown["metrics.`final_val_accuracy`"]) == pytest.approx(
            run.data.metrics["final_val_accuracy"], abs=5e-4
        )
        assert float(shown["params.`learning_rate`"]) == pytest.approx(float(run.data.params["learning_rate"]))
        assert float(shown["metrics.`learning_rate`"]) == pytest.approx(run.data.metrics["learning_rate"], rel=1e-3)


@pytest.mark.browser
@pytest.mark.server
def test_the_compare_view_of_every_trial_draws_parallel_coordinates(study: Study, browser: Any) -> None:
    open_runs_table(browser, study.served.url)
    expand_study(browser, study)
    for run in study.trials:
        browser.locator(f'{ROWS}[row-id="{run.info.run_id}"] input.ag-checkbox-input').check()
    browser.get_by_role("button", name="Compare", exact=True).click()
    browser.get_by_text(f"Comparing {TRIALS} Runs").wait_for(timeout=60_000)
    browser.wait_for_function(f"() => ({PARCOORDS})().length > 0", timeout=60_000)
    axes = browser.evaluate(PARCOORDS)[0]
    compared = browser.url
    assert all(run.info.run_id in compared for run in study.trials)
    assert len(axes) >= 2 and all(count == TRIALS for _, count in axes)  # one line per trial across each axis


@pytest.mark.browser
@pytest.mark.server
def test_the_models_tab_lists_every_complete_trials_model(study: Study, browser: Any) -> None:
    browser.goto(study.page_url("models"))
    names = [run.info.run_name for run in study.trials]
    browser.get_by_role("link", name=names[0], exact=True).first.wait_for(timeout=90_000)
    # The table fills in row by row, model links before run links: read it once every row has both.
    deadline = time.monotonic() + 90
    while True:
        links = browser.get_by_role("link", name=re.compile(r"^trial-\d{4}$")).all()
        by_target = [(link.inner_text(), link.get_attribute("href") or "") for link in links]
        if len(by_target) >= 2 * len(names) or time.monotonic() > deadline:
            break
        browser.wait_for_timeout(500)
    model_names = sorted(text for text, href in by_target if "/models/m-" in href)
    source_runs = sorted(text for text, href in by_target if "/runs/" in href)
    models = study.client.search_logged_models(experiment_ids=[study.experiment.experiment_id])
    assert model_names == names  # each complete trial's model, named after its trial
    assert source_runs == names  # and linked to its run
    assert sorted(m.source_run_id for m in models) == sorted(run.info.run_id for run in study.trials)
    assert all(run.data.tags["trial_state"] == "COMPLETE" for run in study.trials)


@pytest.mark.browser
@pytest.mark.server
def test_the_registered_models_page_shows_the_champion_version(study: Study, browser: Any, tmp_path: Path) -> None:
    (version,) = study.client.search_model_versions("name = 'fcn'")
    browser.goto(f"{study.origin}/#/models/fcn")
    browser.get_by_role("link", name=f"Version {version.version}", exact=True).wait_for(timeout=90_000)
    # The aliases column fills in after the versions table.
    browser.wait_for_function(r"() => /@\s*champion/.test(document.body.innerText)", timeout=90_000)
    page = browser.locator("body").inner_text()
    browser.screenshot(path=tmp_path / "registered-model.png", full_page=True)
    assert re.search(r"@\s*champion", page)  # the alias beside its version
    assert "mnist_sweep.registered_by" in page and "test_accuracy" in page
    versions = browser.get_by_role("link", name=re.compile(r"^Version \d+$")).all()
    assert [link.inner_text() for link in versions] == [f"Version {version.version}"]  # one version, however run


@pytest.mark.browser
@pytest.mark.server
def test_the_report_draws_every_plot_in_the_study_runs_artifact_view(study: Study, browser: Any) -> None:
    browser.goto(study.page_url(f"runs/{study.parent.info.run_id}/artifacts/report/report.html"))
    browser.locator("iframe").first.wait_for(timeout=90_000)
    frame = browser.frame_locator("iframe").first  # MLflow shows HTML in a sandboxed frame: no shared files
    frame.locator("#test-accuracy").wait_for(timeout=60_000)
    drawn = "figure.plot:has(svg.main-svg), figure.plot:has(canvas)"
    frame.locator(f"{drawn} >> nth=8").wait_for(timeout=60_000)
    plots = frame.locator("figure.plot").count()
    accuracy = frame.locator("#test-accuracy").inner_text()
    # Two test confusion heatmaps, the chosen trial's and the lecture network's validation ones, five sweep plots.
    assert plots == frame.locator(drawn).count() == 9
    assert accuracy == f"{study.parent.data.metrics['test_accuracy']:.4f}"


# --------------------------------------------------------------------------- optuna-dashboard


@pytest.mark.browser
@pytest.mark.server
def test_the_dashboard_shows_the_study_and_each_trial(finished_sweep: FinishedSweep, tmp_path: Path) -> None:
    required_module("optuna_dashboard", DASHBOARD_MISSING)
    trials = finished_sweep.study()
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    with (
        serving(
            [*CLI, "dashboard", SWEEP, "--port", str(port)],
            cwd=finished_sweep.folder,
            env=cli_environment(finished_sweep.data),
            needle="optuna-dashboard for study 'fcn'",
            goodbye="optuna-dashboard stopped",
            log=tmp_path / "dashboard.log",
        ) as served,
        chromium_page(allow=origin) as (page, problems),
    ):
        page.goto(served.url)
        page.get_by_text(f"fcn (id={trials._study_id})").first.wait_for(timeout=60_000)
        best = page.get_by_text("Best Trial (number=").inner_text()
        axis_named = page.get_by_text("val_accuracy").count() > 0  # the metric's name, not "Objective 0"
        page.screenshot(path=tmp_path / "dashboard-study.png")
        page.goto(served.url + "/trials")
        page.get_by_text(f"{len(trials.trials)} Trials").wait_for(timeout=60_000)
        shown = {}
        for trial in trials.trials:
            page.get_by_text(f"Trial {trial.number}", exact=True).first.click()
            page.get_by_text(f"Trial {trial.number} (trial_id=").wait_for()
            shown[trial.number] = page.inner_text("body")
        page.screenshot(path=tmp_path / "dashboard-trials.png")
    assert problems == []
    assert served.url.startswith(f"{origin}/dashboard/studies/")
    assert best == f"Best Trial (number={trials.best_trial.number})"
    assert axis_named
    assert len(shown) == TRIALS
    for trial in trials.trials:
        assert trial.state.name.title() in shown[trial.number]  # "Complete"
        for name, value in trial.params.items():
            assert f"{name} {value}" in shown[trial.number]
    assert served.exit_code == 0 and nothing_listens(served.url)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("command", ["ui", "dashboard"])
@pytest.mark.parametrize("port", ["70000", "0", "-1"])
def test_a_port_outside_1_to_65535_exits_2_with_one_line(
    command: str, port: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # In this process: without the check, the empty folder's missing study ends the command, with another line.
    done = run_in_process([command, SWEEP, "--port", port], cwd=tmp_path, monkeypatch=monkeypatch)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f"mnist-sweep: --port must be a TCP port from 1 to 65535, got {port}"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.server
def test_ui_on_a_port_in_use_exits_2_naming_it(study: Study) -> None:
    port = study.origin.rsplit(":", 1)[1]  # the fixture's UI holds it
    done = cli("ui", SWEEP, "--port", port, cwd=study.folder, data=study.folder, timeout=300)
    assert done.returncode == 2
    errors = [line for line in done.stderr.splitlines() if line.startswith("mnist-sweep:")]
    assert errors == [f"mnist-sweep: --port {port}: cannot listen on 127.0.0.1:{port} (Address already in use)"]
