"""The held-out test report: reports/<study>/report.md and test_metrics.json."""

from __future__ import annotations

import json
import platform
from collections import Counter
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from mnist_sweep.study import RUN_ID_ATTR

TOP_TRIALS = 10


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """Plain data about the sweep: state counts, durations and the top trials."""
    trials = study.get_trials(deepcopy=False)
    states = Counter(t.state.name for t in trials)
    durations = [t.duration.total_seconds() for t in trials if t.duration is not None]
    complete = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete.sort(key=lambda t: (-t.value if maximize else t.value, t.number))  # type: ignore[operator]
    return {
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "trial_states": {state.name: states.get(state.name, 0) for state in TrialState},
        "total_trial_seconds": round(sum(durations), 1),
        "mean_trial_seconds": round(sum(durations) / len(durations), 2) if durations else 0.0,
        "top_trials": [
            {
                "number": t.number,
                "value": t.value,
                "params": dict(t.params),
                "epochs_trained": t.user_attrs.get("epochs_trained"),
                "seconds": round(t.duration.total_seconds(), 1) if t.duration else None,
                "run_id": t.user_attrs.get(RUN_ID_ATTR),
            }
            for t in complete[:TOP_TRIALS]
        ],
        "environment": environment(),
    }


def environment() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    packages = {}
    for name in ("tensorflow", "keras", "optuna", "mlflow", "numpy"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = "not installed"
    return {"python": platform.python_version(), "machine": platform.machine(), **packages}


def _table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "_none_\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row[c]) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_cell(v)}" for k, v in value.items())
    return str(value)


def render_markdown(result: dict[str, Any] | None, summary: dict[str, Any]) -> str:
    lines = [f"# mnist-sweep report: study `{summary['study']}`", ""]
    if result is None:
        lines += ["**Test set not scored yet.** Run `mnist-sweep finalize SWEEP` to score the chosen trial once.", ""]
    else:
        low, high = result["test_accuracy_ci95"]
        gap = (result["val_accuracy"] or 0.0) - result["test_accuracy"]
        lines += [
            "## Held-out test set (scored once)",
            "",
            f"- test accuracy: **{result['test_accuracy']:.4f}** (95 % Wilson CI {low:.4f} to {high:.4f}) "
            f"on {result['test_images']} images",
            f"- test loss: {result['test_loss']:.4f}",
            f"- validation -> test accuracy gap: {gap:+.4f}",
            f"- scored at {result['scored_at']} by {result['scored_by']}",
            "",
            "## Chosen trial",
            "",
            f"- trial {result['trial_number']}, MLflow run `{result['run_id']}`, model `{result['model_uri']}`",
            f"- hyperparameters: {_cell(result['params'])}",
            f"- epochs trained: {result['epochs_trained']}",
            f"- validation accuracy {_cell(result['val_accuracy'])}, validation loss {_cell(result['val_loss'])}",
            "",
            "## Test confusion matrix (rows: true digit, columns: predicted)",
            "",
            _table(
                [
                    {"true": k, **{str(j): v for j, v in enumerate(row)}}
                    for k, row in enumerate(result["test_confusion_matrix"])
                ]
            ),
            "## Per-class test metrics",
            "",
            _table(result["test_per_class"]),
        ]
    states = ", ".join(f"{k.lower()} {v}" for k, v in summary["trial_states"].items() if v)
    lines += [
        "## Sweep",
        "",
        f"- trials: {states or 'none'}",
        f"- time in trials: {summary['total_trial_seconds']} s (mean {summary['mean_trial_seconds']} s per trial)",
        "",
        "### Top trials",
        "",
        _table([{k: v for k, v in t.items() if k != "run_id"} for t in summary["top_trials"]]),
        "## Environment",
        "",
        _cell(summary["environment"]),
        "",
    ]
    return "\n".join(lines)


def write_report(folder: Path, result: dict[str, Any] | None, summary: dict[str, Any]) -> list[Path]:
    """Write report.md and test_metrics.json; returns the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    markdown = folder / "report.md"
    markdown.write_text(render_markdown(result, summary), encoding="utf-8")
    metrics = folder / "test_metrics.json"
    payload = {"test_set_scored": result is not None, **(result or {}), "sweep": summary}
    metrics.write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")
    return [markdown, metrics]
