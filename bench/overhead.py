"""What mnist-sweep costs on top of training: one trial against a raw `model.fit` + `evaluate`.

Same hyperparameters and data (55,000 training images, 1 epoch, batch 128), same process, alternating,
medians of several repeats. Also: tracking time alone per trial, start-up of `mnist-sweep validate`, and
`mnist-sweep run` from launch to its first epoch's metrics in MLflow.

    python bench/overhead.py [--repeats 3] [--train-limit 0]
"""

from __future__ import annotations

import argparse
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, data_dir, median, record, table, timed

PARAMS = {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 128, "activation": "relu", "dropout": 0.0}
STEPS_PER_EXECUTION = 16  # both sides compile alike, so the ratio is the tool's overhead alone


def raw_fit(split: object, session: object) -> None:
    """The raw fit, sharing the sweep trials' session so both sides start alike."""
    from mnist_sweep.model import compiled_model

    session.fresh(0)  # type: ignore[attr-defined]
    model = compiled_model(dict(PARAMS), (500, 500), steps_per_execution=STEPS_PER_EXECUTION)
    model.fit(
        split.x_train,
        split.y_train,
        batch_size=128,
        epochs=1,  # type: ignore[attr-defined]
        validation_data=(split.x_val, split.y_val),
        verbose=0,
    )  # type: ignore[attr-defined]
    model.evaluate(split.x_val, split.y_val, batch_size=2048, verbose=0)  # type: ignore[attr-defined]


def sweep_trial(objective: object, study: object) -> float:
    """One full mnist-sweep trial; returns its tracking seconds, as the trial recorded them."""
    from mnist_sweep.records import TRACKING_SECONDS_ATTR

    study.optimize(objective, n_trials=1)  # type: ignore[attr-defined]
    return float(study.trials[-1].user_attrs[TRACKING_SECONDS_ATTR])  # type: ignore[attr-defined]


def startup_validate(repeats: int = 5) -> float:
    command = [sys.executable, "-m", "mnist_sweep", "validate", str(REPO / "sweeps" / "fcn.toml")]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return median(
        [timed(lambda: subprocess.run(command, env=env, capture_output=True, check=True)) for _ in range(repeats)]
    )


def startup_to_first_epoch(train_limit: int) -> float:
    """Launch `run` in a temp dir and poll MLflow's database until the first epoch's loss lands."""
    with tempfile.TemporaryDirectory() as folder:
        env = {**os.environ, "PYTHONPATH": str(REPO), "MNIST_SWEEP_DATA": data_dir()}
        command = [
            sys.executable,
            "-m",
            "mnist_sweep",
            "run",
            str(REPO / "sweeps" / "fcn.toml"),
            "--trials",
            "1",
            "--epochs",
            "3",
            "--set",
            "search.batch_size=128",
            "--set",
            f"data.train_limit={train_limit}",
        ]
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        database = Path(folder) / "mlruns" / "mlflow.db"
        try:
            while process.poll() is None:
                if database.exists():
                    with sqlite3.connect(database) as connection:
                        try:
                            count = connection.execute("SELECT COUNT(*) FROM metrics WHERE key = 'loss'").fetchone()[0]
                        except sqlite3.OperationalError:
                            count = 0
                    if count:
                        return time.perf_counter() - started
                time.sleep(0.05)
            raise RuntimeError(f"run exited with {process.returncode} before its first epoch")
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--train-limit", type=int, default=0, help="0 = all 55,000 training images")
    args = parser.parse_args()

    import optuna

    from mnist_sweep.config import load_sweep
    from mnist_sweep.data import load_split, resolve_source
    from mnist_sweep.study import Objective
    from mnist_sweep.tracking import Tracker

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    fixed = [f"search.{key}={value!r}".replace("'", '"') for key, value in PARAMS.items()]
    cfg = load_sweep(
        REPO / "sweeps" / "fcn.toml",
        [
            *fixed,
            "train.epochs=1",
            'train.lr_schedule="constant"',
            f"train.steps_per_execution={STEPS_PER_EXECUTION}",
            f"data.train_limit={args.train_limit}",
        ],
    )
    source = resolve_source(data_dir())
    split = load_split(source, validation=5000, train_limit=args.train_limit, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        tracker = Tracker(uri=f"sqlite:///{folder}/mlflow.db", artifacts=f"{folder}/artifacts", experiment="overhead")
        parent = tracker.create_parent_run(study_name="overhead", config={})
        objective = Objective(
            cfg=cfg, split=split, tracker=tracker, parent_run_id=parent, data_source=source.describe()
        )
        study = optuna.create_study(direction="maximize")
        raw_fit(split, objective.session)  # warm-up: first-use costs (imports, thread pools) belong to neither side
        raw_times, trial_times, tracking_times = [], [], []
        for _ in range(args.repeats):
            raw_times.append(timed(lambda: raw_fit(split, objective.session)))
            started = time.perf_counter()
            tracking_times.append(sweep_trial(objective, study))
            trial_times.append(time.perf_counter() - started)
    raw, trial = median(raw_times), median(trial_times)
    validate = startup_validate()
    first_epoch = startup_to_first_epoch(args.train_limit)
    rows = [
        ["raw model.fit + evaluate (s)", raw, "—"],
        ["mnist-sweep trial (s)", trial, "—"],
        ["trial / raw", trial / raw, "≤ 1.03"],
        ["tracking per trial (s)", median(tracking_times), "≤ 0.3"],
        ["`mnist-sweep validate` start-up (s)", validate, "≤ 1"],
        ["`mnist-sweep run` launch → first epoch logged (s)", first_epoch, "—"],
    ]
    body = (
        f"{len(split.y_train)} training images, 1 epoch, batch 128, adam 1e-3 relu; "
        f"{args.repeats} alternating repeats, medians. raw: {', '.join(f'{t:.2f}' for t in raw_times)} s; "
        f"trial: {', '.join(f'{t:.2f}' for t in trial_times)} s.\n\n" + table(["measure", "value", "target"], rows)
    )
    record("bench/overhead: one trial against raw fit", body)


if __name__ == "__main__":
    main()
