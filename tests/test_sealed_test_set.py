"""The sealed test set: read only after every trial, by the final step; trials cannot reach it, and a scored
study takes no more trials."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna
import pytest

from mnist_sweep import data, preflight, study, sweep
from mnist_sweep.config import load_sweep
from tests.conftest import DEFAULT_SWEEP, CliRunner, small_sweep_args, unreadable_test_images
from tests.stores import all_runs, load_study, parent_run, storage_url

pytestmark = pytest.mark.slow


def test_trials_never_read_the_test_split(tmp_path: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    events: list[str] = []
    data.CACHE.clear()  # an earlier test may have read these files: this one counts the reads
    real_read_part, real_call = data.read_part, study.Objective.__call__

    def read_part(source: data.DataSource, part: str) -> Any:
        events.append(f"read {part}")
        return real_read_part(source, part)

    def objective_call(self: study.Objective, trial: Any) -> float:
        events.append("trial")
        # a trial that reaches for the test images is refused
        with pytest.raises(data.SealedTestSetError), data.sealed_test_set():
            data.load_test_split(data.resolve_source(str(mnist_dir)))
        return real_call(self, trial)

    monkeypatch.setattr(data, "read_part", read_part)
    monkeypatch.setattr(study.Objective, "__call__", objective_call)
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
    assert events[first : last + 1] == ["trial", "trial"], "nothing is read while trials run"
    assert events[last + 1 :] == ["read test"], "the test split is read once after the trials, to score it"
    # Before the trials: the training images decoded once, and the test files' form checked (read, dropped).
    assert events[:first].count("read train") == 1 and set(events[:first]) <= {"read train", "read test"}


def test_only_finalize_reads_the_test_set_and_a_scored_study_takes_no_more_trials(
    tmp_path: Path, run_cli: CliRunner, mnist_dir: Path
) -> None:
    args = [str(DEFAULT_SWEEP), *small_sweep_args(trials=2, train_limit=1000, validation=500)]
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
