"""The test split is read only after every trial, by the final step; trials cannot reach it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mnist_sweep import data, preflight, study, sweep
from mnist_sweep.config import load_sweep
from tests.conftest import DEFAULT_SWEEP

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
