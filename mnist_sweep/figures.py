"""Pictures of results: the confusion matrix as PNG (matplotlib) for MLflow's artifact view."""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt


def confusion_matrix_png(matrix: npt.ArrayLike, *, title: str) -> bytes:
    """A 10x10 count heatmap with the counts written in the cells."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix)
    figure, axes = plt.subplots(figsize=(6.4, 5.6), dpi=100)
    try:
        image = axes.imshow(counts, cmap="Blues")
        figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
        classes = range(counts.shape[0])
        axes.set_xticks(list(classes))
        axes.set_yticks(list(classes))
        axes.set_xlabel("predicted digit")
        axes.set_ylabel("true digit")
        axes.set_title(title)
        threshold = counts.max() / 2 if counts.size else 0
        for (row, col), value in np.ndenumerate(counts):
            colour = "white" if value > threshold else "black"
            axes.text(col, row, str(value), ha="center", va="center", fontsize=7, color=colour)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        plt.close(figure)
