"""A real `mlflow server --serve-artifacts` on 127.0.0.1: artifacts go through it, models sit in the study.

Two working folders stand for two machines: a worker trains in one, `run` finalizes in the other and loads
the chosen model through the server. Neither folder may hold an artifact afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import required_mnist, sweep_args
from tests.in_process import run_in_process
from tests.servers import mlflow_server
from tests.stores import assert_runs_linked

pytestmark = [pytest.mark.slow, pytest.mark.server, pytest.mark.subprocess]


@dataclass
class Server:
    url: str
    served: Path  # the server's --artifacts-destination


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    folder = tmp_path_factory.mktemp("mlflow-server")
    served = folder / "served"
    with mlflow_server(folder, ["--serve-artifacts", "--artifacts-destination", str(served)]) as url:
        yield Server(url, served)


@dataclass
class ServedSweep:
    server: Server
    machines: tuple[Path, Path]
    outputs: list[str]

    @property
    def client(self) -> MlflowClient:
        return MlflowClient(tracking_uri=self.server.url)


def served_args(server: Server, storage: Path, *settings: str) -> list[str]:
    settings = (f'tracking.uri="{server.url}"', f'study.storage="sqlite:///{storage}"', *settings)
    return sweep_args(*settings, trials=2, train_limit=1000, validation=500)


@pytest.fixture(scope="module")
def served_sweep(server: Server, tmp_path_factory: pytest.TempPathFactory) -> ServedSweep:
    data = required_mnist()
    shared = tmp_path_factory.mktemp("shared-storage") / "optuna.db"
    trainer, finalizer = tmp_path_factory.mktemp("machine-a"), tmp_path_factory.mktemp("machine-b")
    # Both through the CLI's main in this process: what stands for two machines is their two folders.
    worker = run_in_process("worker", *served_args(server, shared), cwd=trainer, data=data)
    assert worker.returncode == 0, worker.stderr
    run = run_in_process("run", *served_args(server, shared), cwd=finalizer, data=data)
    assert run.returncode == 0, run.stderr
    return ServedSweep(server, (trainer, finalizer), [worker.stdout, run.stdout])


def test_runs_and_their_artifacts_go_through_the_server(served_sweep: ServedSweep) -> None:
    import optuna

    client = served_sweep.client
    experiment = client.get_experiment_by_name("fcn")
    assert experiment is not None
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([experiment.experiment_id])
    storage = f"sqlite:///{next(p for p in served_sweep.machines[0].parent.glob('shared-storage*/optuna.db'))}"
    assert_runs_linked(optuna.load_study(study_name="fcn", storage=storage), runs)
    for run in runs:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
    served = {p.name for p in served_sweep.server.served.rglob("*") if p.is_file()}
    assert {"val_confusion_matrix.json", "MLmodel", "test_confusion_matrix.csv", "report.html"} <= served
    for machine in served_sweep.machines:
        assert not (machine / "mlruns").exists(), f"artifacts left on a worker's disk: {list(machine.rglob('*'))}"


def test_models_sit_in_the_study_experiment_and_load_through_the_server(served_sweep: ServedSweep) -> None:
    import mlflow
    import mlflow.keras
    import numpy as np

    client = served_sweep.client
    experiment = client.get_experiment_by_name("fcn")
    assert experiment is not None
    models = client.search_logged_models(experiment_ids=[experiment.experiment_id])
    complete = [  # trials only: the lecture's reference run (role "reference") logs no model
        r
        for r in client.search_runs([experiment.experiment_id])
        if r.data.tags.get("trial_state") == "COMPLETE" and r.data.tags.get("mnist_sweep.role") == "trial"
    ]
    assert complete and {m.source_run_id for m in models} == {r.info.run_id for r in complete}
    assert client.search_logged_models(experiment_ids=["0"]) == []
    (parent,) = [
        r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("mnist_sweep.role") == "study"
    ]
    assert parent.data.tags["test_set_scored"] == "true"
    assert len(client.get_metric_history(parent.info.run_id, "test_accuracy")) == 1
    chosen = client.get_run(parent.data.tags["test_scored_run_id"])  # machine B loaded it through the server
    mlflow.set_tracking_uri(served_sweep.server.url)
    model = mlflow.keras.load_model(chosen.data.tags["model_uri"])
    assert model.predict(np.zeros((1, 28, 28), np.float32), verbose=0).shape == (1, 10)
    assert "test accuracy" in served_sweep.outputs[1]
    for output in served_sweep.outputs:  # MLflow's own "View run ... at" lines stay out of the terminal
        assert "View run" not in output and "View experiment" not in output


def test_an_explicit_artifact_uri_is_used_as_given(server: Server, tmp_path: Path, mnist_dir: Path) -> None:
    args = served_args(server, tmp_path / "optuna.db", 'tracking.artifacts="mlflow-artifacts:/sweeps"')
    done = run_in_process("worker", *args, "--set", "study.name=given", "--trials", "1", cwd=tmp_path, data=mnist_dir)
    assert done.returncode == 0, done.stderr
    client = MlflowClient(tracking_uri=server.url)
    experiment = client.get_experiment_by_name("given")
    assert experiment is not None and experiment.artifact_location == "mlflow-artifacts:/sweeps"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3  # the study's parent, its one trial and the lecture's network
    for run in runs:
        assert run.info.artifact_uri.startswith("mlflow-artifacts:/sweeps/")
    assert any((server.served / "sweeps").rglob("MLmodel"))
    assert not any("mlflow-artifacts" in p.name for p in tmp_path.rglob("*")), "taken for a local folder"


def test_the_chosen_model_is_registered_through_the_server_once(served_sweep: ServedSweep) -> None:
    import mlflow
    import numpy as np

    client = served_sweep.client
    (version,) = client.search_model_versions("name = 'fcn'")
    assert str(client.get_model_version_by_alias("fcn", "champion").version) == str(version.version) == "1"
    experiment = client.get_experiment_by_name("fcn")
    assert experiment is not None
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`mnist_sweep.role` = 'study'")
    assert version.run_id == parent.data.tags["test_scored_run_id"]
    assert version.tags["parent_run_id"] == parent.info.run_id
    assert served_sweep.outputs[1].strip().splitlines()[-1].endswith("alias champion (models:/fcn@champion)")
    mlflow.set_tracking_uri(served_sweep.server.url)  # pyfunc loads it through the server
    images = np.random.default_rng(0).random((4, 28, 28), dtype=np.float32)
    served = mlflow.pyfunc.load_model("models:/fcn@champion").predict(images)
    np.testing.assert_array_equal(served, mlflow.keras.load_model("models:/fcn@champion").predict(images, verbose=0))
