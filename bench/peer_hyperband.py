"""The peer: the plain KerasTuner Hyperband script a user would write instead of mnist-sweep.

`kt.Hyperband` (factor 3) over the sweep file's space, split, seed and epoch cap, read through the project's
config loader so it stays in step with sweeps/fcn.toml; the same network, optimizer and learning-rate schedule
(a trial's cosine decay ends at the epochs Hyperband gives it); no tracking; the best model scored once on the
test set. Keras' fit as a user calls it: no steps_per_execution. The timing (each fit's seconds and epochs)
is the benchmark's, not the user's, and adds nothing to the search.

    python bench/peer_hyperband.py [--seed 42] [--set data.train_limit=1000] [--json result.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
from _common import REPO, data_dir

from mnist_sweep.config import SweepConfig, load_sweep
from mnist_sweep.data import Split, load_split, load_test_split, resolve_source
from mnist_sweep.keras_tuner_engine import keras_tuner_space
from mnist_sweep.model import compiled_model

SWEEP = REPO / "sweeps" / "fcn.toml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, help="the search's seed (default: the sweep file's study.seed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()
    started = time.perf_counter()
    result = search(load_sweep(SWEEP, args.overrides), seed=args.seed)
    result["wall"] = time.perf_counter() - started  # data loading included, as in a sweep's wall
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


class FCN(kt.HyperModel):  # type: ignore[misc]
    """The sweep's network, optimizer and schedule; the searched batch size goes to fit."""

    def __init__(self, cfg: SweepConfig, split: Split) -> None:
        super().__init__()
        self.cfg, self.train_images = cfg, len(split.y_train)

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        params = {name: hp.get(name) for name in self.cfg.search.specs()}
        epochs = hp.values.get("tuner/epochs", self.cfg.train.epochs)  # the epochs Hyperband gives this trial
        steps = epochs * -(-self.train_images // int(params["batch_size"]))
        return compiled_model(params, self.cfg.model.hidden, schedule=self.cfg.train.lr_schedule, total_steps=steps)

    def fit(self, hp: kt.HyperParameters, model: keras.Model, *args: Any, **kwargs: Any) -> Any:
        return model.fit(*args, batch_size=int(hp.get("batch_size")), **kwargs)


def search(cfg: SweepConfig, *, seed: int | None) -> dict[str, Any]:
    """The whole script: the tuner's search, then the best model scored once on the test images."""
    source = resolve_source(cfg.data.path or data_dir())
    split = load_split(source, validation=cfg.data.validation, train_limit=cfg.data.train_limit, seed=cfg.data.seed)
    with tempfile.TemporaryDirectory() as folder:
        tuner = TimedHyperband(
            FCN(cfg, split),
            hyperparameters=keras_tuner_space(cfg.search),
            objective=cfg.study.metric,
            max_epochs=cfg.train.epochs,
            factor=3,
            seed=cfg.study.seed if seed is None else seed,
            directory=folder,
            project_name="peer",
        )
        started = time.perf_counter()
        tuner.search(split.x_train, split.y_train, validation_data=(split.x_val, split.y_val), verbose=0)
        trial_seconds = time.perf_counter() - started
        best = tuner.oracle.get_best_trials(1)[0]
        model = tuner.get_best_models(1)[0]
        x_test, y_test = load_test_split(source)
        test_loss, test_accuracy = model.evaluate(x_test, y_test, verbose=0)  # once
    clocks = tuner.clocks
    return {
        "trials": len(clocks),
        "epochs": sum(clock.epochs for clock in clocks.values()),
        "epoch_seconds": sum(clock.seconds for clock in clocks.values()),
        "trial_seconds": trial_seconds,
        "best_val": best.score,
        "test": test_accuracy,
        "test_loss": test_loss,
        "winner_fit_seconds": lineage_seconds(tuner, best),
        "winner": dict(best.hyperparameters.values),
    }


def lineage_seconds(tuner: TimedHyperband, best: Any) -> float:
    """The fit seconds that made the best model: its trial's, plus those of each trial Hyperband resumed it from
    (`tuner/trial_id`), as bench/search.py counts the tool's ASHA promotions."""
    seconds, trial = 0.0, best
    while trial is not None:
        clock = tuner.clocks.get(trial.trial_id)
        seconds += clock.seconds if clock else 0.0
        source = trial.hyperparameters.values.get("tuner/trial_id")
        trial = tuner.oracle.trials.get(source) if source else None
    return seconds


# ---------------------------------------------------------------- the benchmark's instruments, not the user's


class FitClock(keras.callbacks.Callback):  # type: ignore[misc]
    """Seconds inside one trial's fit, and its epochs."""

    def __init__(self) -> None:
        super().__init__()
        self.seconds, self.epochs, self.started = 0.0, 0, 0.0

    def __deepcopy__(self, memo: dict[int, Any]) -> FitClock:
        return self  # keras-tuner deep-copies a trial's callbacks: keep this one, to read it afterwards

    def on_train_begin(self, logs: Any = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: Any = None) -> None:
        self.epochs += 1

    def on_train_end(self, logs: Any = None) -> None:
        self.seconds += time.perf_counter() - self.started


class TimedHyperband(kt.Hyperband):  # type: ignore[misc]
    """kt.Hyperband, each trial's fit timed by its own FitClock."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clocks: dict[str, FitClock] = {}

    def run_trial(self, trial: Any, *args: Any, **kwargs: Any) -> Any:
        clock = self.clocks[trial.trial_id] = FitClock()
        kwargs["callbacks"] = [*kwargs.get("callbacks", []), clock]
        return super().run_trial(trial, *args, **kwargs)


if __name__ == "__main__":
    main()
