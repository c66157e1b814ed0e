"""Everything MLflow knows about: the experiment, the study's parent run and one child run per trial."""

from __future__ import annotations

import contextlib
import csv
import datetime
import functools
import io
import json
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_sweep import databases, environment, processes
from mnist_sweep.data import IMAGE_SIDE, NUM_CLASSES, file_sha256
from mnist_sweep.errors import TrackingError, first_line
from mnist_sweep.figures import confusion_matrix_html, confusion_matrix_png
from mnist_sweep.locations import artifact_location, local_artifact_folder
from mnist_sweep.metrics import ClassificationReport
from mnist_sweep.placement import WORKER_PROCESS_TAG, WORKER_TAG, worker_tags
from mnist_sweep.processes import ProcessId
from mnist_sweep.records import (
    BACKEND_TAG,
    BASELINE_TAG,
    DESCRIPTION_TAG,
    DEVICE_TAG,
    EXPERIMENT_KIND_TAG,
    MODEL_SHA256_TAG,
    MODEL_TRAINING,
    MODEL_URI_KEY,
    PARENT_TAG,
    PRUNED_AT_EPOCH_TAG,
    REFERENCE_ROLE,
    ROLE_TAG,
    STATE_REASON_TAG,
    STATE_TAG,
    STUDY_ROLE,
    STUDY_TAG,
    TEST_SCORED_TAG,
    TRIAL_NUMBER_TAG,
    TRIAL_ROLE,
    final_metric,
)
from mnist_sweep.workarounds import create_mlflow_tables, saved_as_uncompiled

if TYPE_CHECKING:
    import keras

    from mnist_sweep.trial import TrialOutcome

MAX_RUNNING_RUNS = 1000
REFERENCE_RUN_NAME = "lecture-network"
# What _save_model writes: MLflow's keras flavor, Keras' own .keras zip, never a TF SavedModel.
MODEL_FILE = Path("data") / "model.keras"


class _ChecksummedKeras:
    """mlflow.keras as the flavor Model.log saves with, noting the sha256 of the model file it wrote, before the
    upload: finalize checks the file it downloads against it (final.load_scored_model)."""

    __name__ = "mlflow.keras"

    def __init__(self) -> None:
        self.sha256 = ""

    def save_model(self, path: str, **kwargs: Any) -> None:
        import mlflow.keras

        mlflow.keras.save_model(path=path, **kwargs)
        self.sha256 = file_sha256(Path(path) / MODEL_FILE)


def _model_pip_requirements() -> list[str]:
    """Explicit requirements: inferring them spawns a subprocess that costs ~10 s per model.

    The backend's package is the one the model was trained with (tensorflow, jax or torch): a model
    saved under JAX reloads without TensorFlow.
    """
    import keras

    backend = keras.backend.backend()
    packages = {"jax": ["jax", "jaxlib"]}.get(backend, [environment.BACKEND_PACKAGES.get(backend, backend)])
    requirements = [f"mlflow=={mlflow.__version__}", f"keras=={keras.__version__}"]
    for package in [*packages, "numpy"]:
        installed = environment.package_version(package)
        # A local build label (torch's "+cpu") names no release on PyPI.
        requirements.append(package if installed == "not installed" else f"{package}=={installed.split('+')[0]}")
    return requirements


def _model_signature() -> Any:
    """float32 images (N, 28, 28) in, (N, 10) probabilities out.

    The input is unnamed: a named tensor makes pyfunc (and so `mlflow models serve`) hand the model a dict
    {name: images}, which a Sequential model refuses.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, IMAGE_SIDE, IMAGE_SIDE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES), "probabilities")]),
    )


def _csv_text(rows: Iterable[Mapping[str, Any]]) -> str:
    rows = list(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _matrix_csv(matrix: np.ndarray[Any, Any]) -> str:
    header = "true\\predicted," + ",".join(str(k) for k in range(matrix.shape[1]))
    body = [f"{k}," + ",".join(str(int(v)) for v in row) for k, row in enumerate(matrix)]
    return "\n".join([header, *body]) + "\n"


def _make_local_folders(uri: str, artifacts: str) -> None:
    database = databases.sqlite_file(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    folder = local_artifact_folder(uri, artifacts)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)


@contextlib.contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` only within, for the MLflow calls that read it: Model.log
    uploads through it, and a models:/ URI is resolved through it (whatever tracking_uri is passed)."""
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None  # type: ignore[no-untyped-call]
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None: unset again, as MLflow's own helper does


def read_run(uri: str, run_id: str) -> tuple[dict[str, str], dict[str, float]]:
    """A run's params and latest metrics, read without creating anything (no store, no experiment)."""
    if databases.nothing_recorded(uri):
        raise TrackingError(f"tracking.uri = {uri!r}: no MLflow store there yet")
    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"run {run_id!r} in tracking.uri = {uri!r}: {first_line(exc)}") from None
    return dict(run.data.params), dict(run.data.metrics)


UPLOAD_GRACE_SECONDS = 120.0


class BackgroundUploads:
    """One thread that stores finished trials' artifacts while the next trial trains.

    The model, the confusion matrix and the per-class metrics took ~0.08 s of a 2 s trial (4 %) on the
    training thread. Here they overlap the next fit. What a crash leaves stays consistent because a trial's
    run ends FINISHED only as the last step of its upload: a process killed mid-upload leaves its run
    RUNNING, the next `run` closes it as KILLED (once UPLOAD_GRACE_SECONDS have passed since its Optuna
    trial completed, at once if its process has provably ended: processes.ended), and finalize never scores a
    trial whose run is not FINISHED. Ctrl-C, SIGTERM, an error and the end of the loop all wait for the
    uploads first (study.run_trials). An upload that fails ends its run FAILED and is raised on the
    training thread within a few steps of the next trial and after it, as the same error a synchronous upload
    would have raised (a full disk: one line, and rerun).
    """

    def __init__(self, tracker: Tracker) -> None:
        self._tracker = tracker
        self.background = True  # False: each upload runs at once on the caller's thread (tracking.background_uploads)
        self._jobs: queue.Queue[tuple[str, Callable[[], None]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._errors: list[BaseException] = []

    def submit(self, run_id: str, job: Callable[[], None]) -> None:
        if not self.background:
            self.wait()
            self._run(run_id, job)
            self.raise_if_failed()
            return
        if self._thread is None:
            # A daemon: a process that exits without waiting (a second signal) must not hang; its run stays
            # RUNNING, never FINISHED without its artifacts.
            self._thread = threading.Thread(target=self._work, name="mnist-sweep-uploads", daemon=True)
            self._thread.start()
        self._jobs.put((run_id, job))

    def wait(self, *, raise_errors: bool = True) -> None:
        """Until every submitted upload is stored or has failed; then the first failure, if any, is raised."""
        self._jobs.join()
        if raise_errors:
            self.raise_if_failed()

    def raise_if_failed(self, *args: object) -> None:
        """Raise the first upload failure, every time (the process is to stop); takes and ignores a hook's args."""
        if self._errors:
            raise self._errors[0]

    def _work(self) -> None:
        while True:
            run_id, job = self._jobs.get()
            try:
                self._run(run_id, job)
            finally:
                self._jobs.task_done()

    def _run(self, run_id: str, job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # kept for the training thread to raise
            self._errors.append(exc)
            with contextlib.suppress(Exception):  # the store may be what failed: then the run stays RUNNING
                self._tracker.end_trial_run(
                    run_id, state="FAIL", message=f"storing the trial's artifacts failed: {first_line(exc)}"
                )


class Tracker:
    """One MLflow experiment per study; its parent run and the trial runs nested under it."""

    def __init__(
        self,
        *,
        uri: str,
        artifacts: str,
        experiment: str,
        model_optimizer_state: bool = False,
        background_uploads: bool = False,
        create: bool = True,
    ) -> None:
        """Opens the store and the study's experiment; unless `create` is False, makes what they lack first
        (folders, tables, the experiment). MLflow's process-wide tracking URI is left alone."""
        self.uri = uri
        self.model_optimizer_state = model_optimizer_state
        self.background_uploads = background_uploads
        if not create:
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment(experiment, location=None, create=False)
            return
        _make_local_folders(uri, artifacts)
        with databases.schema_lock(uri):  # opening the store creates or migrates its tables
            databases.create_whole(uri, create_mlflow_tables)
            self.client = MlflowClient(tracking_uri=uri)
            self.experiment_id = self._experiment(experiment, artifact_location(uri, artifacts))
        self._mark_model_training()

    @classmethod
    def existing(cls, *, uri: str, experiment: str) -> Tracker | None:
        """The study's tracker where its store and experiment exist, else None; makes nothing (for `report`)."""
        if find_experiment_id(uri=uri, experiment=experiment) is None:
            return None
        return cls(uri=uri, artifacts="", experiment=experiment, create=False)

    @functools.cached_property
    def _requirements(self) -> list[str]:
        # Computed at the first model, so `report` and `trials` never import Keras and TensorFlow.
        return _model_pip_requirements()

    @functools.cached_property
    def _machine_tags(self) -> dict[str, str]:
        # Asked at the first trial, once Keras is loaded: the device its backend trains on.
        return {BACKEND_TAG: environment.keras_backend(), DEVICE_TAG: environment.device(), **worker_tags()}

    def _experiment(self, name: str, location: str | None, *, create: bool = True) -> str:
        try:
            found = self.client.get_experiment_by_name(name)
            if found is None and not create:
                raise TrackingError(f"tracking.uri = {self.uri!r}: no MLflow experiment {name!r}")
            if found is None:
                try:
                    return self.client.create_experiment(name, artifact_location=location)
                except MlflowException:  # another worker created it a moment ago
                    found = self.client.get_experiment_by_name(name)
                    if found is None:
                        raise
        except MlflowException as exc:
            raise TrackingError(f"tracking.uri = {self.uri!r}: {first_line(exc)}") from None
        if found.lifecycle_stage == "deleted":
            raise TrackingError(
                f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore "
                f"--experiment-id {found.experiment_id}) or choose another study.name"
            )
        return str(found.experiment_id)

    def _mark_model_training(self) -> None:
        """Give the experiment its kind, unless someone chose one (studies made before this had none)."""
        tags = self.client.get_experiment(self.experiment_id).tags
        if EXPERIMENT_KIND_TAG not in tags:
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)

    # ----------------------------------------------------------------------- the study's parent run

    def create_parent_run(self, *, study_name: str, config: Mapping[str, Any]) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=study_name,
            tags={ROLE_TAG: STUDY_ROLE, STUDY_TAG: study_name},
        )
        self.client.log_dict(run.info.run_id, dict(config), "sweep.json")
        return str(run.info.run_id)

    def parent_exists(self, run_id: str) -> bool:
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def set_parent_status(self, run_id: str, status: str) -> None:
        """RUNNING, or an end status with the end time, so the UI shows how long the study ran."""
        if status == "RUNNING":
            self.client.update_run(run_id, status=status)
        else:
            self.client.set_terminated(run_id, status=status)

    def describe_run(self, run_id: str, markdown: str) -> None:
        """The run's description, shown at the top of its page in the MLflow UI."""
        self.client.set_tag(run_id, DESCRIPTION_TAG, markdown)

    # ----------------------------------------------------------------------- trial runs

    def start_trial_run(
        self,
        *,
        parent_run_id: str,
        study_name: str,
        trial_number: int,
        params: Mapping[str, Any],
        tags: Mapping[str, str] | None = None,
    ) -> str:
        """`tags`: the worker policy's, besides the trial's own and the machine's."""
        own = {ROLE_TAG: TRIAL_ROLE, TRIAL_NUMBER_TAG: str(trial_number), STATE_TAG: "RUNNING"}
        return self._start_child_run(
            parent_run_id, study_name, f"trial-{trial_number:04d}", {**(tags or {}), **own}, params
        )

    def start_reference_run(self, *, parent_run_id: str, study_name: str, params: Mapping[str, Any]) -> str:
        """The lecture's network's run: a child of the study's run like the trials, but not one of them (its role)."""
        tags = {ROLE_TAG: REFERENCE_ROLE, BASELINE_TAG: "true", STATE_TAG: "RUNNING"}
        return self._start_child_run(parent_run_id, study_name, REFERENCE_RUN_NAME, tags, params)

    def _start_child_run(
        self, parent_run_id: str, study_name: str, name: str, tags: Mapping[str, str], params: Mapping[str, Any]
    ) -> str:
        run = self.client.create_run(
            self.experiment_id,
            run_name=name,
            tags={**tags, PARENT_TAG: parent_run_id, STUDY_TAG: study_name, **self._machine_tags},
        )
        run_id = str(run.info.run_id)
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run_id

    def finish_reference_run(self, run_id: str, outcome: TrialOutcome) -> None:
        """Its validation confusion matrix and final metrics; no model: it is never scored or served."""
        self.log_report_artifacts(run_id, outcome.report, prefix="val", title="validation")
        final = {
            final_metric("val_loss"): outcome.val_loss,
            final_metric("val_accuracy"): outcome.val_accuracy,
            "epochs_trained": float(outcome.epochs_trained),
            "fit_seconds": outcome.fit_seconds,
            **outcome.report.as_flat_metrics("val"),
        }
        self.end_trial_run(run_id, state="COMPLETE", metrics=final)

    def log_epoch(self, run_id: str, epoch: int, values: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, epoch) for k, v in values.items()])

    def reserve_model(self, run_id: str) -> tuple[str, str]:
        """The trial's logged model, created empty in the study's experiment; returns its id and URI.

        Quick (one row), so the URI is known before the Optuna trial is told; `finish_trial_run` fills it.
        """
        # Left to Model.log, MLflow 3.17 files the model under the active experiment, which is "Default" (0)
        # in a process that never set one.
        run = self.client.get_run(run_id)
        # Named after its run (trial-0007), so the Models tab tells the trials' models apart.
        logged = self.client.create_logged_model(
            self.experiment_id, name=run.info.run_name, source_run_id=run_id, params=dict(run.data.params)
        )
        return str(logged.model_id), f"models:/{logged.model_id}"

    def finish_trial_run(
        self, run_id: str, outcome: TrialOutcome, *, model_id: str, metrics: Mapping[str, float]
    ) -> None:
        """The model, the final metrics and the report artifacts on the uploads thread, while the next trial
        trains; the run ends FINISHED only after all of them are stored (see BackgroundUploads)."""
        self.uploads.submit(run_id, functools.partial(self._upload_outcome, run_id, outcome, model_id, metrics))

    def _upload_outcome(self, run_id: str, outcome: TrialOutcome, model_id: str, metrics: Mapping[str, float]) -> None:
        started = time.perf_counter()
        # The model first: MLflow links a run's step-0 metrics to a model logged after them by reading
        # each metric's history back (70 queries, 0.1 s). Logged after it, they carry its id directly.
        sha256 = self._save_model(run_id, outcome.model, model_id)
        self.log_report_artifacts(run_id, outcome.report, prefix="val", title="validation")
        final = {
            final_metric("val_loss"): outcome.val_loss,
            final_metric("val_accuracy"): outcome.val_accuracy,
            "epochs_trained": float(outcome.epochs_trained),
            "best_epoch": float(outcome.best_epoch),
            "fit_seconds": outcome.fit_seconds,
            **outcome.report.as_flat_metrics("val"),
            **metrics,
            "upload_seconds": time.perf_counter() - started,
        }
        now = int(time.time() * 1000)
        self.client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0, model_id=model_id) for k, v in final.items()],
            tags=[RunTag(MODEL_URI_KEY, f"models:/{model_id}"), RunTag(MODEL_SHA256_TAG, sha256)],
        )
        self.end_trial_run(run_id, state="COMPLETE")  # last: FINISHED means every artifact is there

    @functools.cached_property
    def uploads(self) -> BackgroundUploads:
        uploads = BackgroundUploads(self)
        uploads.background = self.background_uploads
        return uploads

    def log_report_artifacts(self, run_id: str, report: ClassificationReport, *, prefix: str, title: str) -> None:
        """The confusion matrix (JSON, CSV, PNG, HTML) and the per-class metrics, in one upload."""
        import tempfile

        matrix = report.matrix
        title = f"{title} confusion matrix"
        counts = {"labels": list(range(matrix.shape[0])), "rows": "true", "columns": "predicted"}
        files = {
            f"{prefix}_confusion_matrix.json": json.dumps({**counts, "counts": matrix.tolist()}).encode(),
            f"{prefix}_confusion_matrix.csv": _matrix_csv(matrix).encode(),
            f"{prefix}_per_class_metrics.csv": _csv_text(report.per_class_rows()).encode(),
            f"{prefix}_confusion_matrix.png": confusion_matrix_png(matrix, title=title),
            f"{prefix}_confusion_matrix.html": confusion_matrix_html(matrix, title=title).encode(),
        }
        with tempfile.TemporaryDirectory() as folder:
            for name, payload in files.items():
                (Path(folder) / name).write_bytes(payload)
            self.client.log_artifacts(run_id, folder)

    def _save_model(self, run_id: str, model: keras.Model, model_id: str) -> str:
        """Save the trained model into its reserved logged model (reserve_model); returns its file's sha256."""
        from mlflow.models import Model

        name = self.client.get_logged_model(model_id).name
        flavor = _ChecksummedKeras()
        # Model.log takes the run id, so the run is not resumed as the active run around it (0.03 s).
        with saved_as_uncompiled(model, keep_optimizer=self.model_optimizer_state), global_tracking_uri(self.uri):
            Model.log(
                artifact_path=None,
                name=name,
                flavor=flavor,
                run_id=run_id,
                model_id=model_id,
                model=model,
                pip_requirements=self._requirements,
                signature=_model_signature(),
            )
        return flavor.sha256

    def end_trial_run(
        self,
        run_id: str,
        *,
        state: str,
        message: str = "",
        pruned_epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Record how the trial ended: COMPLETE, PRUNED (with the epoch) or FAIL (with the error)."""
        tags = [RunTag(STATE_TAG, state)]
        if message:
            tags.append(RunTag(STATE_REASON_TAG, message[:4900]))
        if pruned_epoch is not None:
            tags.append(RunTag(PRUNED_AT_EPOCH_TAG, str(pruned_epoch)))
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, tags=tags, metrics=[Metric(k, v, now, 0) for k, v in (metrics or {}).items()])
        status = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED", "KILLED": "KILLED"}[state]
        self.client.set_terminated(run_id, status=status)

    def log_traceback(self, run_id: str, text: str) -> None:
        self.client.log_text(run_id, text, "error_traceback.txt")

    def model_sha256(self, run_id: str) -> str | None:
        """The sha256 of the run's model file as it was logged; None for a run logged before checksums."""
        try:
            return self.client.get_run(run_id).data.tags.get(MODEL_SHA256_TAG) or None
        except MlflowException:
            return None

    def run_status(self, run_id: str) -> str | None:
        try:
            return str(self.client.get_run(run_id).info.status)
        except MlflowException:
            return None

    def upload_may_be_running(self, run_id: str, *, completed: datetime.datetime | None) -> bool:
        """Whether a RUNNING run of a COMPLETE trial (completed then) may still be getting its artifacts
        (BackgroundUploads): its process has not provably ended (processes.ended) and UPLOAD_GRACE_SECONDS have
        not passed since the trial completed: the grace is the heartbeat of a process whose end cannot be seen."""
        if completed is None or (datetime.datetime.now() - completed).total_seconds() >= UPLOAD_GRACE_SECONDS:
            return False
        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            return False
        tags = run.data.tags
        worker = ProcessId.decode(tags.get(WORKER_PROCESS_TAG) or tags.get(WORKER_TAG, ""))
        return run.info.status == "RUNNING" and not (worker is not None and processes.ended(worker))

    def run_worker(self, run_id: str) -> str | None:
        """The worker that logs the run (its `worker` tag, placement.worker_tags), if the run is there."""
        try:
            return self.client.get_run(run_id).data.tags.get(WORKER_TAG)
        except MlflowException:
            return None

    def running_trial_runs(self, parent_run_id: str) -> list[tuple[str, int]]:
        """(run id, trial number) of the study's trial runs that MLflow still has as RUNNING."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and attributes.status = 'RUNNING'",
            max_results=MAX_RUNNING_RUNS,
        )
        return [
            (str(run.info.run_id), int(run.data.tags[TRIAL_NUMBER_TAG]))
            for run in runs
            if run.data.tags.get(ROLE_TAG) == TRIAL_ROLE and TRIAL_NUMBER_TAG in run.data.tags
        ]

    def close_orphaned_run(self, run_id: str, reason: str) -> bool:
        """End a run left RUNNING by a worker that died; returns whether it was still RUNNING."""
        if self.run_status(run_id) != RunStatus.to_string(RunStatus.RUNNING):
            return False
        self.client.log_batch(run_id, tags=[RunTag(STATE_TAG, "FAIL"), RunTag(STATE_REASON_TAG, reason)])
        self.client.set_terminated(run_id, status="KILLED")
        return True

    # ----------------------------------------------------------------------- the test set, on the parent

    def log_test_result(
        self, parent_run_id: str, *, test_loss: float, report: ClassificationReport, tags: Mapping[str, str]
    ) -> None:
        now = int(time.time() * 1000)
        metrics = {"test_loss": test_loss, "test_accuracy": report.overall_accuracy, **report.as_flat_metrics("test")}
        self.client.log_batch(
            parent_run_id,
            metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
            tags=[RunTag(k, v) for k, v in {TEST_SCORED_TAG: "true", **tags}.items()],
        )
        self.log_report_artifacts(parent_run_id, report, prefix="test", title="test set")

    def log_folder(self, run_id: str, folder: Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(folder), artifact_path)


# --------------------------------------------------------------------------- reading back

TRIAL_RUNS_FILTER = f"tags.`{ROLE_TAG}` = '{TRIAL_ROLE}'"


def find_experiment_id(*, uri: str, experiment: str) -> str | None:
    """The experiment's id, or None where there is none; creates nothing, not even a sqlite file."""
    if databases.nothing_recorded(uri):
        return None
    try:
        found = MlflowClient(tracking_uri=uri).get_experiment_by_name(experiment)
    except MlflowException as exc:
        raise TrackingError(f"tracking.uri = {uri!r}: {first_line(exc)}") from None
    return None if found is None else str(found.experiment_id)


def recorded_trial_metrics(*, uri: str, experiment: str) -> dict[str, dict[str, float]]:
    """The latest value of every metric of each trial run, by run id; {} where nothing is recorded."""
    experiment_id = find_experiment_id(uri=uri, experiment=experiment)
    if experiment_id is None:
        return {}
    client = MlflowClient(tracking_uri=uri)
    metrics: dict[str, dict[str, float]] = {}
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id], filter_string=TRIAL_RUNS_FILTER, max_results=1000, page_token=token)
        metrics.update({str(run.info.run_id): dict(run.data.metrics) for run in page})
        token = page.token
        if not token:
            return metrics
