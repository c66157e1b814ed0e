"""Several workers on one study, for real: concurrent CLI processes, then Optuna and MLflow read back."""

from __future__ import annotations

import subprocess
from pathlib import Path

import optuna
import pytest

from mnist_sweep.config import build_config
from mnist_sweep.placement import cgroup_cpu_limit, cpu_budget, usable_cpus
from mnist_sweep.space import sample_params
from mnist_sweep.study import (
    WORKER_POLICY_ATTR,
    WorkerPolicy,
    make_pruner,
    make_sampler,
    make_storage,
    open_study,
    worker_policy,
)
from tests.conftest import CliStarter, sweep_args
from tests.stores import all_runs, assert_nothing_running, assert_runs_linked, assert_scored_once

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


def shared_storage_args(storage: str, trials: int) -> list[str]:
    # Five processes share two cores here: a 2 s heartbeat would be late now and then (that case is
    # handled, the trial is retried, but it wastes the run's time).
    settings = (f'study.storage="{storage}"', "study.heartbeat_seconds=5")
    return sweep_args(*settings, trials=trials, train_limit=1000, validation=500)


def all_succeed(processes: list[subprocess.Popen[str]]) -> list[str]:
    """Wait for every process; each must exit 0 with no "database is locked"; returns their stdout."""
    outputs = []
    for process in processes:
        out, err = process.communicate(timeout=900)
        assert process.returncode == 0, err
        assert "database is locked" not in err
        outputs.append(out)
    return outputs


def check_study(folder: Path, storage: str, trials: int, outputs: list[str]) -> None:
    study = optuna.load_study(study_name="fcn", storage=storage)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == list(range(len(numbers))), "duplicate or missing trial numbers"
    assert len(study.get_trials(states=FINISHED)) >= trials
    runs = all_runs(folder)
    assert_nothing_running(study, runs)
    assert_runs_linked(study, runs)
    assert_scored_once(folder, study, runs, outputs)


@pytest.mark.slow
def test_two_workers_and_two_runs_share_the_local_sqlite_study(tmp_path: Path, start_cli: CliStarter) -> None:
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    args = shared_storage_args(storage, trials=4)
    processes = [start_cli(command, *args) for command in ("worker", "worker", "run", "run")]

    outputs = all_succeed(processes)

    check_study(tmp_path, storage, 4, outputs)
    # Workers started by hand apply the study's record, as `run` does: TPE's lies, threads sized to the cores.
    tags = trial_run_tags(tmp_path)
    assert {t["sampler.constant_liar"] for t in tags} == {"true"}
    assert {t["worker.threads"] for t in tags} == {str(cpu_budget(usable_cpus(), cgroup_cpu_limit()))}
    assert len({t["worker"] for t in tags}) >= 2  # trials from more than one of the four processes


@pytest.mark.slow
@pytest.mark.postgres
def test_three_workers_and_two_runs_share_a_postgres_study(
    tmp_path: Path, start_cli: CliStarter, postgres_database: str
) -> None:
    args = shared_storage_args(postgres_database, trials=6)
    processes = [start_cli(command, *args) for command in ("worker", "worker", "worker", "run", "run")]

    outputs = all_succeed(processes)

    check_study(tmp_path, postgres_database, 6, outputs)


# --------------------------------------------------------------------------- the study's worker policy


def trial_run_tags(folder: Path) -> list[dict[str, str]]:
    return [r.data.tags for r in all_runs(folder) if r.data.tags.get("mnist_sweep.role") == "trial"]


def test_a_new_study_records_its_worker_policy_and_an_old_one_gets_the_same(tmp_path: Path) -> None:
    cfg = build_config({"study": {"storage": f"sqlite:///{tmp_path}/optuna.db"}})
    storage = make_storage(cfg.study)
    assert worker_policy(cfg) == WorkerPolicy(constant_liar=True, threads="cpu_limit")  # nothing there yet

    study, created = open_study(cfg, storage)

    assert created and study.user_attrs[WORKER_POLICY_ATTR] == {"constant_liar": True, "threads": "cpu_limit"}
    assert study.sampler._constant_liar  # type: ignore[attr-defined]
    random = build_config({"study": {"storage": cfg.study.storage, "name": "r", "sampler": "random"}})
    assert open_study(random, storage)[0].user_attrs[WORKER_POLICY_ATTR]["constant_liar"] is False
    # A study made before studies recorded a policy (no user attribute): it gets a new study's, written down.
    optuna.create_study(study_name="old", storage=storage, direction="maximize")
    old = build_config({"study": {"storage": cfg.study.storage, "name": "old"}})
    assert worker_policy(old) == WorkerPolicy(constant_liar=True)
    reopened, created = open_study(old, storage)
    assert not created and reopened.user_attrs[WORKER_POLICY_ATTR] == {"constant_liar": True, "threads": "cpu_limit"}


def test_a_joining_worker_samples_by_the_studys_record_not_its_own_config(tmp_path: Path) -> None:
    cfg = build_config({"study": {"storage": f"sqlite:///{tmp_path}/optuna.db"}})
    storage = make_storage(cfg.study)
    study, _ = open_study(cfg, storage)
    study.set_user_attr(WORKER_POLICY_ATTR, {"constant_liar": False, "threads": "cpu_limit"})

    joined, created = open_study(cfg.model_copy(deep=True), storage, worker_salt=1)

    assert not created and not joined.sampler._constant_liar  # type: ignore[attr-defined]
    assert worker_policy(cfg) == WorkerPolicy(constant_liar=False)


def test_constant_liar_changes_nothing_for_one_worker_so_the_default_run_samples_as_before() -> None:
    """Why every TPE study records constant_liar = true: one process at a time draws the same points."""
    cfg = build_config({})

    def sampled(constant_liar: bool) -> list[dict[str, object]]:
        sampler = make_sampler(cfg.study, seed_offset=0, constant_liar=constant_liar)
        study = optuna.create_study(direction="maximize", sampler=sampler, pruner=make_pruner(cfg.study))

        def objective(trial: optuna.Trial) -> float:
            params = sample_params(trial, cfg.search)
            value = 0.0
            for epoch in range(3):  # some trials are pruned, as in a sweep
                value = (sum(map(ord, repr(sorted(params.items())))) % 101) / 101 + 0.01 * epoch
                trial.report(value, epoch)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            return value

        study.optimize(objective, n_trials=25)
        return [t.params for t in study.trials]

    assert sampled(constant_liar=True) == sampled(constant_liar=False)
