"""The study's ledger in MLflow, bound to its parent run: the parent's status, description, test result and report,
and the child runs opened under it (the trials, the lecture's network), closed here. The files that go into runs
are built in artifacts.py and stored in the background by uploads.py; the store and experiment are tracking.py's."""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Metric, Param, RunTag

from mnist_sweep import environment, interrupt
from mnist_sweep.artifacts import ModelWriter, report_files
from mnist_sweep.errors import first_line
from mnist_sweep.metrics import ClassificationReport
from mnist_sweep.placement import worker_tags
from mnist_sweep.records import (
    BACKEND_TAG,
    BASELINE_TAG,
    DESCRIPTION_TAG,
    DEVICE_TAG,
    MODEL_SHA256_TAG,
    MODEL_URI_KEY,
    PARENT_RUN_ATTR,
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
from mnist_sweep.tracking import Tracker
from mnist_sweep.uploads import BackgroundUploads

if TYPE_CHECKING:
    import optuna

    from mnist_sweep.trial import TrialOutcome

PARENT_WAIT_SECONDS = 60.0
REFERENCE_RUN_NAME = "lecture-network"
RUN_END_STATUS = {"COMPLETE": "FINISHED", "PRUNED": "FINISHED", "FAIL": "FAILED", "KILLED": "KILLED"}


class StudyLedger:
    """What one study logs to MLflow, bound to its parent run from construction: the parent itself, and the runs
    nested under it, each opened and closed here."""

    def __init__(self, tracker: Tracker, *, parent_run_id: str, study_name: str) -> None:
        self.tracker = tracker
        self.client = tracker.client
        self.parent_run_id = parent_run_id
        self.study_name = study_name

    @classmethod
    def create(cls, tracker: Tracker, *, study_name: str, config: Mapping[str, Any]) -> StudyLedger:
        """A new parent run for the study, with its sweep file's resolved config (sweep.json)."""
        run = tracker.client.create_run(
            tracker.experiment_id, run_name=study_name, tags={ROLE_TAG: STUDY_ROLE, STUDY_TAG: study_name}
        )
        tracker.client.log_dict(run.info.run_id, dict(config), "sweep.json")
        return cls(tracker, parent_run_id=str(run.info.run_id), study_name=study_name)

    @classmethod
    def open(cls, study: optuna.Study, tracker: Tracker, *, created: bool, config: Mapping[str, Any]) -> StudyLedger:
        """The study's ledger on its parent run: made once by the process that created the study, waited for by
        the others."""
        if not created:
            stored = interrupt.poll(lambda: _stored_parent(study, tracker), every=0.5, timeout=PARENT_WAIT_SECONDS)
            if stored:
                return cls(tracker, parent_run_id=stored, study_name=study.study_name)
            # The creator died before making it, or the run was deleted: make a new one.
        ledger = cls.create(tracker, study_name=study.study_name, config=config)
        study.set_user_attr(PARENT_RUN_ATTR, ledger.parent_run_id)
        return ledger

    @classmethod
    def recorded(cls, study: optuna.Study, *, uri: str) -> StudyLedger | None:
        """The study's ledger where its store, experiment and parent run exist, else None; makes nothing."""
        tracker = Tracker.existing(uri=uri, experiment=study.study_name)
        parent = str(study.user_attrs.get(PARENT_RUN_ATTR) or "")
        if tracker is None or not tracker.parent_exists(parent):
            return None
        return cls(tracker, parent_run_id=parent, study_name=study.study_name)

    @functools.cached_property
    def models(self) -> ModelWriter:
        return ModelWriter(self.client, uri=self.tracker.uri, keep_optimizer=self.tracker.model_optimizer_state)

    @functools.cached_property
    def uploads(self) -> BackgroundUploads:
        return BackgroundUploads(background=self.tracker.background_uploads, on_failure=self._upload_failed)

    @functools.cached_property
    def _machine_tags(self) -> dict[str, str]:
        # Asked at the first trial, once Keras is loaded: the device its backend trains on.
        return {BACKEND_TAG: environment.keras_backend(), DEVICE_TAG: environment.device(), **worker_tags()}

    # ----------------------------------------------------------------------- the parent run

    def set_status(self, status: str) -> None:
        """RUNNING, or an end status with the end time, so the UI shows how long the study ran."""
        if status == "RUNNING":
            self.client.update_run(self.parent_run_id, status=status)
        else:
            self.client.set_terminated(self.parent_run_id, status=status)

    def describe(self, markdown: str) -> None:
        """The study's description, shown at the top of its run's page in the MLflow UI."""
        self.client.set_tag(self.parent_run_id, DESCRIPTION_TAG, markdown)

    def log_test_result(self, *, test_loss: float, report: ClassificationReport, tags: Mapping[str, str]) -> None:
        """The test numbers, `tags` and report files on the parent run; the numbers once: where a rerun finishing
        a record finds `tags` logged already, they are there too (metrics and tags are one log_batch)."""
        logged = self.client.get_run(self.parent_run_id).data.tags
        if not all(logged.get(key) == value for key, value in tags.items()):
            now = int(time.time() * 1000)
            metrics = {
                "test_loss": test_loss,
                "test_accuracy": report.overall_accuracy,
                **report.as_flat_metrics("test"),
            }
            self.client.log_batch(
                self.parent_run_id,
                metrics=[Metric(k, v, now, 0) for k, v in metrics.items()],
                tags=[RunTag(k, v) for k, v in {TEST_SCORED_TAG: "true", **tags}.items()],
            )
        self._log_report(self.parent_run_id, report, prefix="test", title="test set")

    def log_report_folder(self, folder: Path) -> None:
        """The study's report folder, under `report/` in the parent run."""
        self.client.log_artifacts(self.parent_run_id, str(folder), "report")

    # ----------------------------------------------------------------------- runs under the parent

    def start_trial_run(
        self, *, trial_number: int, params: Mapping[str, Any], tags: Mapping[str, str] | None = None
    ) -> str:
        """`tags`: the worker policy's, besides the trial's own and the machine's."""
        own = {ROLE_TAG: TRIAL_ROLE, TRIAL_NUMBER_TAG: str(trial_number), STATE_TAG: "RUNNING"}
        return self._start_child_run(f"trial-{trial_number:04d}", {**(tags or {}), **own}, params)

    def start_reference_run(self, *, params: Mapping[str, Any]) -> str:
        """The lecture's network's run: a child of the study's run like the trials, but not one of them (its role)."""
        tags = {ROLE_TAG: REFERENCE_ROLE, BASELINE_TAG: "true", STATE_TAG: "RUNNING"}
        return self._start_child_run(REFERENCE_RUN_NAME, tags, params)

    def _start_child_run(self, name: str, tags: Mapping[str, str], params: Mapping[str, Any]) -> str:
        run = self.client.create_run(
            self.tracker.experiment_id,
            run_name=name,
            tags={**tags, PARENT_TAG: self.parent_run_id, STUDY_TAG: self.study_name, **self._machine_tags},
        )
        run_id = str(run.info.run_id)
        self.client.log_batch(run_id, params=[Param(k, str(v)) for k, v in params.items()])
        return run_id

    def log_epoch(self, run_id: str, epoch: int, values: Mapping[str, float]) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, v, now, epoch) for k, v in values.items()])

    def close_reference_run(self, run_id: str, outcome: TrialOutcome) -> None:
        """Its validation confusion matrix and final metrics; no model: it is never scored or served."""
        self._log_report(run_id, outcome.report, prefix="val", title="validation")
        final = {
            final_metric("val_loss"): outcome.val_loss,
            final_metric("val_accuracy"): outcome.val_accuracy,
            "epochs_trained": float(outcome.epochs_trained),
            "fit_seconds": outcome.fit_seconds,
            **outcome.report.as_flat_metrics("val"),
        }
        self.close_run(run_id, state="COMPLETE", metrics=final)

    def reserve_model(self, run_id: str) -> tuple[str, str]:
        """The trial's logged model, created empty in the study's experiment; returns its id and URI.

        Quick (one row), so the URI is known before the Optuna trial is told; `queue_outcome` fills it.
        """
        # Left to Model.log, MLflow 3.17 files the model under the active experiment, which is "Default" (0)
        # in a process that never set one.
        run = self.client.get_run(run_id)
        # Named after its run (trial-0007), so the Models tab tells the trials' models apart.
        logged = self.client.create_logged_model(
            self.tracker.experiment_id, name=run.info.run_name, source_run_id=run_id, params=dict(run.data.params)
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
        self._log_report(run_id, outcome.report, prefix="val", title="validation")
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

    def _upload_failed(self, run_id: str, error: BaseException) -> None:
        self.close_run(run_id, state="FAIL", message=f"storing the trial's artifacts failed: {first_line(error)}")

    def _log_report(self, run_id: str, report: ClassificationReport, *, prefix: str, title: str) -> None:
        """The confusion matrix and the per-class metrics (artifacts.report_files), in one upload."""
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
        self.client.set_terminated(run_id, status=RUN_END_STATUS[state])

    def log_traceback(self, run_id: str, text: str) -> None:
        self.client.log_text(run_id, text, "error_traceback.txt")

    def log_folder(self, run_id: str, folder: Path, artifact_path: str) -> None:
        self.client.log_artifacts(run_id, str(folder), artifact_path)


def _stored_parent(study: optuna.Study, tracker: Tracker) -> str | None:
    """The stored parent run's id once it is there; "" if it was deleted (make another); None while waiting."""
    stored = study.user_attrs.get(PARENT_RUN_ATTR)
    if not stored:
        return None
    return str(stored) if tracker.parent_exists(stored) else ""
