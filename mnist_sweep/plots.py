"""Plotly figures for the report: the test confusion matrix and Optuna's sweep plots.

Drawn in two steps: `plan_sweep_plots` decides from plain trial data which sweep plots can say something
(and why not, for a note in the report); the draw functions only draw.
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import optuna
import plotly.graph_objects as go
from optuna.trial import FrozenTrial, TrialState

from mnist_sweep.metrics import row_normalised

SWEEP_PLOT_TITLES = {
    "optimization_history": "Optimisation history",
    "param_importances": "Hyperparameter importances",
    "parallel_coordinate": "Parallel coordinates",
    "slice": "Slice plots",
    "intermediate_values": "Intermediate values (learning curves)",
}
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
MIN_COMPLETE = 2


@dataclass(frozen=True)
class SweepPlot:
    """One sweep plot: its figure, or the reason it is not drawn."""

    key: str
    title: str
    figure: go.Figure | None
    note: str = ""


def plan_sweep_plots(trials: Sequence[FrozenTrial]) -> dict[str, str]:
    """For each sweep plot, '' where it can be drawn, else why not (one line for the reader)."""
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    names = {name for t in complete for name in t.params}
    varied = [name for name in names if len({repr(t.params.get(name)) for t in complete}) > 1]
    few = f"not enough trials: {len(complete)} complete, {MIN_COMPLETE} needed" if len(complete) < MIN_COMPLETE else ""
    flat = "" if varied else "not enough trials: no hyperparameter took two different values in the complete trials"
    return {
        "optimization_history": few,
        "param_importances": few or flat,
        "parallel_coordinate": few or flat,
        "slice": few or flat,
        "intermediate_values": "" if any(t.intermediate_values for t in trials) else "no trial reported an epoch yet",
    }


def _drawers(metric: str) -> dict[str, Callable[[optuna.Study], go.Figure]]:
    vis = optuna.visualization
    return {
        "optimization_history": lambda s: vis.plot_optimization_history(s, target_name=metric),
        "param_importances": lambda s: vis.plot_param_importances(s, target_name=metric),
        "parallel_coordinate": lambda s: vis.plot_parallel_coordinate(s, target_name=metric),
        "slice": lambda s: vis.plot_slice(s, target_name=metric),
        "intermediate_values": vis.plot_intermediate_values,
    }


def sweep_plots(study: optuna.Study, *, metric: str) -> list[SweepPlot]:
    """Optuna's sweep plots of `study`, each drawn or replaced by a note saying why not."""
    notes = plan_sweep_plots(study.get_trials(deepcopy=False))
    drawers = _drawers(metric)
    plots = []
    for key, title in SWEEP_PLOT_TITLES.items():
        figure, note = (None, notes[key]) if notes[key] else _draw(drawers[key], study)
        plots.append(SweepPlot(key=key, title=title, figure=figure, note=note))
    return plots


def _draw(drawer: Callable[[optuna.Study], go.Figure], study: optuna.Study) -> tuple[go.Figure | None, str]:
    with warnings.catch_warnings():
        # "too few trials for importances" and experimental-API notices: the plan already judged that.
        warnings.simplefilter("ignore")
        try:
            figure = drawer(study)
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            # One odd plot must not cost the report that closes a long sweep; the reader sees why.
            return None, f"Optuna could not draw it: {type(exc).__name__}: {exc}"
    if not figure.data:
        return None, "Optuna drew nothing for these trials"
    figure.update_layout(template="plotly_white", height=460, margin={"t": 60, "r": 30, "b": 60, "l": 70})
    return figure, ""


def confusion_heatmap(matrix: npt.ArrayLike, *, normalised: bool, title: str) -> go.Figure:
    """The confusion matrix as a heatmap: counts, or each row as shares of the true digit."""
    counts = np.asarray(matrix, dtype=np.int64)
    shares = row_normalised(counts)
    digits = [str(k) for k in range(counts.shape[0])]
    values: Any = shares if normalised else counts
    text = [[f"{v:.1%}" for v in row] for row in shares] if normalised else counts.tolist()
    heatmap = go.Heatmap(
        z=values,
        x=digits,
        y=digits,
        text=text,
        texttemplate="%{text}",
        customdata=np.dstack([counts, shares]),
        hovertemplate="true %{y}, predicted %{x}: %{customdata[0]} images, %{customdata[1]:.1%} of true %{y}"
        "<extra></extra>",
        colorscale="Blues",
        zmin=0,
        zmax=1 if normalised else None,
        colorbar={"tickformat": ".0%"} if normalised else None,
    )
    figure = go.Figure(heatmap)
    figure.update_layout(
        title=title,
        template="plotly_white",
        height=480,
        margin={"t": 60, "r": 20, "b": 60, "l": 60},
        xaxis={"title": "predicted digit", "side": "bottom", "constrain": "domain"},
        yaxis={"title": "true digit", "autorange": "reversed", "scaleanchor": "x"},
    )
    return figure


def figure_div(figure: go.Figure, *, div_id: str) -> str:
    """The figure as an empty <div> and its JSON, drawn by `plotly_loader` once plotly.js is unpacked."""
    height = figure.layout.height or 460
    spec = figure.to_json().replace("</", "<\\/")  # the JSON cannot close its <script> early
    return (
        f'<div id="{div_id}" style="width:100%;height:{height}px"></div>'
        f'<script type="application/json" class="plotly-figure" data-target="{div_id}">{spec}</script>'
    )


def plotly_js() -> str:
    """plotly.js itself (the bundle `include_plotlyjs=True` embeds)."""
    from plotly.offline import get_plotlyjs

    return str(get_plotlyjs())


@functools.lru_cache(maxsize=1)
def plotly_js_packed() -> str:
    """plotly.js gzip-compressed, as base64: 4.8 MB becomes 2.0 MB, unpacked by the page itself."""
    return base64.b64encode(gzip.compress(plotly_js().encode(), compresslevel=9, mtime=0)).decode("ascii")


def plotly_loader() -> str:
    """The page's scripts: plotly.js packed, and the code that unpacks it and draws every `figure_div`.

    A report page embeds plotly.js so that it opens offline and inside MLflow's artifact view, where a
    sandboxed frame cannot load a shared copy; packed, the page and its copy in the study's MLflow run
    weigh 2 MB each instead of 5 MB. Browsers unpack gzip natively (DecompressionStream, 2023 on).
    """
    return (
        f'<script type="application/octet-stream" id="plotly-js-gzip">{plotly_js_packed()}</script>\n'
        f"<script>const PLOT_CONFIG = {json.dumps(PLOT_CONFIG)};\n{_LOADER}</script>"
    )


_LOADER = """(async () => {
  const packed = document.getElementById("plotly-js-gzip").textContent.trim();
  const bytes = Uint8Array.from(atob(packed), (c) => c.charCodeAt(0));
  const unpacked = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
  const library = document.createElement("script");
  library.textContent = await new Response(unpacked).text();
  document.head.appendChild(library);  // runs at once and defines window.Plotly
  for (const holder of document.querySelectorAll("script.plotly-figure")) {
    const figure = JSON.parse(holder.textContent);
    await Plotly.newPlot(holder.dataset.target, figure.data, figure.layout, PLOT_CONFIG);
  }
})();"""
