"""The test set is scored only when no trial can still change the choice (issue 24).

In one process, with real stores: which trials are live, the refusal, the wait (its quiet period on a fake
clock), a worker that stops at the seal, and a trial finishing after the seal never chosen. Then for real:
workers training one study while `finalize` is refused and two `finalize --wait` race, on sqlite and PostgreSQL.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState, create_trial
from rich.console import Console as RichConsole

import mnist_sweep.trial
from mnist_sweep import live, preflight, sweep
from mnist_sweep.config import SweepConfig, load_sweep
from mnist_sweep.console import NO_PROGRESS, LiveProgress
from mnist_sweep.errors import TrialsLiveError
from mnist_sweep.final import choose_trial, seal_name
from mnist_sweep.ledger import StudyLedger
from mnist_sweep.records import MODEL_URI_KEY, RUN_ID_ATTR, TestResult
from mnist_sweep.report import after_seal_line
from mnist_sweep.study import StudyContext, make_storage, open_study
from mnist_sweep.tracking import Tracker
from tests.conftest import DEFAULT_SWEEP, CliRunner, CliStarter, cli_environment, sweep_args
from tests.stores import (
    all_runs,
    assert_nothing_running,
    assert_runs_linked,
    assert_scored_once,
    raw_trials,
    storage_url,
    wait_for,
)
from tests.test_console import rendered
from tests.test_trial_loop import sweep_config

COMPLETE, RUNNING = TrialState.COMPLETE, TrialState.RUNNING


class Stores:
    """The study, its tracker and ledger (on its parent run), as `sweep.finalize` opens them."""

    def __init__(self, cfg: SweepConfig) -> None:
        self.cfg = cfg
        self.storage = make_storage(cfg.study)
        self.tracker = Tracker(uri=cfg.tracking.uri, artifacts=cfg.tracking.artifacts, experiment=cfg.study.name)
        self.study, created = open_study(cfg, self.storage)
        self.ledger = StudyLedger.open(self.study, self.tracker, created=created, config=cfg.to_dict())
        self.context = StudyContext(self.study, self.storage, self.ledger)

    def waiting(self, clock: Callable[[], float], lines: list[str], *, target: int) -> live.Waiting:
        return live.Waiting(
            self.context,
            metric="val_accuracy",
            target=target,
            quiet_seconds=10,
            echo=lambda line, final=False: lines.append(line),
            clock=clock,
        )


def test_a_live_trial_is_refused_in_one_line_naming_it_and_a_dead_workers_trial_is_closed(tmp_path: Path) -> None:
    stores = Stores(sweep_config(tmp_path, "study.heartbeat_seconds=1"))
    live_trial = stores.study.ask()
    dead = stores.study.ask()
    stores.storage.record_heartbeat(dead._trial_id)  # its worker beat once, then died
    run_id = stores.ledger.start_trial_run(trial_number=live_trial.number, params={})
    live_trial.set_user_attr(RUN_ID_ATTR, run_id)
    time.sleep(3)  # past the grace period (2 heartbeats of 1 s): the dead worker's trial is stale

    with pytest.raises(TrialsLiveError) as refused:
        live.settle_before_scoring(
            context=stores.context,
            metric="val_accuracy",
            target=2,
            wait=False,
            quiet_seconds=10,
            poll_seconds=0.1,
            echo=lambda line, final=False: None,
            progress=NO_PROGRESS,
        )

    line = str(refused.value)
    assert "\n" not in line
    worker = MlflowClient(stores.cfg.tracking.uri).get_run(run_id).data.tags["worker"]  # who trains it
    assert f"trial {live_trial.number} (worker {worker})" in line
    assert f"trial {dead.number} " not in line
    assert "--wait" in line and "nothing was sealed" in line
    assert stores.study.get_trials()[dead.number].state == TrialState.FAIL, "the dead worker's trial blocks"
    assert seal_name("fcn") not in optuna.get_all_study_names(stores.storage)


def test_the_wait_ends_once_nothing_trains_and_below_target_once_nothing_started_for_the_quiet_period(
    tmp_path: Path,
) -> None:
    stores = Stores(sweep_config(tmp_path, "study.heartbeat_seconds=1"))
    now = [0.0]
    lines: list[str] = []
    waiting = stores.waiting(lambda: now[0], lines, target=3)
    progress = NO_PROGRESS

    first = stores.study.ask()
    assert waiting.settled(progress) is None
    assert lines[-1].startswith(f"waiting for trial {first.number} (")
    stores.study.tell(first, 0.5)
    now[0] = 9.0
    assert waiting.settled(progress) is None, "scored in a worker's gap between two trials"
    second = stores.study.ask()  # the worker goes on
    now[0] = 15.0
    assert waiting.settled(progress) is None
    stores.study.tell(second, 0.6)
    now[0] = 24.0
    assert waiting.settled(progress) is None, "the quiet period counts from the last trial seen training"
    assert "no worker has started another for 10 s" in lines[-1]
    now[0] = 26.0
    assert waiting.settled(progress) is True

    at_target = stores.waiting(lambda: 0.0, [], target=2)  # no worker starts a trial past the target
    assert at_target.settled(progress) is True


def test_the_live_display_names_the_trials_waited_for_above_the_study_row() -> None:
    progress = LiveProgress(RichConsole(file=io.StringIO()))
    progress.waiting(
        trials=["trial 3 (worker host-a:41)", "trial 4 (worker host-b:7)"],
        metric="val_accuracy",
        finished=2,
        target=4,
        best=0.91,
    )
    try:
        text = rendered(progress)
    finally:
        progress.close()
    waited = r"trial 3 \(worker host-a:41\), trial 4 \(worker host-b:7\)"
    assert re.search(rf"waiting\s+for other workers\s+{waited}\s*\n", text), text
    assert re.search(r"study\s+2/4 trials done\s+\S+\s+best val_accuracy 0\.9100", text), text


def test_a_worker_on_a_study_sealed_while_it_trains_starts_no_more_trials(
    tmp_path: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = load_sweep(
        DEFAULT_SWEEP,
        [
            f'data.path="{mnist_dir}"',
            "study.trials=3",
            "train.epochs=1",
            "data.train_limit=300",
            "data.validation=200",
            "model.hidden=[16]",
            "study.baseline=false",
        ],
    )
    storage = make_storage(cfg.study)
    real_run_trial = mnist_sweep.trial.run_trial

    def sealed_during_the_first_trial(**kwargs: Any) -> Any:
        if seal_name("fcn") not in optuna.get_all_study_names(storage):  # a finalize takes the seal meanwhile
            optuna.create_study(study_name=seal_name("fcn"), storage=storage)
        return real_run_trial(**kwargs)

    monkeypatch.setattr(mnist_sweep.trial, "run_trial", sealed_during_the_first_trial)
    lines: list[str] = []
    source, split = preflight.prepare(cfg, training=True)

    code = sweep.run(cfg, source=source, split=split, echo=lambda line, final=False: lines.append(line), finalize=False)

    assert code == 0
    assert [t.state for t in optuna.load_study(study_name="fcn", storage=storage).trials] == [COMPLETE]
    assert lines[-1] == "study 'fcn' is sealed (its test set scored): this process starts no more trials"


def test_a_better_trial_that_finished_after_the_seal_is_never_chosen_and_the_report_counts_it() -> None:
    study = optuna.create_study(direction="maximize")
    for number, value in enumerate([0.7, 0.8, 0.95]):  # trial 2 was asked for just before the seal
        attrs = {RUN_ID_ATTR: f"run-{number}", MODEL_URI_KEY: f"models:/m-{number}"}
        study.add_trial(create_trial(state=COMPLETE, value=value, user_attrs=attrs))

    chosen = choose_trial(study, "val_accuracy", counted=(0, 1))

    assert chosen.number == 1
    assert after_seal_line(study, _result(counted=(0, 1))) == (
        "trials finished after the seal: 1 (trials 2; recorded, never chosen: the chosen trial was ranked among "
        "the 2 finished when it was scored)"
    )
    assert after_seal_line(study, _result(counted=(0, 1, 2))).startswith("trials finished after the seal: 0 (")
    assert after_seal_line(study, _result(counted=None)) is None  # scored before the counted trials were recorded


def _result(counted: tuple[int, ...] | None) -> TestResult:
    return TestResult.from_dict(
        {
            "study": "fcn",
            "trial_number": 1,
            "run_id": "run-1",
            "model_uri": "models:/m-1",
            "params": {},
            "metric": "val_accuracy",
            "val_loss": None,
            "val_accuracy": 0.8,
            "epochs_trained": 1,
            "test_images": 10,
            "test_loss": 0.5,
            "test_accuracy": 0.8,
            "test_accuracy_ci95": [0.5, 0.9],
            "test_confusion_matrix": [[1]],
            "test_per_class": [],
            "scored_at": "2026-12-06T00:00:00+00:00",
            "scored_by": "host:1",
            **({} if counted is None else {"counted_trials": list(counted)}),
        }
    )


# --------------------------------------------------------------------------- real workers, real finalizers


def live_sweep_args(storage: str) -> list[str]:
    """Two trials on a few hundred images (no pruning: each trial runs its epochs). A trial waits at the gate for
    as long as the finalizers take to start: 10 s heartbeats keep a loaded machine's late beat from failing it as
    stale (no worker dies here)."""
    settings = ("model.hidden=[32]", 'study.pruner="none"', "study.heartbeat_seconds=10", f'study.storage="{storage}"')
    return sweep_args(*settings, trials=2, train_limit=300, validation=200, epochs=2)


# The CLI's own main, whose trials wait at a gate once they have their MLflow run: they are training, as far as
# any other process can tell, until the test opens the gate (a file), so `finalize` meets them training however
# slow the machine is, and no trial trains longer than that. Patched in Optuna, not in mnist_sweep, so the
# moment is the same whatever mnist_sweep's own code looks like.
GATED_WORKER = """
import sys, time
from pathlib import Path
import optuna

gate = Path(sys.argv.pop(1))
set_user_attr = optuna.trial.Trial.set_user_attr

def held_once_it_has_its_run(self, key, value):
    set_user_attr(self, key, value)
    while key == "mlflow_run_id" and not gate.exists():
        time.sleep(0.1)

optuna.trial.Trial.set_user_attr = held_once_it_has_its_run
from mnist_sweep.cli import main
sys.exit(main())
"""


def gated_worker(gate: Path, args: list[str], *, cwd: Path, data: Path) -> subprocess.Popen[str]:
    """`mnist-sweep worker ARGS` whose trials wait at `gate` (GATED_WORKER)."""
    command = [sys.executable, "-c", GATED_WORKER, str(gate), "worker", *args]
    return subprocess.Popen(
        command, cwd=cwd, env=cli_environment(data), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def said_until(process: subprocess.Popen[str], sign: str) -> str:
    """What `process` printed up to its first line holding `sign` (all it printed, if it ended first)."""
    assert process.stdout is not None
    said = ""
    for line in process.stdout:
        said += line
        if sign in line:
            break
    return said


def running_with_run(storage: str, folder: Path) -> list[int]:
    """The RUNNING trials that have their MLflow run (they are training), read as a user would: the sqlite
    file read-only (polling must not create or lock it), PostgreSQL through Optuna."""
    if storage.startswith("sqlite"):
        trials = raw_trials(folder)
        return [t["number"] for t in trials if t["state"] == "RUNNING" and RUN_ID_ATTR in t["attrs"]]
    try:
        study = optuna.load_study(study_name="fcn", storage=storage)
    except KeyError:
        return []
    return [t.number for t in study.get_trials(states=(RUNNING,)) if RUN_ID_ATTR in t.user_attrs]


def best_of(study: optuna.Study, numbers: list[int]) -> int:
    """The best complete trial among `numbers` (val_accuracy, ties to the earlier)."""
    complete = [t for t in study.trials if t.number in numbers and t.state == COMPLETE]
    return min(complete, key=lambda t: (-(t.value or 0.0), t.number)).number


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def test_finalize_while_workers_train_is_refused_then_two_waiting_finalizers_score_the_best_once(
    backend: str,
    tmp_path: Path,
    mnist_dir: Path,
    start_cli: CliStarter,
    run_cli: CliRunner,
    request: pytest.FixtureRequest,
) -> None:
    storage = storage_url(tmp_path) if backend == "sqlite" else request.getfixturevalue("postgres_database")
    args, gate = live_sweep_args(storage), tmp_path / "gate"
    workers = [gated_worker(gate, args, cwd=tmp_path, data=mnist_dir) for _ in range(2)]
    finalizers: list[subprocess.Popen[str]] = []
    try:
        wait_for(lambda: running_with_run(storage, tmp_path), process=workers[0], timeout=600)

        refused = run_cli("finalize", *args)
        still_training = running_with_run(storage, tmp_path)
        sealed_when_refused = seal_name("fcn") in optuna.get_all_study_names(storage)
        finalizers += [start_cli("finalize", *args, "--wait") for _ in range(2)]
        waited = [said_until(process, "waiting for trial ") for process in finalizers]
        gate.touch()  # the trials train on, and end
        outputs = [said + _ended(process) for said, process in zip(waited, finalizers, strict=True)]
        worker_outputs = [_ended(process) for process in workers]
    finally:
        gate.touch()
        for process in [*workers, *finalizers]:
            if process.poll() is None:
                process.kill()

    assert refused.returncode == 2, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    named = [int(n) for n in re.findall(r"trial (\d+) \(worker [^)]+\)", refused.stderr)]
    assert named and still_training, "the workers were not training while finalize ran"
    assert "--wait" in refused.stderr and "test accuracy" not in refused.stdout
    assert not sealed_when_refused, "a refused finalize sealed the study"

    study = optuna.load_study(study_name="fcn", storage=storage)
    finished = [t.number for t in study.get_trials(states=(COMPLETE, TrialState.PRUNED))]
    assert len(finished) >= 2 and set(named) <= set(finished), "a trial was lost"
    result = TestResult.from_dict(study.user_attrs["test_result"])
    assert result.counted_trials == tuple(sorted(finished)), "a trial finished after the seal"
    assert result.trial_number == best_of(study, finished)
    runs = all_runs(tmp_path)
    assert_nothing_running(study, runs)
    assert_runs_linked(study, runs)
    assert_scored_once(tmp_path, study, runs, outputs)
    assert all("waiting for trial " in out for out in outputs), outputs
    assert "starts no more trials" not in "".join(worker_outputs)
    report = (tmp_path / "reports" / "fcn" / "report.md").read_text()
    assert "trials finished after the seal: 0 (" in report


def _ended(process: subprocess.Popen[str]) -> str:
    out, err = process.communicate(timeout=900)
    assert process.returncode == 0, f"{process.args} exited {process.returncode}:\n{out}\n{err}"
    return out
