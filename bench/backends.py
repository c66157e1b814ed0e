"""Epoch time of the default trial under each Keras backend (TensorFlow, JAX, torch) on this machine.

Each backend runs in a process of its own (a process has one Keras backend), on the same 55,000
training images, batch 128, the default sweep's train settings; epoch 1 pays for tracing/compilation.
A backend whose package is not installed is listed as such, not measured.

    python bench/backends.py [--epochs 3] [--batch-size 128] [--backends tensorflow jax torch]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from _common import data_dir, default_trial_epochs, load_average, python_path, record, table

BACKENDS = ("tensorflow", "jax", "torch")


def measure(backend: str, *, epochs: int, batch_size: int) -> dict[str, object]:
    """One child process with KERAS_BACKEND=backend; its JSON line, or why it could not run."""
    command = [sys.executable, __file__, "--child", "--epochs", str(epochs), "--batch-size", str(batch_size)]
    env = {**os.environ, "KERAS_BACKEND": backend, "PYTHONPATH": python_path()}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": last}
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def child(epochs: int, batch_size: int) -> None:
    from mnist_sweep.data import load_split, resolve_source
    from mnist_sweep.environment import BACKEND_PACKAGES, package_version, prepare_backend

    backend = prepare_backend()
    split = load_split(resolve_source(data_dir()), validation=5000, train_limit=0, seed=0)
    seconds, accuracy = default_trial_epochs(split, batch_size=batch_size, epochs=epochs)
    package = BACKEND_PACKAGES[backend]
    tensorflow_loaded = sys.modules.get("tensorflow") is not None
    print(
        json.dumps(
            {
                "backend": backend,
                "version": f"{package} {package_version(package)}",
                "seconds": seconds,
                "val_accuracy": accuracy,
                "tensorflow_loaded": tensorflow_loaded,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.epochs, args.batch_size)
        return
    load_before = load_average()
    rows: list[list[object]] = []
    for backend in args.backends:
        result = measure(backend, epochs=args.epochs, batch_size=args.batch_size)
        if "error" in result:
            rows.append([backend, "—", "—", "—", "—", f"not measured: {result['error']}"])
            continue
        seconds = [float(s) for s in result["seconds"]]  # type: ignore[attr-defined]
        accuracy = [float(a) for a in result["val_accuracy"]]  # type: ignore[attr-defined]
        steady = statistics.median(seconds[1:]) if len(seconds) > 1 else float("nan")
        note = "TensorFlow loaded" if result["tensorflow_loaded"] and backend != "tensorflow" else ""
        rows.append([backend, result["version"], seconds[0], steady, accuracy[-1], note])
    header = ["backend", "package", "epoch 1 s (compile)", f"epochs 2-{args.epochs} median s", "val acc", "note"]
    body = (
        f"The default trial (adam 1e-3, relu, dropout 0.2, the default sweep's train settings), 55000 training "
        f"images, batch {args.batch_size}, {args.epochs} epochs, one process per backend, run one after "
        f"another. 1-minute load average {load_before} before, {load_average()} after (the machine is "
        "shared).\n\n" + table(header, rows)
    )
    record("bench/backends: epoch time of the default trial per Keras backend", body)


if __name__ == "__main__":
    main()
