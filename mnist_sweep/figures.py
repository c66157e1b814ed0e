"""Pictures of results for MLflow's artifact view: the confusion matrix as PNG and as a light HTML page.

The PNG is drawn with Pillow rather than matplotlib: it is made once per trial, and matplotlib's text
layout for 100 annotated cells costs ~0.25 s against ~0.02 s here (the per-trial tracking budget is 0.3 s).
"""

from __future__ import annotations

import html
import io

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from mnist_sweep.metrics import row_normalised

CELL = 44  # pixels per confusion-matrix cell, in the HTML view and the PNG
PNG_LEFT, PNG_TOP, PNG_BOTTOM = 70, 50, 50
_LIGHT, _DARK = (247, 251, 255), (8, 48, 107)  # the ends of matplotlib's and plotly's "Blues"


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def _rgb(fraction: float) -> tuple[int, int, int]:
    r, g, b = (round(a + (z - a) * fraction) for a, z in zip(_LIGHT, _DARK, strict=True))
    return r, g, b


def confusion_matrix_png(matrix: npt.ArrayLike, *, title: str) -> bytes:
    """A count heatmap (rows: true digit, columns: predicted) with the counts written in the cells."""
    counts = np.asarray(matrix, dtype=np.int64)
    n = counts.shape[0]
    width, height = PNG_LEFT + n * CELL + 20, PNG_TOP + n * CELL + PNG_BOTTOM
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    small, large = _font(13), _font(16)
    peak = max(int(counts.max()), 1)
    for (row, col), value in np.ndenumerate(counts):
        x0, y0 = PNG_LEFT + col * CELL, PNG_TOP + row * CELL
        # a square-root scale keeps the off-diagonal confusions visible next to the large diagonal
        fraction = float(np.sqrt(value / peak))
        draw.rectangle([x0, y0, x0 + CELL - 1, y0 + CELL - 1], fill=_rgb(fraction), outline=(220, 220, 220))
        colour = "white" if fraction > 0.6 else "black"
        draw.text((x0 + CELL / 2, y0 + CELL / 2), str(value), fill=colour, font=small, anchor="mm")
    for k in range(n):
        draw.text((PNG_LEFT + k * CELL + CELL / 2, PNG_TOP - 8), str(k), fill="black", font=small, anchor="ms")
        draw.text((PNG_LEFT - 8, PNG_TOP + k * CELL + CELL / 2), str(k), fill="black", font=small, anchor="rm")
    draw.text((width / 2, 18), title, fill="black", font=large, anchor="mm")
    draw.text((PNG_LEFT + n * CELL / 2, height - 18), "predicted digit", fill="black", font=small, anchor="mm")
    draw.text((8, PNG_TOP + n * CELL / 2), "true", fill="black", font=small, anchor="lm")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def _blue(intensity: float) -> str:
    # Square root: errors of a few dozen beside a diagonal of hundreds stay visible.
    r, g, b = _rgb(float(np.sqrt(intensity)))
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
