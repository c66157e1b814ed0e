"""Retrain one logged trial from its MLflow run and say how close it came to what was logged.

Everything comes from the run: hyperparameters, network, epochs, the data split (validation size,
training limit, split seed) and the trial's seed; the sweep file only says where MLflow and the
data are. The test set stays sealed throughout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mnist_sweep.config import SearchConfig, SweepConfig, parse_override
from mnist_sweep.data import load_split, resolve_source, sealed_test_set
from mnist_sweep.errors import UsageError
from mnist_sweep.tracking import read_run
from mnist_sweep.trial import TrainSettings, run_trial

REQUIRED = ("hidden", "epochs", "seed", "data_validation", "data_train_limit", "data_seed")


def _typed(text: str) -> Any:
    """An MLflow param (always a string) back as the number or name it was."""
    return parse_override(f"param.value={text}")[1]


def hyperparameters(params: Mapping[str, str]) -> dict[str, Any]:
    """The search-space keys of a run's params, typed."""
    return {key: _typed(params[key]) for key in SearchConfig.model_fields if key in params}


def replay(cfg: SweepConfig, run_id: str, *, echo: Callable[[str], None]) -> int:
    """Retrain the trial logged as `run_id` and report the differences to its logged metrics."""
    params, metrics = read_run(cfg.tracking.uri, run_id)
    missing = [key for key in (*REQUIRED, *SearchConfig.model_fields) if key not in params]
    if missing or "final_val_accuracy" not in metrics:
        raise UsageError(f"run {run_id!r} is not a finished mnist-sweep trial run (no {(missing or ['metrics'])[0]})")
    split = load_split(
        resolve_source(cfg.data.path),
        validation=int(params["data_validation"]),
        train_limit=int(params["data_train_limit"]),
        seed=int(params["data_seed"]),
    )
    if (len(split.y_train), len(split.y_val)) != (int(params["n_train"]), int(params["n_val"])):
        raise UsageError(f"run {run_id!r} trained on {params['n_train']} images; this data gives {len(split.y_train)}")
    settings = TrainSettings(
        hidden=tuple(int(units) for units in params["hidden"].split("-")),
        epochs=int(params["epochs"]),
        early_stopping_patience=int(params.get("early_stopping_patience", "0")),
        monitor=params.get("early_stopping_monitor", "val_loss"),
        lr_schedule=params.get("lr_schedule", "constant"),
        steps_per_execution=int(params.get("steps_per_execution", "1")),
        precision=params.get("precision", "float32"),
    )
    with sealed_test_set():
        outcome = run_trial(params=hyperparameters(params), split=split, settings=settings, seed=int(params["seed"]))
    for name, now in (("val_accuracy", outcome.val_accuracy), ("val_loss", outcome.val_loss)):
        logged = metrics[f"final_{name}"]
        echo(f"{name}: replayed {now:.6f}, logged {logged:.6f}, difference {now - logged:+.2e}")
    return 0
