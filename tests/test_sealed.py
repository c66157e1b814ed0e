"""The sealed test set: only finalize reads the test images, and a scored study takes no more trials."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import optuna
import pytest

from tests.conftest import DEFAULT_SWEEP, CliRunner, small_sweep_args
from tests.stores import all_runs, load_study, parent_run, storage_url


def unreadable_test_images(mnist_dir: Path, folder: Path) -> Path:
    """MNIST whose test images keep a valid header but lose their pixels."""
    copy = folder / "mnist"
    shutil.copytree(mnist_dir, copy)
    images = copy / "t10k-images-idx3-ubyte.gz"
    images.chmod(0o644)
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:1000]))
    return copy


@pytest.mark.slow
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
