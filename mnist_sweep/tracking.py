"""MLflow's store and the study's experiment: opened (made where missing) and read back here. What is logged under
the study's parent run is the ledger's (ledger.py); runs left by dead workers, dead_runs.py's."""

from __future__ import annotations

from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_sweep import databases
from mnist_sweep.config import TrackingConfig
from mnist_sweep.errors import TrackingError, first_line
from mnist_sweep.locations import artifact_location, local_artifact_folder
from mnist_sweep.placement import WORKER_TAG
from mnist_sweep.records import EXPERIMENT_KIND_TAG, MODEL_SHA256_TAG, MODEL_TRAINING, ROLE_TAG, TRIAL_ROLE
from mnist_sweep.workarounds import create_mlflow_tables


def _make_local_folders(uri: str, artifacts: str) -> None:
    database = databases.sqlite_file(uri)
    if database is not None:
        database.parent.mkdir(parents=True, exist_ok=True)
    folder = local_artifact_folder(uri, artifacts)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class LoggedRun:
    params: dict[str, str]
    metrics: dict[str, float]  # the latest value of each
    tags: dict[str, str]


def read_run(uri: str, run_id: str) -> LoggedRun:
    """A run's params, latest metrics and tags, read without creating anything (no store, no experiment)."""
    if databases.nothing_recorded(uri):
        raise TrackingError(f"tracking.uri = {uri!r}: no MLflow store there yet")
    try:
        run = MlflowClient(tracking_uri=uri).get_run(run_id)
    except MlflowException as exc:
        raise TrackingError(f"run {run_id!r} in tracking.uri = {uri!r}: {first_line(exc)}") from None
    return LoggedRun(dict(run.data.params), dict(run.data.metrics), dict(run.data.tags))


# tracking.background_uploads' default, the one place it is decided: the sweep file's.
BACKGROUND_UPLOADS = TrackingConfig.model_fields["background_uploads"].default


class Tracker:
    """The connection to MLflow's store and the study's experiment (one per study), and runs read back by id.
    `model_optimizer_state` and `background_uploads`: how the study's ledger (ledger.py) writes to it."""

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

    # ----------------------------------------------------------------------- runs read back by id

    def parent_exists(self, run_id: str) -> bool:
        """Whether the run is there and not deleted (a study's parent run can be deleted in the UI)."""
        try:
            return self.client.get_run(run_id).info.lifecycle_stage == "active"
        except MlflowException:
            return False

    def run_status(self, run_id: str) -> str | None:
        try:
            return str(self.client.get_run(run_id).info.status)
        except MlflowException:
            return None

    def model_sha256(self, run_id: str) -> str | None:
        """The sha256 of the run's model file as it was logged; None for a run logged before checksums."""
        try:
            return self.client.get_run(run_id).data.tags.get(MODEL_SHA256_TAG) or None
        except MlflowException:
            return None

    def run_worker(self, run_id: str) -> str | None:
        """The worker that logs the run (its `worker` tag, placement.worker_tags), if the run is there."""
        try:
            return self.client.get_run(run_id).data.tags.get(WORKER_TAG)
        except MlflowException:
            return None


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
