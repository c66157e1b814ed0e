"""`mnist-sweep dashboard`: optuna-dashboard on the study's storage, looked at in headless Chromium."""

from __future__ import annotations

import subprocess
from pathlib import Path

import optuna
import pytest

from tests.browser import chromium_page, free_port, nothing_listens, serving
from tests.conftest import CLI, DEFAULT_SWEEP, REPO, CliRunner, cli_environment, small_sweep_args

SWEEP = str(DEFAULT_SWEEP)
NOT_INSTALLED = "optuna-dashboard is not installed: pip install -e '.[dashboard]' (make install-dev does)"


@pytest.mark.slow
def test_dashboard_shows_the_study_and_each_trial(run_cli: CliRunner, tmp_path: Path, mnist_dir: Path) -> None:
    pytest.importorskip("optuna_dashboard", reason=NOT_INSTALLED)
    worker = run_cli("worker", SWEEP, *small_sweep_args(trials=3, train_limit=1000, validation=500))
    assert worker.returncode == 0, worker.stderr[-2000:]
    study = optuna.load_study(study_name="fcn", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db")
    port = free_port()
    origin = f"http://127.0.0.1:{port}"
    command = [*CLI, "dashboard", SWEEP, "--port", str(port)]
    with (
        serving(
            command,
            cwd=tmp_path,
            env=cli_environment(mnist_dir),
            needle="optuna-dashboard for study 'fcn'",
            goodbye="optuna-dashboard stopped",
            log=tmp_path / "dashboard.log",
        ) as served,
        chromium_page(allow=origin) as (page, problems),
    ):
        page.goto(served.url)
        page.get_by_text(f"fcn (id={study._study_id})").first.wait_for(timeout=60_000)
        page.get_by_text("Best Trial (number=").wait_for()
        best = page.get_by_text("Best Trial (number=").inner_text()
        axis_named = page.get_by_text("val_accuracy").count() > 0  # the metric's name, not "Objective 0"
        page.screenshot(path=tmp_path / "dashboard-study.png")
        page.goto(served.url + "/trials")
        page.get_by_text(f"{len(study.trials)} Trials").wait_for(timeout=60_000)
        shown = {}
        for trial in study.trials:
            page.get_by_text(f"Trial {trial.number}", exact=True).first.click()
            page.get_by_text(f"Trial {trial.number} (trial_id=").wait_for()
            shown[trial.number] = page.inner_text("main") if page.locator("main").count() else page.inner_text("body")
        page.screenshot(path=tmp_path / "dashboard-trials.png")
    assert problems == []
    assert served.url.startswith(f"{origin}/dashboard/studies/")
    assert best == f"Best Trial (number={study.best_trial.number})"
    assert axis_named
    for trial in study.trials:
        assert trial.state.name.title() in shown[trial.number]  # "Complete"
        for name, value in trial.params.items():
            assert f"{name} {value}" in shown[trial.number]
    assert served.exit_code == 0 and served.goodbye == "optuna-dashboard stopped"
    assert nothing_listens(served.url)


def test_dashboard_without_the_extra_exits_2_naming_it(tmp_path: Path, mnist_dir: Path) -> None:
    (tmp_path / "mlruns").mkdir()
    optuna.create_study(study_name="fcn", storage=f"sqlite:///{tmp_path}/mlruns/optuna.db", direction="maximize")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    (hidden / "optuna_dashboard.py").write_text("raise ImportError('hidden by the test')\n", encoding="utf-8")
    env = cli_environment(mnist_dir, {"PYTHONPATH": f"{hidden}:{REPO}"})
    done = subprocess.run(
        [*CLI, "dashboard", SWEEP, "--port", str(free_port())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if line.startswith("mnist-sweep:")] == [
        "mnist-sweep: optuna-dashboard is not installed; pip install 'mnist-sweep[dashboard]'"
    ]
    assert done.stdout == ""
