"""The study's ledger in MLflow: the experiment, the study's parent run and one child run per trial, opened, closed
and read back here. The files that go into runs are built in artifacts.py; stored in the background by uploads.py."""

from __future__ import annotations

import datetime
import functools
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_sweep import databases, environment, processes
from mnist_sweep.artifacts import ModelWriter, report_files
from mnist_sweep.config import TrackingConfig
from mnist_sweep.errors import TrackingError, first_line
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
from mnist_sweep.uploads import BackgroundUploads
from mnist_sweep.workarounds import create_mlflow_tables

if TYPE_CHECKING:
    from mnist_sweep.trial import TrialOutcome

MAX_RUNNING_RUNS = 1000
REFERENCE_RUN_NAME = "lecture-network"


def _make_local_folders(uri: str, artifacts: str) -> None:
    database = databases.sqlite_file(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    folder = local_artifact_folder(uri, artifacts)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)


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
# tracking.background_uploads' default, the one place it is decided: the sweep file's.
BACKGROUND_UPLOADS = TrackingConfig.model_fields["background_uploads"].default


class Tracker:
    """The study's ledger in MLflow: one experiment per study, its parent run and the trial runs nested under it,
    opened and closed here; what goes into them is built by artifacts.py and stored by uploads.py."""

    def __init__(
        self,
        *,
        uri: str,
        artifacts: str,
        experiment: str,
        model_optimizer_state: bool = False,
        background_uploads: bool = BACKGROUND_UPLOADS,
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
    def models(self) -> ModelWriter:
        return ModelWriter(self.client, uri=self.uri, keep_optimizer=self.model_optimizer_state)

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

    def close_reference_run(self, run_id: str, outcome: TrialOutcome) -> None:
        """Its validation confusion matrix and final metrics; no model: it is never scored or served."""
        self.log_report(run_id, outcome.report, prefix="val", title="validation")
        final = {
            final_metric("val_loss"): outcome.val_loss,
            final_metric("val_accuracy"): outcome.val_accuracy,
            "epochs_trained": float(outcome.epochs_trained),
            "fit_seconds": outcome.fit_seconds,
            **outcome.report.as_flat_metrics("val"),
        }
        self.close_run(run_id, state="COMPLETE", metrics=final)

    def log_epoch(self, run_id: str, epoch: int, values: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, epoch) for k, v in values.items()])

    def reserve_model(self, run_id: str) -> tuple[str, str]:
        """The trial's logged model, created empty in the study's experiment; returns its id and URI.

        Quick (one row), so the URI is known before the Optuna trial is told; `queue_outcome` fills it.
        """
        # Left to Model.log, MLflow 3.17 files the model under the active experiment, which is "Default" (0)
        # in a process that never set one.
        run = self.client.get_run(run_id)
        # Named after its run (trial-0007), so the Models tab tells the trials' models apart.
        logged = self.client.create_logged_model(
            self.experiment_id, name=run.info.run_name, source_run_id=run_id, params=dict(run.data.params)
        )
        return str(logged.model_id), f"models:/{logged.model_id}"

    def queue_outcome(self, run_id: str, outcome: TrialOutcome, *, model_id: str, metrics: Mapping[str, float]) -> None:
        """Queue the model, the final metrics and the report artifacts for the uploads (in the background, while
        the next trial trains, or at once); the run is closed FINISHED only after all of them are stored."""
        self.uploads.submit(run_id, functools.partial(self._upload_outcome, run_id, outcome, model_id, metrics))

    def _upload_outcome(self, run_id: str, outcome: TrialOutcome, model_id: str, metrics: Mapping[str, float]) -> None:
        started = time.perf_counter()
        # The model first: MLflow links a run's step-0 metrics to a model logged after them by reading
        # each metric's history back (70 queries, 0.1 s). Logged after it, they carry its id directly.
        sha256 = self.models.save(run_id, outcome.model, model_id)
        self.log_report(run_id, outcome.report, prefix="val", title="validation")
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
        self.close_run(run_id, state="COMPLETE")  # last: FINISHED means every artifact is there

    @functools.cached_property
    def uploads(self) -> BackgroundUploads:
        return BackgroundUploads(background=self.background_uploads, on_failure=self._upload_failed)

    def _upload_failed(self, run_id: str, error: BaseException) -> None:
        self.close_run(run_id, state="FAIL", message=f"storing the trial's artifacts failed: {first_line(error)}")

    def log_report(self, run_id: str, report: ClassificationReport, *, prefix: str, title: str) -> None:
        """The confusion matrix and the per-class metrics (artifacts.report_files), in one upload."""
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            for name, payload in report_files(report, prefix=prefix, title=title).items():
                (Path(folder) / name).write_bytes(payload)
            self.client.log_artifacts(run_id, folder)

    def close_run(
        self,
        run_id: str,
        *,
        state: str,
        message: str = "",
        pruned_epoch: int | None = None,
        metrics: Mapping[str, float] | None = None,
    ) -> None:
        """Close the run now, recording how it ended: COMPLETE, PRUNED (with the epoch), FAIL (with the error) or
        KILLED."""
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
        self.log_report(parent_run_id, report, prefix="test", title="test set")

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
