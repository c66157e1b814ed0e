"""The chosen model in the Model Registry: one version per study, alias champion, its test numbers as tags.

The registry parts run on a real sqlite store read back with MlflowClient; the end-to-end tests run the real CLI
on a small real subset, load the champion through pyfunc and serve it with `mlflow models serve`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from mnist_sweep.artifacts import global_tracking_uri
from mnist_sweep.errors import RegistryError
from mnist_sweep.ledger import StudyLedger
from mnist_sweep.records import CHAMPION, REGISTERED_BY, REGISTERED_BY_TAG, TestResult
from mnist_sweep.registry import check_up_front, register_champion
from mnist_sweep.tracking import Tracker
from mnist_sweep.ui import stop_process_group
from tests.conftest import (
    DEFAULT_SWEEP,
    REPO,
    CliRunner,
    cli_environment,
    created_files,
    free_port,
    required_mnist,
    small_sweep_args,
)
from tests.finished_sweep import ARGS, SWEEP, TRAIN_IMAGES, VALIDATION_IMAGES, FinishedSweep
from tests.servers import wait_for_health
from tests.stores import tracking_url

# --------------------------------------------------------------------------- the registry on a real sqlite store


@dataclass
class Logged:
    tracker: Tracker
    parent: str
    result: TestResult


def _logged_result(folder: Path, *, study: str = "reg") -> Logged:
    """A trial run with a logged (untrained) model, and a test result naming it, in a real sqlite store."""
    from mnist_sweep.model import build_model

    tracker = Tracker(uri=f"sqlite:///{folder}/mlflow.db", artifacts=str(folder / "artifacts"), experiment=study)
    ledger = StudyLedger.create(tracker, study_name=study, config={})
    run_id = ledger.start_trial_run(trial_number=3, params={})
    model_id, model_uri = ledger.reserve_model(run_id)
    ledger.models.save(run_id, build_model(hidden=(8,), activation="relu"), model_id)
    result = TestResult(
        study=study,
        trial_number=3,
        run_id=run_id,
        model_uri=model_uri,
        params={},
        metric="val_accuracy",
        val_loss=0.1,
        val_accuracy=0.97,
        epochs_trained=1,
        test_images=10000,
        test_loss=0.0987,
        test_accuracy=0.9712,
        test_accuracy_ci95=(0.9678, 0.9743),
        test_confusion_matrix=((1,),),
        test_per_class=(),
        scored_at="now",
        scored_by="here",
    )
    return Logged(tracker, ledger.parent_run_id, result)


def _register(logged: Logged, name: str = "reg") -> str:
    with global_tracking_uri(logged.tracker.uri):
        registration = register_champion(
            logged.tracker.client, name=name, result=logged.result, parent_run_id=logged.parent, report="report.html"
        )
    assert (registration.name, registration.alias) == (name, CHAMPION)
    return registration.version


def test_registering_again_or_racing_leaves_one_version_with_alias_and_tags(tmp_path: Path) -> None:
    logged = _logged_result(tmp_path)
    client = MlflowClient(tracking_uri=logged.tracker.uri)
    assert _register(logged) == "1"
    assert _register(logged) == "1"  # a rerun, a second finalize: the version is found, not made again
    # A finalizer racing this one made its own version a moment later: both settle on the lower one.
    with global_tracking_uri(logged.tracker.uri):
        made = client.create_model_version("reg", source=logged.result.model_uri, run_id=logged.result.run_id)
    assert str(made.version) == "2"  # the reruns made none, not one each that they deleted again
    assert _register(logged) == "1"
    versions = client.search_model_versions("name = 'reg'")
    assert [str(v.version) for v in versions] == ["1"]
    (version,) = versions
    assert str(client.get_model_version_by_alias("reg", "champion").version) == "1"
    assert version.run_id == logged.result.run_id and version.source == logged.result.model_uri
    assert version.tags == {
        "test_accuracy": "0.971200",
        "test_accuracy_ci95_low": "0.967800",
        "test_accuracy_ci95_high": "0.974300",
        "test_loss": "0.098700",
        "test_images": "10000",
        "optuna.trial_number": "3",
        "optuna.study_name": "reg",
        "parent_run_id": logged.parent,
    }
    assert "Report: report.html" in version.description
    assert client.get_registered_model("reg").tags[REGISTERED_BY_TAG] == REGISTERED_BY


def test_another_projects_model_of_that_name_is_refused_in_one_line(tmp_path: Path) -> None:
    logged = _logged_result(tmp_path)
    client = MlflowClient(tracking_uri=logged.tracker.uri)
    client.create_registered_model("taken")  # someone else's: no mnist_sweep.registered_by tag
    with pytest.raises(RegistryError) as refused:
        check_up_front(lambda: client, "taken")
    assert str(refused.value).startswith("tracking.registered_model = 'taken': ")
    with pytest.raises(RegistryError) as again:
        _register(logged, "taken")
    assert str(again.value) == str(refused.value) and "\n" not in str(again.value)
    assert client.search_model_versions("name = 'taken'") == []  # nothing added to their model
    check_up_front(lambda: client, "free-name")  # a name nobody holds is fine, and so is ours
    _register(logged, "ours")
    check_up_front(lambda: client, "ours")


@pytest.mark.parametrize("name", ["a/b", "x:y", "../up", " "])
def test_a_name_mlflow_refuses_is_refused_naming_the_key(name: str) -> None:
    with pytest.raises(RegistryError, match=r"^tracking\.registered_model = .*MLflow refuses this name"):
        check_up_front(None, name)


# --------------------------------------------------------------------------- the real CLI


def test_a_bad_name_is_exit_2_before_any_trial_and_nothing_is_written(run_here: CliRunner, tmp_path: Path) -> None:
    done = run_here("run", str(DEFAULT_SWEEP), *small_sweep_args(trials=1), "--set", 'tracking.registered_model="a/b"')
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("mnist-sweep: tracking.registered_model = 'a/b': MLflow refuses this name")
    assert created_files(tmp_path) == []


def test_a_name_another_project_holds_is_exit_2_before_any_trial(run_here: CliRunner, tmp_path: Path) -> None:
    MlflowClient(tracking_uri=f"sqlite:///{tmp_path}/mlruns/mlflow.db").create_registered_model("fcn")
    before = created_files(tmp_path)
    done = run_here("run", str(DEFAULT_SWEEP), *small_sweep_args(trials=1))
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert "tracking.registered_model = 'fcn'" in line and "mnist-sweep did not create" in line
    assert created_files(tmp_path) == before
    assert "trial" not in done.stdout


@dataclass
class RegisteredSweep:
    folder: Path
    outputs: list[str]

    @property
    def uri(self) -> str:
        return tracking_url(self.folder)


@pytest.fixture(scope="module")
def registered(finished_sweep: FinishedSweep) -> RegisteredSweep:
    """The session's finished sweep, finalized once more and run again (each a no-op that registers nothing new
    but says what is registered), with what `run`, `finalize` and `run` printed."""
    outputs = [finished_sweep.first.stdout]
    for command in ("finalize", "run"):
        done = finished_sweep.run(command, SWEEP, *ARGS)
        assert done.returncode == 0, done.stderr
        outputs.append(done.stdout)
    return RegisteredSweep(finished_sweep.folder, outputs)


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_chosen_model_is_registered_once_as_champion_and_said_so(registered: RegisteredSweep) -> None:
    client = MlflowClient(tracking_uri=registered.uri)
    (version,) = client.search_model_versions("name = 'fcn'")  # run, finalize, run again: one version
    result = json.loads((registered.folder / "reports" / "fcn" / "test_metrics.json").read_text())
    assert str(client.get_model_version_by_alias("fcn", "champion").version) == str(version.version) == "1"
    assert version.run_id == result["run_id"] and version.source == result["model_uri"]
    assert float(version.tags["test_accuracy"]) == pytest.approx(result["test_accuracy"], abs=1e-6)
    assert float(version.tags["test_accuracy_ci95_low"]) == pytest.approx(result["test_accuracy_ci95"][0], abs=1e-6)
    assert version.tags["optuna.trial_number"] == str(result["trial_number"])
    assert version.tags["optuna.study_name"] == "fcn"
    (parent,) = client.search_runs(
        [client.get_experiment_by_name("fcn").experiment_id], "tags.`mnist_sweep.role` = 'study'"
    )
    assert version.tags["parent_run_id"] == parent.info.run_id
    assert str(registered.folder / "reports" / "fcn" / "report.html") in version.description
    said = "registered model 'fcn' version 1, alias champion (models:/fcn@champion)"
    for output in registered.outputs:
        assert output.strip().splitlines()[-1].endswith("; " + said)
    assert result["registered_model"] == {"name": "fcn", "version": "1", "alias": "champion"}
    markdown = (registered.folder / "reports" / "fcn" / "report.md").read_text()
    assert "- registered model: 'fcn' version 1, alias champion: load it with " in markdown
    page = (registered.folder / "reports" / "fcn" / "report.html").read_text()
    assert '<div class="value" id="registered-model">fcn v1</div>' in page
    assert "alias champion: models:/fcn@champion" in page


def _validation_images(n: int) -> np.ndarray:
    """The first `n` validation images of the small sweep's split (never a test image)."""
    from mnist_sweep.data import load_split, resolve_source

    split = load_split(
        resolve_source(str(required_mnist())), validation=VALIDATION_IMAGES, train_limit=TRAIN_IMAGES, seed=0
    )
    return split.x_val[:n]


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_champion_predicts_through_pyfunc_as_through_keras(registered: RegisteredSweep) -> None:
    images = _validation_images(32)
    mlflow.set_tracking_uri(registered.uri)
    served = mlflow.pyfunc.load_model("models:/fcn@champion")
    probabilities = served.predict(images)
    assert probabilities.shape == (32, 10)
    np.testing.assert_array_equal(
        probabilities, mlflow.keras.load_model("models:/fcn@champion").predict(images, verbose=0)
    )


def _documented_environment() -> dict[str, str]:
    """The environment the documented commands run in: the export line's variable, and the venv's bin on PATH.

    `serve --env-manager local` starts `uvicorn` from PATH: the venv's bin must be on it, as it is for a user
    with the venv active (CI runs .venv/bin/python without activating it: "exec: uvicorn: not found")."""
    name, _, uri = _documented_commands()[0].removeprefix("export ").partition("=")
    environment = cli_environment(required_mnist(), {name: uri})
    environment["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{environment['PATH']}"  # python and mlflow
    return environment


@pytest.fixture(scope="module")
def serving(registered: RegisteredSweep, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The documented `mlflow models serve` line (docs/use-the-model.md) on a free port of 127.0.0.1, in the
    sweep's folder: one server for the tests that query it.

    A second try on another port if the first never answers (a port taken between choosing and binding it);
    the server's own log is in the failure's message."""
    serve_line = _documented_commands()[4]
    logs = tmp_path_factory.mktemp("serve")
    for attempt in (1, 2):
        port, log = free_port(), logs / f"serve-{attempt}.log"
        with log.open("wb") as sink:
            process = subprocess.Popen(
                ["bash", "-c", "exec " + serve_line.replace("5001", str(port))],
                cwd=registered.folder,
                env=_documented_environment(),
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_for_health(url, process)
        except AssertionError as failed:
            stop_process_group(process)
            if attempt == 2:
                tail = log.read_text(errors="replace")[-3000:]
                raise AssertionError(f"{failed}; its log ends:\n{tail}") from None
            continue
        try:
            yield url
        finally:
            stop_process_group(process)
        return


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.subprocess
def test_mlflow_models_serve_answers_with_the_keras_models_digits(registered: RegisteredSweep, serving: str) -> None:
    images = _validation_images(16)
    body = json.dumps({"inputs": images.tolist()}).encode()
    request = urllib.request.Request(serving + "/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        predictions = np.asarray(json.loads(response.read())["predictions"])
    mlflow.set_tracking_uri(registered.uri)
    keras_model = mlflow.keras.load_model("models:/fcn@champion")
    assert predictions.shape == (16, 10)
    np.testing.assert_array_equal(predictions.argmax(axis=1), keras_model.predict(images, verbose=0).argmax(axis=1))
    np.testing.assert_allclose(predictions, keras_model.predict(images, verbose=0), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_study_records_its_registration(registered: RegisteredSweep) -> None:
    study = optuna.load_study(study_name="fcn", storage=f"sqlite:///{registered.folder / 'mlruns' / 'optuna.db'}")
    assert study.user_attrs["registered_model"] == {"name": "fcn", "version": "1", "alias": "champion"}
    assert os.path.isfile(registered.folder / "reports" / "fcn" / "report.html")


def _documented_commands() -> list[str]:
    """The commands of docs/use-the-model.md ("Use the chosen model", linked from the README), in order."""
    text = (REPO / "docs" / "use-the-model.md").read_text(encoding="utf-8")
    section = text.split("# Use the chosen model", 1)[1]
    block = section.split("```\n", 2)[1]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.subprocess
def test_each_command_of_use_the_model_works_on_a_real_sweep(registered: RegisteredSweep, serving: str) -> None:
    """Each line as the page gives it; the serve line is the one `serving` runs, queried by the curl line."""
    _, keras_line, pyfunc_line, registry_line, serve_line, curl_line = _documented_commands()
    environment = _documented_environment()

    def shell(command: str) -> str:
        done = subprocess.run(
            ["bash", "-c", command], cwd=registered.folder, env=environment, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"{command}\n{done.stderr[-2000:]}"
        return done.stdout.strip().splitlines()[-1]

    digits = shell(keras_line)
    assert re.fullmatch(r"\[\d \d\]", digits)
    assert shell(pyfunc_line) == digits
    version, tags = shell(registry_line).split(" ", 1)
    assert version == "1" and "'test_accuracy_ci95_low'" in tags
    assert serve_line.startswith("mlflow models serve ") and "http://127.0.0.1:5001/" in curl_line
    answer = json.loads(shell(curl_line.replace("http://127.0.0.1:5001", serving)))
    served = np.asarray(answer["predictions"]).argmax(axis=1)
    assert f"[{served[0]} {served[1]}]" == digits
