"""The metrics module against scikit-learn on random label sets, absent and never-predicted classes included."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn import metrics as sk

from mnist_sweep.metrics import (
    ClassificationReport,
    classification_report,
    confusion_matrix,
    most_confused,
    row_normalised,
)

LABELS = list(range(10))


def label_sets(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random labels where some digits never occur and others are never predicted."""
    rng = np.random.default_rng(seed)
    occurring = rng.choice(10, size=rng.integers(1, 11), replace=False)
    predicted = rng.choice(10, size=rng.integers(1, 11), replace=False)
    size = int(rng.integers(1, 300))
    return rng.choice(occurring, size=size), rng.choice(predicted, size=size)


CASES = [label_sets(seed) for seed in range(40)] + [
    (np.array([3, 3, 3]), np.array([3, 3, 3])),  # one digit, always right: nine classes empty
    (np.array([0, 1, 2]), np.array([9, 9, 9])),  # always wrong, a single predicted digit
    (np.array([7]), np.array([2])),
]


def ours(y_true: np.ndarray, y_pred: np.ndarray) -> ClassificationReport:
    """Our report with every warning an error, so a 0/0 cannot slip through as a RuntimeWarning."""
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        return classification_report(confusion_matrix(y_true, y_pred))


@pytest.mark.parametrize(("y_true", "y_pred"), CASES)
def test_per_class_metrics_match_sklearn(y_true: np.ndarray, y_pred: np.ndarray) -> None:
    report = ours(y_true, y_pred)
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        y_true, y_pred, labels=LABELS, average=None, zero_division=0
    )
    assert report.matrix.tolist() == sk.confusion_matrix(y_true, y_pred, labels=LABELS).tolist()
    assert report.precision == pytest.approx(precision)
    assert report.recall == pytest.approx(recall)
    assert report.f1 == pytest.approx(f1)
    assert report.support.tolist() == support.tolist()
    assert report.iou == pytest.approx(sk.jaccard_score(y_true, y_pred, labels=LABELS, average=None, zero_division=0))
    # One digit against the rest: (TP + TN) / N from scikit-learn's per-label 2x2 matrices.
    per_label = sk.multilabel_confusion_matrix(y_true, y_pred, labels=LABELS)
    assert report.accuracy == pytest.approx((per_label[:, 0, 0] + per_label[:, 1, 1]) / len(y_true))
    assert report.overall_accuracy == pytest.approx(sk.accuracy_score(y_true, y_pred))


@pytest.mark.parametrize("average", ["micro", "macro"])
@pytest.mark.parametrize(("y_true", "y_pred"), CASES)
def test_averages_match_sklearn(y_true: np.ndarray, y_pred: np.ndarray, average: str) -> None:
    averages = getattr(ours(y_true, y_pred), average)
    precision, recall, f1, _ = sk.precision_recall_fscore_support(
        y_true, y_pred, labels=LABELS, average=average, zero_division=0
    )
    jaccard = sk.jaccard_score(y_true, y_pred, labels=LABELS, average=average, zero_division=0)
    assert averages["precision"] == pytest.approx(precision)
    assert averages["recall"] == pytest.approx(recall)
    assert averages["f1"] == pytest.approx(f1)
    assert averages["iou"] == pytest.approx(jaccard)


@pytest.mark.parametrize(("y_true", "y_pred"), CASES)
def test_no_nan_anywhere(y_true: np.ndarray, y_pred: np.ndarray) -> None:
    flat = ours(y_true, y_pred).as_flat_metrics("val")
    assert all(np.isfinite(value) for value in flat.values()), {k: v for k, v in flat.items() if not np.isfinite(v)}


@pytest.mark.parametrize(("y_true", "y_pred"), CASES)
def test_row_normalised_matches_sklearn_normalize_true(y_true: np.ndarray, y_pred: np.ndarray) -> None:
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        shares = row_normalised(confusion_matrix(y_true, y_pred))
    expected = sk.confusion_matrix(y_true, y_pred, labels=LABELS, normalize="true")  # empty rows: 0
    assert shares == pytest.approx(expected)


def test_most_confused_lists_the_largest_errors_with_their_share() -> None:
    matrix = np.zeros((10, 10), dtype=int)
    matrix[4, 4], matrix[4, 9], matrix[7, 1], matrix[9, 4], matrix[3, 3] = 90, 10, 10, 30, 5
    pairs = most_confused(matrix, top=2)
    assert pairs == [
        {"true": 9, "predicted": 4, "count": 30, "share_of_true": 1.0},
        {"true": 4, "predicted": 9, "count": 10, "share_of_true": 0.1},  # ties: the lower true digit first
    ]
    assert most_confused(np.eye(10, dtype=int)) == []  # no errors, no pairs
