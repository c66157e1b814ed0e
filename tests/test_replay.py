"""`replay` of a run logged before a key existed: the key's default fills in, and says so; a run whose recorded
values the schema refuses, or that lacks a key with no single default, is still refused."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from mnist_sweep.config import SweepConfig, load_sweep
from mnist_sweep.data import load_split, resolve_source, withholding_test_split
from mnist_sweep.errors import ConfigError, UsageError
from mnist_sweep.records import RunParams, final_metric
from tests.conftest import DEFAULT_SWEEP

TRIAL = {
    "optimizer": "adam",
    "learning_rate": 0.002,
    "batch_size": 128,
    "activation": "relu",
    "dropout": 0.0,
    "weight_decay": 0.0,
    "momentum": 0.0,
}


def small_config(folder: Path, mnist_dir: Path, *settings: str) -> SweepConfig:
    return load_sweep(
        DEFAULT_SWEEP,
        [
            f'tracking.uri="sqlite:///{folder}/mlflow.db"',
            f'data.path="{mnist_dir}"',
            "data.train_limit=1000",
            "data.validation=500",
            "train.epochs=1",
            *settings,
        ],
    )


def log_run(cfg: SweepConfig, params: dict[str, str], metrics: dict[str, float]) -> str:
    """A finished trial run as an older version would have logged it: exactly these params and metrics."""
    client = MlflowClient(tracking_uri=cfg.tracking.uri)
    experiment = client.get_experiment_by_name("old") or client.get_experiment(client.create_experiment("old"))
    run = client.create_run(experiment.experiment_id)
    for key, value in params.items():
        client.log_param(run.info.run_id, key, value)
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def trained_params(cfg: SweepConfig, hyperparameters: dict[str, Any], seed: int) -> tuple[dict[str, str], Any]:
    """The params the objective logs for this trial, and the outcome of training it (as the sweep would)."""
    from mnist_sweep.trial import run_trial

    split = load_split(resolve_source(cfg.data.path), validation=500, train_limit=1000, seed=cfg.data.seed)
    run_params = RunParams.from_config(
        cfg, data_source="idx", n_train=len(split.y_train), n_val=len(split.y_val)
    ).for_trial(hyperparameters, seed)
    with withholding_test_split():
        outcome = run_trial(params=hyperparameters, split=split, settings=run_params.settings, seed=seed)
    return run_params.encode(), outcome


def replay_lines(cfg: SweepConfig, run_id: str) -> list[str]:
    from mnist_sweep.replay import replay

    lines: list[str] = []
    assert replay(cfg, run_id, echo=lines.append) == 0
    return lines


@pytest.mark.slow
def test_a_run_logged_before_a_key_existed_replays_with_its_default(tmp_path: Path, mnist_dir: Path) -> None:
    # Trained by model.fit, as every run was before train.loop existed (the default sweep file now says "compiled").
    cfg = small_config(tmp_path, mnist_dir, 'train.loop="fit"')
    params, outcome = trained_params(cfg, TRIAL, seed=7)
    # Logged before momentum and the training loop were recorded: neither is among its params.
    older = {key: value for key, value in params.items() if key not in ("momentum", "loop")}
    run_id = log_run(
        cfg,
        older,
        {final_metric("val_accuracy"): outcome.val_accuracy, final_metric("val_loss"): outcome.val_loss},
    )

    lines = replay_lines(cfg, run_id)

    assert lines[0] == (
        f"run {run_id!r} was logged before these keys were recorded; replayed with their defaults: "
        "loop = fit, momentum = 0.0"
    )
    differences = [float(d) for d in re.findall(r"difference ([-+0-9.e]+)", "\n".join(lines[1:]))]
    assert len(differences) == 2 and all(abs(d) < 1e-5 for d in differences), lines  # the default is what it ran


def logged_without_training(cfg: SweepConfig, **changes: str | None) -> str:
    """A run of the shape the objective logs, with `changes` (None: the key left out); never trained."""
    run_params = RunParams.from_config(cfg, data_source="idx", n_train=1000, n_val=500).for_trial(TRIAL, 7)
    params = {**run_params.encode(), **changes}
    kept = {key: value for key, value in params.items() if value is not None}
    return log_run(cfg, kept, {final_metric("val_accuracy"): 0.9, final_metric("val_loss"): 0.3})


def test_a_recorded_value_the_schema_refuses_is_refused_in_one_line(tmp_path: Path, mnist_dir: Path) -> None:
    cfg = small_config(tmp_path, mnist_dir)
    run_id = logged_without_training(cfg, optimizer="lbfgs", momentum=None)

    with pytest.raises(ConfigError) as caught:
        replay_lines(cfg, run_id)

    assert str(caught.value) == (
        f"run {run_id!r} recorded: search.optimizer must be one of sgd, adam, rmsprop, adamw, nadam, got 'lbfgs'"
    )


def test_a_run_lacking_a_key_with_no_single_default_is_refused(tmp_path: Path, mnist_dir: Path) -> None:
    cfg = small_config(tmp_path, mnist_dir)
    run_id = logged_without_training(cfg, optimizer=None)  # searched by default: no value to fill in

    with pytest.raises(UsageError) as caught:
        replay_lines(cfg, run_id)

    assert str(caught.value) == f"run {run_id!r} is not a finished mnist-sweep trial run (no optimizer)"


def test_filled_in_names_only_what_the_run_lacks() -> None:
    cfg = SweepConfig()
    params = RunParams.from_config(cfg, data_source="idx", n_train=1, n_val=1).for_trial(TRIAL, 7).encode()
    assert RunParams.filled_in(params) == {}
    assert RunParams.filled_in({k: v for k, v in params.items() if k != "weight_decay"}) == {"weight_decay": "0.0"}
