"""Keras backends: the same sweep under JAX (and torch), without TensorFlow; what each run records."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient

from mnist_sweep import environment
from mnist_sweep.artifacts import model_pip_requirements
from mnist_sweep.ledger import StudyLedger
from mnist_sweep.records import BACKEND_TAG, DEVICE_TAG
from mnist_sweep.tracking import Tracker
from tests.conftest import DEFAULT_SWEEP, REPO, cli_environment, small_sweep_args

# The real CLI's main() in a fresh interpreter; at exit, which TensorFlow modules got loaded. A backend
# other than TensorFlow leaves sys.modules["tensorflow"] = None: Python's marker of an absent module.
SWEEP_THEN_LIST_TENSORFLOW = """
import sys
from mnist_sweep.cli import main
code = main(sys.argv[1:])
loaded = [name for name, module in sys.modules.items() if name.split(".")[0] == "tensorflow" and module is not None]
print("tensorflow modules loaded:", len(loaded), loaded[:3])
sys.exit(code)
"""


def needs(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed: pip install -e '.[{package}]' (make install-dev installs jax)")


def sweep_under(
    backend: str, workdir: Path, data: Path, *, trials: int, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    args = ["run", str(DEFAULT_SWEEP), *small_sweep_args(trials=trials, train_limit=1000, validation=500), *extra]
    return subprocess.run(
        [sys.executable, "-c", SWEEP_THEN_LIST_TENSORFLOW, *args],
        cwd=workdir,
        env=cli_environment(data, {"KERAS_BACKEND": backend}),
        capture_output=True,
        text=True,
        timeout=600,
    )


def check_recorded(workdir: Path, backend: str, trials: int) -> None:
    """Every trial run names the backend and the device; the models require the backend's package; the
    chosen model was reloaded from MLflow and scored on the test set."""
    uri = f"sqlite:///{workdir / 'mlruns' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fcn")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], max_results=50)
    children = [r for r in runs if r.data.tags.get("mnist_sweep.role") == "trial"]
    assert len(children) == trials
    for run in children:
        assert run.data.tags[BACKEND_TAG] == backend
        assert run.data.tags[DEVICE_TAG] in (f"CPU: {environment.cpu_model()}", environment.device())
        model = client.get_logged_model(run.data.tags["model_uri"].removeprefix("models:/"))
        assert model.experiment_id == experiment.experiment_id
        mlflow.set_tracking_uri(uri)
        lines = Path(mlflow.artifacts.download_artifacts(f"{model.artifact_location}/requirements.txt")).read_text()
        lines = lines.split()
        assert f"{backend}=={version(backend).split('+')[0]}" in lines
        assert not [line for line in lines if line.startswith("tensorflow")]
    (parent,) = [r for r in runs if r.data.tags.get("mnist_sweep.role") == "study"]
    assert parent.data.tags["test_set_scored"] == "true"
    assert 0.3 < parent.data.metrics["test_accuracy"] <= 1.0
    scored_on = json.loads((workdir / "reports" / "fcn" / "test_metrics.json").read_text())["environment"]
    assert scored_on["keras_backend"] == backend and scored_on[backend] == version(backend)
    assert scored_on["device"] == children[0].data.tags[DEVICE_TAG]
    assert f"keras_backend={backend}" in (workdir / "reports" / "fcn" / "report.md").read_text()
    study = optuna.load_study(study_name="fcn", storage=f"sqlite:///{workdir / 'mlruns' / 'optuna.db'}")
    assert sum(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials) == trials


@pytest.mark.slow
@pytest.mark.backend
@pytest.mark.subprocess
def test_a_jax_sweep_never_imports_tensorflow(tmp_path: Path, mnist_dir: Path) -> None:
    needs("jax")
    # TensorBoard event files too: written without TensorFlow (Keras' own callback would need tf.summary)
    done = sweep_under("jax", tmp_path, mnist_dir, trials=2, extra=("--set", "train.tensorboard=true"))
    assert done.returncode == 0, done.stderr
    assert "tensorflow modules loaded: 0 []" in done.stdout
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fcn")
    assert experiment is not None
    runs = client.search_runs([experiment.experiment_id], "tags.`mnist_sweep.role` = 'trial'")
    assert len(runs) == 2
    for run in runs:
        folders = [a.path for a in client.list_artifacts(run.info.run_id, "tensorboard")]
        assert folders == ["tensorboard/train", "tensorboard/validation"]
        assert client.list_artifacts(run.info.run_id, "tensorboard/train")[0].file_size > 0
    lines = done.stdout.splitlines()
    assert lines[0] in ("no GPU found, training on CPU (" + environment.cpu_model() + ")",) or lines[0].startswith(
        "training on GPU: "
    )
    assert "test accuracy" in done.stdout and "Traceback" not in done.stderr
    check_recorded(tmp_path, "jax", trials=2)


@pytest.mark.slow
@pytest.mark.backend
@pytest.mark.subprocess
def test_a_torch_sweep_runs_and_records_torch(tmp_path: Path, mnist_dir: Path) -> None:
    needs("torch")
    done = sweep_under("torch", tmp_path, mnist_dir, trials=1)
    assert done.returncode == 0, done.stderr
    assert "tensorflow modules loaded: 0 []" in done.stdout
    check_recorded(tmp_path, "torch", trials=1)


@pytest.mark.subprocess
def test_records_and_reports_need_no_keras() -> None:
    """Reading MNIST, MLflow, Optuna and the report import no deep-learning framework."""
    code = (
        "import sys; import mnist_sweep.data, mnist_sweep.tracking, mnist_sweep.report, mnist_sweep.final, "
        "mnist_sweep.sweep, mnist_sweep.study, mnist_sweep.environment; "
        "print([m for m in ('keras', 'tensorflow', 'jax', 'torch') if m in sys.modules])"
    )
    done = subprocess.run([sys.executable, "-c", code], env=cli_environment(REPO), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_model_requires_the_backend_it_was_trained_with() -> None:
    import keras

    backend = keras.backend.backend()
    requirements = model_pip_requirements()
    assert f"{backend}=={version(backend).split('+')[0]}" in requirements
    assert f"keras=={keras.__version__}" in requirements
    others = {"tensorflow", "jax", "torch"} - {backend}
    assert not [r for r in requirements if r.split("==")[0] in others]


def test_every_trial_run_records_backend_and_device(tmp_path: Path) -> None:
    import keras

    tracker = Tracker(uri=f"sqlite:///{tmp_path / 'mlflow.db'}", artifacts=str(tmp_path / "artifacts"), experiment="e")
    ledger = StudyLedger.create(tracker, study_name="e", config={})
    runs = [ledger.start_trial_run(trial_number=n, params={}) for n in (0, 1)]
    for run_id in runs:
        tags = tracker.client.get_run(run_id).data.tags
        assert tags[BACKEND_TAG] == keras.backend.backend()
        assert tags[DEVICE_TAG] == environment.device()
