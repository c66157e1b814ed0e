"""On a GPU: epoch time of the default trial at batch 64, 128 and 256, and trials per hour with 1, 2, 4 and
8 workers sharing one GPU.

Runs in one go on a GPU machine, with whichever Keras backend is installed there (TensorFlow need not be):

    KERAS_BACKEND=jax MNIST_SWEEP_DATA=/path/to/mnist python bench/gpu.py [--workers 1 2 4 8]
        [--batch-sizes 64 128 256] [--epochs 3] [--worker-epochs 5] [--trials-per-worker 2]

Workers are real `mnist-sweep worker` processes on the first visible GPU, joining one study per worker
count (Optuna and MLflow on sqlite in a temp folder, pruning off). Trials per hour = complete trials /
(last trial's end - first trial's start), from Optuna's own timestamps, so process start-up is left out.
Every trial run's `device` tag is read back from MLflow: a worker that trained on the CPU is reported.

Without a GPU it says that it found none and exits 0, recording nothing: numbers are only ever from a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, data_dir, default_trial_epochs, load_average, record, table

SWEEP = REPO / "sweeps" / "fcn.toml"


def epoch_rows(batch_sizes: list[int], epochs: int, train_limit: int) -> list[list[object]]:
    from mnist_sweep.data import load_split, resolve_source

    split = load_split(resolve_source(data_dir()), validation=5000, train_limit=train_limit, seed=0)
    rows: list[list[object]] = []
    for batch_size in batch_sizes:
        seconds, accuracy = default_trial_epochs(split, batch_size=batch_size, epochs=epochs)
        steady = statistics.median(seconds[1:]) if len(seconds) > 1 else float("nan")
        rows.append([batch_size, seconds[0], steady, accuracy[-1]])
    return rows


def worker_overrides(folder: Path, name: str, trials: int, epochs: int, train_limit: int) -> list[str]:
    return [
        "--set",
        f"data.train_limit={train_limit}",
        "--trials",
        str(trials),
        "--epochs",
        str(epochs),
        "--set",
        f'study.name="{name}"',
        "--set",
        f'study.storage="sqlite:///{folder}/optuna.db"',
        "--set",
        f'tracking.uri="sqlite:///{folder}/mlflow.db"',
        "--set",
        f'tracking.artifacts="{folder}/artifacts"',
        "--set",
        'study.pruner="none"',  # every trial trains all its epochs: trials are alike
        "--set",
        f'data.path="{data_dir()}"',
    ]


def packed_workers(workers: int, *, trials_per_worker: int, epochs: int, train_limit: int, gpu: str) -> list[object]:
    """`workers` worker processes on one GPU, one study; a row of the trials-per-hour table."""
    import optuna
    from mlflow.tracking import MlflowClient

    name = f"gpu-bench-{workers}"
    folder = Path(tempfile.mkdtemp(prefix=f"mnist-sweep-{name}-"))
    command = [sys.executable, "-m", "mnist_sweep", "worker", str(SWEEP)]
    command += worker_overrides(folder, name, workers * trials_per_worker, epochs, train_limit)
    env = {**os.environ, "PYTHONPATH": str(REPO), "CUDA_VISIBLE_DEVICES": gpu}
    started = time.perf_counter()
    processes = [
        subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for _ in range(workers)
    ]
    outputs = [p.communicate()[0] for p in processes]
    wall = time.perf_counter() - started
    failed = [
        out.strip().splitlines()[-1] if out.strip() else "no output"
        for p, out in zip(processes, outputs, strict=True)
        if p.returncode
    ]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/optuna.db")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        return [workers, 0, "—", "—", wall, f"no trial completed: {failed[:1]}"]
    first = min(t.datetime_start for t in complete if t.datetime_start)
    last = max(t.datetime_complete for t in complete if t.datetime_complete)
    span = (last - first).total_seconds()
    durations = [t.duration.total_seconds() for t in complete if t.duration]
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], "tags.`mnist_sweep.role` = 'trial'") if experiment else []
    devices = sorted({r.data.tags.get("device", "?") for r in runs})
    cpu_runs = [d for d in devices if not d.startswith("GPU")]
    note = "; ".join([*(f"worker failed: {f}" for f in failed[:2]), *(f"ran on {d}" for d in cpu_runs)])
    return [workers, len(complete), len(complete) / span * 3600, statistics.median(durations), wall, note]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per batch size for the epoch times")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--worker-epochs", type=int, default=5, help="epochs of each trial the workers run")
    parser.add_argument("--trials-per-worker", type=int, default=2)
    parser.add_argument("--train-limit", type=int, default=0, help="0 = all 55,000 training images")
    parser.add_argument(
        "--check-on-cpu",
        action="store_true",
        help="without a GPU, run every step anyway to check the script; prints, never records",
    )
    args = parser.parse_args()

    from mnist_sweep.environment import device, gpus, prepare_backend

    backend = prepare_backend()
    found = gpus()
    if not found and not args.check_on_cpu:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        print(
            f"bench/gpu: no GPU found (Keras backend {backend}, CUDA_VISIBLE_DEVICES={visible!r}, "
            f"{device(found)}); nothing measured, nothing recorded"
        )
        return 0
    print(f"bench/gpu: {device(found)}, Keras backend {backend}", flush=True)
    load_before = load_average()
    epochs = epoch_rows(args.batch_sizes, args.epochs, args.train_limit)
    print(table(["batch", "epoch 1 s (compile)", "later epochs median s", "val acc"], epochs), flush=True)
    # The first GPU this process sees, for the workers: the same physical GPU whichever way it is named.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first_gpu = visible.split(",")[0].strip() if visible else "0"
    images = f"{args.train_limit} training images (--train-limit)" if args.train_limit else "55000 training images"
    packed = []
    for workers in args.workers:
        row = packed_workers(
            workers,
            trials_per_worker=args.trials_per_worker,
            epochs=args.worker_epochs,
            train_limit=args.train_limit,
            gpu=first_gpu,
        )
        print(row, flush=True)
        packed.append(row)
    body = (
        f"{device(found)}, Keras backend {backend}; 1-minute load average {load_before} before, "
        f"{load_average()} after.\n\n"
        f"Epoch time of the default trial ({images}, the default sweep's train settings, "
        f"{args.epochs} epochs per batch size; epoch 1 pays for compilation):\n\n"
        + table(["batch", "epoch 1 s (compile)", "later epochs median s", "val acc"], epochs)
        + f"\n\nWorkers sharing GPU {first_gpu}: each a `mnist-sweep worker` process, {args.trials_per_worker} "
        f"trials of {args.worker_epochs} epochs per worker, pruning off, sqlite storage; trials per hour from "
        "Optuna's timestamps (start-up excluded):\n\n"
        + table(["workers", "complete trials", "trials per hour", "median trial s", "wall s", "note"], packed)
    )
    if not found:  # --check-on-cpu: these are CPU numbers and go nowhere
        print(f"bench/gpu --check-on-cpu: every step ran; NOT recorded (no GPU)\n\n{body}")
        return 0
    record("bench/gpu: epoch time by batch size, and workers sharing one GPU", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
