"""Reading what a sweep left behind, the way a user would: the Optuna storage and MLflow runs."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

RUN_ID_ATTR = "mlflow_run_id"


def storage_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlruns' / 'optuna.db'}"


def tracking_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"


def raw_trials(folder: Path, study: str = "fcn") -> list[dict[str, Any]]:
    """Trials read straight from the sqlite file, read-only, so polling never creates or locks anything."""
    database = folder / "mlruns" / "optuna.db"
    if not database.exists():
        return []
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)) as connection:
            rows = connection.execute(
                "SELECT t.trial_id, t.number, t.state FROM trials t JOIN studies s ON s.study_id = t.study_id "
                "WHERE s.study_name = ?",
                (study,),
            ).fetchall()
            attrs = connection.execute("SELECT trial_id, key, value_json FROM trial_user_attributes").fetchall()
    except sqlite3.OperationalError:  # the tables are not there yet
        return []
    by_id: dict[int, dict[str, Any]] = {tid: {"number": n, "state": st, "attrs": {}} for tid, n, st in rows}
    for trial_id, key, value in attrs:
        if trial_id in by_id:
            by_id[trial_id]["attrs"][key] = json.loads(value)
    return sorted(by_id.values(), key=lambda t: t["number"])


def wait_for(
    condition: Callable[[], Any], *, process: subprocess.Popen[str] | None = None, timeout: float = 300
) -> Any:
    """Poll until `condition()` is truthy; fails if `process` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if process is not None and process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"the CLI exited {process.returncode} before the condition held:\n{out}\n{err}")
        time.sleep(0.1)
    raise AssertionError("timed out waiting")


def running_trial_with_run(folder: Path, *, after_complete: int = 0) -> dict[str, Any] | None:
    """A RUNNING trial that already has its MLflow run, once `after_complete` trials are COMPLETE."""
    trials = raw_trials(folder)
    if sum(t["state"] == "COMPLETE" for t in trials) < after_complete:
        return None
    return next((t for t in trials if t["state"] == "RUNNING" and RUN_ID_ATTR in t["attrs"]), None)


def load_study(folder: Path, name: str = "fcn") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=storage_url(folder))


def all_runs(folder: Path, experiment: str = "fcn", tracking: str | None = None) -> list[Run]:
    client = MlflowClient(tracking or tracking_url(folder))
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    return list(client.search_runs([found.experiment_id], max_results=10000))


def run_snapshot(run: Run) -> tuple[Any, ...]:
    """What must not change about a finished run when the study is resumed."""
    return (run.info.status, run.info.end_time, dict(run.data.metrics), dict(run.data.params), dict(run.data.tags))


def assert_nothing_running(study: optuna.Study, runs: list[Run]) -> None:
    running_trials = [t.number for t in study.get_trials(states=(optuna.trial.TrialState.RUNNING,))]
    running_runs = [(r.info.run_name, r.data.tags.get("mnist_sweep.role")) for r in runs if r.info.status == "RUNNING"]
    assert running_trials == [], f"Optuna trials left RUNNING: {running_trials}"
    assert running_runs == [], f"MLflow runs left RUNNING: {running_runs}"


def assert_runs_linked(study: optuna.Study, runs: list[Run]) -> None:
    """Each finished trial has exactly one child run under the one parent, and each run names its trial."""
    parents = [r for r in runs if r.data.tags.get("mnist_sweep.role") == "study"]
    assert len(parents) == 1, f"{len(parents)} parent runs"
    children = [r for r in runs if r.data.tags.get("mnist_sweep.role") == "trial"]
    assert all(r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id for r in children)
    by_id = {r.info.run_id: r for r in children}
    finished = study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
    for trial in finished:
        run = by_id[trial.user_attrs[RUN_ID_ATTR]]
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        reason = run.data.tags.get("state_reason", "")
        if run.info.status == "KILLED" and "not all stored" in reason:
            # killed while its artifacts were stored (uploads.BackgroundUploads): its parameters trained again
            # (an Optuna study; keras-tuner's oracle asks no values twice)
            redo = [t.params for t in study.trials if t.user_attrs.get("redo_of_trial") == trial.number]
            assert redo == ([trial.params] if "are trained again" in reason else []), f"trial {trial.number}: {reason}"
            continue
        assert run.info.status == "FINISHED"
    numbers = [r.data.tags["optuna.trial_number"] for r in children]
    finished_numbers = {str(t.number) for t in finished}
    assert sorted(n for n in numbers if n in finished_numbers) == sorted(finished_numbers), "a trial has two runs"


def parent_run(runs: list[Run]) -> Run:
    (parent,) = [r for r in runs if r.data.tags.get("mnist_sweep.role") == "study"]
    return parent


def assert_scored_once(folder: Path, study: optuna.Study, runs: list[Run], outputs: list[str]) -> None:
    """One test-set score in MLflow and Optuna, made by exactly one of the processes that finalized."""
    parent = parent_run(runs)
    history = MlflowClient(tracking_url(folder)).get_metric_history(parent.info.run_id, "test_accuracy")
    assert len(history) == 1, f"test_accuracy logged {len(history)} times"
    result = study.user_attrs["test_result"]
    assert history[0].value == pytest.approx(result["test_accuracy"])
    scorers = [out for out in outputs if "test accuracy" in out and "already scored" not in out]
    scorers = [out for out in scorers if "another process is scoring" not in out]
    assert len(scorers) == 1, f"{len(scorers)} processes say they scored the test set"
