"""Metrics from a confusion matrix, checked against numbers worked out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_sweep.metrics import classification_report, confusion_matrix, wilson_interval


def test_confusion_matrix_counts_rows_true_columns_predicted() -> None:
    cm = confusion_matrix([0, 0, 1, 2, 2, 2], [0, 1, 1, 2, 2, 0], num_classes=3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_three_class_report_by_hand() -> None:
    # rows true, columns predicted
    report = classification_report([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    # class 0: TP 1, FP 1, FN 1 -> P 1/2, R 1/2, F1 1/2, IoU 1/3; TN 3 -> acc 4/6
    # class 1: TP 1, FP 1, FN 0 -> P 1/2, R 1, F1 2/3, IoU 1/2; TN 4 -> acc 5/6
    # class 2: TP 2, FP 0, FN 1 -> P 1, R 2/3, F1 4/5, IoU 2/3; TN 3 -> acc 5/6
    assert report.precision == pytest.approx([1 / 2, 1 / 2, 1])
    assert report.recall == pytest.approx([1 / 2, 1, 2 / 3])
    assert report.f1 == pytest.approx([1 / 2, 2 / 3, 4 / 5])
    assert report.iou == pytest.approx([1 / 3, 1 / 2, 2 / 3])
    assert report.accuracy == pytest.approx([4 / 6, 5 / 6, 5 / 6])
    assert report.support.tolist() == [2, 1, 3]
    assert report.overall_accuracy == pytest.approx(4 / 6)
    # micro: TP 4, FP 2, FN 2 -> P = R = F1 = 4/6, IoU 4/8
    assert report.micro["precision"] == pytest.approx(4 / 6)
    assert report.micro["f1"] == pytest.approx(4 / 6)
    assert report.micro["iou"] == pytest.approx(1 / 2)
    assert report.macro["f1"] == pytest.approx((1 / 2 + 2 / 3 + 4 / 5) / 3)


def test_absent_and_never_predicted_classes_score_zero_not_nan() -> None:
    y_true = np.array([0, 0, 1, 1])
    y_pred = np.array([0, 0, 0, 0])
    report = classification_report(confusion_matrix(y_true, y_pred))
    assert not np.isnan(report.as_flat_metrics("val")["val_f1_macro"])
    assert report.precision[1] == 0.0 and report.recall[1] == 0.0  # class 1 never predicted
    assert report.precision[5] == 0.0 and report.support[5] == 0  # class 5 never occurs
    assert all(np.isfinite(v) for v in report.as_flat_metrics("val").values())


def test_flat_metric_keys_are_stable() -> None:
    keys = classification_report(np.eye(10, dtype=int)).as_flat_metrics("val")
    assert "val_iou_class_9" in keys and "val_precision_micro" in keys and "val_recall_macro" in keys
    assert len(keys) == 1 + 5 * (10 + 2)


def test_labels_out_of_range_are_rejected() -> None:
    with pytest.raises(ValueError, match="outside 0..9"):
        confusion_matrix([0, 10], [0, 1])


def test_wilson_interval_known_value() -> None:
    low, high = wilson_interval(9800, 10000)
    # p = 0.98, z = 1.96: centre 0.979816, half-width 0.002750 (worked by hand)
    assert low == pytest.approx(0.977066, abs=1e-5) and high == pytest.approx(0.982566, abs=1e-5)
    assert wilson_interval(0, 0) == (0.0, 0.0)
