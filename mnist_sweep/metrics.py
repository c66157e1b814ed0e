"""Confusion matrix -> per-class and averaged metrics, with the lecture's definitions.

For class k: precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = TP/(TP + FP/2 + FN/2),
IoU = TP/(TP+FP+FN), accuracy = (TP+TN)/N (one class against the rest). Micro averages pool the counts
of all classes before dividing; macro averages are the plain mean over the 10 classes.

Zero-division convention: a ratio whose denominator is 0 is 0 (scikit-learn's `zero_division=0`).
So a class that never occurs and is never predicted scores 0, never NaN, and still counts in the
macro mean (as scikit-learn does with `labels=range(10)`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from mnist_sweep.data import NUM_CLASSES

PER_CLASS_METRICS = ("precision", "recall", "f1", "iou", "accuracy")

IntMatrix = npt.NDArray[np.int64]
FloatVector = npt.NDArray[np.float64]
FloatMatrix = npt.NDArray[np.float64]


def confusion_matrix(y_true: npt.ArrayLike, y_pred: npt.ArrayLike, num_classes: int = NUM_CLASSES) -> IntMatrix:
    """Counts with rows = true class, columns = predicted class."""
    truth = np.asarray(y_true, dtype=np.int64).ravel()
    predicted = np.asarray(y_pred, dtype=np.int64).ravel()
    if truth.shape != predicted.shape:
        raise ValueError(f"y_true has {truth.size} labels but y_pred has {predicted.size}")
    for name, labels in (("y_true", truth), ("y_pred", predicted)):
        if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{name} holds labels outside 0..{num_classes - 1}")
    flat = np.bincount(truth * num_classes + predicted, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes).astype(np.int64)


def _ratio(numerator: npt.ArrayLike, denominator: npt.ArrayLike) -> FloatVector:
    num = np.asarray(numerator, dtype=np.float64)
    den = np.asarray(denominator, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


@dataclass(frozen=True)
class ClassificationReport:
    """Everything derived from one confusion matrix."""

    matrix: IntMatrix
    precision: FloatVector
    recall: FloatVector
    f1: FloatVector
    iou: FloatVector
    accuracy: FloatVector  # per class, one against the rest
    support: npt.NDArray[np.int64]
    micro: dict[str, float]
    macro: dict[str, float]
    overall_accuracy: float

    def as_flat_metrics(self, prefix: str) -> dict[str, float]:
        """Metric keys identical across runs: `{prefix}_{metric}_class_{k}`, `_micro`, `_macro`."""
        flat: dict[str, float] = {f"{prefix}_accuracy_overall": self.overall_accuracy}
        for name in PER_CLASS_METRICS:
            values: FloatVector = getattr(self, name)
            flat.update({f"{prefix}_{name}_class_{k}": float(v) for k, v in enumerate(values)})
            flat[f"{prefix}_{name}_micro"] = self.micro[name]
            flat[f"{prefix}_{name}_macro"] = self.macro[name]
        return flat

    def per_class_rows(self) -> list[dict[str, float | int | str]]:
        """One row per class, then micro and macro: for tables and CSV files."""
        rows: list[dict[str, float | int | str]] = []
        for k in range(len(self.support)):
            row: dict[str, float | int | str] = {"class": str(k)}
            row.update({name: float(getattr(self, name)[k]) for name in PER_CLASS_METRICS})
            row["support"] = int(self.support[k])
            rows.append(row)
        total = int(self.support.sum())
        for label, averages in (("micro", self.micro), ("macro", self.macro)):
            rows.append({"class": label, **averages, "support": total})
        return rows


def classification_report(matrix: npt.ArrayLike) -> ClassificationReport:
    """Per-class precision, recall, F1, IoU and accuracy, with micro and macro averages."""
    cm = np.asarray(matrix, dtype=np.int64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"a confusion matrix is square, got shape {cm.shape}")
    total = int(cm.sum())
    tp = np.diag(cm).astype(np.float64)
    fp = cm.sum(axis=0) - tp
    fn = cm.sum(axis=1) - tp
    tn = total - tp - fp - fn
    per_class = {
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "iou": _ratio(tp, tp + fp + fn),
        "accuracy": _ratio(tp + tn, np.full_like(tp, total)),
    }
    sums = {name: float(v.sum()) for name, v in (("tp", tp), ("fp", fp), ("fn", fn), ("tn", tn))}
    micro = {
        "precision": float(_ratio(sums["tp"], sums["tp"] + sums["fp"])),
        "recall": float(_ratio(sums["tp"], sums["tp"] + sums["fn"])),
        "f1": float(_ratio(2 * sums["tp"], 2 * sums["tp"] + sums["fp"] + sums["fn"])),
        "iou": float(_ratio(sums["tp"], sums["tp"] + sums["fp"] + sums["fn"])),
        "accuracy": float(_ratio(sums["tp"] + sums["tn"], sum(sums.values()))),
    }
    macro = {name: float(values.mean()) if values.size else 0.0 for name, values in per_class.items()}
    return ClassificationReport(
        matrix=cm,
        support=cm.sum(axis=1).astype(np.int64),
        micro=micro,
        macro=macro,
        overall_accuracy=float(_ratio(tp.sum(), total)),
        **per_class,
    )


def row_normalised(matrix: npt.ArrayLike) -> FloatMatrix:
    """Each row divided by its sum: the share of each true digit predicted as each digit (an empty row stays 0)."""
    counts = np.asarray(matrix, dtype=np.float64)
    return _ratio(counts, np.broadcast_to(counts.sum(axis=1, keepdims=True), counts.shape))


def most_confused(matrix: npt.ArrayLike, top: int = 5) -> list[dict[str, int | float]]:
    """The largest off-diagonal counts, largest first (ties: lower true, then predicted digit first).

    Each pair carries its count and its share of the true digit's images, so a rare digit's confusion
    is not hidden behind a common one's.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    shares = row_normalised(counts)
    pairs = [(int(counts[t, p]), t, p) for t in range(counts.shape[0]) for p in range(counts.shape[1]) if t != p]
    ranked = sorted((pair for pair in pairs if pair[0] > 0), key=lambda pair: (-pair[0], pair[1], pair[2]))
    return [
        {"true": t, "predicted": p, "count": count, "share_of_true": float(shares[t, p])}
        for count, t, p in ranked[:top]
    ]


def wilson_interval(successes: int, trials: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95 % Wilson score interval for a proportion (e.g. test accuracy)."""
    if trials <= 0:
        return (0.0, 0.0)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * np.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return (float(max(0.0, centre - half)), float(min(1.0, centre + half)))
