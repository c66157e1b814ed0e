"""study.engine = "keras-tuner": the oracle chooses, the Optuna study records, and both survive a restart."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient

from mnist_sweep.config import SweepConfig, build_config
from mnist_sweep.errors import OracleStopped, StudyMismatchError
from mnist_sweep.keras_tuner_engine import ORACLE_STATE, OracleSampler, check_engine, keras_tuner_space, oracle_dir
from mnist_sweep.records import ENGINE_ATTR, KERAS_TUNER_EPOCHS_ATTR, KERAS_TUNER_TRIAL_ID_ATTR
from mnist_sweep.space import sample_params
from tests.conftest import CliRunner, sweep_args
from tests.stores import (
    all_runs,
    assert_nothing_running,
    assert_runs_linked,
    load_study,
    parent_run,
    tracking_url,
)

COMPLETE = optuna.trial.TrialState.COMPLETE


def kt_config(tmp_path: Path, oracle: str, **study: Any) -> SweepConfig:
    storage = f"sqlite:///{tmp_path}/optuna.db"
    return build_config(
        {
            "study": {"engine": "keras-tuner", "sampler": oracle, "storage": storage, **study},
            "train": {"epochs": 9},
            "search": {"optimizer": ["adam", "sgd"], "learning_rate": {"low": 1e-4, "high": 0.1, "log": True}},
        }
    )


def synthetic_objective(cfg: SweepConfig) -> Any:
    """A trial without training: its val_accuracy per epoch grows with the learning rate and the epochs."""
    from mnist_sweep.keras_tuner_engine import planned_epochs

    def objective(trial: optuna.Trial) -> float:
        params = sample_params(trial, cfg.search)
        epochs = planned_epochs(trial, cfg.train.epochs)
        value = 0.0
        for epoch in range(1, epochs + 1):
            value = min(1.0, params["learning_rate"] * 5 * epoch + (params["optimizer"] == "adam") * 0.1)
            trial.report(value, step=epoch)
        return value

    return objective


@pytest.fixture
def new_sampler() -> Iterator[Any]:
    """Samplers made in a test, each released at its end (the lock is held per process, per open file)."""
    made: list[OracleSampler] = []

    def make(cfg: SweepConfig, **kwargs: Any) -> OracleSampler:
        sampler = OracleSampler(cfg, **kwargs)
        made.append(sampler)
        return sampler

    yield make
    for sampler in made:
        if sampler._lock is not None:
            sampler._lock.close()


def test_defaults_follow_the_engine() -> None:
    optuna_cfg, kt_cfg = build_config({}), build_config({"study": {"engine": "keras-tuner"}})
    assert (optuna_cfg.study.sampler, optuna_cfg.study.pruner) == ("tpe", "median")
    assert (kt_cfg.study.sampler, kt_cfg.study.pruner) == ("bayesian", "none")
    # A sweep file written for Optuna keeps its (unused) pruner keys once it says pruner = "none".
    kept = build_config(
        {"study": {"engine": "keras-tuner", "sampler": "hyperband", "pruner": "none", "pruner_warmup_epochs": 3}}
    )
    assert kept.study.pruner == "none"
    # What `validate` prints is a sweep file that validates again.
    assert build_config(kt_cfg.to_dict()) == kt_cfg


def test_hyperband_plans_epochs_promotes_and_records_both_ids(tmp_path: Path, new_sampler: Any) -> None:
    cfg = kt_config(tmp_path, "hyperband")
    study = optuna.create_study(storage=cfg.study.storage, sampler=new_sampler(cfg), direction="maximize")
    study.optimize(synthetic_objective(cfg), n_trials=13)

    trials = study.get_trials(states=(COMPLETE,))
    epochs = [t.user_attrs[KERAS_TUNER_EPOCHS_ATTR] for t in trials]
    # 9 epochs, factor 3: bracket 2 runs 9 trials for 1 epoch, then the best 3 for 3 epochs, then 1 for 9.
    assert epochs == [1] * 9 + [3] * 3 + [9]
    assert [len(t.intermediate_values) for t in trials] == epochs  # each trained what it was given
    by_oracle_id = {t.user_attrs[KERAS_TUNER_TRIAL_ID_ATTR]: t for t in trials}
    assert len(by_oracle_id) == 13
    first_round = sorted(trials[:9], key=lambda t: t.value or 0.0, reverse=True)
    promoted = [by_oracle_id[t.user_attrs["keras_tuner_promoted_from"]] for t in trials[9:12]]
    assert {t.number for t in promoted} == {t.number for t in first_round[:3]}, "hyperband promoted others"
    for trial in trials[9:12]:
        source = by_oracle_id[trial.user_attrs["keras_tuner_promoted_from"]]
        assert trial.params == source.params
    oracle = study.sampler.oracle  # type: ignore[attr-defined]
    assert {oracle.get_trial(i).status for i in by_oracle_id} == {"COMPLETED"}
    assert (oracle_dir(cfg) / ORACLE_STATE).is_file()


def test_seeded_oracles_draw_the_same_values(tmp_path: Path, new_sampler: Any) -> None:
    drawn = []
    for name in ("a", "b"):
        cfg = kt_config(tmp_path / name, "random")
        study = optuna.create_study(storage=cfg.study.storage, sampler=new_sampler(cfg), direction="maximize")
        study.optimize(synthetic_objective(cfg), n_trials=3)
        drawn.append([t.params for t in study.trials])
    assert drawn[0] == drawn[1]


@pytest.mark.parametrize("oracle", ["bayesian", "hyperband"])
def test_a_restart_reloads_the_oracle_and_reasks_the_trial_that_was_running(
    tmp_path: Path, new_sampler: Any, oracle: str
) -> None:
    cfg = kt_config(tmp_path, oracle)
    first = new_sampler(cfg)
    study = optuna.create_study(study_name="s", storage=cfg.study.storage, sampler=first, direction="maximize")
    study.optimize(synthetic_objective(cfg), n_trials=3)
    killed = study.ask()  # asked, never told: its process "died" mid-trial
    sample_params(killed, cfg.search)
    killed_values = killed.params
    first._lock.close()  # type: ignore[union-attr]

    second = new_sampler(cfg)
    resumed = optuna.load_study(study_name="s", storage=cfg.study.storage, sampler=second)
    resumed.optimize(synthetic_objective(cfg), n_trials=2)

    again = resumed.trials[killed.number + 1]
    assert (
        again.user_attrs[KERAS_TUNER_TRIAL_ID_ATTR]
        == resumed.trials[killed.number].user_attrs[KERAS_TUNER_TRIAL_ID_ATTR]
    )
    assert again.params == killed_values
    ids = [t.user_attrs[KERAS_TUNER_TRIAL_ID_ATTR] for t in resumed.get_trials(states=(COMPLETE,))]
    assert len(ids) == len(set(ids)) == 5
    assert len(second.oracle.trials) == 5  # the reloaded oracle knows every trial the ledger has


def test_a_study_keeps_its_engine_and_oracle(tmp_path: Path) -> None:
    made_by_optuna = optuna.create_study(storage=f"sqlite:///{tmp_path}/optuna.db", study_name="fcn")
    with pytest.raises(StudyMismatchError, match="created with engine 'optuna'.*'keras-tuner/bayesian'"):
        check_engine(made_by_optuna, kt_config(tmp_path, "bayesian"))
    made_by_optuna.set_user_attr(ENGINE_ATTR, "keras-tuner/hyperband")
    with pytest.raises(StudyMismatchError, match="'keras-tuner/hyperband' but the sweep file says '.*/random'"):
        check_engine(made_by_optuna, kt_config(tmp_path, "random"))
    made_by_optuna.enqueue_trial({})
    with pytest.raises(StudyMismatchError, match="oracle state .* is missing"):
        check_engine(made_by_optuna, kt_config(tmp_path, "hyperband"))


def test_an_exhausted_oracle_fails_the_trial_saying_why(tmp_path: Path, new_sampler: Any) -> None:
    cfg = build_config(
        {
            "study": {"engine": "keras-tuner", "sampler": "hyperband", "storage": f"sqlite:///{tmp_path}/o.db"},
            "train": {"epochs": 9},
            "search": {"optimizer": ["adam", "sgd"], "learning_rate": 0.01, "batch_size": 64, "activation": "relu"},
        }
    )
    study = optuna.create_study(storage=cfg.study.storage, sampler=new_sampler(cfg), direction="maximize")
    study.optimize(synthetic_objective(cfg), n_trials=3, catch=(OracleStopped,))

    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL"]
    assert KERAS_TUNER_TRIAL_ID_ATTR not in study.trials[2].user_attrs


def test_a_second_process_on_the_study_is_refused(tmp_path: Path, new_sampler: Any) -> None:
    cfg = kt_config(tmp_path, "random")
    new_sampler(cfg)
    with pytest.raises(Exception, match="being run by another process"):
        new_sampler(cfg)


# --------------------------------------------------------------------------- the real CLI


def kt_args(*, trials: int, oracle: str = "hyperband", epochs: int = 3) -> list[str]:
    settings = ('study.engine="keras-tuner"', f'study.sampler="{oracle}"', 'study.pruner="none"')
    return sweep_args(*settings, trials=trials, train_limit=1000, validation=500, epochs=epochs)


@pytest.mark.slow
def test_hyperband_sweep_logs_each_trial_with_the_epochs_it_trained(tmp_path: Path, run_here: CliRunner) -> None:
    result = run_here("run", *kt_args(trials=4))

    assert result.returncode == 0, result.stderr
    assert "Search: Running Trial" not in result.stdout, "keras-tuner's own display leaked into the output"
    study, runs = load_study(tmp_path), all_runs(tmp_path)
    assert study.user_attrs["engine"] == "keras-tuner/hyperband"
    client = MlflowClient(tracking_url(tmp_path))
    by_id = {r.info.run_id: r for r in runs}
    trials = study.get_trials(states=(COMPLETE,))
    # 3 epochs, factor 3: three trials of 1 epoch, then the best of them goes on to epoch 3 from its model.
    assert [t.user_attrs[KERAS_TUNER_EPOCHS_ATTR] for t in trials] == [1, 1, 1, 3]
    first_round = max(trials[:3], key=lambda t: t.value or 0.0)
    promoted = trials[3]
    assert promoted.user_attrs["keras_tuner_promoted_from"] == first_round.user_attrs[KERAS_TUNER_TRIAL_ID_ATTR]
    assert promoted.params == first_round.params
    for trial in trials:
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        planned = trial.user_attrs[KERAS_TUNER_EPOCHS_ATTR]
        initial = trial.user_attrs["keras_tuner_initial_epoch"]
        assert run.data.params["epochs"] == str(planned)
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert sorted(m.step for m in history) == list(range(initial + 1, planned + 1))  # the epochs it trained
        assert trial.user_attrs["epochs_trained"] == planned - initial
        assert sorted(trial.intermediate_values) == list(range(initial + 1, planned + 1))
    # Trained on from the first round's weights: its first epoch's mean training loss is well below that of the
    # first round's own first epoch, which began from a fresh network.
    (loss_before,) = client.get_metric_history(first_round.user_attrs["mlflow_run_id"], "loss")
    loss_after = min(client.get_metric_history(promoted.user_attrs["mlflow_run_id"], "loss"), key=lambda m: m.step)
    assert loss_after.step == 2 and loss_after.value < 0.8 * loss_before.value
    assert "test_accuracy" in parent_run(runs).data.metrics
    assert (tmp_path / "reports" / "fcn" / "report.html").is_file()
    assert (tmp_path / "mlruns" / "keras-tuner" / "fcn" / ORACLE_STATE).is_file()
    assert_nothing_running(study, runs)
    assert_runs_linked(study, runs)


@pytest.mark.slow
def test_worker_on_a_keras_tuner_study_is_refused_and_creates_nothing(tmp_path: Path, run_here: CliRunner) -> None:
    result = run_here("worker", *kt_args(trials=2, oracle="random"))

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "study.engine = 'keras-tuner'" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_search_space_maps_keras_tuner_space() -> None:
    hp = keras_tuner_space(build_config({}).search)
    assert hp.get("optimizer") == "sgd" and hp.get("batch_size") == 32
    assert {p.name for p in hp.space} >= {"optimizer", "learning_rate", "batch_size", "activation"}
