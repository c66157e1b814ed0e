"""A bad day: a full disk, a corrupt store, no data source, a tampered model, a dead claim, late signals.

Each fault ends in one line and a known exit code, never a traceback, and nothing recorded is lost.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path

import optuna
import pytest

from mnist_sweep.processes import ProcessId, this_process
from tests.conftest import CliRunner, CliStarter, cli_here, required_mnist, small_sweep_args, write_sweep
from tests.stores import storage_url, tracking_url


def one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    # TensorFlow's C++ start-up lines ("E0000 ... cuInit") are not ours; the backends work quiets them.
    lines = [line for line in result.stderr.strip().splitlines() if not re.match(r"[EWIF]\d{4} ", line)]
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("mnist-sweep: "), result.stderr
    return lines[0]


def finished_trials(folder: Path) -> list[int]:
    if not (folder / "mlruns" / "optuna.db").exists():
        return []
    try:
        study = optuna.load_study(study_name="fcn", storage=storage_url(folder))
    except KeyError:  # the disk filled before the study was made
        return []
    return sorted(t.number for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,)))


# --------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A real tmpfs of request.param MiB, mounted at tmp_path/disk (needs root and mount rights)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={request.param}m", "tmpfs", str(mount_point)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode(errors='replace').strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def grow(mount_point: Path, mebibytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={mebibytes}m", str(mount_point)], check=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    "small_disk", [3, 9], ids=["full-while-creating-the-stores", "full-after-two-trials"], indirect=True
)
def test_full_disk_is_one_line_and_the_rerun_resumes_with_nothing_lost(
    small_disk: Path, run_here: CliRunner, tmp_path: Path
) -> None:
    sweep = write_sweep(tmp_path, "")
    args = ["run", str(sweep), *small_sweep_args(trials=4), "--set", "study.heartbeat_seconds=2"]

    full = run_here(*args, cwd=small_disk)

    line = one_line(full, 1)
    assert "no space left on device" in line and str(small_disk / "mlruns") in line and "rerun" in line
    kept = finished_trials(small_disk)

    grow(small_disk, 400)
    again = run_here(*args, cwd=small_disk)

    assert again.returncode == 0, again.stderr
    assert "Traceback" not in again.stderr
    after = finished_trials(small_disk)
    assert set(kept) <= set(after) and len(after) >= 4
    assert "test accuracy" in again.stdout


# --------------------------------------------------------------------------- a corrupt store


def truncated_mlflow_db(folder: Path) -> None:
    from mnist_sweep.tracking import Tracker

    Tracker(uri=tracking_url(folder), artifacts=str(folder / "mlruns" / "artifacts"), experiment="fcn")
    database = folder / "mlruns" / "mlflow.db"
    with closing(sqlite3.connect(database)) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    content = database.read_bytes()
    database.write_bytes(content[: len(content) // 3])


def garbage_mlflow_db(folder: Path) -> None:
    (folder / "mlruns").mkdir()
    (folder / "mlruns" / "mlflow.db").write_bytes(b"this is no sqlite database at all\n" * 200)


@pytest.mark.parametrize("damage", [garbage_mlflow_db, truncated_mlflow_db], ids=["garbage", "truncated"])
@pytest.mark.parametrize("command", ["run", "trials", "report"])
def test_corrupt_mlflow_db_is_one_line_like_a_corrupt_optuna_db(
    run_here: CliRunner, tmp_path: Path, command: str, damage: object
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    damage(work)  # type: ignore[operator]
    before = sorted(p.name for p in (work / "mlruns").iterdir())

    line = one_line(run_here(command, str(write_sweep(tmp_path, "")), cwd=work), 2)

    assert "tracking.uri" in line and "mlflow.db" in line and "not an intact sqlite database" in line
    assert sorted(p.name for p in (work / "mlruns").iterdir()) == before


# --------------------------------------------------------------------------- no data source


def test_no_data_source_offline_is_one_line_saying_where_to_put_the_files(run_cli: CliRunner, tmp_path: Path) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    offline = {
        "MNIST_SWEEP_DATA": "",
        "HOME": str(home),
        "KERAS_HOME": str(home / ".keras"),
        **{name: "http://127.0.0.1:9" for name in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY")},
    }
    line = one_line(run_cli("run", str(write_sweep(tmp_path, "")), cwd=work, env=offline, timeout=300), 2)
    assert "data.path" in line and "MNIST_SWEEP_DATA" in line and "download" in line and "put the four" in line
    assert list(work.iterdir()) == []


def test_trials_csv_under_a_file_is_one_line_before_anything_is_read(run_here: CliRunner, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    sweep = write_sweep(tmp_path, "")
    line = one_line(run_here("trials", str(sweep), "--csv", f"{sweep}/leaderboard.csv", cwd=work), 2)
    assert "--csv" in line and "is a file" in line
    assert list(work.iterdir()) == []


# --------------------------------------------------------------------------- finalize


def test_finalize_on_a_missing_study_creates_nothing(run_here: CliRunner, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    line = one_line(run_here("finalize", str(write_sweep(tmp_path, "")), cwd=work), 2)
    assert "'fcn' does not exist" in line
    assert list(work.iterdir()) == []


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(working folder, sweep file) of a study with two trained trials and an unscored test set."""
    data = required_mnist()
    folder = tmp_path_factory.mktemp("trained")
    sweep = write_sweep(folder, "")
    work = folder / "work"
    work.mkdir()
    shrunk = small_sweep_args("--set", "study.baseline=false", trials=2, train_limit=1000, validation=500)
    result = cli_here("worker", str(sweep), *shrunk, cwd=work, data=data)
    assert result.returncode == 0, result.stderr
    return work, sweep


def chosen_model_file(work: Path) -> tuple[Path, Path]:
    """(the chosen trial's model.keras, its MLmodel), found the way MLflow resolves the model URI."""
    from mlflow.tracking import MlflowClient

    study = optuna.load_study(study_name="fcn", storage=storage_url(work))
    model_uri = study.best_trial.user_attrs["model_uri"]
    location = MlflowClient(tracking_uri=tracking_url(work)).get_logged_model(model_uri.split("/")[-1])
    folder = Path(location.artifact_location.removeprefix("file://"))
    return folder / "data" / "model.keras", folder / "MLmodel"


def seal_exists(work: Path) -> bool:
    names = {s.study_name for s in optuna.get_all_study_summaries(storage_url(work), include_best_trial=False)}
    return "fcn.test-seal" in names


@pytest.fixture
def restored(trained: tuple[Path, Path]) -> Iterator[tuple[Path, Path]]:
    """The trained study; the chosen model's files, and its recorded checksum, are put back afterwards."""
    model, mlmodel = chosen_model_file(trained[0])
    saved = {model: model.read_bytes(), mlmodel: mlmodel.read_bytes()}
    try:
        yield trained
    finally:
        for path, content in saved.items():
            path.write_bytes(content)
        record_checksum(trained[0], model)


def lambda_model_file(path: Path) -> None:
    import keras

    inputs = keras.Input((28, 28))
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.Lambda(lambda x: x[:, 0, :] * 2.0)(inputs))
    keras.Model(inputs, outputs).save(path)


def record_checksum(work: Path, model: Path) -> None:
    """The chosen run's recorded sha256 made to match `model`: as if whoever changed the file rewrote it too."""
    from mlflow.tracking import MlflowClient

    from mnist_sweep.data import file_sha256

    run_id = optuna.load_study(study_name="fcn", storage=storage_url(work)).best_trial.user_attrs["mlflow_run_id"]
    MlflowClient(tracking_uri=tracking_url(work)).set_tag(run_id, "model_sha256", file_sha256(model))


@pytest.mark.slow  # the module's trained study: two trials
def test_finalize_refuses_a_model_file_changed_since_it_was_logged(
    restored: tuple[Path, Path], run_here: CliRunner
) -> None:
    """Other weights in a well-formed .keras file, which Keras' safe mode loads: only the checksum can tell."""
    import keras

    work, sweep = restored
    model, _ = chosen_model_file(work)
    loaded = keras.saving.load_model(model, compile=False)
    loaded.set_weights([w * 0.5 for w in loaded.get_weights()])
    loaded.save(model)

    line = one_line(run_here("finalize", str(sweep), cwd=work), 2)

    assert "has changed since it was logged" in line and "model.keras" in line and "sha256" in line
    assert not seal_exists(work)  # the test set was not claimed: restored, the model can still be scored
    assert "test_result" not in optuna.load_study(study_name="fcn", storage=storage_url(work)).user_attrs


@pytest.mark.slow  # the module's trained study: two trials
def test_finalize_refuses_a_model_holding_code_in_one_line(restored: tuple[Path, Path], run_here: CliRunner) -> None:
    work, sweep = restored
    model, _ = chosen_model_file(work)
    lambda_model_file(model)
    record_checksum(work, model)  # past the checksum, Keras' safe mode still refuses the code

    line = one_line(run_here("finalize", str(sweep), cwd=work), 2)

    assert "Keras refused to load it safely" in line and "Lambda" in line
    assert not seal_exists(work)  # the test set was not claimed: after restoring the model it can be scored


@pytest.mark.slow  # the module's trained study: two trials
def test_finalize_refuses_an_exported_savedmodel_in_one_line(restored: tuple[Path, Path], run_here: CliRunner) -> None:
    work, sweep = restored
    _, mlmodel = chosen_model_file(work)
    mlmodel.write_text(mlmodel.read_text().replace("save_exported_model: false", "save_exported_model: true"))

    line = one_line(run_here("finalize", str(sweep), cwd=work), 2)

    assert "not a model this tool wrote" in line and "save_exported_model: false" in line
    assert not seal_exists(work)


def claim_seal(work: Path, claimed_by: ProcessId, heartbeat: str) -> None:
    seal = optuna.create_study(study_name="fcn.test-seal", storage=storage_url(work))
    seal.set_user_attr("heartbeat_at", heartbeat)
    seal.set_user_attr("claimed_by", claimed_by.encode())
    seal.set_user_attr("claimed_at", "2026-01-01T00:00:00+00:00")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@pytest.mark.slow  # the module's trained study: two trials
def test_every_wait_for_the_test_result_answers_sigterm(trained: tuple[Path, Path], start_cli: CliStarter) -> None:
    work, sweep = trained
    claim_seal(work, this_process(), now())  # a live process with a fresh heartbeat: finalize waits for it
    try:
        process = start_cli("finalize", str(sweep), cwd=work)
        assert process.stdout is not None
        for line in process.stdout:
            if "waiting for its result" in line:
                break
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)  # it used to sleep out its 600 s wait
        finally:
            process.kill()
        assert process.returncode == 143, process.stderr.read() if process.stderr else ""
    finally:
        optuna.delete_study(study_name="fcn.test-seal", storage=storage_url(work))


@pytest.mark.slow  # the module's trained study: two trials
def test_a_dead_claim_on_this_host_is_taken_over_at_once(trained: tuple[Path, Path], run_here: CliRunner) -> None:
    work, sweep = trained
    dead = subprocess.Popen(["true"])
    dead.wait()
    me = this_process()
    claimant = ProcessId(me.host, dead.pid, "deadbeef0000", me.boot, me.namespace, "12345")
    claim_seal(work, claimant, now())  # its heartbeat is fresh, but its end is proven: this PID namespace

    result = run_here("finalize", str(sweep), cwd=work)

    assert result.returncode == 0, result.stderr
    assert f"claimed by {claimant.label}, a process that no longer runs" in result.stdout
    assert "test accuracy" in result.stdout
    study = optuna.load_study(study_name="fcn", storage=storage_url(work))
    assert study.user_attrs["test_result"]["scored_by"] != claimant.label


@pytest.mark.slow  # the module's trained study: two trials
def test_a_late_sigint_in_finalize_still_exits_130(trained: tuple[Path, Path], start_cli: CliStarter) -> None:
    """After the result line: Python drops a KeyboardInterrupt raised while the libraries shut down."""
    work, sweep = trained
    for _attempt in range(3):  # the signal must find the process alive: a process that ended first proves nothing
        process = start_cli("finalize", str(sweep), cwd=work)  # scored by the test above: reports it again
        assert process.stdout is not None
        for line in process.stdout:
            if "test accuracy" in line:
                break
        alive = process.poll() is None
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
        if alive:
            break
    assert alive, "finalize ended before the signal three times"
    # 130 from our exit hook; -SIGINT if it lands in the interpreter's last teardown, after every hook ran,
    # which a shell reports as 130 too. Never 0: the interrupt is not dropped.
    assert process.returncode in (130, -signal.SIGINT)
