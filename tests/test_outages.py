"""A tracking server that goes away mid-sweep and comes back: a real `mlflow server`, killed while a trial
logs to it, started again on the same backend store, artifacts and port.

While it is away past MLflow's retries the worker ends in one line (exit 1, no traceback); once it is back the
same command resumes and finishes, and Optuna and MLflow, read back, agree: each finished trial has exactly one
child run, nothing is left RUNNING, and every run logged before the outage is still there, unchanged.
"""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import (
    DEFAULT_SWEEP,
    cli_process,
    free_port,
    postgres_server_handle,
    required_mnist,
    small_sweep_args,
)
from tests.in_process import run_in_process
from tests.servers import mlflow_server
from tests.stores import (
    all_runs,
    assert_nothing_running,
    assert_runs_linked,
    run_snapshot,
    running_trial_with_run,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.subprocess]
COMPLETE, FAIL = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL
# The worker an outage interrupts gives up on its first failed request: how long MLflow retries is its own
# setting (mnist_sweep/environment.py), not what these tests check, and each request that retried cost seconds.
NO_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


def _one_trial_worker(*settings: str, epochs: int) -> list[str]:
    """`worker` arguments for one trial on a small real subset: the trial an outage interrupts."""
    sweep = small_sweep_args(*settings, trials=1, train_limit=1000, validation=500)
    return ["worker", str(DEFAULT_SWEEP), *sweep, "--epochs", str(epochs)]


def test_a_tracking_server_gone_mid_trial_ends_in_one_line_and_the_rerun_resumes_once_it_is_back(
    tmp_path: Path,
) -> None:

    data, work, server_folder, port = required_mnist(), tmp_path / "work", tmp_path / "server", free_port()
    work.mkdir()
    server_folder.mkdir()
    options = ["--serve-artifacts", "--artifacts-destination", str(server_folder / "served")]
    url = f"http://127.0.0.1:{port}"
    args = _one_trial_worker(
        *("--set", f'tracking.uri="{url}"', "--set", f'study.storage="sqlite:///{work}/mlruns/optuna.db"'),
        *("--set", "study.heartbeat_seconds=2", "--set", 'study.pruner="none"'),
        epochs=2,
    )

    with mlflow_server(server_folder, options, port=port):
        worker = cli_process(*args, cwd=work, data=data, env=NO_RETRIES)
        victim = wait_for(lambda: running_trial_with_run(work), process=worker)
        client = MlflowClient(url)
        experiment = client.get_experiment_by_name("fcn")
        assert experiment is not None
        before = {r.info.run_id: run_snapshot(r) for r in client.search_runs([experiment.experiment_id])}
        before = {k: v for k, v in before.items() if v[0] == "FINISHED"}  # the lecture's reference run
    _, err = worker.communicate(timeout=300)  # the server stopped with its block: it stays down

    lines = err.strip().splitlines()
    assert worker.returncode == 1, err
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith("mnist-sweep: tracking.uri = "), err
    assert "stopped answering" in lines[0] and "rerun the same command" in lines[0]

    with mlflow_server(server_folder, options, port=port):  # the same store, back
        rerun = run_in_process(*args, cwd=work, data=data)  # the rerun's process is not what this test checks
        assert rerun.returncode == 0, rerun.stderr
        study = optuna.load_study(study_name="fcn", storage=f"sqlite:///{work}/mlruns/optuna.db")
        runs = MlflowClient(url).search_runs([experiment.experiment_id], max_results=1000)

    assert len(study.get_trials(states=(COMPLETE,))) == 1
    assert study.trials[victim["number"]].state == FAIL  # failed with the server away; the study went on
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[victim["attrs"]["mlflow_run_id"]].info.status in ("FAILED", "KILLED")
    assert {run_id: run_snapshot(by_id[run_id]) for run_id in before} == before, "a run logged before changed"
    assert_nothing_running(study, runs)
    assert_runs_linked(study, runs)


@pytest.mark.postgres
def test_postgres_gone_mid_trial_ends_in_one_line_and_the_rerun_retries_the_trial_once_it_is_back(
    tmp_path: Path,
) -> None:
    """Optuna's storage on a real PostgreSQL, stopped (immediate: connections cut) while a trial trains.

    The trial's heartbeat thread meets the dead database first: it must not die with a traceback (it then never
    beat again, and a live trial was failed as stale once the database was back)."""
    import psycopg

    data, work = required_mnist(), tmp_path / "work"
    work.mkdir()
    with postgres_server_handle() as server:
        with psycopg.connect(f"{server.url}/postgres", autocommit=True) as connection:
            connection.execute("CREATE DATABASE sweep")
        storage = f"{server.url}/sweep"
        args = _one_trial_worker(
            *("--set", f'study.storage="{storage}"', "--set", "study.heartbeat_seconds=1"),
            *("--set", 'study.pruner="none"', "--set", "study.baseline=false"),
            epochs=3,
        )
        worker = cli_process(*args, cwd=work, data=data)
        (victim,) = wait_for(lambda: running_trial_on(storage), process=worker)
        server.stop()
        _, err = worker.communicate(timeout=300)

        lines = err.strip().splitlines()
        assert worker.returncode == 1, err
        assert "Traceback" not in err and "Exception in thread" not in err, err
        assert len(lines) == 1 and lines[0].startswith("mnist-sweep: study.storage = "), err
        assert "stopped answering" in lines[0] and "rerun the same command" in lines[0]

        server.start()
        rerun = run_in_process(*args, cwd=work, data=data)  # the rerun's process is not what this test checks
        assert rerun.returncode == 0, rerun.stderr
        study = optuna.load_study(study_name="fcn", storage=storage)
        runs = all_runs(work)
        assert len(study.get_trials(states=(COMPLETE,))) == 1
        assert study.trials[victim].state == FAIL  # left RUNNING by the outage: failed as stale, then retried
        assert [t.params for t in study.trials if t.system_attrs.get("failed_trial") == victim] == [
            study.trials[victim].params
        ]
        assert_nothing_running(study, runs)
        assert_runs_linked(study, runs)


def running_trial_on(storage: str) -> tuple[int] | None:
    """(the number of a RUNNING trial that has its MLflow run,) read straight from PostgreSQL; a tuple, since
    trial 0 is falsy and wait_for waits for a truthy value."""
    import psycopg

    with psycopg.connect(storage) as connection:
        try:
            found = connection.execute(
                "SELECT t.number FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                "WHERE t.state = 'RUNNING' AND a.key = 'mlflow_run_id'"
            ).fetchone()
        except psycopg.errors.UndefinedTable:  # the schema is not there yet
            return None
    return None if found is None else (int(found[0]),)
