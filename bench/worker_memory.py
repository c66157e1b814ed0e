"""Resident memory of one `mnist-sweep worker` after its first trial and after its twentieth.

State leaking from trial to trial (Keras sessions, MLflow runs, Optuna caches) shows as growth. The
worker is the real CLI on small data; its RSS is read from /proc while the storage is polled for
finished trials. Run from the repo root:

    python bench/worker_memory.py --trials 20
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from contextlib import closing
from pathlib import Path

from _common import REPO, data_dir, record, table


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def finished_trials(database: Path) -> int:
    if not database.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
            query = "SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED', 'FAIL')"
            return int(connection.execute(query).fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--folder", type=Path, help="an empty folder for the worker's stores (default: a new one)")
    args = parser.parse_args()
    args.folder = args.folder or Path(tempfile.mkdtemp(prefix="mnist-sweep-memory-"))
    args.folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "mnist_sweep", "worker", str(REPO / "sweeps" / "fcn.toml"),
        "--trials", str(args.trials), "--epochs", "1", "--set", "data.train_limit=1000",
        "--set", "data.validation=500", "--set", 'study.pruner="none"',
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "MNIST_SWEEP_DATA": data_dir()}
    process = subprocess.Popen(command, cwd=args.folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    database = args.folder / "mlruns" / "optuna.db"
    seen: dict[int, float] = {}
    while process.poll() is None:
        count = finished_trials(database)
        if count and count not in seen:
            seen[count] = rss_mib(process.pid)
        time.sleep(0.05)
    if process.returncode != 0:
        raise SystemExit(f"the worker exited {process.returncode}")
    counts = sorted(seen)
    shown = [c for c in counts if c in (1, 2, 5, 10, 15) or c == counts[-1]]
    first, last = seen[counts[0]], seen[counts[-1]]
    per_trial = (last - first) / max(counts[-1] - counts[0], 1)
    body = (
        "`mnist-sweep worker` on 1,000 training images, 1 epoch per trial, no pruning; RSS read from /proc as "
        "each trial finishes.\n\n"
        + table(["after trials", "RSS MiB"], [[c, seen[c]] for c in shown])
        + f"\n\ngrowth from trial {counts[0]} to trial {counts[-1]}: {last - first:+.1f} MiB "
        f"({per_trial:+.2f} MiB per trial)."
    )
    record("bench/worker_memory: RSS after 1 and after 20 trials", body)


if __name__ == "__main__":
    main()
