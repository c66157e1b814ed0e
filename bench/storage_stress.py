"""Several worker processes hammer one study's local stores: how many storage errors, lost or doubled trials?

Each worker runs trials whose objective does only the tracking part of a real trial (an MLflow child run,
params, three epochs of metrics, the end state) and no training, so the stores see far more traffic per
second than real trials make. Run from the repo root:

    python bench/storage_stress.py --workers 4 --trials 25 --folder /tmp/stress
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any


def _config(folder: Path) -> Any:
    from mnist_sweep.config import build_config

    return build_config(
        {
            "study": {
                "name": "stress",
                "storage": f"sqlite:///{folder}/optuna.db",
                "heartbeat_seconds": 2,
                "pruner": "none",
                "sampler": "random",
            },
            "tracking": {"uri": f"sqlite:///{folder}/mlflow.db", "artifacts": str(folder / "artifacts")},
        }
    )


def worker(folder: Path, trials: int, errors: Any) -> None:
    """Run `trials` tracking-only trials; put each error's first line on the queue."""
    import optuna

    from mnist_sweep.ledger import StudyLedger
    from mnist_sweep.records import RUN_ID_ATTR
    from mnist_sweep.study import make_storage, open_study, worker_salt
    from mnist_sweep.tracking import Tracker

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    cfg = _config(folder)
    try:
        tracker = Tracker(uri=cfg.tracking.uri, artifacts=cfg.tracking.artifacts, experiment="stress")
        ledger = StudyLedger(tracker, parent_run_id="", study_name="stress")  # the runs only: no parent run
        study, _ = open_study(cfg, make_storage(cfg.study), worker_salt=worker_salt())
    except Exception as exc:
        errors.put(f"setup: {type(exc).__name__}: {str(exc).splitlines()[0]}")
        traceback.print_exc()
        return

    def objective(trial: optuna.Trial) -> float:
        params = {"x": trial.suggest_float("x", 0, 1)}
        run_id = ledger.start_trial_run(trial_number=trial.number, params=params)
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        for epoch in range(1, 4):
            ledger.log_epoch(run_id, epoch, {"loss": random.random(), "val_loss": random.random()})
            time.sleep(0.01)
        ledger.close_run(run_id, state="COMPLETE")
        return random.random()

    for _ in range(trials):
        try:
            study.optimize(objective, n_trials=1)
        except Exception as exc:
            errors.put(f"trial: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            traceback.print_exc()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--trials", type=int, default=25, help="trials per worker")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/mnist-sweep-stress"))
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    if any(args.folder.iterdir()):
        raise SystemExit(f"{args.folder} is not empty")
    errors: Any = multiprocessing.get_context("spawn").Queue()
    processes = [
        multiprocessing.get_context("spawn").Process(target=worker, args=(args.folder, args.trials, errors))
        for _ in range(args.workers)
    ]
    started = time.perf_counter()
    for process in processes:
        process.start()
    for process in processes:
        process.join()
    seconds = time.perf_counter() - started
    report(args.folder, args.workers * args.trials, errors, seconds)


def report(folder: Path, expected: int, errors: Any, seconds: float) -> None:
    import optuna
    from mlflow.tracking import MlflowClient

    from mnist_sweep.records import RUN_ID_ATTR

    kinds: Counter[str] = Counter()
    while not errors.empty():
        kinds[errors.get()] += 1
    print(f"errors: {sum(kinds.values())}")
    for kind, count in kinds.most_common():
        print(f"  {count:4d}  {kind}")
    try:
        study = optuna.load_study(study_name="stress", storage=f"sqlite:///{folder}/optuna.db")
    except KeyError:
        print("no study was created")
        return
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    numbers = Counter(t.number for t in trials)
    client = MlflowClient(f"sqlite:///{folder}/mlflow.db")
    experiment = client.get_experiment_by_name("stress")
    runs = client.search_runs([experiment.experiment_id], max_results=10000) if experiment else []
    linked = {t.user_attrs.get(RUN_ID_ATTR) for t in trials if t.state.name == "COMPLETE"}
    print(f"{expected} trials asked in {seconds:.1f} s; optuna states {dict(states)}")
    print(f"duplicate trial numbers: {sum(1 for c in numbers.values() if c > 1)}")
    print(f"mlflow runs {len(runs)}, by status {dict(Counter(r.info.status for r in runs))}")
    print(f"complete trials without their run: {len(linked - {r.info.run_id for r in runs})}")


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    main()
