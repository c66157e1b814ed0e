"""Processes told apart across hosts and containers: a claim or a run of another process is ended only when its
end is proven (this host's PID namespace) or its heartbeat is stale, never because its host:pid is not running
here. Containers that share a hostname (compose's network_mode: host, k8s' hostNetwork) each number their
processes from 1: patched identities stand in for them."""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest

from mnist_sweep import final, processes, study
from mnist_sweep.dead_runs import close_stale_runs
from mnist_sweep.ledger import StudyLedger
from mnist_sweep.processes import ProcessId, this_process
from mnist_sweep.records import CLAIM_HEARTBEAT_ATTR, CLAIMED_AT_ATTR, CLAIMED_BY_ATTR, RUN_ID_ATTR
from mnist_sweep.tracking import Tracker
from tests.conftest import cli_environment, required_mnist, small_sweep_args, write_sweep
from tests.in_process import absolute_stores, run_in_process
from tests.stores import all_runs, assert_scored_once, load_study, storage_url, tracking_url


def dead_pid() -> int:
    """A pid of this namespace whose process has ended (and been reaped)."""
    ended = subprocess.Popen(["true"])
    ended.wait()
    return ended.pid


def other_container(pid: int, token: str = "0123456789ab", namespace: str = "4026539999") -> ProcessId:
    """A process of another container on this host, with this hostname: its own PID namespace, its own `pid`."""
    me = this_process()
    assert namespace != me.namespace
    return ProcessId(me.host, pid, token, me.boot, namespace, "12345")


def ended_here(pid: int) -> ProcessId:
    """A process of this host and PID namespace that has ended."""
    me = this_process()
    return ProcessId(me.host, pid, "deadbeef0000", me.boot, me.namespace, "12345")


@pytest.mark.subprocess
def test_only_a_process_of_this_pid_namespace_can_be_proven_ended() -> None:
    me, parent = this_process(), os.getppid()
    alive = ProcessId(me.host, parent, "aaaaaaaaaaaa", me.boot, me.namespace, processes._started(parent))
    gone = dead_pid()
    assert me.token and me.boot and me.namespace and me.started  # Linux: every part known
    assert ProcessId.decode(me.encode()) == me
    assert processes.ended(ended_here(gone))
    assert processes.ended(ProcessId(me.host, parent, "b" * 12, me.boot, me.namespace, "1"))  # the pid is reused
    assert not processes.ended(alive)
    assert not processes.ended(me)
    assert not processes.ended(other_container(gone)), "a pid not running here proves nothing of another container"
    assert not processes.ended(ProcessId(me.host, gone))  # an older record, host:pid alone: unknown
    assert ProcessId.decode(f"{me.host}:{gone}") == ProcessId(me.host, gone)


# --------------------------------------------------------------------------- the test-set claim


def claimed(storage: str, claimant: ProcessId, heartbeat: datetime.datetime | None) -> None:
    seal = optuna.create_study(study_name="fcn.test-seal", storage=storage)
    if heartbeat is not None:
        seal.set_user_attr(CLAIM_HEARTBEAT_ATTR, heartbeat.isoformat(timespec="seconds"))
    seal.set_user_attr(CLAIMED_BY_ATTR, claimant.encode())
    seal.set_user_attr(CLAIMED_AT_ATTR, "2026-01-01T00:00:00+00:00")


def claim_attrs(storage: str) -> dict[str, object]:
    return dict(optuna.load_study(study_name="fcn.test-seal", storage=storage).user_attrs)


def claimant_of(storage: str) -> str:
    return str(claim_attrs(storage)[CLAIMED_BY_ATTR])


# Heartbeats as ages, read off the clock when a test runs: a time taken at import is minutes old by the time
# a test late in a long run uses it, and a "fresh" beat would then be stale.
FRESH_AGE, STALE_AGE = 0.0, final.CLAIM_STALE_SECONDS + 60


def beat_aged(seconds: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds)


STALE = beat_aged(STALE_AGE)  # stale at import, staler later


@pytest.mark.parametrize(
    ("claimant", "heartbeat_age", "taken", "why"),
    [
        (lambda: other_container(dead_pid()), FRESH_AGE, False, ""),
        (lambda: other_container(dead_pid()), STALE_AGE, True, "whose heartbeat stopped"),
        (lambda: ended_here(dead_pid()), FRESH_AGE, True, "a process that no longer runs on this host"),
    ],
    ids=["live-in-another-container", "stale-heartbeat", "ended-on-this-host"],
)
@pytest.mark.subprocess
def test_a_claim_is_taken_over_only_when_its_claimant_is_proven_ended_or_its_heartbeat_is_stale(
    tmp_path: Path, claimant: object, heartbeat_age: float, taken: bool, why: str
) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    other: ProcessId = claimant()  # type: ignore[operator]
    claimed(storage, other, beat_aged(heartbeat_age))
    said: list[str] = []

    assert final._claim(optuna.storages.RDBStorage(storage), "fcn", reclaim=False, echo=said.append) is taken

    assert claimant_of(storage) == (this_process().encode() if taken else other.encode())
    assert (said == []) if not taken else (len(said) == 1 and why in said[0] and other.label in said[0])


def test_the_claimants_heartbeat_stays_fresh_while_it_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    claimed(storage, this_process(), STALE)  # its last beat long ago, as if scoring had taken that long
    monkeypatch.setattr(final, "CLAIM_HEARTBEAT_SECONDS", 0.05)

    with final._claim_heartbeat(optuna.storages.RDBStorage(storage), "fcn"):
        deadline = time.monotonic() + 120  # a generous bound for a loaded machine, not a timing check
        while claim_attrs(storage)[CLAIM_HEARTBEAT_ATTR] == STALE.isoformat(timespec="seconds"):
            assert time.monotonic() < deadline, "the claimant never beat"
            time.sleep(0.05)

    assert final._abandoned(claim_attrs(storage), waited=0.0) is None


def test_a_claim_never_completed_is_judged_by_how_long_it_was_watched() -> None:
    attrs: dict[str, object] = {}  # the seal was created; its claimant died before writing anything
    assert final._abandoned(attrs, waited=1.0) is None
    assert final._abandoned(attrs, waited=final.CLAIM_STALE_SECONDS + 1) is not None


# --------------------------------------------------------------------------- dead trial runs


@pytest.mark.parametrize(
    ("worker", "closed"),
    [(lambda: other_container(dead_pid()), False), (lambda: ended_here(dead_pid()), True)],
    ids=["live-in-another-container", "ended-on-this-host"],
)
@pytest.mark.subprocess
def test_a_run_storing_its_artifacts_is_closed_only_when_its_worker_provably_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, worker: object, closed: bool
) -> None:
    """A COMPLETE trial whose run is still RUNNING: its worker may be storing the artifacts (BackgroundUploads)."""
    process: ProcessId = worker()  # type: ignore[operator]
    tracker = Tracker(uri=tracking_url(tmp_path), artifacts=str(tmp_path / "mlruns" / "artifacts"), experiment="fcn")
    # The tags that worker wrote on its trial run (placement.worker_tags, in that process).
    monkeypatch.setattr(StudyLedger, "_machine_tags", {"worker": process.label, "worker.process": process.encode()})
    ledger = StudyLedger.create(tracker, study_name="fcn", config={})
    run_id = ledger.start_trial_run(trial_number=0, params={"units": 8})
    storage = optuna.storages.RDBStorage(storage_url(tmp_path))
    optuna_study = optuna.create_study(study_name="fcn", storage=storage)
    trial = optuna_study.ask()
    trial.set_user_attr(RUN_ID_ATTR, run_id)
    optuna_study.tell(trial, 0.9)

    assert close_stale_runs(study.StudyContext(optuna_study, storage, ledger)) == int(closed)

    assert tracker.run_status(run_id) == ("KILLED" if closed else "RUNNING")


# --------------------------------------------------------------------------- two finalize processes


AS_CONTAINER = """
import os, sys, time
from pathlib import Path
from mnist_sweep import final, processes

pid, token, namespace, gate = int(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4])
me = processes.this_process()
processes._cached = (os.getpid(), processes.ProcessId(me.host, pid, token, me.boot, namespace, "777"))
if token == "aaaaaaaaaaaa":  # the first: holds its claim until the test lets it score
    evaluate = final._evaluate
    def held(*args):
        (gate / "claimed").touch()
        while not (gate / "go").exists():
            time.sleep(0.1)
        return evaluate(*args)
    final._evaluate = held
sys.argv = ["mnist-sweep", *sys.argv[5:]]
from mnist_sweep.cli import main
sys.exit(main())
"""


def as_container(
    pid: int, token: str, namespace: str, gate: Path, *args: str, cwd: Path, data: Path
) -> subprocess.Popen[str]:
    """`mnist-sweep ARGS` as process `pid` of a container with this hostname and its own PID namespace."""
    command = [sys.executable, "-c", AS_CONTAINER, str(pid), token, namespace, str(gate), *args]
    return subprocess.Popen(
        command, cwd=cwd, env=cli_environment(data), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_containers_sharing_a_hostname_and_a_pid_score_the_test_set_once(tmp_path: Path) -> None:
    data = required_mnist()
    shared = dead_pid()  # both containers' finalize has this pid; in this namespace it runs nothing
    sweep = write_sweep(tmp_path, "")
    work, gate = tmp_path / "work", tmp_path / "gate"
    work.mkdir()
    gate.mkdir()
    shrunk = small_sweep_args(trials=1, train_limit=500, validation=200)
    trained = run_in_process("worker", str(sweep), *shrunk, *absolute_stores(work), cwd=work, data=data)
    assert trained.returncode == 0, trained.stderr

    first = as_container(shared, "aaaaaaaaaaaa", "4026539001", gate, "finalize", str(sweep), cwd=work, data=data)
    deadline = time.monotonic() + 300
    while not (gate / "claimed").exists():
        assert first.poll() is None and time.monotonic() < deadline, first.communicate()
        time.sleep(0.1)
    second = as_container(shared, "bbbbbbbbbbbb", "4026539002", gate, "finalize", str(sweep), cwd=work, data=data)
    waited = ""
    assert second.stdout is not None
    for line in second.stdout:  # it must wait for the first, whose pid runs nothing in this namespace
        waited += line
        if "waiting for its result" in line or "test accuracy" in line:
            break
    (gate / "go").touch()
    outputs = [process.communicate(timeout=300) for process in (first, second)]

    assert first.returncode == 0 and second.returncode == 0, outputs
    assert "waiting for its result" in waited and "taking over" not in waited + outputs[1][0], waited + outputs[1][0]
    study_ = load_study(work)
    assert study_.user_attrs["test_result"]["scored_by"] == f"{this_process().host}:{shared}/aaaaaaaaaaaa"
    assert_scored_once(work, study_, all_runs(work), [waited + outputs[1][0], outputs[0][0]])
