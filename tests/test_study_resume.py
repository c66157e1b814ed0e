"""Kill and resume for real: the CLI as a subprocess, a signal mid-trial, a rerun, then Optuna and MLflow read back."""

from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial

from mnist_sweep.records import KERAS_TUNER_TRIAL_ID_ATTR
from tests.conftest import DEFAULT_SWEEP, ENGINE_ARGS, CliStarter, small_sweep_args, sweep_args
from tests.in_process import absolute_stores, run_in_process
from tests.stores import (
    all_runs,
    assert_nothing_running,
    assert_runs_linked,
    load_study,
    raw_trials,
    run_snapshot,
    running_trial_with_run,
    wait_for,
)

pytestmark = pytest.mark.slow
FAIL, COMPLETE = optuna.trial.TrialState.FAIL, optuna.trial.TrialState.COMPLETE


def resume_args(trials: int, engine: str = "optuna") -> list[str]:
    """Short heartbeats so a killed trial goes stale in seconds; epochs long enough to be killed mid-fit."""
    return [
        *sweep_args("study.heartbeat_seconds=2", 'study.pruner="none"', trials=trials, epochs=3),
        *ENGINE_ARGS[engine],
    ]


def run_here(folder: Path, data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`mnist-sweep run ARGS` in `folder`, through the CLI's main in this process: a rerun's process is not what
    these tests check (the one they signal or kill is a process of its own)."""
    return run_in_process("run", *args, *absolute_stores(folder), cwd=folder, data=data)


def reruns(trial: FrozenTrial, killed: FrozenTrial) -> bool:
    """Whether `trial` reran `killed`: Optuna's retry of a stale trial, or keras-tuner's oracle asking it again."""
    if KERAS_TUNER_TRIAL_ID_ATTR in killed.user_attrs:
        same = trial.user_attrs.get(KERAS_TUNER_TRIAL_ID_ATTR) == killed.user_attrs[KERAS_TUNER_TRIAL_ID_ATTR]
        return same and trial.number != killed.number
    return trial.system_attrs.get("failed_trial") == killed.number


@pytest.mark.parametrize("engine", list(ENGINE_ARGS))
def test_sigkill_mid_trial_then_rerun_loses_nothing(
    tmp_path: Path, start_cli: CliStarter, mnist_dir: Path, engine: str
) -> None:
    process = start_cli("run", *resume_args(trials=3, engine=engine))
    victim = wait_for(lambda: running_trial_with_run(tmp_path, after_complete=1), process=process)
    process.kill()
    process.wait()
    assert next(t for t in raw_trials(tmp_path) if t["number"] == victim["number"])["state"] == "RUNNING"
    before = {r.info.run_id: run_snapshot(r) for r in all_runs(tmp_path) if r.info.status == "FINISHED"}

    rerun = run_here(tmp_path, mnist_dir, *resume_args(trials=3, engine=engine))

    assert rerun.returncode == 0, rerun.stderr
    study, runs = load_study(tmp_path), all_runs(tmp_path)
    assert len(study.get_trials(states=(COMPLETE,))) == 3
    killed = study.trials[victim["number"]]
    assert killed.state == FAIL
    retried = [t for t in study.trials if reruns(t, killed)]
    assert [t.params for t in retried] == [killed.params], "the killed trial's parameters were not retried"
    if engine == "keras-tuner":  # the oracle, reloaded, has ended exactly the trials the ledger completed
        saved = [json.loads(f.read_text()) for f in (tmp_path / "mlruns/keras-tuner/fcn").glob("trial_*/trial.json")]
        completed = {t.user_attrs[KERAS_TUNER_TRIAL_ID_ATTR] for t in study.get_trials(states=(COMPLETE,))}
        assert {t["trial_id"] for t in saved if t["status"] == "COMPLETED"} == completed
        assert {t["status"] for t in saved} == {"COMPLETED"}
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[victim["attrs"]["mlflow_run_id"]].info.status in ("FAILED", "KILLED")
    assert {run_id: run_snapshot(by_id[run_id]) for run_id in before} == before
    assert_nothing_running(study, runs)
    assert_runs_linked(study, runs)


@pytest.mark.parametrize(("signum", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_closes_the_running_trial_and_rerun_resumes(
    tmp_path: Path, start_cli: CliStarter, mnist_dir: Path, signum: int, exit_code: int
) -> None:
    process = start_cli("run", *resume_args(trials=2))
    victim = wait_for(lambda: running_trial_with_run(tmp_path), process=process)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == exit_code, stderr
    assert "Traceback" not in stderr
    assert "rerun to resume" in stderr.strip().splitlines()[-1]
    study, runs = load_study(tmp_path), all_runs(tmp_path)
    assert study.trials[victim["number"]].state == FAIL
    by_id = {r.info.run_id: r for r in runs}
    assert by_id[victim["attrs"]["mlflow_run_id"]].info.status == "KILLED"
    assert_nothing_running(study, runs)

    rerun = run_here(tmp_path, mnist_dir, *resume_args(trials=2))

    assert rerun.returncode == 0, rerun.stderr
    study, runs = load_study(tmp_path), all_runs(tmp_path)
    assert len(study.get_trials(states=(COMPLETE,))) == 2
    assert_nothing_running(study, runs)
    assert_runs_linked(study, runs)


def test_diverging_loss_fails_the_trial_and_the_study_goes_on(tmp_path: Path, mnist_dir: Path) -> None:
    # relu lets the weights blow up (tanh would only saturate); 1e9 is drawn by the seeded sampler early on.
    diverging = {
        "search.optimizer": '"sgd"',
        "search.learning_rate": "[1e9, 0.05]",
        "search.activation": '"relu"',
        "search.batch_size": "32",
        "study.sampler": '"random"',
        "study.pruner": '"none"',
        "study.max_failures": "10",
    }
    overrides = [arg for key, value in diverging.items() for arg in ("--set", f"{key}={value}")]
    result = run_here(tmp_path, mnist_dir, str(DEFAULT_SWEEP), *small_sweep_args(*overrides, trials=2))

    assert result.returncode == 0, result.stderr
    study, runs = load_study(tmp_path), all_runs(tmp_path)
    diverged = [t for t in study.trials if t.state == FAIL]
    assert diverged, "no trial diverged: the sampler never chose learning_rate = 1e9"
    for trial in diverged:
        assert trial.params["learning_rate"] == 1e9
        assert "TrialDiverged" in trial.user_attrs["fail_reason"]
        run = next(r for r in runs if r.info.run_id == trial.user_attrs["mlflow_run_id"])
        assert run.info.status == "FAILED"
        assert "became" in run.data.tags["state_reason"]
    assert len(study.get_trials(states=(COMPLETE,))) == 2
    assert_nothing_running(study, runs)
