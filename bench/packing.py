"""Epoch throughput of one process on all the cores against one process per core, all at once.

The measurement `--workers auto` makes in small (mnist_sweep/packing.py), here on real MNIST through the
trial's own path: each process runs the default sweep's trial (bench/_common.default_trial_epochs),
pinned the way `run --workers N` pins its workers (mnist_sweep/placement.py). Epoch 1 (tracing and
compilation) is left out; the steady epochs are averaged. On 2 cores: 1x2 cores against 2x1 core.

    python bench/packing.py                          # batch 64/128/256, full MNIST, 3 epochs (~5 min on 2 cores)
    python bench/packing.py --quick                  # every step small, to check the script; records nothing
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
from typing import Any

from _common import data_dir, load_average, python_path, record, table

from mnist_sweep.placement import Placement, cpu_list, plan, usable_cpus


def run_layout(layout: list[Placement], *, batch_size: int, epochs: int, train_limit: int) -> list[float]:
    """Every process of the layout at once; the mean steady epoch seconds of each."""
    job = json.dumps({"batch_size": batch_size, "epochs": epochs, "train_limit": train_limit})
    env = {**os.environ, "PYTHONPATH": python_path(), "MNIST_SWEEP_DATA": data_dir()}
    with contextlib.ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in layout]  # TensorFlow's start-up lines
        processes = [
            subprocess.Popen(
                [sys.executable, __file__, "--child", job],
                env={**env, **placement.environment()},
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
            )
            for placement, log in zip(layout, logs, strict=True)
        ]
        seconds = []
        for process, log in zip(processes, logs, strict=True):
            out, _ = process.communicate()
            if process.returncode != 0:
                log.seek(0)
                sys.exit(f"a packing process failed: {(log.read().strip().splitlines() or ['no output'])[-1]}")
            seconds.append(float(json.loads(out.strip().splitlines()[-1])["epoch_seconds"]))
    return seconds


def child(job: dict[str, Any]) -> None:
    from mnist_sweep.environment import prepare_backend

    prepare_backend()  # pins this process (MNIST_SWEEP_CPUS) before Keras loads
    from _common import default_trial_epochs

    from mnist_sweep.data import load_split, resolve_source

    split = load_split(resolve_source(data_dir()), validation=5000, train_limit=job["train_limit"], seed=0)
    seconds, _ = default_trial_epochs(split, batch_size=job["batch_size"], epochs=job["epochs"])
    steady = seconds[1:] or seconds
    print(json.dumps({"epoch_seconds": sum(steady) / len(steady), "cpus": cpu_list(usable_cpus())}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--epochs", type=int, default=3, help="per process; the first is left out")
    parser.add_argument("--train-limit", type=int, default=0, help="0 = all 55,000 training images")
    parser.add_argument("--quick", action="store_true", help="2 epochs of 3,000 images at batch 64 and 256; no record")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if args.quick:
        args.batch_sizes, args.epochs, args.train_limit = [64, 256], 2, 3000
    cpus = usable_cpus()
    if len(cpus) < 2:
        sys.exit(f"one core ({cpu_list(cpus)}): nothing to pack")
    together, apart = plan(1, cpus=cpus, gpu_ids=()), plan(len(cpus), cpus=cpus, gpu_ids=())
    rows = []
    load_before = load_average()
    for batch_size in args.batch_sizes:
        (one,) = run_layout(together, batch_size=batch_size, epochs=args.epochs, train_limit=args.train_limit)
        many = run_layout(apart, batch_size=batch_size, epochs=args.epochs, train_limit=args.train_limit)
        gain = sum(one / s for s in many)  # epochs per second of all of them, against the one
        rows.append([batch_size, one, " and ".join(f"{s:.2f}" for s in many), f"{gain:.2f}x"])
    header = [
        "batch",
        f"1 process on {len(cpus)} cores (s/epoch)",
        f"{len(cpus)} processes, 1 core each (s/epoch)",
        "throughput gain",
    ]
    images = args.train_limit or 55_000
    body = table(header, rows) + (
        f"\n\n{images} training images, {args.epochs} epochs per process (the first left out), the default "
        f"sweep's trial; pinned as `run --workers N` pins. Load average before: {load_before}, after: "
        f"{load_average()}. `--workers auto` measures the same two layouts in small and picks the faster."
    )
    if args.quick:
        print(body)
        print("(--quick: nothing recorded)")
        return
    record("bench/packing: 1 process on all cores against 1 process per core", body)


if __name__ == "__main__":
    main()
