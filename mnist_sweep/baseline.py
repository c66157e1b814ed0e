"""The lecture's own network, trained once per study beside the trials: what the report measures the sweep against.

It is no trial of the study: not counted in `study.trials`, never chosen for the test set, and the searched space
is left as it is (the lecture's sigmoid and dropout 0 lie outside the default space). Its run is a child of the
study's MLflow run with the role `reference` and the tag `baseline = true`; what it reached on the validation
split is recorded on the study (records.LectureReference).

Once per study, whichever process (`run` or `worker`) claims it first: the claim is an Optuna study named
`<study>.lecture-reference`, created atomically as the test-set seal is (final.py), and deleted once the result
is recorded on the study. A claim whose process has provably ended (processes.ended) is taken over.
"""

from __future__ import annotations

import contextlib
import dataclasses
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

import optuna

from mnist_sweep import processes
from mnist_sweep.config import Hyperparameters, SweepConfig
from mnist_sweep.data import Split, withholding_test_split
from mnist_sweep.processes import ProcessId, this_process
from mnist_sweep.records import CLAIMED_BY_ATTR, LECTURE_REFERENCE_ATTR, LectureReference
from mnist_sweep.study import StudyContext
from mnist_sweep.train_settings import TrainSettings

if TYPE_CHECKING:
    from mnist_sweep.trial import TrialSession

# The lecture (seed/lecture.txt), "MNIST: All in all" (lines 761-779): 784 -> Dense(500, sigmoid) ->
# Dense(500, sigmoid) -> Dense(10, softmax) (also lines 424-432), compiled with optimizer='adam' (Keras' default
# rate 1e-3, line 772), fit for 5 epochs (line 778). That slide's fit passes no batch size (Keras would take 32);
# the lecture's own batch size is its data-preparation slide's `batch size = 128` (line 568). No dropout, weight
# decay, momentum or learning-rate schedule.
LECTURE_HIDDEN = (500, 500)
LECTURE_EPOCHS = 5
# The four it states; the others (dropout, weight decay, momentum) it does not use, which is [search]'s default.
LECTURE_PARAMS: dict[str, str | int | float] = dataclasses.asdict(
    Hyperparameters.of({"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 128, "activation": "sigmoid"})
)
CLAIM_SUFFIX = ".lecture-reference"


def lecture_settings(cfg: SweepConfig) -> TrainSettings:
    """The sweep's settings with the lecture's network, epochs and plain training: no early stopping, a constant
    rate, float32. What it keeps (steps per execution, the loop, the monitored metric) changes speed, not the
    numbers trained, or is the study's metric it is measured by."""
    return dataclasses.replace(
        TrainSettings.from_config(cfg),
        hidden=LECTURE_HIDDEN,
        epochs=LECTURE_EPOCHS,
        early_stopping_patience=0,
        lr_schedule="constant",
        precision="float32",
    )


def recorded_reference(study: optuna.Study) -> LectureReference | None:
    return LectureReference.from_dict(study.user_attrs.get(LECTURE_REFERENCE_ATTR))


def train_reference(
    *,
    cfg: SweepConfig,
    context: StudyContext,
    split: Split,
    session: TrialSession,
    echo: Callable[[str], None],
) -> LectureReference | None:
    """The lecture's network trained on the study's split, once per study; None where study.baseline is off,
    another process has it, or it failed (said in one line: the sweep goes on without it)."""
    study, storage, ledger = context.study, context.storage, context.ledger
    if not cfg.study.baseline or recorded_reference(study) is not None:
        return None
    claim = study.study_name + CLAIM_SUFFIX
    if not _claim(storage, claim):
        return None
    from mnist_sweep.trial import run_trial

    params = {**LECTURE_PARAMS, "hidden": "-".join(map(str, LECTURE_HIDDEN)), "epochs": LECTURE_EPOCHS}
    run_id = ledger.start_reference_run(params=params)
    settings = lecture_settings(cfg)
    try:
        with withholding_test_split():
            outcome = run_trial(
                params=LECTURE_PARAMS,
                split=split,
                settings=settings,
                seed=cfg.study.seed,
                epoch_hooks=[lambda epoch, values: ledger.log_epoch(run_id, epoch, values)],
                session=session,
            )
    except KeyboardInterrupt:
        ledger.close_run(run_id, state="KILLED", message="interrupted")
        _release(storage, claim)
        raise
    except Exception as exc:
        ledger.log_traceback(run_id, traceback.format_exc())
        ledger.close_run(run_id, state="FAIL", message=f"{type(exc).__name__}: {exc}")
        _release(storage, claim)
        echo(f"the lecture's network (reference run {run_id}) failed: {exc}; the sweep goes on without it")
        return None
    ledger.close_reference_run(run_id, outcome)
    reference = LectureReference(
        run_id=run_id,
        epochs=outcome.epochs_trained,
        fit_seconds=round(outcome.fit_seconds, 1),
        val_loss=outcome.val_loss,
        val_accuracy=outcome.val_accuracy,
        val_confusion_matrix=tuple(tuple(int(v) for v in row) for row in outcome.report.matrix.tolist()),
    )
    study.set_user_attr(LECTURE_REFERENCE_ATTR, reference.to_dict())
    _release(storage, claim)  # recorded: the record keeps every later process from training it again
    echo(
        f"the lecture's network (reference, not a trial): {cfg.study.metric} {reference.metric(cfg.study.metric):.4f} "
        f"after {reference.epochs} epochs, {reference.fit_seconds:.1f} s; run {run_id}"
    )
    return reference


def _claim(storage: optuna.storages.BaseStorage, name: str) -> bool:
    """Whether this process is the one to train the reference (atomic: a unique study name)."""
    with contextlib.suppress(KeyError):
        claimed_by = str(optuna.load_study(study_name=name, storage=storage).user_attrs.get(CLAIMED_BY_ATTR, ""))
        claimant = ProcessId.decode(claimed_by)
        if claimant is None or not processes.ended(claimant):
            return False
        optuna.delete_study(study_name=name, storage=storage)  # its process ended on this host without it
    try:
        claim = optuna.create_study(study_name=name, storage=storage)
    except optuna.exceptions.DuplicatedStudyError:
        return False
    claim.set_user_attr(CLAIMED_BY_ATTR, this_process().encode())
    return True


def _release(storage: optuna.storages.BaseStorage, name: str) -> None:
    """The claim gone: the reference is recorded, or it did not finish here and the next process trains it."""
    with contextlib.suppress(KeyError):
        optuna.delete_study(study_name=name, storage=storage)
