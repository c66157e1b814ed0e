"""Issue 21's benchmark harness: the peer script on a small real subset, and the medians table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.conftest import REPO


def bench_module(name: str) -> ModuleType:
    """A bench/ script as a module (bench/ is scripts, not a package: its own folder goes on sys.path)."""
    sys.path.insert(0, str(REPO / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def result(name: str, seed: int, wall: float, best_val: float, test: float, winner: float) -> dict[str, object]:
    return {
        "name": name,
        "seed": seed,
        "wall": wall,
        "trials": 10,
        "epochs": 100,
        "epoch_seconds": wall / 2,
        "trial_seconds": wall - 20,
        "best_val": best_val,
        "test": test,
        "winner_fit_seconds": winner,
    }


def test_the_seeds_report_gives_rows_medians_and_the_targets_on_the_medians() -> None:
    search = bench_module("search")
    today, new, peer = search.TODAY, search.NEW, search.PEER
    results = [
        result(today, 42, 1000, 0.986, 0.987, 50),
        result(new, 42, 500, 0.985, 0.986, 100),
        result(peer, 42, 900, 0.984, 0.984, 90),
        result(today, 7, 1200, 0.984, 0.985, 60),
        result(new, 7, 540, 0.9855, 0.9855, 60),
        result(peer, 7, 1000, 0.985, 0.983, 100),
        result(today, 1, 1100, 0.985, 0.986, 55),
        result(new, 1, 520, 0.986, 0.987, 65),
        result(peer, 1, 950, 0.983, 0.985, 95),
    ]
    body = search.seeds_report(results, ["data.train_limit=1000"], ["train.loop='compiled'"])

    medians = [line for line in body.splitlines() if "| median |" in line]
    assert [line.split(" | ")[0] for line in medians] == [f"| {today}", f"| {new}", f"| {peer}"]
    assert medians[1].split(" | ")[2] == f"{520 / 60:.3f}"  # the median wall, in minutes
    assert medians[1].split(" | ")[-1] == "7.692 |"  # trial seconds over the winner's fit: 480/100, 520/60, 500/65
    assert "wall 0.55x the peer's (≤ 0.6)" in body  # 520 / 950
    assert "best val +0.05 points and test +0.00 points against today's default" in body
    assert "sweep cost 7.7x its winner's own fit (≤ 8)" in body
    assert f"{new}: 24.00 s per trial outside its fit, 20.0 s per sweep outside its trials" in body  # (500-260)/10
    assert "New default: [\"train.loop='compiled'\"]" in body


@pytest.mark.slow
def test_the_peer_searches_scores_the_test_set_once_and_reports_its_costs(
    tmp_path: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    saved = tmp_path / "peer.json"
    small = ["--set", "data.train_limit=500", "--set", "data.validation=500", "--set", "train.epochs=2"]
    peer_script = bench_module("peer_hyperband")  # its main, in this process: the script's process is not checked
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MNIST_SWEEP_DATA", str(mnist_dir))
    monkeypatch.setattr(sys, "argv", ["peer_hyperband.py", "--seed", "3", "--json", str(saved), *small])
    peer_script.main()
    peer = json.loads(saved.read_text())
    # max_epochs 2, factor 3: one bracket of 2 trials, 2 epochs each (keras-tuner's own plan)
    assert (peer["trials"], peer["epochs"]) == (2, 4)
    assert 0 < peer["winner_fit_seconds"] <= peer["epoch_seconds"] <= peer["trial_seconds"] <= peer["wall"]
    assert 0.0 <= peer["best_val"] <= 1.0 and 0.0 <= peer["test"] <= 1.0
    assert set(peer["winner"]) >= {"optimizer", "learning_rate", "batch_size", "activation", "dropout"}
    assert list(tmp_path.iterdir()) == [saved]  # the tuner's folder was temporary


def test_a_promoted_winner_costs_the_fit_of_every_trial_it_went_on_from() -> None:
    import optuna

    from mnist_sweep.asha import PROMOTED_FROM_ATTR
    from mnist_sweep.records import FIT_SECONDS_ATTR

    study = optuna.create_study(direction="maximize")
    for number, (seconds, source) in enumerate([(10.0, None), (7.0, None), (30.0, 0), (90.0, 2)]):
        trial = study.ask()
        trial.set_user_attr(FIT_SECONDS_ATTR, seconds)
        if source is not None:
            trial.set_user_attr(PROMOTED_FROM_ATTR, source)
        study.tell(trial, 0.9 + number / 100)
    trials = study.trials
    lineage = bench_module("search").lineage_fit_seconds
    assert lineage(trials, trials[3]) == 10.0 + 30.0 + 90.0  # trial 1 (7 s) is not in its line
    assert lineage(trials, trials[1]) == 7.0


def test_a_run_cut_short_gives_its_table_from_the_files_it_saved(tmp_path: Path) -> None:
    """--from-saved: the variants in the order they ran (seed by seed, today, new, peer), whatever the file names."""
    import os

    search = bench_module("search")
    ran = [(search.TODAY, 42), (search.NEW, 42), (search.PEER, 42), (search.TODAY, 7), (search.NEW, 7)]
    for when, (name, seed) in enumerate(ran):
        path = tmp_path / f"{search.SEED_SLUGS[name]}-{seed}-tensorflow.json"
        path.write_text(json.dumps(result(name, seed, 100.0 + when, 0.98, 0.98, 10.0)))
        os.utime(path, (1000.0 + when, 1000.0 + when))
    (tmp_path / "today-1-jax.json").write_text("{}")  # another backend's: not read
    assert [(r["name"], r["seed"]) for r in search.saved_seeds(tmp_path, "tensorflow")] == ran
