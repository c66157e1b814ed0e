"""The lecture's network beside the trials: trained once per study on the study's split, never one of its trials,
and the gain the report shows over it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import optuna
import pytest
from mlflow.tracking import MlflowClient

from mnist_sweep.baseline import CLAIM_SUFFIX, LECTURE_EPOCHS, LECTURE_PARAMS, recorded_reference, train_reference
from mnist_sweep.config import build_config, load_sweep
from mnist_sweep.data import Split
from mnist_sweep.ledger import StudyLedger
from mnist_sweep.records import LectureReference
from mnist_sweep.report import baseline_gain, gain_line, lecture_matrices, lecture_rows
from mnist_sweep.study import StudyContext
from mnist_sweep.tracking import Tracker
from tests.conftest import DEFAULT_SWEEP

MATRIX = tuple(tuple(1 if i == j else 0 for j in range(10)) for i in range(10))


def test_the_lecture_values_are_the_lecture_network() -> None:
    assert LECTURE_PARAMS == {
        "optimizer": "adam",
        "learning_rate": 1e-3,
        "batch_size": 128,
        "activation": "sigmoid",
        "dropout": 0.0,
        "weight_decay": 0.0,
        "momentum": 0.0,
    }
    assert LECTURE_EPOCHS == 5
    # The default space is left as it is: the lecture's sigmoid stays outside it.
    assert "sigmoid" not in load_sweep(DEFAULT_SWEEP).search.activation.values  # type: ignore[union-attr]


def _with_reference(values: list[float | None], *, reference: float, direction: str = "maximize") -> optuna.Study:
    """A study whose trials ended with `values` (None: pruned) and whose reference reached `reference`."""
    study = optuna.create_study(direction=direction)
    for value in values:
        trial = study.ask()
        trial.set_user_attr("mlflow_run_id", f"run-{trial.number}")
        trial.set_user_attr("val_confusion_matrix", [list(row) for row in MATRIX])
        study.tell(trial, value, state=None if value is not None else optuna.trial.TrialState.PRUNED)
    stored = LectureReference(
        run_id="ref",
        epochs=5,
        fit_seconds=24.06,
        val_loss=reference,
        val_accuracy=reference,
        val_confusion_matrix=MATRIX,
    )
    study.set_user_attr("lecture_reference", stored.to_dict())
    assert recorded_reference(study) == stored  # read back as written
    return study


def test_gain_in_points_of_validation_accuracy() -> None:
    gain = baseline_gain(_with_reference([0.9864, 0.98], reference=0.9712), metric="val_accuracy")
    assert gain is not None and gain.gain == pytest.approx(0.0152)
    assert gain_line(gain) == (
        "the lecture's network (reference run, 5 epochs, 24.1 s) val_accuracy 0.9712 -> best 0.9864 (trial 0), "
        "+1.52 points"
    )


def test_gain_in_validation_loss_goes_down() -> None:
    gain = baseline_gain(_with_reference([0.0512], reference=0.0950, direction="minimize"), metric="val_loss")
    assert gain is not None and gain.gain == pytest.approx(0.0438)
    assert gain_line(gain).endswith("val_loss 0.0950 -> best 0.0512 (trial 0), -0.0438 (lower is better)")


def test_a_sweep_worse_than_the_lecture_or_without_a_complete_trial_says_so() -> None:
    worse = baseline_gain(_with_reference([0.95], reference=0.9712), metric="val_accuracy")
    assert worse is not None and gain_line(worse).endswith("-> best 0.9500 (trial 0), -2.12 points")
    none_yet = baseline_gain(_with_reference([None], reference=0.9712), metric="val_accuracy")
    assert none_yet is not None and gain_line(none_yet).endswith(
        "val_accuracy 0.9712; no complete trial to compare it with yet"
    )
    assert baseline_gain(optuna.create_study(), metric="val_accuracy") is None  # no reference recorded


def test_the_report_puts_the_lecture_network_beside_the_best_trial() -> None:
    study = _with_reference([0.97, 0.9864], reference=0.9712)
    gain = baseline_gain(study, metric="val_accuracy")
    assert gain is not None
    rows = lecture_rows(study, gain, None)
    assert [row[""] for row in rows] == ["the lecture's network", "trial 1 (best so far)"]
    assert [title for title, _ in lecture_matrices(study, gain, rows)] == [
        "the lecture's network",
        "trial 1 (best so far)",
    ]


def test_the_reference_trains_once_on_the_split_and_is_no_trial(
    tmp_path: Path, synthetic_mnist: tuple[np.ndarray, np.ndarray]
) -> None:
    from mnist_sweep.trial import TrialSession

    folder = tmp_path
    images, labels = synthetic_mnist
    x = images.astype(np.float32) / 255.0
    split = Split(x_train=x[:1000], y_train=labels[:1000], x_val=x[1000:], y_val=labels[1000:])
    cfg = build_config({"study": {"storage": f"sqlite:///{folder}/optuna.db"}})
    storage = optuna.storages.RDBStorage(cfg.study.storage)
    study = optuna.create_study(study_name="fcn", storage=storage, direction="maximize")
    tracker = Tracker(uri=f"sqlite:///{folder}/mlflow.db", artifacts=str(folder / "artifacts"), experiment="fcn")
    ledger = StudyLedger.create(tracker, study_name="fcn", config={})
    lines: list[str] = []

    def train() -> LectureReference | None:
        return train_reference(
            cfg=cfg,
            context=StudyContext(study, storage, ledger),
            split=split,
            session=TrialSession(),
            echo=lines.append,
        )

    reference = train()
    assert reference is not None and reference.epochs == LECTURE_EPOCHS
    assert sum(map(sum, reference.val_confusion_matrix)) == 200  # every validation image
    assert train() is None and len(lines) == 1  # recorded: never trained again
    assert study.trials == []  # no Optuna trial: not counted, never chosen for the test set
    assert [s.study_name for s in optuna.get_all_study_summaries(storage)] == ["fcn"]  # the claim is gone
    assert recorded_reference(study) == reference
    run = MlflowClient(tracking_uri=tracker.uri).get_run(reference.run_id)
    assert run.data.tags["mnist_sweep.role"] == "reference" and run.data.tags["baseline"] == "true"
    assert run.data.tags["mlflow.parentRunId"] == ledger.parent_run_id and run.info.status == "FINISHED"
    assert len(MlflowClient(tracking_uri=tracker.uri).get_metric_history(reference.run_id, "val_accuracy")) == 5


def test_a_claim_held_by_a_live_process_is_left_to_it(tmp_path: Path) -> None:
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db")
    study = optuna.create_study(study_name="fcn", storage=storage)
    claim = optuna.create_study(study_name="fcn" + CLAIM_SUFFIX, storage=storage)
    claim.set_user_attr("claimed_by", "another-host:1")  # alive as far as this host can tell
    cfg = build_config({})
    done = train_reference(
        cfg=cfg,
        context=StudyContext(study, storage, None),  # type: ignore[arg-type]  # no ledger: never reached
        split=None,  # type: ignore[arg-type]  # never reached: the claim is another process's
        session=None,  # type: ignore[arg-type]
        echo=print,
    )
    assert done is None


def test_study_baseline_false_trains_nothing() -> None:
    cfg = build_config({"study": {"baseline": False}})
    done = train_reference(
        cfg=cfg,
        context=StudyContext(optuna.create_study(), None, None),  # type: ignore[arg-type]
        split=None,  # type: ignore[arg-type]
        session=None,  # type: ignore[arg-type]
        echo=print,
    )
    assert done is None
