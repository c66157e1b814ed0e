"""The sealed test set: read only after every trial, by the final step; trials cannot reach it, and a scored
study takes no more trials."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest

from mnist_sweep import data, preflight, replay, sweep, trial
from mnist_sweep.config import load_sweep
from tests.conftest import DEFAULT_SWEEP, small_sweep_args, unreadable_test_images
from tests.in_process import absolute_stores, run_in_process
from tests.stores import all_runs, load_study, parent_run, storage_url, tracking_url

pytestmark = pytest.mark.slow


def reaching_for_the_test_split(real: Callable[..., Any], source: data.DataSource, events: list[str]) -> Any:
    """`run_trial` that first reaches for the test images, as a careless trial would: the seal the caller put
    around it (and only that: this wrapper opens none) must refuse."""

    def run_trial(**kwargs: Any) -> Any:
        events.append("trial")
        try:
            data.load_test_split(source)
        except data.WithheldTestSplitError:
            events.append("refused")
        return real(**kwargs)

    return run_trial


def test_trials_never_read_the_test_split(tmp_path: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    events: list[str] = []
    data.forget_decoded()  # an earlier test may have read these files: this one counts the reads
    real_read_part = data.read_part

    def read_part(source: data.DataSource, part: str) -> Any:
        events.append(f"read {part}")
        return real_read_part(source, part)

    monkeypatch.setattr(data, "read_part", read_part)
    # study.py imports run_trial from mnist_sweep.trial when a trial starts: this wrapper is what it gets.
    monkeypatch.setattr(
        trial, "run_trial", reaching_for_the_test_split(trial.run_trial, data.resolve_source(str(mnist_dir)), events)
    )
    cfg = load_sweep(
        DEFAULT_SWEEP,
        [
            f'data.path="{mnist_dir}"',
            "study.trials=2",
            "train.epochs=1",
            "data.train_limit=1000",
            "data.validation=500",
        ],
    )
    source, split = preflight.prepare(cfg, training=True)
    assert sweep.run(cfg, source=source, split=split, echo=lambda line, final=False: None, finalize=True) == 0
    first, last = events.index("trial"), len(events) - 1 - events[::-1].index("trial")
    # Two trials and the lecture's reference run (baseline.py), which trains through run_trial too.
    assert events[first : last + 2] == ["trial", "refused"] * 3, "each trial was refused the test set"
    assert events[last + 2 :] == ["read test"], "the test split is read once after the trials, to score it"
    # Before the trials: the training images decoded once, and the test files' form checked (read, dropped).
    assert events[:first].count("read train") == 1 and set(events[:first]) <= {"read train", "read test"}


def test_replay_never_reads_the_test_split(tmp_path: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An absolute tracking URI: MLflow keeps one store per URI in a process, and a relative one names another
    # test's file once an earlier test has used it.
    keys = [f'data.path="{mnist_dir}"', f'tracking.uri="{tracking_url(tmp_path)}"']
    shrink = [
        *(f for key in keys for f in ("--set", key)),
        *absolute_stores(tmp_path),
        *small_sweep_args(trials=1, train_limit=500, validation=200),
    ]
    worker = run_in_process("worker", str(DEFAULT_SWEEP), *shrink, cwd=tmp_path, data=mnist_dir)
    assert worker.returncode == 0, worker.stderr
    (run,) = [r for r in all_runs(tmp_path) if r.data.tags.get("mnist_sweep.role") == "trial"]
    monkeypatch.chdir(tmp_path)
    events: list[str] = []
    monkeypatch.setattr(
        replay, "run_trial", reaching_for_the_test_split(replay.run_trial, data.resolve_source(str(mnist_dir)), events)
    )
    said: list[str] = []

    assert replay.replay(load_sweep(DEFAULT_SWEEP, keys), run.info.run_id, echo=said.append) == 0

    assert events == ["trial", "refused"], "replay's trial was refused the test set"
    assert len(said) == 2 and all("difference" in line for line in said), said


def test_only_finalize_reads_the_test_set_and_a_scored_study_takes_no_more_trials(
    tmp_path: Path, mnist_dir: Path
) -> None:
    # Each command through the CLI's main in this process: their exit codes and lines are what this checks.
    args = [
        str(DEFAULT_SWEEP),
        *absolute_stores(tmp_path),
        *small_sweep_args(trials=2, train_limit=1000, validation=500),
    ]

    def run_cli(*command: str) -> subprocess.CompletedProcess[str]:
        return run_in_process(*command, cwd=tmp_path, data=mnist_dir)

    broken = unreadable_test_images(mnist_dir, tmp_path / "inputs")

    # The test files' form is checked before any trial (issue 10): a broken one stops the sweep at once,
    # not after every trial has trained. Trials never get the pixels: `load_test_split` refuses while they run.
    refused_early = run_cli("worker", *args, "--data", str(broken))

    assert refused_early.returncode == 2, refused_early.stderr
    assert "t10k-images-idx3-ubyte.gz" in refused_early.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "mlruns").exists(), "a refused sweep wrote something"

    trained = run_cli("worker", *args)
    cannot_score = run_cli("finalize", *args, "--data", str(broken))

    assert trained.returncode == 0, trained.stderr
    assert cannot_score.returncode == 2, cannot_score.stderr
    assert "t10k-images-idx3-ubyte.gz" in cannot_score.stderr.strip().splitlines()[-1]
    assert "fcn.test-seal" not in optuna.get_all_study_names(storage_url(tmp_path)), "a failed score sealed it"

    scored = run_cli("finalize", *args)
    more_trials = [run_cli(command, *args, "--trials", "3") for command in ("run", "worker")]

    assert scored.returncode == 0, scored.stderr
    for refused in more_trials:
        lines = refused.stderr.strip().splitlines()
        assert refused.returncode == 2, refused.stderr
        assert len(lines) == 1, refused.stderr
        assert "start a new study name" in lines[0]
        assert "study.name=fcn-2" in lines[0]
    assert len(load_study(tmp_path).trials) == 2
    assert "test_accuracy" in parent_run(all_runs(tmp_path)).data.metrics
