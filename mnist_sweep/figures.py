"""Pictures of results for MLflow's artifact view: the confusion matrix as PNG and as a light HTML page."""

from __future__ import annotations

import html
import io

import numpy as np
import numpy.typing as npt

from mnist_sweep.metrics import row_normalised

CELL = 44  # pixels per confusion-matrix cell in the HTML view
_LIGHT, _DARK = (247, 251, 255), (8, 48, 107)  # the ends of matplotlib's and plotly's "Blues"


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


def _blue(intensity: float) -> str:
    # Square root: errors of a few dozen beside a diagonal of hundreds stay visible.
    intensity = float(np.sqrt(intensity))
    r, g, b = (round(a + (z - a) * intensity) for a, z in zip(_LIGHT, _DARK, strict=True))
    return f"rgb({r},{g},{b})"


def confusion_matrix_html(matrix: npt.ArrayLike, *, title: str) -> str:
    """The confusion matrix as one small self-contained HTML page: hover a cell, switch counts / row %.

    Each trial logs one, so it is drawn as inline SVG with a few lines of script rather than with plotly:
    a plotly page must embed plotly.js (4.8 MB and ~0.1 s per trial, measured) to work offline and inside
    MLflow's artifact view, which shows HTML in a sandboxed frame that cannot load a shared copy. This page
    is ~30 kB and takes milliseconds. The held-out test report draws the same matrix with plotly.
    """
    counts = np.asarray(matrix, dtype=np.int64)
    shares = row_normalised(counts)
    peak = max(int(counts.max()), 1) if counts.size else 1
    size = counts.shape[0]
    cells = []
    for (row, col), count in np.ndenumerate(counts):
        share = float(shares[row, col])
        x, y = (col + 1) * CELL, (row + 1) * CELL
        tip = f"true {row}, predicted {col}: {count} ({share:.1%} of true {row})"
        cells.append(
            f'<g data-count-fill="{_blue(count / peak)}" data-share-fill="{_blue(share)}" '
            f'data-count="{count}" data-share="{share:.1%}" data-count-dark="{int(count / peak > 0.3)}" '
            f'data-share-dark="{int(share > 0.3)}"><title>{tip}</title>'
            f'<rect x="{x}" y="{y}" width="{CELL}" height="{CELL}" stroke="#fff"/>'
            f'<text x="{x + CELL / 2}" y="{y + CELL / 2}"></text></g>'
        )
    labels = [
        f'<text class="axis" x="{(k + 1.5) * CELL}" y="{CELL * 0.7}">{k}</text>'
        f'<text class="axis" x="{CELL * 0.6}" y="{(k + 1.5) * CELL}">{k}</text>'
        for k in range(size)
    ]
    side = (size + 1) * CELL
    return _HTML_PAGE.format(
        title=html.escape(title),
        side=side,
        body="".join(labels + cells),
        total=int(counts.sum()),
    )


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 16px; color: #222; }}
svg text {{ text-anchor: middle; dominant-baseline: central; font-size: 12px; }}
svg text.axis {{ font-weight: 600; fill: #555; }}
button[aria-pressed="true"] {{ font-weight: 700; }}
</style></head><body>
<h3>{title}</h3>
<p>rows: true digit, columns: predicted digit; {total} images. Show
<button id="count" aria-pressed="true">counts</button>
<button id="share" aria-pressed="false">row %</button></p>
<svg width="{side}" height="{side}" viewBox="0 0 {side} {side}" role="img">{body}</svg>
<script>
function show(view) {{
  for (const cell of document.querySelectorAll("svg g")) {{
    cell.querySelector("rect").setAttribute("fill", cell.dataset[view + "Fill"]);
    const label = cell.querySelector("text");
    label.textContent = cell.dataset[view];
    label.setAttribute("fill", cell.dataset[view + "Dark"] === "1" ? "#fff" : "#222");
  }}
  for (const button of document.querySelectorAll("button")) {{
    button.setAttribute("aria-pressed", String(button.id === view));
  }}
}}
document.getElementById("count").onclick = () => show("count");
document.getElementById("share").onclick = () => show("share");
show("count");
</script></body></html>
"""
