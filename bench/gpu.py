"""On a GPU: epoch time of the default trial at batch 64, 128 and 256, and trials per hour with 1, 2, 4 and
8 workers sharing one GPU.

Runs in one go on a GPU machine, with whichever Keras backend is installed there (TensorFlow need not be):

    KERAS_BACKEND=jax MNIST_SWEEP_DATA=/path/to/mnist python bench/gpu.py [--workers 1 2 4 8]
        [--batch-sizes 64 128 256] [--epochs 3] [--worker-epochs 5] [--trials-per-worker 3] [--via trials|cli]

Workers are separate processes on the first visible GPU, all started at once:
- `--via trials` (default): each runs the default trial back to back through mnist_sweep.trial, as a
  worker does, without Optuna and MLflow (needs Keras, its backend and pydantic only: a GPU machine
  without the project installed can run it, see bench/gpu_wheels.sh);
- `--via cli`: real `mnist-sweep worker` processes joining one study per worker count (Optuna and MLflow
  on sqlite in a temp folder, pruning off); each trial run's `device` tag is read back from MLflow.
Trials per hour = finished trials / (last trial's end - first trial's start), from each trial's own
timestamps, so process start-up is left out. A worker that trained on the CPU is reported as such.

Without a GPU it says that it found none and exits 0, recording nothing: numbers are only ever from a GPU
(`--check-on-cpu` runs every step anyway, to check the script, and records nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import REPO, data_dir, default_trial_epochs, load_average, python_path, record, table

SWEEP = REPO / "sweeps" / "fcn.toml"
EPOCH_HEADER = ["batch", "epoch 1 s (compile)", "later epochs median s", "val acc"]
WORKER_HEADER = ["workers", "finished trials", "trials per hour", "median trial s", "wall s", "note"]


def load_data(train_limit: int) -> object:
    from mnist_sweep.data import load_split, resolve_source

    return load_split(resolve_source(data_dir()), validation=5000, train_limit=train_limit, seed=0)


def epoch_rows(batch_sizes: list[int], epochs: int, train_limit: int) -> list[list[object]]:
    split = load_data(train_limit)
    rows: list[list[object]] = []
    for batch_size in batch_sizes:
        seconds, accuracy = default_trial_epochs(split, batch_size=batch_size, epochs=epochs)
        steady = statistics.median(seconds[1:]) if len(seconds) > 1 else float("nan")
        rows.append([batch_size, seconds[0], steady, accuracy[-1]])
    return rows


# --------------------------------------------------------------------------- workers: plain trial loops


def trial_worker(trials: int, epochs: int, train_limit: int) -> None:
    """A child: `trials` default trials back to back; one JSON line per trial (wall-clock start, end)."""
    from mnist_sweep.environment import device, prepare_backend

    prepare_backend()
    split = load_data(train_limit)
    where = device()
    for _ in range(trials):
        started = time.time()
        default_trial_epochs(split, batch_size=128, epochs=epochs)
        print(json.dumps({"start": started, "end": time.time(), "device": where}), flush=True)


def trial_loops(workers: int, *, trials_per_worker: int, epochs: int, train_limit: int, gpu: str) -> list[object]:
    command = [sys.executable, __file__, "--trial-worker", "--trials-per-worker", str(trials_per_worker)]
    command += ["--worker-epochs", str(epochs), "--train-limit", str(train_limit)]
    env = {**os.environ, "PYTHONPATH": python_path(), "CUDA_VISIBLE_DEVICES": gpu}
    outputs, failed, wall = run_all([command] * workers, env=env, cwd=REPO)
    trials = [json.loads(line) for out in outputs for line in out.splitlines() if line.startswith("{")]
    spans = [(float(t["start"]), float(t["end"])) for t in trials]
    devices = {str(t["device"]) for t in trials}
    return worker_row(workers, spans, devices, failed, wall)


# --------------------------------------------------------------------------- workers: `mnist-sweep worker`


def cli_overrides(folder: Path, name: str, trials: int, epochs: int, train_limit: int) -> list[str]:
    settings = {
        "study.name": f'"{name}"',
        "study.storage": f'"sqlite:///{folder}/optuna.db"',
        "study.pruner": '"none"',  # every trial trains all its epochs: trials are alike
        "tracking.uri": f'"sqlite:///{folder}/mlflow.db"',
        "tracking.artifacts": f'"{folder}/artifacts"',
        "data.path": f'"{data_dir()}"',
        "data.train_limit": str(train_limit),
    }
    pairs = [["--set", f"{key}={value}"] for key, value in settings.items()]
    return ["--trials", str(trials), "--epochs", str(epochs), *[item for pair in pairs for item in pair]]


def cli_workers(workers: int, *, trials_per_worker: int, epochs: int, train_limit: int, gpu: str) -> list[object]:
    import optuna
    from mlflow.tracking import MlflowClient

    name = f"gpu-bench-{workers}"
    folder = Path(tempfile.mkdtemp(prefix=f"mnist-sweep-{name}-"))
    command = [sys.executable, "-m", "mnist_sweep", "worker", str(SWEEP)]
    command += cli_overrides(folder, name, workers * trials_per_worker, epochs, train_limit)
    env = {**os.environ, "PYTHONPATH": python_path(), "CUDA_VISIBLE_DEVICES": gpu}
    _, failed, wall = run_all([command] * workers, env=env, cwd=folder)
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/optuna.db")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    spans = [
        (t.datetime_start.timestamp(), t.datetime_complete.timestamp())
        for t in complete
        if t.datetime_start and t.datetime_complete
    ]
    client = MlflowClient(tracking_uri=f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name(name)
    runs = client.search_runs([experiment.experiment_id], "tags.`mnist_sweep.role` = 'trial'") if experiment else []
    return worker_row(workers, spans, {r.data.tags.get("device", "?") for r in runs}, failed, wall)


# --------------------------------------------------------------------------- shared by both


def run_all(commands: list[list[str]], *, env: dict[str, str], cwd: Path) -> tuple[list[str], list[str], float]:
    """Start every command at once, wait for all; their outputs, the last line of each failed one, wall s."""
    started = time.perf_counter()
    processes = [
        subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for command in commands
    ]
    results = [p.communicate() for p in processes]
    wall = time.perf_counter() - started
    failed = [
        (err.strip().splitlines() or ["no output"])[-1]
        for p, (_, err) in zip(processes, results, strict=True)
        if p.returncode
    ]
    return [out for out, _ in results], failed, wall


def worker_row(
    workers: int, spans: list[tuple[float, float]], devices: set[str], failed: list[str], wall: float
) -> list[object]:
    notes = [f"worker failed: {f}" for f in failed[:2]] + [f"ran on {d}" for d in sorted(devices) if "GPU" not in d]
    if not spans:
        return [workers, 0, "—", "—", wall, "; ".join(notes) or "no trial finished"]
    span = max(end for _, end in spans) - min(start for start, _ in spans)
    median_trial = statistics.median(end - start for start, end in spans)
    return [workers, len(spans), len(spans) / span * 3600, median_trial, wall, "; ".join(notes)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per batch size for the epoch times")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--worker-epochs", type=int, default=5, help="epochs of each trial the workers run")
    parser.add_argument("--trials-per-worker", type=int, default=3)
    parser.add_argument("--via", choices=["trials", "cli"], default="trials", help="worker processes (see above)")
    parser.add_argument("--train-limit", type=int, default=0, help="0 = all 55,000 training images")
    parser.add_argument("--check-on-cpu", action="store_true", help="run every step without a GPU; record nothing")
    parser.add_argument("--trial-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.trial_worker:
        trial_worker(args.trials_per_worker, args.worker_epochs, args.train_limit)
        return 0

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
    print(table(EPOCH_HEADER, epochs), flush=True)
    # The first GPU this process sees, for the workers: the same physical GPU whichever way it is named.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    first_gpu = visible.split(",")[0].strip() if visible else "0"
    measure = trial_loops if args.via == "trials" else cli_workers
    packed = []
    for workers in args.workers:
        row = measure(
            workers,
            trials_per_worker=args.trials_per_worker,
            epochs=args.worker_epochs,
            train_limit=args.train_limit,
            gpu=first_gpu,
        )
        print(row, flush=True)
        packed.append(row)
    images = f"{args.train_limit} training images (--train-limit)" if args.train_limit else "55000 training images"
    how = (
        "each a process running default trials back to back (mnist_sweep.trial, no tracking)"
        if args.via == "trials"
        else "each a `mnist-sweep worker` process, pruning off, Optuna and MLflow on sqlite"
    )
    body = (
        f"{device(found)}, Keras backend {backend}; 1-minute load average {load_before} before, "
        f"{load_average()} after.\n\n"
        f"Epoch time of the default trial ({images}, the default sweep's train settings, {args.epochs} "
        "epochs per batch size; epoch 1 pays for compilation):\n\n"
        + table(EPOCH_HEADER, epochs)
        + f"\n\nWorkers sharing GPU {first_gpu}, {how}; {args.trials_per_worker} trials of {args.worker_epochs} "
        "epochs (batch 128) per worker; trials per hour from the trials' own start and end (process start-up "
        "left out):\n\n" + table(WORKER_HEADER, packed)
    )
    if not found:  # --check-on-cpu: these are CPU numbers and go nowhere
        print(f"bench/gpu --check-on-cpu: every step ran; NOT recorded (no GPU)\n\n{body}")
        return 0
    record("bench/gpu: epoch time by batch size, and workers sharing one GPU", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
