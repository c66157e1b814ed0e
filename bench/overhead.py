"""What mnist-sweep costs on top of training: one trial against a raw `model.fit` + `evaluate`.

Same hyperparameters and data (55,000 training images, 1 epoch, batch 128), same process, alternating
blocks of `--block` raw fits and `--block` trials, medians of several repeats. A trial block ends when its
last trial's artifacts are stored (they upload while the next trial trains), so it pays for one upload
that nothing overlaps. Also: tracking time alone per trial (the training thread's share), the uploads'
own seconds, start-up of `mnist-sweep validate`, and `mnist-sweep run` from launch to its first epoch's
metrics in MLflow.

`--processes 2`: instead, 2 copies of a worker, each pinned to one core (CPU affinity, one TensorFlow
thread per pool), run `--trials` trials each through the sweep's trial loop on one sqlite MLflow store and
one sqlite Optuna storage, and report each one's tracking seconds per trial and every "database is
locked" error.

    python bench/overhead.py [--repeats 3] [--block 3] [--train-limit 0]
    python bench/overhead.py --processes 2 [--trials 3] [--train-limit 10000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, data_dir, load_average, median, python_path, record, table, timed

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


def sweep_trials(trials: Any, count: int) -> list[float]:
    """`count` full mnist-sweep trials, their artifacts stored; returns their tracking seconds as recorded."""
    from mnist_sweep.records import TRACKING_SECONDS_ATTR
    from mnist_sweep.trial_loop import run_one_trial

    for _ in range(count):
        run_one_trial(trials.context, trials)
    trials.context.ledger.uploads.wait()
    return [float(t.user_attrs[TRACKING_SECONDS_ATTR]) for t in trials.context.study.trials[-count:]]


def upload_seconds(tracker: Any) -> list[float]:
    """The uploads thread's seconds per trial (the `upload_seconds` metric of every trial run)."""
    runs = tracker.client.search_runs([tracker.experiment_id], filter_string="metrics.upload_seconds >= 0")
    return [float(run.data.metrics["upload_seconds"]) for run in runs]


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


def sweep_config(train_limit: int, *extra: str) -> Any:
    from mnist_sweep.config import load_sweep

    fixed = [f"search.{key}={value!r}".replace("'", '"') for key, value in PARAMS.items()]
    return load_sweep(
        REPO / "sweeps" / "fcn.toml",
        [
            *fixed,
            "train.epochs=1",
            'train.lr_schedule="constant"',
            f"train.steps_per_execution={STEPS_PER_EXECUTION}",
            f"data.train_limit={train_limit}",
            *extra,
        ],
    )


def one_process(args: argparse.Namespace) -> None:
    import optuna

    from mnist_sweep.data import load_split, resolve_source
    from mnist_sweep.ledger import StudyLedger
    from mnist_sweep.study import StudyContext
    from mnist_sweep.tracking import Tracker
    from mnist_sweep.trial_run import Trials

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    cfg = sweep_config(args.train_limit)
    source = resolve_source(data_dir())
    split = load_split(source, validation=5000, train_limit=args.train_limit, seed=0)
    with tempfile.TemporaryDirectory() as folder:
        tracker = Tracker(uri=f"sqlite:///{folder}/mlflow.db", artifacts=f"{folder}/artifacts", experiment="overhead")
        ledger = StudyLedger.create(tracker, study_name="overhead", config={})
        storage = optuna.storages.InMemoryStorage()
        study = optuna.create_study(direction="maximize", storage=storage)
        context = StudyContext(study, storage, ledger)
        trials = Trials(cfg=cfg, split=split, context=context, data_source=source.describe())
        raw_fit(split, trials.session)  # warm-up: first-use costs (imports, thread pools) belong to neither side
        sweep_trials(trials, 1)  # and MLflow's first model (imports): 0.3 s once per process
        raw_times, trial_times, sync_times, tracking_times = [], [], [], []
        for _ in range(args.repeats):
            started = time.perf_counter()
            for _ in range(args.block):
                raw_fit(split, trials.session)
            raw_times.append((time.perf_counter() - started) / args.block)
            started = time.perf_counter()
            tracking_times += sweep_trials(trials, args.block)
            trial_times.append((time.perf_counter() - started) / args.block)
            ledger.uploads.background = False  # the same trials, each storing its artifacts before the next
            started = time.perf_counter()
            sweep_trials(trials, args.block)
            sync_times.append((time.perf_counter() - started) / args.block)
            ledger.uploads.background = True
        uploads = upload_seconds(tracker)
    raw, trial, sync = median(raw_times), median(trial_times), median(sync_times)
    validate = startup_validate()
    first_epoch = startup_to_first_epoch(args.train_limit)
    rows = [
        ["raw model.fit + evaluate (s)", raw, "—"],
        ["mnist-sweep trial (s)", trial, "—"],
        ["trial / raw", trial / raw, "≤ 1.03"],
        ["trial, artifacts stored before the next trial (s)", sync, "—"],
        ["that trial / raw", sync / raw, "—"],
        ["tracking per trial, training thread (s)", median(tracking_times), "≤ 0.3"],
        ["artifact upload per trial, uploads thread (s)", median(uploads), "—"],
        ["`mnist-sweep validate` start-up (s)", validate, "≤ 1"],
        ["`mnist-sweep run` launch → first epoch logged (s)", first_epoch, "—"],
    ]
    body = (
        f"{len(split.y_train)} training images, 1 epoch, batch 128, adam 1e-3 relu; {args.repeats} alternating "
        f"blocks of {args.block} raw fits, {args.block} trials and {args.block} trials storing their artifacts "
        f"synchronously, per-fit medians; 1-minute load average {load_average()} at the end. "
        f"raw: {', '.join(f'{t:.2f}' for t in raw_times)} s; trial: {', '.join(f'{t:.2f}' for t in trial_times)} "
        f"s; synchronous: {', '.join(f'{t:.2f}' for t in sync_times)} s.\n\n"
        + table(["measure", "value", "target"], rows)
    )
    record("bench/overhead: one trial against raw fit", body)


LOCKED = "database is locked"


class RanHere:
    """A silent progress display that notes which trials this process ran."""

    def __init__(self) -> None:
        self.numbers: set[int] = set()

    def trial_started(self, *, number: int, epochs: int) -> None:
        self.numbers.add(number)

    def study(self, **kwargs: Any) -> None: ...
    def batch(self, epoch: int, done: int, steps: int) -> None: ...
    def epoch(self, epoch: int, values: Any) -> None: ...
    def trial_ended(self) -> None: ...
    def close(self) -> None: ...


def worker(args: argparse.Namespace) -> None:
    """One of the `--processes` copies: pinned to core `--core`, trials through the sweep's own loop."""
    os.sched_setaffinity(0, {args.core})
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import optuna

    from mnist_sweep.data import load_split, resolve_source
    from mnist_sweep.ledger import StudyLedger
    from mnist_sweep.records import FAIL_REASON_ATTR, TRACKING_SECONDS_ATTR
    from mnist_sweep.study import StudyContext, make_storage, open_study
    from mnist_sweep.tracking import Tracker
    from mnist_sweep.trial_loop import run_trials
    from mnist_sweep.trial_run import Trials

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    folder = Path(args.store)
    cfg = sweep_config(args.train_limit, f'study.storage="sqlite:///{folder}/optuna.db"', 'study.name="overhead"')
    source = resolve_source(data_dir())
    split = load_split(source, validation=5000, train_limit=args.train_limit, seed=0)
    errors: list[str] = []
    tracking: list[float] = []
    try:
        tracker = Tracker(uri=f"sqlite:///{folder}/mlflow.db", artifacts=f"{folder}/artifacts", experiment="overhead")
        storage = make_storage(cfg.study)
        study, created = open_study(cfg, storage, worker_salt=args.core)
        ledger = StudyLedger.open(study, tracker, created=created, config={})
        ran = RanHere()
        context = StudyContext(study, storage, ledger)
        trials = Trials(cfg=cfg, split=split, context=context, data_source=source.describe(), progress=ran)
        run_trials(trials, target=args.processes * args.trials, max_failures=100, echo=lambda line: None)
        for trial in study.get_trials(deepcopy=False):
            if trial.number not in ran.numbers:
                continue
            if TRACKING_SECONDS_ATTR in trial.user_attrs:
                tracking.append(float(trial.user_attrs[TRACKING_SECONDS_ATTR]))
            reason = str(trial.user_attrs.get(FAIL_REASON_ATTR, ""))
            if reason:
                errors.append(reason)
    except Exception as exc:  # a lock error anywhere counts; the parent reports it
        errors.append(f"{type(exc).__name__}: {exc}")
    print(json.dumps({"core": args.core, "tracking": tracking, "errors": errors}))


def processes(args: argparse.Namespace) -> None:
    """`--processes` pinned copies of `worker` on one sqlite store; their tracking seconds and lock errors."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < args.processes:
        sys.exit(f"--processes {args.processes}: only {len(cores)} cores here")
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, __file__, "--worker-store", folder, "--trials", str(args.trials)]
        command += ["--train-limit", str(args.train_limit), "--processes", str(args.processes)]
        env = {**os.environ, "PYTHONPATH": python_path()}
        started = time.perf_counter()
        children = [
            subprocess.Popen([*command, "--core", str(core)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for core in cores[: args.processes]
        ]
        outputs = [child.communicate(timeout=1800) for child in children]
        wall = time.perf_counter() - started
        results = []
        for (out, err), child in zip(outputs, children, strict=True):
            text = out.decode(errors="replace")
            found = json.loads(text.strip().splitlines()[-1]) if text.strip() else {"tracking": [], "errors": []}
            stderr = err.decode(errors="replace")
            locked = [line for line in stderr.splitlines() if LOCKED in line]
            found["errors"] += locked
            found["returncode"] = child.returncode
            results.append(found)
        tracker_uri = f"sqlite:///{folder}/mlflow.db"
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=tracker_uri)
        experiment = client.get_experiment_by_name("overhead")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        statuses = sorted(run.info.status for run in runs if "upload_seconds" in run.data.metrics)
        uploads = [run.data.metrics["upload_seconds"] for run in runs if "upload_seconds" in run.data.metrics]
    rows = []
    for found in results:
        seconds = found["tracking"]
        locks = sum(LOCKED in error for error in found["errors"])
        rows.append(
            [
                f"core {found.get('core', '?')} (exit {found['returncode']})",
                len(seconds),
                ", ".join(f"{s:.3f}" for s in seconds),
                median(seconds) if seconds else float("nan"),
                locks,
                "; ".join(found["errors"])[:300] or "—",
            ]
        )
    header = ["process", "trials", "tracking s per trial", "median", "'database is locked'", "errors"]
    body = (
        f"{args.processes} processes, each pinned to one core with one TensorFlow thread per pool, "
        f"{args.trials} trials each of {args.train_limit or 55000} training images, 1 epoch, batch 128, through "
        f"study.run_trials on one sqlite MLflow store and one sqlite Optuna storage; {wall:.0f} s wall; "
        f"{len(statuses)} trial runs with artifacts, statuses {sorted(set(statuses))}; upload seconds median "
        f"{median(uploads) if uploads else float('nan'):.3f} (uploads thread); 1-minute load average "
        f"{load_average()} at the end.\n\n" + table(header, rows)
    )
    record(f"bench/overhead: tracking with {args.processes} processes on one sqlite store", body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block", type=int, default=3, help="trials (and raw fits) per timed block")
    parser.add_argument("--train-limit", type=int, default=None, help="0 = all 55,000 training images")
    parser.add_argument("--processes", type=int, default=1, help="2: pinned processes on one sqlite store")
    parser.add_argument("--trials", type=int, default=3, help="trials per process, with --processes")
    parser.add_argument("--worker-store", help=argparse.SUPPRESS)
    parser.add_argument("--core", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train_limit is None:
        args.train_limit = 10000 if args.processes > 1 else 0
    if args.worker_store:
        args.store = args.worker_store
        worker(args)
    elif args.processes > 1:
        processes(args)
    else:
        one_process(args)


if __name__ == "__main__":
    main()
