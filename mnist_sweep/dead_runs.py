"""Trial runs left RUNNING by a worker that died: found under the study's parent run, told apart from a live worker
still storing a finished trial's artifacts (uploads.BackgroundUploads), and closed as KILLED."""

from __future__ import annotations

import datetime
from typing import TYPE_CHECKING

from mlflow.entities import RunStatus, RunTag
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, TrialState

from mnist_sweep import processes
from mnist_sweep.placement import WORKER_PROCESS_TAG, WORKER_TAG
from mnist_sweep.processes import ProcessId
from mnist_sweep.records import (
    ENGINE_ATTR,
    PARENT_TAG,
    ROLE_TAG,
    STATE_REASON_TAG,
    STATE_TAG,
    TRIAL_NUMBER_TAG,
    TRIAL_ROLE,
)

if TYPE_CHECKING:
    from mnist_sweep.ledger import StudyLedger
    from mnist_sweep.study import StudyContext
    from mnist_sweep.tracking import Tracker

MAX_RUNNING_RUNS = 1000
UPLOAD_GRACE_SECONDS = 120.0
REDO_OF_ATTR = "redo_of_trial"  # a trial that trains again the parameters of one whose artifacts were lost
REDONE = "finalize never scores it and its parameters are trained again"
NOT_REDONE = "finalize never scores it (keras-tuner's oracle has it as completed: not trained again)"


def close_stale_runs(context: StudyContext) -> int:
    """Trial runs still RUNNING in MLflow whose Optuna trial has ended (its worker died) end as KILLED."""
    study, tracker = context.study, context.ledger.tracker
    running_runs = running_trial_runs(context.ledger)
    if not running_runs:
        return 0
    # Found by MLflow's trial-number tag, so a run made just before a kill, not yet linked, is found too.
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    closed = 0
    for run_id, number in running_runs:
        trial = trials.get(number)
        state = trial.state if trial else None
        if state != TrialState.RUNNING and not _uploading(trial, tracker, run_id):
            reason = f"its worker stopped; Optuna recorded trial {number} as {state.name if state else 'missing'}"
            if state == TrialState.COMPLETE and trial is not None:
                # Optuna cannot take a COMPLETE back: finalize skips it, and its parameters train again, unless
                # keras-tuner's oracle chooses the trials (it has this one as completed, and asks no values twice).
                redo = str(study.user_attrs.get(ENGINE_ATTR, "optuna")) == "optuna"
                reason += f", but its model and reports were not all stored; {REDONE if redo else NOT_REDONE}"
                if close_orphaned_run(tracker, run_id, reason):
                    if redo:
                        study.enqueue_trial(trial.params, user_attrs={REDO_OF_ATTR: number})
                    closed += 1
                continue
            closed += close_orphaned_run(tracker, run_id, reason)
    return closed


def running_trial_runs(ledger: StudyLedger) -> list[tuple[str, int]]:
    """(run id, trial number) of the study's trial runs that MLflow still has as RUNNING."""
    runs = ledger.client.search_runs(
        [ledger.tracker.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{ledger.parent_run_id}' and attributes.status = 'RUNNING'",
        max_results=MAX_RUNNING_RUNS,
    )
    return [
        (str(run.info.run_id), int(run.data.tags[TRIAL_NUMBER_TAG]))
        for run in runs
        if run.data.tags.get(ROLE_TAG) == TRIAL_ROLE and TRIAL_NUMBER_TAG in run.data.tags
    ]


def _uploading(trial: FrozenTrial | None, tracker: Tracker, run_id: str) -> bool:
    """A COMPLETE trial's run still RUNNING may be a live worker storing its artifacts (BackgroundUploads)."""
    if trial is None or trial.state != TrialState.COMPLETE:
        return False
    return upload_may_be_running(tracker, run_id, completed=trial.datetime_complete)


def upload_may_be_running(tracker: Tracker, run_id: str, *, completed: datetime.datetime | None) -> bool:
    """Whether a RUNNING run of a COMPLETE trial (completed then) may still be getting its artifacts
    (BackgroundUploads): its process has not provably ended (processes.ended) and UPLOAD_GRACE_SECONDS have
    not passed since the trial completed: the grace is the heartbeat of a process whose end cannot be seen."""
    if completed is None or (datetime.datetime.now() - completed).total_seconds() >= UPLOAD_GRACE_SECONDS:
        return False
    try:
        run = tracker.client.get_run(run_id)
    except MlflowException:
        return False
    tags = run.data.tags
    worker = ProcessId.decode(tags.get(WORKER_PROCESS_TAG) or tags.get(WORKER_TAG, ""))
    return run.info.status == "RUNNING" and not (worker is not None and processes.ended(worker))


def close_orphaned_run(tracker: Tracker, run_id: str, reason: str) -> bool:
    """End a run left RUNNING by a worker that died; returns whether it was still RUNNING."""
    if tracker.run_status(run_id) != RunStatus.to_string(RunStatus.RUNNING):
        return False
    tracker.client.log_batch(run_id, tags=[RunTag(STATE_TAG, "FAIL"), RunTag(STATE_REASON_TAG, reason)])
    tracker.client.set_terminated(run_id, status="KILLED")
    return True
