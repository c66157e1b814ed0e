"""The held-out test report: reports/<study>/report.html, report.md, test_metrics.json, leaderboard.csv.

Everything comes from what the sweep recorded (the study's trials, its stored test result, the trial runs'
metrics in MLflow): writing the report never reads a test image.
"""

from __future__ import annotations

import contextlib
import html
import json
import os
import secrets
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from optuna.trial import TrialState

from mnist_sweep import plots
from mnist_sweep.asha import model_epochs
from mnist_sweep.baseline import LECTURE_PARAMS, recorded_reference
from mnist_sweep.config import METRIC_DIRECTIONS, metric_maximizes
from mnist_sweep.environment import environment
from mnist_sweep.errors import UsageError
from mnist_sweep.final import finished_trials, rank_trials
from mnist_sweep.metrics import most_confused
from mnist_sweep.records import (
    REGISTERED_MODEL_ATTR,
    RUN_ID_ATTR,
    VAL_ACCURACY_ATTR,
    VAL_CONFUSION_ATTR,
    VAL_LOSS_ATTR,
    LectureReference,
    Registration,
    TestResult,
)

TOP_TRIALS = 10
CONFUSED_PAIRS = 5
# The trial-run metrics the leaderboard reads from MLflow, beside what Optuna holds.
LOGGED_METRICS = ("val_accuracy", "val_loss", "val_f1_macro")
# Sorted smallest first whatever the study metric; a metric column follows its direction in the config.
ASCENDING_COLUMNS = ("trial", "duration_s")
NOT_SCORED = "Test set not scored yet."

Row = dict[str, Any]


# --------------------------------------------------------------------------- plain data


def leaderboard_rows(study: optuna.Study, run_metrics: Mapping[str, Mapping[str, float]], *, metric: str) -> list[Row]:
    """Every trial, best first (rank_trials): number, state, params, validation metrics, epochs, duration, run id.

    Optuna holds the final validation numbers of complete trials; MLflow adds the macro F1 and, for pruned
    or failed trials, the last epoch's numbers.
    """
    trials = study.get_trials(deepcopy=False)
    param_names = list(dict.fromkeys(name for t in trials for name in t.params))
    rows = []
    for t in rank_trials(trials, metric=metric):
        run_id = t.user_attrs.get(RUN_ID_ATTR)
        logged = run_metrics.get(run_id, {}) if run_id else {}
        row: Row = {"trial": t.number, "state": t.state.name}
        row.update({name: t.params.get(name) for name in param_names})
        row.update({name: t.user_attrs.get(name, logged.get(name)) for name in LOGGED_METRICS})
        epochs = model_epochs(trials, t)  # a promotion's model counts its earlier trials' epochs too
        row["epochs"] = epochs if epochs is not None else len(t.intermediate_values) or None
        row["duration_s"] = round(t.duration.total_seconds(), 1) if t.duration is not None else None
        row["run_id"] = run_id
        rows.append(row)
    return rows


def leaderboard_table(rows: Sequence[Row], *, sort: str) -> pd.DataFrame:
    """The rows as a table sorted by one column: durations, trial numbers and metrics to minimise up, other numbers
    down."""
    columns = ["trial", "state", *LOGGED_METRICS, "epochs", "duration_s", "run_id"]
    frame = pd.DataFrame(list(rows)) if rows else pd.DataFrame(columns=columns)
    if sort not in frame.columns:
        raise UsageError(f"--sort must be one of {', '.join(frame.columns)}, got {sort!r}")
    minimised = sort in METRIC_DIRECTIONS and not metric_maximizes(sort)
    ascending = sort in ASCENDING_COLUMNS or minimised or not pd.api.types.is_numeric_dtype(frame[sort])
    return frame.sort_values(sort, ascending=ascending, na_position="last", kind="stable").reset_index(drop=True)


@dataclass(frozen=True)
class BaselineGain:
    """The lecture's network (its reference run) against the best trial of the sweep, on validation."""

    metric: str
    reference: LectureReference
    best_trial: int | None
    best_value: float | None

    @property
    def baseline_value(self) -> float:
        return self.reference.metric(self.metric)

    @property
    def gain(self) -> float | None:
        """How much better the best trial is, in the metric's direction (negative: worse); None without one."""
        if self.best_value is None:
            return None
        difference = self.best_value - self.baseline_value
        return difference if metric_maximizes(self.metric) else -difference


def baseline_gain(study: optuna.Study, *, metric: str) -> BaselineGain | None:
    """The lecture's network against the best complete trial (rank_trials, the ranking that chooses the tested
    trial); None where the study has no reference run (study.baseline = false, or not trained yet)."""
    reference = recorded_reference(study)
    if reference is None:
        return None
    ranked = rank_trials(study.get_trials(deepcopy=False), metric=metric)
    best = ranked[0] if ranked and ranked[0].state == TrialState.COMPLETE else None
    return BaselineGain(
        metric=metric,
        reference=reference,
        best_trial=best.number if best is not None else None,
        best_value=best.value if best is not None else None,
    )


def gain_line(gain: BaselineGain) -> str:
    """One line: e.g. `the lecture's network (reference run, 5 epochs, 24.1 s) val_accuracy 0.9712 -> best 0.9864
    (trial 16), +1.52 points`."""
    reference = gain.reference
    head = f"the lecture's network (reference run, {reference.epochs} epochs, {reference.fit_seconds:.1f} s)"
    value = f"{gain.metric} {gain.baseline_value:.4f}"
    if gain.gain is None or gain.best_value is None:
        return f"{head} {value}; no complete trial to compare it with yet"
    if gain.metric == "val_accuracy":
        change = f"{100 * gain.gain:+.2f} points"
    else:
        change = f"{gain.best_value - gain.baseline_value:+.4f} (lower is better)"
    return f"{head} {value} -> best {gain.best_value:.4f} (trial {gain.best_trial}), {change}"


def lecture_rows(study: optuna.Study, gain: BaselineGain, result: TestResult | None) -> list[Row]:
    """The lecture's network beside the chosen trial (the best one before the test set is scored), on validation."""
    number = result.trial_number if result is not None else gain.best_trial
    chosen = next((t for t in study.get_trials(deepcopy=False) if t.number == number), None)
    reference = gain.reference
    rows: list[Row] = [
        {
            "": "the lecture's network",
            "run": reference.run_id,
            "epochs": reference.epochs,
            "val_accuracy": reference.val_accuracy,
            "val_loss": reference.val_loss,
            "params": {**LECTURE_PARAMS, "hidden": "500-500"},
        }
    ]
    if chosen is not None:
        rows.append(
            {
                "": f"trial {chosen.number} ({'chosen' if result is not None else 'best so far'})",
                "run": chosen.user_attrs.get(RUN_ID_ATTR),
                "epochs": model_epochs(study.get_trials(deepcopy=False), chosen),
                "val_accuracy": chosen.user_attrs.get(VAL_ACCURACY_ATTR),
                "val_loss": chosen.user_attrs.get(VAL_LOSS_ATTR),
                "params": dict(chosen.params),
            }
        )
    return rows


def lecture_matrices(study: optuna.Study, gain: BaselineGain, rows: Sequence[Row]) -> list[tuple[str, Any]]:
    """(title, validation confusion matrix) of the lecture's network and of the chosen trial where recorded."""
    matrices: list[tuple[str, Any]] = [("the lecture's network", gain.reference.val_confusion_matrix)]
    trials = {t.user_attrs.get(RUN_ID_ATTR): t for t in study.get_trials(deepcopy=False)}
    for row in rows[1:]:
        matrix = trials[row["run"]].user_attrs.get(VAL_CONFUSION_ATTR) if row["run"] in trials else None
        if matrix is not None:
            matrices.append((str(row[""]), matrix))
    return matrices


def study_summary(
    study: optuna.Study, rows: Sequence[Row], *, metric: str, result: TestResult | None = None
) -> dict[str, Any]:
    """Plain data about the sweep: state counts, durations, the top trials (of `rows`), the gain over the
    baseline trial (None without one) and the environment."""
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    durations = [t.duration.total_seconds() for t in trials if t.duration is not None]
    gain = baseline_gain(study, metric=metric)
    return {
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "trial_states": {state.name: states.get(state.name, 0) for state in TrialState},
        "total_trial_seconds": round(sum(durations), 1),
        "mean_trial_seconds": round(sum(durations) / len(durations), 2) if durations else 0.0,
        "top_trials": [
            {k: v for k, v in row.items() if k != "state"} for row in rows if row["state"] == TrialState.COMPLETE.name
        ][:TOP_TRIALS],
        "baseline": None if gain is None else _lecture_summary(study, gain, result),
        "environment": environment(),
    }


def _lecture_summary(study: optuna.Study, gain: BaselineGain, result: TestResult | None) -> dict[str, Any]:
    rows = lecture_rows(study, gain, result)
    return {
        **asdict(gain),
        "baseline_value": gain.baseline_value,
        "gain": gain.gain,
        "line": gain_line(gain),
        "rows": rows,
        "matrices": [{"title": title, "matrix": matrix} for title, matrix in lecture_matrices(study, gain, rows)],
    }


def after_seal_line(study: optuna.Study, result: TestResult) -> str | None:
    """How many trials finished after the test set was sealed (normally 0: finalize scores once none is live).

    Such a trial was asked for just before the seal; it is recorded and on the leaderboard, but the chosen trial
    was ranked among the `counted_trials` only. None for a result recorded before they were.
    """
    if result.counted_trials is None:
        return None
    counted = set(result.counted_trials)
    late = [number for number in finished_trials(study) if number not in counted]
    among = f"the chosen trial was ranked among the {len(counted)} finished when it was scored"
    if not late:
        return f"trials finished after the seal: 0 ({among})"
    numbers = ", ".join(map(str, late))
    return f"trials finished after the seal: {len(late)} (trials {numbers}; recorded, never chosen: {among})"


def _environment(result: TestResult | None, summary: Mapping[str, Any]) -> Mapping[str, str]:
    """The machine that scored the test set; the report writer's where the result does not say."""
    if result is not None and result.environment is not None:
        return result.environment
    return dict(summary["environment"])


def _chosen_rows(result: TestResult) -> list[Row]:
    facts = {
        "trial": result.trial_number,
        "MLflow run id": result.run_id,
        "model": result.model_uri,
        "epochs trained": result.epochs_trained,
        "validation accuracy": result.val_accuracy,
        "validation loss": result.val_loss,
        **{f"param {k}": v for k, v in result.params.items()},
    }
    return [{"": key, "value": value} for key, value in facts.items()]


def _confused_rows(result: TestResult) -> list[Row]:
    return [
        {
            "true digit": p["true"],
            "predicted as": p["predicted"],
            "images": p["count"],
            "share of true digit": f"{p['share_of_true']:.1%}",
        }
        for p in most_confused(result.test_confusion_matrix, top=CONFUSED_PAIRS)
    ]


def _state_line(summary: Mapping[str, Any]) -> str:
    states = ", ".join(f"{k.lower()} {v}" for k, v in summary["trial_states"].items() if v)
    return states or "none"


# --------------------------------------------------------------------------- text


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        # Four decimals suit accuracies and losses; a learning rate of 0.0004 needs significant digits.
        return f"{value:.3g}" if 0 < abs(value) < 0.01 else f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)


def _table(rows: Sequence[Row]) -> str:
    if not rows:
        return "_none_\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def render_markdown(
    result: TestResult | None, summary: dict[str, Any], registration: Registration | None = None
) -> str:
    """The report as Markdown: the same facts as the HTML page, without the plots."""
    title = [f"# mnist-sweep report: study `{summary['study']}`", ""]
    test = (
        _test_markdown(result, registration, summary.get("after_seal"))
        if result is not None
        else _not_scored_markdown()
    )
    lecture = _lecture_markdown(summary["baseline"]) if summary.get("baseline") else []
    return "\n".join([*title, *test, *lecture, *_sweep_markdown(summary), *_environment_markdown(result, summary)])


LECTURE_TITLE = "The lecture's network beside the chosen trial (validation)"
LECTURE_NOTE = (
    "The lecture's own network (784-500-500-10, sigmoid, Adam at 1e-3, batches of 128, 5 epochs) trained once on "
    "the same split, beside the trials: not a trial, never scored on the test set."
)


def _matrix_rows(matrix: Sequence[Sequence[int]]) -> list[Row]:
    return [{"true": k, **{str(j): v for j, v in enumerate(row)}} for k, row in enumerate(matrix)]


def _lecture_markdown(lecture: Mapping[str, Any]) -> list[str]:
    out = [f"## {LECTURE_TITLE}", "", LECTURE_NOTE, "", f"- {lecture['line']}", "", _table(lecture["rows"])]
    for shown in lecture["matrices"]:
        out += [f"### Validation confusion matrix: {shown['title']}", "", _table(_matrix_rows(shown["matrix"]))]
    return out


def _not_scored_markdown() -> list[str]:
    return [f"**{NOT_SCORED}** Run `mnist-sweep finalize SWEEP` to score the chosen trial once.", ""]


def registered_text(registration: Registration | None) -> str:
    """Where the chosen model is in the Model Registry, for both pages."""
    if registration is None:
        return (
            'not registered (tracking.registered_model is "", or the registry refused it: '
            "`mnist-sweep finalize SWEEP` registers it once)"
        )
    return (
        f"{registration.name!r} version {registration.version}, alias {registration.alias}: "
        f"load it with mlflow.pyfunc.load_model({registration.uri!r})"
    )


def _test_markdown(result: TestResult, registration: Registration | None, after_seal: str | None) -> list[str]:
    """The test score, the chosen trial, the confusion matrix and the per-class metrics."""
    low, high = result.test_accuracy_ci95
    gap = result.gaps()
    matrix_rows = _matrix_rows(result.test_confusion_matrix)
    return [
        "## Held-out test set (scored once)",
        "",
        f"- test accuracy: **{result.test_accuracy:.4f}** (95 % Wilson CI {low:.4f} to {high:.4f}) "
        f"on {result.test_images} images",
        f"- test loss: {result.test_loss:.4f}",
        f"- validation -> test gap: accuracy {_cell(gap['accuracy'])} (validation minus test), "
        f"loss {_cell(gap['loss'])} (test minus validation)",
        f"- scored at {result.scored_at} by {result.scored_by}",
        f"- registered model: {registered_text(registration)}",
        *([f"- {after_seal}"] if after_seal else []),
        "",
        "## Chosen trial",
        "",
        _table(_chosen_rows(result)),
        "## Test confusion matrix (rows: true digit, columns: predicted)",
        "",
        _table(matrix_rows),
        "### Most confused digits",
        "",
        _table(_confused_rows(result)),
        "## Per-class test metrics",
        "",
        _table(result.test_per_class),
    ]


def _sweep_markdown(summary: Mapping[str, Any]) -> list[str]:
    return [
        "## Sweep",
        "",
        f"- trials: {_state_line(summary)}",
        f"- time in trials: {summary['total_trial_seconds']} s (mean {summary['mean_trial_seconds']} s per trial)",
        *(
            [f"- {summary['baseline']['line']}"]
            if summary.get("baseline")
            else ["- the lecture's network: not trained"]
        ),
        "- plots: report.html (one page, opens offline)",
        "",
        "### Top trials",
        "",
        _table(summary["top_trials"]),
    ]


def _environment_markdown(result: TestResult | None, summary: Mapping[str, Any]) -> list[str]:
    return ["## Environment", "", _cell(dict(_environment(result, summary))), ""]


# --------------------------------------------------------------------------- the HTML page


def _html_cell(value: Any) -> str:
    return html.escape(_cell(value))


def _html_table(rows: Sequence[Row], *, table_id: str) -> str:
    if not rows:
        return '<p class="note">none yet</p>'
    columns = list(rows[0])
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_html_cell(row[c])}</td>" for c in columns) + "</tr>" for row in rows)
    table = f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table}</div>'


def _card(label: str, value: str, detail: str = "", *, value_id: str = "") -> str:
    identifier = f' id="{value_id}"' if value_id else ""
    return (
        f'<div class="card"><div class="label">{html.escape(label)}</div>'
        f'<div class="value"{identifier}>{html.escape(value)}</div>'
        f'<div class="detail">{html.escape(detail)}</div></div>'
    )


def _plot(figure_html: str, *, key: str) -> str:
    return f'<figure class="plot" data-plot="{key}">{figure_html}</figure>'


def _note(title: str, note: str, *, key: str) -> str:
    return f'<div class="plot-note" data-plot="{key}"><strong>{html.escape(title)}</strong>: {html.escape(note)}</div>'


def _test_section(result: TestResult, registration: Registration | None, after_seal: str | None) -> str:
    low, high = result.test_accuracy_ci95
    gap = result.gaps()
    matrix = result.test_confusion_matrix
    ci = f"95 % Wilson CI {low:.4f} to {high:.4f}"
    cards = [
        _card("test accuracy", f"{result.test_accuracy:.4f}", ci, value_id="test-accuracy"),
        _card("test loss", f"{result.test_loss:.4f}"),
        _card(
            "validation → test gap",
            _cell(gap["accuracy"]),
            f"accuracy, validation minus test; loss {_cell(gap['loss'])}",
        ),
        _card("test images", str(result.test_images), f"scored {result.scored_at}"),
        _card(
            "registered model",
            f"{registration.name} v{registration.version}" if registration else "not registered",
            f"alias {registration.alias}: {registration.uri}" if registration else registered_text(None),
            value_id="registered-model",
        ),
    ]
    heatmaps = [
        _plot(
            plots.figure_div(plots.confusion_heatmap(matrix, normalised=normalised, title=title), div_id=key),
            key=key,
        )
        for key, normalised, title in (
            ("confusion-counts", False, "Test confusion matrix: counts"),
            ("confusion-normalised", True, "Test confusion matrix: share of each true digit"),
        )
    ]
    seal = f'<p id="after-seal">{html.escape(after_seal)}</p>' if after_seal else ""
    return f"""
<section id="test"><h2>Held-out test set, scored once</h2>
<div class="cards">{"".join(cards)}</div>{seal}
<h2>Chosen trial</h2>{_html_table(_chosen_rows(result), table_id="chosen-trial")}
<h2>Test confusion matrix</h2><p>rows: true digit, columns: predicted digit</p>
<div class="grid">{"".join(heatmaps)}</div>
<h3>Most confused digits</h3>{_html_table(_confused_rows(result), table_id="confused-pairs")}
<h3>Per-class test metrics</h3>{_html_table(result.test_per_class, table_id="per-class")}
</section>"""


def _lecture_section(lecture: Mapping[str, Any]) -> str:
    heatmaps = [
        _plot(
            plots.figure_div(
                plots.confusion_heatmap(shown["matrix"], normalised=False, title=f"Validation: {shown['title']}"),
                div_id=f"lecture-confusion-{index}",
            ),
            key=f"lecture-confusion-{index}",
        )
        for index, shown in enumerate(lecture["matrices"])
    ]
    return f"""
<section id="lecture"><h2>{html.escape(LECTURE_TITLE)}</h2>
<p class="note">{html.escape(LECTURE_NOTE)}</p>
<p id="lecture-gain">{html.escape(lecture["line"])}</p>
{_html_table(lecture["rows"], table_id="lecture-table")}
<div class="grid">{"".join(heatmaps)}</div>
</section>"""


def _sweep_section(summary: Mapping[str, Any], sweep_plots: Sequence[plots.SweepPlot]) -> str:
    states = summary["trial_states"]
    cards = [
        _card(label, str(states[state]))
        for label, state in (("complete", "COMPLETE"), ("pruned", "PRUNED"), ("failed", "FAIL"))
    ]
    seconds = f"mean {summary['mean_trial_seconds']} s per trial"
    gain = summary.get("baseline")
    baseline = f'<p id="baseline-gain">{html.escape(gain["line"])}</p>' if gain else ""
    cards.append(_card("time in trials", f"{summary['total_trial_seconds']} s", seconds))
    drawn = [
        _plot(plots.figure_div(p.figure, div_id=p.key), key=p.key)
        if p.figure is not None
        else _note(p.title, p.note, key=p.key)
        for p in sweep_plots
    ]
    return f"""
<section id="sweep"><h2>Sweep</h2>
<div class="cards">{"".join(cards)}</div>{baseline}
<h3>Top trials</h3>{_html_table(summary["top_trials"], table_id="top-trials")}
{"".join(drawn)}
</section>"""


def render_html(
    result: TestResult | None,
    summary: dict[str, Any],
    sweep_plots: Sequence[plots.SweepPlot],
    registration: Registration | None = None,
) -> str:
    """The report as one self-contained page: plotly.js embedded once (packed), nothing fetched."""
    study = html.escape(summary["study"])
    written = datetime.now(timezone.utc).isoformat(timespec="seconds")
    test = (
        _test_section(result, registration, summary.get("after_seal"))
        if result is not None
        else f'<div class="banner" id="not-scored"><strong>{NOT_SCORED}</strong> Run <code>mnist-sweep finalize '
        f"SWEEP</code> to score the chosen trial once.</div>"
    )
    env_rows = [{"": key, "value": value} for key, value in _environment(result, summary).items()]
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>mnist-sweep report: {study}</title>
<style>{_CSS}</style>
</head><body>
<h1>mnist-sweep report: study <code>{study}</code></h1>
<p class="note">written {written}; direction: {html.escape(summary["direction"])}</p>
{test}
{_lecture_section(summary["baseline"]) if summary.get("baseline") else ""}
{_sweep_section(summary, sweep_plots)}
<section id="environment"><h2>Environment</h2>{_html_table(env_rows, table_id="environment-table")}</section>
{plots.plotly_loader()}
</body></html>
"""


_CSS = """
body { font-family: system-ui, -apple-system, sans-serif; margin: 24px auto; max-width: 1280px; color: #222;
       padding: 0 16px; }
h1 { font-size: 1.6em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
code { background: #f3f3f3; padding: 1px 4px; border-radius: 3px; }
.note { color: #666; }
.banner { background: #fff4e5; border: 1px solid #f0b35a; padding: 12px 16px; border-radius: 6px; margin: 16px 0; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 12px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 10px 16px; min-width: 180px; }
.card .label { color: #666; font-size: 0.9em; } .card .value { font-size: 1.8em; font-weight: 600; }
.card .detail { color: #666; font-size: 0.85em; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; }
th { background: #f6f8fa; } td:first-child, th:first-child { text-align: left; }
/* auto-fill, not auto-fit: the first heatmap is drawn before the second exists, and must get its half then. */
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(520px, 1fr)); gap: 12px; }
.grid > * { min-width: 0; }
.scroll { overflow-x: auto; }
figure.plot { margin: 12px 0; border: 1px solid #eee; border-radius: 6px; padding: 4px; }
.plot-note { margin: 12px 0; padding: 12px 16px; background: #f6f8fa; border: 1px dashed #bbb; border-radius: 6px; }
"""


# --------------------------------------------------------------------------- files


def write_report(
    folder: Path,
    *,
    study: optuna.Study,
    result: TestResult | None,
    metric: str,
    run_metrics: Mapping[str, Mapping[str, float]],
) -> list[Path]:
    """report.html, report.md, test_metrics.json and leaderboard.csv; returns them.

    Every plot is drawn in report.html alone, which carries the one copy of plotly.js (packed, 2 MB): a page
    per plot had to embed its own copy to open offline and in MLflow's sandboxed artifact view (~28 MB a study).
    """
    rows = leaderboard_rows(study, run_metrics, metric=metric)
    summary = study_summary(study, rows, metric=metric, result=result)
    summary["after_seal"] = after_seal_line(study, result) if result is not None else None
    sweep_plots = plots.sweep_plots(study, metric=metric)
    registration = Registration.from_dict(study.user_attrs.get(REGISTERED_MODEL_ATTR))
    folder.mkdir(parents=True, exist_ok=True)
    registered = {"registered_model": registration.to_dict() if registration else None}
    written = {
        "report.html": render_html(result, summary, sweep_plots, registration),
        "report.md": render_markdown(result, summary, registration),
        "test_metrics.json": json.dumps(
            {
                "test_set_scored": result is not None,
                **(result.to_dict() if result else {}),
                **registered,
                "sweep": summary,
            },
            indent=2,
            default=str,
        ),
        "leaderboard.csv": leaderboard_table(rows, sort=metric).to_csv(index=False),
    }
    paths = []
    for name, text in written.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_atomically(path, text)
        paths.append(path)
    return paths


def replace_atomically(path: Path, text: str) -> None:
    """`path` holds `text`, or what it held before: never half of it, whatever stops this process meanwhile
    (a second Ctrl-C, SIGKILL, a full disk). Written beside the report folder, not in it: a leftover of a killed
    process is never uploaded with the folder (sweep._write_report logs it to MLflow)."""
    temporary = path.parent.parent / f".{path.parent.name}-{path.name}.{os.getpid()}-{secrets.token_hex(4)}.partial"
    try:
        with open(temporary, "x", encoding="utf-8") as file:  # "x": the umask's permissions, like write_text
            file.write(text)
            file.flush()
            os.fsync(file.fileno())  # on disk before the rename, so a crash cannot leave an empty report
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise
