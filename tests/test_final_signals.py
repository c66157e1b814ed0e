"""Signals that land while `finalize` scores the test set or writes the report, in the real CLI.

A signal is timed by the finalizing process itself (a wrapper around the CLI's `main` sends it to itself at
the named moment), so it lands exactly there every run: a Ctrl-C pressed twice while the test set is being
predicted, SIGTERM twice once the test numbers are in MLflow but not yet on the study, Ctrl-C twice with
report.html half written. The first signal of each pair is deferred to a safe point; the second acts at once.
Afterwards: the result is recorded everywhere or nowhere, the report files are whole, and a rerun finishes
the record without scoring the test set a second time.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import cli_environment, required_mnist, small_sweep_args, write_sweep
from tests.in_process import absolute_stores, run_in_process
from tests.stores import all_runs, parent_run, storage_url, tracking_url

pytestmark = [pytest.mark.slow, pytest.mark.subprocess]

# The CLI's own main, with one moment made to signal this process twice. Patched where the libraries are,
# not in mnist_sweep, so the moment is the same whatever mnist_sweep's own code looks like.
SIGNALLED_MAIN = """
import builtins, io, os, signal, sys

moment, signum = sys.argv.pop(1), signal.Signals[sys.argv.pop(1)]

def twice():
    os.kill(os.getpid(), signum)  # recorded, acted on at the next safe point
    os.kill(os.getpid(), signum)  # acts at once: KeyboardInterrupt, or SIGTERM's default, the end

if moment == "predicting":
    import keras
    predict = keras.Model.predict
    def signalled_predict(self, *args, **kwargs):
        twice()
        return predict(self, *args, **kwargs)
    keras.Model.predict = signalled_predict
elif moment == "logged-to-mlflow":
    from mlflow.tracking import MlflowClient
    log_batch = MlflowClient.log_batch
    def signalled_log_batch(self, run_id, metrics=(), *args, **kwargs):
        log_batch(self, run_id, metrics, *args, **kwargs)
        if any(m.key == "test_accuracy" for m in metrics):
            twice()
    MlflowClient.log_batch = signalled_log_batch
elif moment == "writing-report":
    opened = io.open
    class HalfWritten:
        def __init__(self, file):
            self.file = file
        def __getattr__(self, name):
            return getattr(self.file, name)
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.file.close()
        def write(self, text):
            self.file.write(text[: len(text) // 2])
            self.file.flush()
            twice()
            return self.file.write(text[len(text) // 2 :])
    def signalled_open(file, mode="r", *args, **kwargs):
        handle = opened(file, mode, *args, **kwargs)
        writing = any(c in mode for c in "wxa") and "report.html" in os.fspath(file)
        return HalfWritten(handle) if writing else handle
    builtins.open = io.open = signalled_open

from mnist_sweep.cli import main
sys.exit(main())
"""


def signalled_finalize(
    work: Path, sweep: Path, moment: str, signum: signal.Signals
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", SIGNALLED_MAIN, moment, signum.name, "finalize", str(sweep)]
    return subprocess.run(
        command, cwd=work, env=cli_environment(required_mnist()), capture_output=True, text=True, timeout=300
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(working folder, sweep file) of a study with two trained trials and an unscored test set."""
    folder = tmp_path_factory.mktemp("trained")
    sweep = write_sweep(folder, "")
    work = folder / "work"
    work.mkdir()
    trials = small_sweep_args("--set", "study.baseline=false", trials=2, train_limit=1000, validation=500)
    result = run_in_process("worker", str(sweep), *trials, *absolute_stores(work), cwd=work, data=required_mnist())
    assert result.returncode == 0, result.stderr
    return work, sweep


def finalize(work: Path, sweep: Path) -> subprocess.CompletedProcess[str]:
    """`mnist-sweep finalize` run to its end (in this process: signals are sent to the signalled ones only)."""
    return run_in_process("finalize", str(sweep), *absolute_stores(work), cwd=work, data=required_mnist())


def seal(work: Path) -> dict[str, object] | None:
    """The seal's user attributes (the claim), or None while the test set is unclaimed."""
    try:
        return dict(optuna.load_study(study_name="fcn.test-seal", storage=storage_url(work)).user_attrs)
    except KeyError:
        return None


def scored_accuracies(work: Path) -> list[float]:
    parent = parent_run(all_runs(work))
    return [m.value for m in MlflowClient(tracking_url(work)).get_metric_history(parent.info.run_id, "test_accuracy")]


def recorded(work: Path) -> object:
    return optuna.load_study(study_name="fcn", storage=storage_url(work)).user_attrs.get("test_result")


def test_signals_while_the_test_set_is_scored_record_it_everywhere_or_nowhere_and_once(
    trained: tuple[Path, Path],
) -> None:
    work, sweep = trained

    stopped = signalled_finalize(work, sweep, "predicting", signal.SIGINT)  # Ctrl-C twice before a result

    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr and "rerun to resume" in stopped.stderr
    assert recorded(work) is None and scored_accuracies(work) == []
    assert seal(work) is None, "the claim of a finalize stopped before scoring was kept"

    killed = signalled_finalize(work, sweep, "logged-to-mlflow", signal.SIGTERM)  # in MLflow, not on the study

    assert killed.returncode == -signal.SIGTERM, killed.stderr
    assert recorded(work) is None and len(scored_accuracies(work)) == 1
    sealed = seal(work)
    assert sealed is not None and "test_result" in sealed, "the result of a claimant that died is lost"

    rerun = finalize(work, sweep)

    assert rerun.returncode == 0, rerun.stderr
    assert "nothing scored again" in rerun.stdout
    assert recorded(work) == sealed["test_result"]
    assert len(scored_accuracies(work)) == 1, "the test set was scored a second time"
    (report,) = (work / "reports").rglob("test_metrics.json")
    assert json.loads(report.read_text())["scored_at"] == sealed["test_result"]["scored_at"]  # type: ignore[index]


def test_a_report_being_written_when_finalize_is_stopped_stays_whole(trained: tuple[Path, Path]) -> None:
    work, sweep = trained
    page = work / "reports" / "fcn" / "report.html"
    if not page.exists():  # run alone: the study is scored first
        assert finalize(work, sweep).returncode == 0
    before = page.read_bytes()

    stopped = signalled_finalize(work, sweep, "writing-report", signal.SIGINT)

    assert stopped.returncode == 130, stopped.stderr
    assert "Traceback" not in stopped.stderr
    assert page.read_bytes() == before, "report.html was left half written"
    assert not [p.name for p in (work / "reports").rglob("*") if p.name.endswith(".partial")]

    rerun = finalize(work, sweep)

    assert rerun.returncode == 0, rerun.stderr
    assert page.read_text(encoding="utf-8").rstrip().endswith("</html>")
    assert len(scored_accuracies(work)) == 1
