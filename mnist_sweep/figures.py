"""Pictures of results: the confusion matrix as a PNG for MLflow's artifact view.

Drawn with Pillow rather than matplotlib: this runs once per trial, and matplotlib's text layout for 100
annotated cells costs ~0.25 s against ~0.01 s here (the per-trial tracking budget is 0.3 s).
"""

from __future__ import annotations

import io

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

CELL = 44
MARGIN_LEFT, MARGIN_TOP, MARGIN_BOTTOM = 70, 50, 50


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _blue(fraction: float) -> tuple[int, int, int]:
    """White to dark blue, like matplotlib's "Blues"."""
    light, dark = np.array([247, 251, 255]), np.array([8, 48, 107])
    r, g, b = (light + (dark - light) * fraction).astype(int)
    return int(r), int(g), int(b)


def confusion_matrix_png(matrix: npt.ArrayLike, *, title: str) -> bytes:
    """A count heatmap (rows: true digit, columns: predicted) with the counts written in the cells."""
    counts = np.asarray(matrix, dtype=np.int64)
    n = counts.shape[0]
    width, height = MARGIN_LEFT + n * CELL + 20, MARGIN_TOP + n * CELL + MARGIN_BOTTOM
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    small, large = _font(13), _font(16)
    peak = max(int(counts.max()), 1)
    for (row, col), value in np.ndenumerate(counts):
        x0, y0 = MARGIN_LEFT + col * CELL, MARGIN_TOP + row * CELL
        # a square-root scale keeps the off-diagonal confusions visible next to the large diagonal
        fraction = float(np.sqrt(value / peak))
        draw.rectangle([x0, y0, x0 + CELL - 1, y0 + CELL - 1], fill=_blue(fraction), outline=(220, 220, 220))
        colour = "white" if fraction > 0.6 else "black"
        draw.text((x0 + CELL / 2, y0 + CELL / 2), str(value), fill=colour, font=small, anchor="mm")
    for k in range(n):
        draw.text((MARGIN_LEFT + k * CELL + CELL / 2, MARGIN_TOP - 8), str(k), fill="black", font=small, anchor="ms")
        draw.text((MARGIN_LEFT - 8, MARGIN_TOP + k * CELL + CELL / 2), str(k), fill="black", font=small, anchor="rm")
    draw.text((width / 2, 18), title, fill="black", font=large, anchor="mm")
    draw.text((MARGIN_LEFT + n * CELL / 2, height - 18), "predicted digit", fill="black", font=small, anchor="mm")
    draw.text((8, MARGIN_TOP + n * CELL / 2), "true", fill="black", font=small, anchor="lm")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
