"""Resident memory of one `mnist-sweep worker` after its first trial and after its twentieth.

State leaking from trial to trial (Keras sessions, MLflow runs, Optuna caches) shows as growth. The
worker is the real CLI on small data; its RSS is read from /proc while the storage is polled for
finished trials. Run from the repo root:

    python bench/worker_memory.py --trials 20 --folder /tmp/mnist-sweep-memory
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    parser.add_argument("--folder", type=Path, default=Path("/tmp/mnist-sweep-memory"))
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=False)
    command = [
        sys.executable, "-m", "mnist_sweep", "worker", str(REPO / "sweeps" / "fcn.toml"),
        "--trials", str(args.trials), "--epochs", "1", "--set", "data.train_limit=1000",
        "--set", "data.validation=500", "--set", 'study.pruner="none"',
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
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
    for count in sorted(seen):
        print(f"after {count:3d} trials: {seen[count]:7.1f} MiB")
    first, last = seen[min(seen)], seen[max(seen)]
    print(f"growth from trial {min(seen)} to trial {max(seen)}: {last - first:+.1f} MiB")


if __name__ == "__main__":
    main()
