"""Choose the trial, score the test set once, and seal the study.

The seal is a second Optuna study named `<study>.test-seal`: creating a study is atomic in every RDB
storage (a unique name), so of two processes that finish at the same moment exactly one scores the test
set; the other waits for the recorded result. The caller first makes sure no trial is live (live.py); the
result names the finished trials the chosen one was ranked among, so a trial that finishes after the seal
(asked for just before it) is recorded but never chosen.

The result is written to the seal first, the moment it is known: a claimant that dies after scoring (a second
Ctrl-C, SIGKILL) leaves it there, and the next finalize records it in MLflow and on the study from the seal
instead of scoring the test set a second time.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import optuna
from optuna.trial import FrozenTrial, TrialState

from mnist_sweep import interrupt, processes
from mnist_sweep.artifacts import MODEL_FILE, global_tracking_uri
from mnist_sweep.asha import model_epochs
from mnist_sweep.config import SEAL_SUFFIX, metric_maximizes
from mnist_sweep.data import DataSource, Images, Labels, file_sha256, load_test_split
from mnist_sweep.dead_runs import upload_may_be_running
from mnist_sweep.environment import environment
from mnist_sweep.errors import FinalizeError, first_line
from mnist_sweep.heartbeat import beating
from mnist_sweep.metrics import ClassificationReport, classification_report, confusion_matrix, wilson_interval
from mnist_sweep.processes import ProcessId, this_process
from mnist_sweep.records import (
    CLAIM_HEARTBEAT_ATTR,
    CLAIMED_AT_ATTR,
    CLAIMED_BY_ATTR,
    MODEL_URI_KEY,
    RUN_ID_ATTR,
    TEST_RESULT_ATTR,
    TEST_SCORED_AT_TAG,
    TEST_SCORED_RUN_ID_TAG,
    TEST_SCORED_TRIAL_TAG,
    VAL_ACCURACY_ATTR,
    VAL_LOSS_ATTR,
    TestResult,
)
from mnist_sweep.study import StudyContext
from mnist_sweep.tracking import Tracker

if TYPE_CHECKING:
    import keras

RESULT_WAIT_SECONDS = 600.0
POLL_SECONDS = 1.0
# The claimant of the test set beats this often while it scores; a claim whose beat is older is taken over.
CLAIM_HEARTBEAT_SECONDS = 5.0
CLAIM_STALE_SECONDS = 60.0


def seal_name(study_name: str) -> str:
    return study_name + SEAL_SUFFIX


def recorded_result(study: optuna.Study) -> TestResult | None:
    """The test result stored on the study, if its test set was scored."""
    result = study.user_attrs.get(TEST_RESULT_ATTR)
    return TestResult.from_dict(result) if result else None


def seal_claimed(storage: optuna.storages.BaseStorage, study_name: str) -> bool:
    """True once a process has started scoring the test set (or finished)."""
    names = {s.study_name for s in optuna.get_all_study_summaries(storage, include_best_trial=False)}
    return seal_name(study_name) in names


def rank_trials(trials: Sequence[FrozenTrial], *, metric: str) -> list[FrozenTrial]:
    """Complete trials best first by `metric`, in the config's direction; then the others by number.

    The one ranking: the leaderboard is in this order and `choose_trial` scores its best complete trial.
    Ties go to the earlier trial, so neither depends on the order workers finished.
    """
    maximize = metric_maximizes(metric)

    def key(t: FrozenTrial) -> tuple[int, float, int]:
        if t.state == TrialState.COMPLETE and t.value is not None:
            return (0, -t.value if maximize else t.value, t.number)
        return (1, 0.0, t.number)

    return sorted(trials, key=key)


def finished_trials(study: optuna.Study) -> tuple[int, ...]:
    """The numbers of the study's trials that have ended COMPLETE or PRUNED: those a choice is made among."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    return tuple(sorted(t.number for t in finished))


def choose_trial(
    study: optuna.Study,
    metric: str,
    *,
    stored: Callable[[FrozenTrial], bool] = lambda trial: True,
    counted: Collection[int] | None = None,
) -> FrozenTrial:
    """The best complete trial by the study metric that has a logged model, `stored` in full; among the
    `counted` trial numbers only, where given (a trial that finished after them is not a candidate)."""
    for trial in rank_trials(study.get_trials(deepcopy=False), metric=metric):
        if counted is not None and trial.number not in counted:
            continue
        complete = trial.state == TrialState.COMPLETE and trial.value is not None
        if complete and trial.user_attrs.get(MODEL_URI_KEY) and stored(trial):
            return trial
    raise FinalizeError(f"study {study.study_name!r} has no complete trial with a logged model to score")


def artifacts_stored(tracker: Tracker, trial: FrozenTrial) -> bool:
    """Whether the trial's run is FINISHED, which it becomes only once its model and reports are stored
    (uploads.BackgroundUploads); an upload still running in another worker is waited for."""

    run_id = str(trial.user_attrs.get(RUN_ID_ATTR, ""))

    def status() -> str | None:
        if upload_may_be_running(tracker, run_id, completed=trial.datetime_complete):
            return None
        return tracker.run_status(run_id) or ""

    return interrupt.poll(status, every=POLL_SECONDS) == "FINISHED"


def load_scored_model(model_uri: str, *, tracking_uri: str, sha256: str | None = None) -> keras.Model:
    """The logged model, if it is in the one format this tool writes, loaded with Keras' safe mode.

    With `sha256` (recorded when the model was logged), a model file changed since is refused before Keras reads
    it. A `.keras` file with a Lambda layer (code) is refused by safe mode; an MLmodel saying
    `save_exported_model: true` would be a TensorFlow SavedModel, which has no safe mode: refused too.
    """
    import keras
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="mnist-sweep-model-") as folder:
        try:
            with global_tracking_uri(tracking_uri):
                local = Path(download_artifacts(artifact_uri=model_uri, dst_path=folder, tracking_uri=tracking_uri))
            flavor = Model.load(str(local / "MLmodel")).flavors.get("keras")
        except Exception as exc:  # MLflow and the artifact store raise many kinds; one line for the user
            raise FinalizeError(f"model {model_uri}: cannot read it ({first_line(exc)})") from None
        written_here = (
            isinstance(flavor, dict) and flavor.get("data") == "data" and flavor.get("save_exported_model") is False
        )
        if not written_here or not (local / MODEL_FILE).is_file():
            raise FinalizeError(
                f"model {model_uri}: not a model this tool wrote (MLflow keras flavor with {MODEL_FILE}, "
                f"save_exported_model: false); refusing to load it"
            )
        found = file_sha256(local / MODEL_FILE)
        if sha256 is not None and found != sha256:
            raise FinalizeError(
                f"model {model_uri}: {MODEL_FILE} has changed since it was logged (sha256 {found[:16]}, "
                f"recorded {sha256[:16]}); refusing to score it, the test set is not used"
            )
        try:
            return keras.saving.load_model(local / MODEL_FILE, compile=False, safe_mode=True)
        except Exception as exc:
            raise FinalizeError(f"model {model_uri}: Keras refused to load it safely ({first_line(exc)})") from None


def _claim(
    storage: optuna.storages.BaseStorage, study_name: str, *, reclaim: bool, echo: Callable[[str], None]
) -> bool:
    """Take the test set for this process: True if it did; False while another process holds a live claim."""
    holder = _claim_holder(storage, study_name)
    if holder is not None:
        _release_if_abandoned(storage, holder, echo, waited=0.0, reclaim=reclaim)
    try:
        seal = optuna.create_study(study_name=seal_name(study_name), storage=storage)
    except optuna.exceptions.DuplicatedStudyError:
        return False
    # The heartbeat first: a claim seen without one is being written (or its claimant died right then).
    seal.set_user_attr(CLAIM_HEARTBEAT_ATTR, _now())
    seal.set_user_attr(CLAIMED_BY_ATTR, this_process().encode())
    seal.set_user_attr(CLAIMED_AT_ATTR, _now())
    return True


def _claim_holder(storage: optuna.storages.BaseStorage, study_name: str) -> tuple[int, dict[str, object]] | None:
    """(the seal's study id, its attributes) while the test set is claimed, else None."""
    try:
        study_id = storage.get_study_id_from_name(seal_name(study_name))
        return study_id, dict(storage.get_study_user_attrs(study_id))
    except KeyError:  # no claim, or it was deleted a moment ago
        return None


def _abandoned(attrs: dict[str, object], *, waited: float) -> str | None:
    """Who left the claim described by `attrs` and how it shows, or None while its claimant may be scoring.

    Taken over only when its claimant has provably ended (processes.ended: this host and PID namespace) or its
    heartbeat is older than CLAIM_STALE_SECONDS; a `host:pid` that merely does not run here proves nothing.
    """
    claimant = ProcessId.decode(str(attrs.get(CLAIMED_BY_ATTR, "")))
    label = claimant.label if claimant is not None else "a process that never wrote its name"
    if claimant is not None and processes.ended(claimant):
        return f"{label}, a process that no longer runs on this host"
    beat = _moment(attrs.get(CLAIM_HEARTBEAT_ATTR) or attrs.get(CLAIMED_AT_ATTR))  # older claims: claimed_at
    if beat is None:  # judged by how long this process has watched it stay so
        return f"{label}, which never completed its claim" if waited > CLAIM_STALE_SECONDS else None
    # Wall clocks of two hosts compared, as Optuna's trial heartbeats are: they are assumed to agree within seconds.
    age = (datetime.now(timezone.utc) - beat).total_seconds()
    return f"{label}, whose heartbeat stopped at {_iso(beat)}" if age > CLAIM_STALE_SECONDS else None


def _moment(value: object) -> datetime | None:
    """An ISO time with its zone, as _now writes it; None for anything else."""
    try:
        moment = datetime.fromisoformat(str(value)) if value else None
    except ValueError:
        return None
    return moment if moment is not None and moment.tzinfo is not None else None


def _release_if_abandoned(
    storage: optuna.storages.BaseStorage,
    holder: tuple[int, dict[str, object]],
    echo: Callable[[str], None],
    *,
    waited: float,
    reclaim: bool = False,
) -> bool:
    """Delete the claim `holder` if it is abandoned (or `reclaim`); True if it is gone."""
    study_id, attrs = holder
    if attrs.get(TEST_RESULT_ATTR):  # scored: recorded from the seal (_result_of_ended_claim), never scored again
        return False
    why = None if reclaim else _abandoned(attrs, waited=waited)
    if not reclaim and why is None:
        return False
    if why is not None:
        echo(f"the test set was claimed by {why}; taking over")
    # By its id: only the claim judged here, never one another process has made since (ids are not reused).
    with contextlib.suppress(KeyError):
        storage.delete_study(study_id)
    return True


@contextlib.contextmanager
def _claim_heartbeat(storage: optuna.storages.BaseStorage, study_name: str) -> Iterator[None]:
    """While within, the claimant's heartbeat on the seal every CLAIM_HEARTBEAT_SECONDS: a live claim."""
    holder = _claim_holder(storage, study_name)
    if holder is None:
        yield
        return
    claim_id = holder[0]

    def beat() -> None:
        with contextlib.suppress(Exception):  # a store that is busy now: the next beat is in time
            storage.set_study_user_attr(claim_id, CLAIM_HEARTBEAT_ATTR, _now())

    with beating(beat, every=CLAIM_HEARTBEAT_SECONDS, name="mnist-sweep-claim-heartbeat", at_start=False):
        yield


def _now() -> str:
    return _iso(datetime.now(timezone.utc))


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds")


def _wait_for_result(
    study: optuna.Study, storage: optuna.storages.BaseStorage, echo: Callable[[str], None]
) -> TestResult | None:
    """The result the claimant records; None once its claim was abandoned and is released, to be taken over."""
    echo("another process is scoring the test set; waiting for its result")
    started = time.monotonic()

    def result_or_released() -> tuple[TestResult | None] | None:
        result = recorded_result(optuna.load_study(study_name=study.study_name, storage=storage))
        ended = _result_of_ended_claim(storage, study.study_name, echo=echo, waited=time.monotonic() - started)
        if result is not None or ended is not None:
            return (result or ended,)
        holder = _claim_holder(storage, study.study_name)
        if holder is None or _release_if_abandoned(storage, holder, echo, waited=time.monotonic() - started):
            return (None,)
        return None

    waited = interrupt.poll(result_or_released, every=POLL_SECONDS, timeout=RESULT_WAIT_SECONDS)
    if waited is not None:
        return waited[0]
    attrs = optuna.load_study(study_name=seal_name(study.study_name), storage=storage).user_attrs
    claimant = ProcessId.decode(str(attrs.get(CLAIMED_BY_ATTR, "")))
    raise FinalizeError(
        f"the test set was claimed by {claimant.label if claimant else None} at {attrs.get(CLAIMED_AT_ATTR)} "
        "but no result was recorded; if that process died, run `mnist-sweep finalize SWEEP --reclaim`"
    )


def score_test_set(
    *,
    context: StudyContext,
    source: DataSource,
    metric: str,
    echo: Callable[[str], None],
    reclaim: bool = False,
) -> tuple[TestResult, bool]:
    """Score the chosen trial's logged model on the test set, once; returns (result, scored_now)."""
    study, storage, tracker = context.study, context.storage, context.ledger.tracker
    existing = recorded_result(study)
    if existing is not None:
        return existing, False
    ended = _result_of_ended_claim(storage, study.study_name, echo=echo, waited=0.0, reclaim=reclaim)
    if ended is not None:
        _record(context, ended)
        return ended, False
    counted = finished_trials(study)  # what the choice is made among, recorded with the result
    chosen = choose_trial(study, metric, stored=lambda trial: artifacts_stored(tracker, trial), counted=counted)
    # Load before claiming, so a corrupt test file or a missing model leaves the seal unclaimed.
    sha256 = tracker.model_sha256(str(chosen.user_attrs.get(RUN_ID_ATTR, "")))
    if sha256 is None:
        echo(f"trial {chosen.number}'s run records no checksum of its model (logged before they were): not checked")
    model = load_scored_model(chosen.user_attrs[MODEL_URI_KEY], tracking_uri=tracker.uri, sha256=sha256)
    x_test, y_test = load_test_split(source)
    while not _claim(storage, study.study_name, reclaim=reclaim, echo=echo):
        reclaim = False  # only ever the claim found at the start: never one made since by a live process
        waited = _wait_for_result(study, storage, echo)
        if waited is not None:
            if recorded_result(study) is None:  # read from the seal of a claimant that ended before recording it
                _record(context, waited)
            return waited, False
    claim = _claim_holder(storage, study.study_name)  # its id: only this claim is ever sealed or released below
    if claim is None:
        raise FinalizeError(f"the claim on study {study.study_name!r}'s test set vanished as it was made; rerun")
    with _released_unless_scored(storage, claim[0]), _claim_heartbeat(storage, study.study_name):
        test_loss, report = _evaluate(model, x_test, y_test)
        result = _test_result(
            study.study_name,
            chosen,
            epochs=model_epochs(study.get_trials(deepcopy=False), chosen),  # a promotion's earlier epochs too
            metric=metric,
            test_loss=test_loss,
            report=report,
            images=len(y_test),
            counted=counted,
        )
        _seal_result(storage, claim[0], study.study_name, result)  # from here on it is scored, whatever happens
        _record(context, result)
    return result, True


@contextlib.contextmanager
def _released_unless_scored(storage: optuna.storages.BaseStorage, claim_id: int) -> Iterator[None]:
    """A claimant stopped before its result is on the seal (a second Ctrl-C, an error) deletes its claim, so the
    next finalize, on any host, scores at once instead of waiting out the claim's heartbeat."""
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):  # gone already, or a store that is down: the claim goes stale instead
            if not storage.get_study_user_attrs(claim_id).get(TEST_RESULT_ATTR):
                storage.delete_study(claim_id)
        raise


def _seal_result(storage: optuna.storages.BaseStorage, claim_id: int, study_name: str, result: TestResult) -> None:
    """The result on this process's claim; refused if the claim was taken over meanwhile (it is another's now)."""
    try:
        storage.get_study_user_attrs(claim_id)
    except KeyError:
        raise FinalizeError(
            f"the claim on study {study_name!r}'s test set was taken over while this process scored; "
            "its result is not recorded"
        ) from None
    storage.set_study_user_attr(claim_id, TEST_RESULT_ATTR, result.to_dict())


def _result_of_ended_claim(
    storage: optuna.storages.BaseStorage,
    study_name: str,
    *,
    echo: Callable[[str], None],
    waited: float,
    reclaim: bool = False,
) -> TestResult | None:
    """The result on the seal of a claimant that ended (or is reclaimed) after scoring, before recording it."""
    holder = _claim_holder(storage, study_name)
    sealed = holder[1].get(TEST_RESULT_ATTR) if holder is not None else None
    if holder is None or not isinstance(sealed, dict):
        return None
    why = _abandoned(holder[1], waited=waited)
    if why is None and not reclaim:
        return None  # its claimant is recording it now
    echo(
        f"the test set was scored by {why or 'a claim taken over with --reclaim'}; its result, on the seal, is "
        "recorded now: nothing scored again"
    )
    return TestResult.from_dict(sealed)


def _evaluate(model: keras.Model, x_test: Images, y_test: Labels) -> tuple[float, ClassificationReport]:
    """The test loss and the classification report of the model's predictions."""
    probabilities = np.asarray(model.predict(x_test, batch_size=2048, verbose=0))
    # Keras' sparse cross-entropy clips at 1e-7 too; regularisation terms are not part of a test loss.
    picked = np.clip(probabilities[np.arange(len(y_test)), y_test], 1e-7, 1.0)
    test_loss = float(-np.mean(np.log(picked)))
    return test_loss, classification_report(confusion_matrix(y_test, probabilities.argmax(axis=1)))


def _test_result(
    study_name: str,
    chosen: FrozenTrial,
    *,
    epochs: int | None,
    metric: str,
    test_loss: float,
    report: ClassificationReport,
    images: int,
    counted: tuple[int, ...],
) -> TestResult:
    """The chosen trial's validation record beside its test numbers, with when, where and by whom."""
    low, high = wilson_interval(int(np.trace(report.matrix)), images)
    return TestResult(
        study=study_name,
        trial_number=chosen.number,
        run_id=chosen.user_attrs.get(RUN_ID_ATTR),
        model_uri=chosen.user_attrs[MODEL_URI_KEY],
        params=dict(chosen.params),
        metric=metric,
        val_loss=chosen.user_attrs.get(VAL_LOSS_ATTR),
        val_accuracy=chosen.user_attrs.get(VAL_ACCURACY_ATTR),
        epochs_trained=epochs,
        test_images=images,
        test_loss=test_loss,
        test_accuracy=report.overall_accuracy,
        test_accuracy_ci95=(low, high),
        test_confusion_matrix=tuple(tuple(row) for row in report.matrix.tolist()),
        test_per_class=tuple(report.per_class_rows()),
        scored_at=_now(),
        scored_by=this_process().label,
        environment=environment(),
        counted_trials=counted,
    )


def _record(context: StudyContext, result: TestResult) -> None:
    """The test numbers on the study's MLflow parent run (once: a rerun finishing a record logs no second copy),
    then the result on the study, which readers (report, trials) take as recorded everywhere."""
    report = classification_report(np.asarray(result.test_confusion_matrix))
    tags = {
        TEST_SCORED_TRIAL_TAG: str(result.trial_number),
        TEST_SCORED_AT_TAG: result.scored_at,
        TEST_SCORED_RUN_ID_TAG: str(result.run_id),
    }
    context.ledger.log_test_result(test_loss=result.test_loss, report=report, tags=tags)
    context.study.set_user_attr(TEST_RESULT_ATTR, result.to_dict())


def result_line(result: TestResult) -> str:
    low, high = result.test_accuracy_ci95
    return (
        f"test accuracy {result.test_accuracy:.4f} (95% CI {low:.4f}-{high:.4f}), "
        f"test loss {result.test_loss:.4f} on {result.test_images} images; "
        f"trial {result.trial_number} (run {result.run_id}), scored {result.scored_at}"
    )
