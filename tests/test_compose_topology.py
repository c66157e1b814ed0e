"""docker/compose.yaml's topology, run natively: each service's own command on 127.0.0.1, no Docker engine.

PostgreSQL is set up as the postgres image does it (user, password, database, the init scripts mounted into
/docker-entrypoint-initdb.d), then the mlflow service's `mlflow server` command, two `worker` services and
the `finalize` service, each translated by tests/compose_native.py (hosts, ports, paths, interpolation
only). The sweep is shrunk in the open by arguments appended to the compose commands (SHRINK). What the
sweep left is read back through MlflowClient over HTTP and through Optuna on PostgreSQL.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from mnist_sweep.placement import cpu_list, parse_cpu_list
from tests.compose_native import (
    DOCKER,
    NativeService,
    Translation,
    k8s_job,
    load_compose,
    native_k8s_container,
    native_service,
)
from tests.conftest import REPO, _postgres_bin, free_port, missing_dependency, required_mnist
from tests.servers import WITHOUT_JOBS
from tests.stores import assert_nothing_running, assert_runs_linked, parent_run

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.server, pytest.mark.subprocess]

SERVICES = {"postgres", "mlflow", "worker", "finalize"}
SHRINK = ("--trials", "4", "--epochs", "1", "--set", "data.train_limit=1000", "--set", "data.validation=500")
FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)


# --------------------------------------------------------------------------- PostgreSQL, as its image starts


@contextlib.contextmanager
def postgres_as_the_image_starts_it(service: Mapping[str, Any]) -> Iterator[tuple[int, Path]]:
    """initdb with POSTGRES_USER / POSTGRES_PASSWORD (password over TCP, trust on the socket, as the image
    does), POSTGRES_DB created, each mounted /docker-entrypoint-initdb.d/*.sql run by psql; yields the port
    and the binaries' folder."""
    bin_dir = _postgres_bin()
    if bin_dir is None:
        missing_dependency("PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); .ci/run installs it")
    env = service["environment"]
    user, password, database = env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], env["POSTGRES_DB"]
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:  # postgres refuses root: the Debian package's 'postgres' user runs it
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            missing_dependency("running as root and there is no 'postgres' user to run the server as")
        as_user = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="mnist-sweep-compose-pg-"))  # pytest's tmp is closed to 'postgres'
    password_file = folder / "password"
    password_file.write_text(password, encoding="utf-8")
    if owner is not None:
        os.chown(folder, owner.pw_uid, owner.pw_gid)
        os.chown(password_file, owner.pw_uid, owner.pw_gid)
    data, port = folder / "data", free_port()

    def pg(*args: str) -> None:
        done = subprocess.run([*as_user, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{args[0]}: {done.stderr.strip()}"

    initdb = [str(bin_dir / "initdb"), "-D", str(data), "-U", user, f"--pwfile={password_file}", "--no-sync"]
    options = f"-h 127.0.0.1 -p {port} -k {folder} -F"
    try:
        pg(*initdb, "--auth-host=scram-sha-256", "--auth-local=trust")
        password_file.unlink()
        pg(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    try:
        client = {**os.environ, "PGPASSWORD": password, "PGHOST": "127.0.0.1", "PGPORT": str(port)}
        psql = [str(bin_dir / "psql"), "-v", "ON_ERROR_STOP=1", "--username", user]
        subprocess.run([*psql, "--dbname", "postgres", "-c", f'CREATE DATABASE "{database}"'], env=client, check=True)
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if target.startswith("/docker-entrypoint-initdb.d/") and target.endswith(".sql"):
                script = (DOCKER / source).resolve()  # a bind mount's source is relative to compose.yaml
                subprocess.run([*psql, "--dbname", database, "-f", str(script)], env=client, check=True)
        yield port, bin_dir
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], timeout=60)
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- healthchecks and processes


def wait_healthy(
    name: str, test: Sequence[str], env: Mapping[str, str], process: subprocess.Popen[bytes] | None
) -> None:
    """Run the compose healthcheck's CMD until it exits 0, as `depends_on: condition: service_healthy` waits."""
    assert test[0] == "CMD", f"{name}: healthcheck test must be exec form [CMD, ...]"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"{name} exited {process.returncode} before it was healthy")
        if subprocess.run(list(test[1:]), env=env, capture_output=True, timeout=30).returncode == 0:
            return
        time.sleep(1)
    raise AssertionError(f"{name} never became healthy")


def start(service: NativeService, log: Path) -> subprocess.Popen[bytes]:
    """A server in its own process group (mlflow forks uvicorn workers), output to `log`."""
    with open(log, "wb") as handle:
        return subprocess.Popen(
            service.argv,
            cwd=service.cwd,
            env=service.env,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop(process: subprocess.Popen[bytes]) -> None:
    """Killed with its process group: after SIGTERM, uvicorn waits for the keep-alive connections of this test's
    MlflowClient (up to the 10 s this waited before), and nothing is checked after the stop."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def host_header_status(port: int, host: str) -> int:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1", headers={"Host": host}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


# --------------------------------------------------------------------------- the topology


class Topology:
    """The compose services' commands running natively; results read back the way a user would."""

    def __init__(self, folder: Path, mnist: Path) -> None:
        self.folder = folder
        self.password = secrets.token_urlsafe(16)
        # The test's docker/.env: the only values it chooses (one CPU per container: 2 workers + finalize here).
        self.compose = load_compose({"POSTGRES_PASSWORD": self.password, "MNIST_DIR": str(mnist), "WORKER_CPUS": "1"})
        self.outputs: dict[str, tuple[int, str, str]] = {}
        self.cores: dict[str, list[int]] = {}  # each sweeper's cores, from its service's CPU limit

    @property
    def services(self) -> dict[str, Any]:
        return dict(self.compose["services"])

    def translation(self, pg_port: int, mlflow_port: int) -> Translation:
        return Translation(
            ports={"postgres": {5432: pg_port}, "mlflow": {5000: mlflow_port}}, named_volumes=self.folder / "volumes"
        )

    def base_env(self, name: str) -> dict[str, str]:
        home = self.folder / "home" / name
        home.mkdir(parents=True, exist_ok=True)
        return {
            "PATH": os.environ["PATH"],
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(REPO),
        }


@pytest.fixture(scope="module")
def topology(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Topology, int, int]]:
    mnist = required_mnist()
    top = Topology(tmp_path_factory.mktemp("compose"), mnist)
    assert set(top.services) == SERVICES, "a service was added or removed: teach this test to run it"
    with postgres_as_the_image_starts_it(top.services["postgres"]) as (pg_port, pg_bin):
        health_env = {**os.environ, "PGPORT": str(pg_port), "PATH": f"{pg_bin}:{os.environ['PATH']}"}
        wait_healthy("postgres", top.services["postgres"]["healthcheck"]["test"], health_env, None)

        mlflow_port = free_port()
        translation = top.translation(pg_port, mlflow_port)
        server = native_service(
            top.compose,
            "mlflow",
            translation,
            top.folder / "mlflow",
            base_env={**top.base_env("mlflow"), **WITHOUT_JOBS},  # the runner of jobs no service asks for
            server_flags={"--host": "127.0.0.1", "--port": str(mlflow_port)},
        )
        mlflow_process = start(server, top.folder / "mlflow.log")
        processes: list[tuple[NativeService, subprocess.Popen[str]]] = []
        try:
            check = [
                sys.executable if arg == "python" else arg.replace("127.0.0.1:5000", f"127.0.0.1:{mlflow_port}")
                for arg in top.services["mlflow"]["healthcheck"]["test"]
            ]
            wait_healthy("mlflow", check, os.environ, mlflow_process)
            sweepers = [
                native_service(
                    top.compose, name, translation, top.folder / label, base_env=top.base_env(label), extra=SHRINK
                )
                for name, label in (("worker", "worker-1"), ("worker", "worker-2"), ("finalize", "finalize"))
            ]
            # And one pod of the Kubernetes workers' Job, on the same servers (its Secret: the test's password).
            sweepers.insert(
                2,
                native_k8s_container(
                    k8s_job("mnist-sweep-workers"),
                    translation,
                    top.folder / "k8s-worker",
                    base_env=top.base_env("k8s-worker"),
                    secrets={"mnist-sweep": {"postgres-password": top.password}},
                    claims={"mnist-data": mnist},
                    extra=SHRINK,
                ),
            )
            available = sorted(os.sched_getaffinity(0))
            for index, s in enumerate(sweepers):
                pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
                cores = s.cores(index, available)  # its container's CPU limit
                top.cores[s.cwd.name] = cores
                limited = functools.partial(os.sched_setaffinity, 0, cores)
                processes.append((s, subprocess.Popen(s.argv, cwd=s.cwd, env=s.env, preexec_fn=limited, **pipes)))  # type: ignore[call-overload]
            for sweeper, process in processes:
                out, err = process.communicate(timeout=900)
                top.outputs[sweeper.cwd.name] = (process.returncode, out, err)
            yield top, pg_port, mlflow_port
        finally:
            for _, process in processes:  # only after a failure or a timeout are any still running
                if process.poll() is None:
                    process.kill()
                    process.communicate()
            stop(mlflow_process)


# --------------------------------------------------------------------------- what a user checks


def test_every_service_command_succeeds(topology: tuple[Topology, int, int]) -> None:
    top, _, _ = topology
    for label, (code, out, err) in top.outputs.items():
        assert code == 0, f"{label} exited {code}\n{out}\n{err}\n{(top.folder / 'mlflow.log').read_text()[-3000:]}"
        print(f"--- {label} (exit {code})\n{out.strip()}")  # shown with `pytest -s`: what each service printed


def study_and_runs(topology: tuple[Topology, int, int]) -> tuple[optuna.Study, MlflowClient, str, list[Any]]:
    top, pg_port, mlflow_port = topology
    storage = f"postgresql://sweep:{top.password}@127.0.0.1:{pg_port}/optuna"
    study = optuna.load_study(study_name="fcn", storage=storage)
    client = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_port}")
    experiment = client.get_experiment_by_name("fcn")
    assert experiment is not None, "no MLflow experiment 'fcn' on the tracking server"
    runs = list(client.search_runs([experiment.experiment_id], max_results=1000))
    return study, client, experiment.experiment_id, runs


def test_every_finished_trial_has_one_child_run_under_one_parent(topology: tuple[Topology, int, int]) -> None:
    study, _, _, runs = study_and_runs(topology)
    assert len(study.get_trials(states=FINISHED)) >= 4
    assert_nothing_running(study, runs)
    assert_runs_linked(study, runs)


def test_artifacts_went_through_the_server(topology: tuple[Topology, int, int]) -> None:
    top, _, _ = topology
    study, client, experiment_id, runs = study_and_runs(topology)
    destination = top.folder / "volumes" / "mlartifacts"  # the mlflow service's --artifacts-destination volume
    assert client.get_experiment(experiment_id).artifact_location.startswith("mlflow-artifacts:")
    for run in runs:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    for trial in complete:
        run_id = trial.user_attrs["mlflow_run_id"]
        names = [a.path for a in client.list_artifacts(run_id)]
        matrices = [n for n in names if "confusion" in n]
        assert matrices, f"trial {trial.number}: no confusion matrix among {names}"
        on_disk = list(destination.rglob(f"{run_id}/**/*confusion*"))
        assert on_disk, f"trial {trial.number}: its confusion matrix is not in the server's artifact folder"
    models = client.search_logged_models(experiment_ids=[experiment_id], max_results=1000)
    assert len(models) == len(complete), f"{len(models)} logged models for {len(complete)} complete trials"
    for model in models:
        assert model.artifact_location.startswith("mlflow-artifacts:"), model.artifact_location
        folder = destination / model.artifact_location.removeprefix("mlflow-artifacts:").lstrip("/")
        assert (folder / "MLmodel").is_file(), f"model {model.model_id} is not in the server's artifact folder"
    assert client.search_logged_models(experiment_ids=["0"], max_results=10) == [], "models filed under Default"
    for label in ("worker-1", "worker-2", "finalize"):  # their own disk; the volumes (symlinks) and KERAS_HOME aside
        own = [p for p in (top.folder / label).iterdir() if not p.is_symlink() and p.name != ".keras"]
        left = [f for p in own for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
        assert left == [], f"{label} wrote to its own disk: {left[:5]}"


def test_the_test_set_was_scored_once_and_the_report_is_on_the_parent_run(topology: tuple[Topology, int, int]) -> None:
    top, _, _ = topology
    study, client, _, runs = study_and_runs(topology)
    parent = parent_run(runs)
    history = client.get_metric_history(parent.info.run_id, "test_accuracy")
    assert len(history) == 1, f"test_accuracy logged {len(history)} times"
    result = study.user_attrs["test_result"]
    assert history[0].value == pytest.approx(result["test_accuracy"])
    scorers = [label for label, (_, out, _) in top.outputs.items() if "test accuracy" in out]
    assert scorers == ["finalize"], f"scored by {scorers}"
    report = [a.path for a in client.list_artifacts(parent.info.run_id, "report")]
    assert "report/report.html" in report, report
    assert (top.folder / "volumes" / "reports" / "fcn" / "report.html").is_file()  # the reports volume


def test_the_chosen_model_loads_through_the_server(topology: tuple[Topology, int, int]) -> None:
    import mlflow

    _, _, mlflow_port = topology
    study, _, _, _ = study_and_runs(topology)
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"http://127.0.0.1:{mlflow_port}")
    try:
        model = mlflow.keras.load_model(study.user_attrs["test_result"]["model_uri"])
    finally:
        mlflow.set_tracking_uri(previous)
    probabilities = np.asarray(model.predict(np.zeros((3, 28, 28), dtype=np.float32), verbose=0))
    assert probabilities.shape == (3, 10)
    assert np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-4)


def test_the_server_answers_the_host_name_workers_use_and_refuses_others(topology: tuple[Topology, int, int]) -> None:
    _, _, mlflow_port = topology
    assert host_header_status(mlflow_port, "mlflow:5000") == 200  # what the workers send inside compose
    assert host_header_status(mlflow_port, "evil.example") in (400, 403)  # the middleware is on


def test_every_worker_applies_the_studys_policy_with_threads_sized_to_its_cpu_limit(
    topology: tuple[Topology, int, int],
) -> None:
    """Compose replicas (WORKER_CPUS=1), finalize and a k8s pod (cpu: 4 on this machine's cores) each sized
    their threads to their CPU limit and sampled with the study's constant_liar, though each one's command
    says nothing of either (and study.workers = 1)."""
    top, _, _ = topology
    study, _, _, runs = study_and_runs(topology)
    assert study.user_attrs["worker_policy"] == {"constant_liar": True, "threads": "cpu_limit"}
    assert [len(top.cores[label]) for label in ("worker-1", "worker-2", "finalize")] == [1, 1, 1]
    assert len(top.cores["k8s-worker"]) == min(4, len(os.sched_getaffinity(0)))  # cpu: "4", on this machine
    trial_runs = [r for r in runs if r.data.tags.get("mnist_sweep.role") == "trial"]
    assert trial_runs
    limits = {cpu_list(cores) for cores in top.cores.values()}
    for run in trial_runs:
        tags = run.data.tags
        assert tags["sampler.constant_liar"] == "true", tags
        assert tags["worker.cpus"] in limits, tags
        assert tags["worker.threads"] == str(len(parse_cpu_list(tags["worker.cpus"]))), tags
    print({r.data.tags["worker"]: (r.data.tags["worker.cpus"], r.data.tags["worker.threads"]) for r in trial_runs})
