"""The default sweep on full MNIST, then with pruning off, with the random sampler, and with local workers.

Reports wall time, epochs spent, best validation accuracy and the once-scored test accuracy of each, and
plots best-validation-accuracy against epochs spent for the three (bench/search.html).

    python bench/search.py                       # the real benchmark (hours on 2 cores)
    python bench/search.py --set study.trials=4 --set train.epochs=2 --set data.train_limit=5000   # smoke
    python bench/search.py --only 3 --only 4 --only 5   # 1 worker, 2 workers, --workers auto (same seed)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import REPO, data_dir, record, table

SAVED = REPO / "bench" / "search_runs"
VARIANTS = {
    "default (TPE + median pruner)": [],
    "pruning off": ["--set", "study.pruner='none'"],
    "random sampler": ["--set", "study.sampler='random'"],
    # Local workers, same seed, measured in one invocation (--only 3 4 5) so the wall times compare.
    "1 worker": ["--workers", "1"],
    "2 workers": ["--workers", "2"],
    "auto workers": ["--workers", "auto"],
}


def run_variant(name: str, extra: list[str], overrides: list[str], folder: Path) -> dict[str, Any]:
    """One sweep through the real CLI in its own folder; returns what the study recorded."""
    workdir = folder / slug(name)
    workdir.mkdir()
    command = [sys.executable, "-m", "mnist_sweep", "run", str(REPO / "sweeps" / "fcn.toml"), *extra]
    for assignment in overrides:
        command += ["--set", assignment]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MNIST_SWEEP_DATA": data_dir()}
    started = time.perf_counter()
    subprocess.run(command, cwd=workdir, env=env, check=True, stdout=sys.stderr)
    wall = time.perf_counter() - started
    result = {"name": name, "wall": wall, **read_study(workdir)}
    result["threads"] = os.environ.get("TF_NUM_INTRAOP_THREADS", "default")
    result["overrides"] = overrides
    SAVED.mkdir(exist_ok=True)
    (SAVED / f"{slug(name)}.json").write_text(json.dumps(result, indent=1))
    return result


def slug(name: str) -> str:
    first, *rest = name.split(" ")
    return f"{first}-{rest[0]}" if first.isdigit() or first == "auto" else first  # "2-workers", not "2"


def saved_results(skip: set[str]) -> list[dict[str, Any]]:
    """Variants measured by earlier invocations (e.g. run side by side), so one plot shows all three."""
    results = []
    for name in VARIANTS:
        path = SAVED / f"{slug(name)}.json"
        if name not in skip and path.exists():
            results.append({**json.loads(path.read_text()), "earlier": True})
    return results


def read_study(workdir: Path) -> dict[str, Any]:
    import optuna

    from mnist_sweep.records import TEST_RESULT_ATTR, TestResult

    storage = f"sqlite:///{workdir / 'mlruns' / 'optuna.db'}"
    (summary,) = [s for s in optuna.get_all_study_summaries(storage) if not s.study_name.endswith(".test-seal")]
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    curve: list[tuple[int, float]] = []
    epochs = 0
    best = 0.0
    for trial in sorted(study.trials, key=lambda t: t.number):
        epochs += len(trial.intermediate_values)
        if trial.intermediate_values:
            best = max(best, max(trial.intermediate_values.values()))
        curve.append((epochs, best))
    result = TestResult.from_dict(study.user_attrs[TEST_RESULT_ATTR])
    chosen = next(t for t in study.trials if t.number == result.trial_number)
    return {
        "chosen_trial": {"number": chosen.number, "params": chosen.params, "value": chosen.value},
        "states": {state: sum(t.state.name == state for t in study.trials) for state in ("COMPLETE", "PRUNED", "FAIL")},
        "epochs": epochs,
        "best_val": best,
        "test": result.test_accuracy,
        "curve": curve,
        "trials": len(study.trials),
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import plotly.graph_objects as go

    figure = go.Figure()
    for result in results:
        xs, ys = zip(*result["curve"], strict=True)
        figure.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=result["name"], line_shape="hv"))
    figure.update_layout(
        title="best validation accuracy against epochs spent",
        xaxis_title="epochs spent (all trials)",
        yaxis_title="best val_accuracy so far",
    )
    figure.write_html(path, include_plotlyjs="cdn")  # a small file to commit; plotly.js comes from its CDN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument(
        "--only",
        choices=range(len(VARIANTS)),
        type=int,
        action="append",
        help="run only these variants (0 default, 1 pruning off, 2 random sampler, 3 1 worker, 4 2 workers, "
        "5 auto workers)",
    )
    parser.add_argument("--replot", action="store_true", help="only redraw bench/search.html from bench/search_runs/")
    args = parser.parse_args()
    if args.replot:
        plot(saved_results(skip=set()), REPO / "bench" / "search.html")
        return
    chosen = [name for index, name in enumerate(VARIANTS) if args.only is None or index in args.only]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in chosen:
            results.append(run_variant(name, VARIANTS[name], args.overrides, Path(folder)))
    results += saved_results(skip={r["name"] for r in results})
    results.sort(key=lambda r: list(VARIANTS).index(r["name"]))
    plot(results, REPO / "bench" / "search.html")
    rows = [
        [
            r["name"] + (" (earlier run)" if r.get("earlier") else ""),
            r["trials"],
            f"{r['wall'] / 60:.1f}",
            r["epochs"],
            r["best_val"],
            r["test"],
        ]
        for r in results
    ]
    body = table(["variant", "trials", "wall min", "epochs spent", "best val acc", "test acc (once)"], rows)
    by_name = {r["name"]: r for r in results}
    default, unpruned = by_name.get("default (TPE + median pruner)"), by_name.get("pruning off")
    if default:
        body += (
            f"\n\ndefault test accuracy {default['test']:.4f} (target ≥ 0.984) in {default['wall'] / 60:.1f} min "
            "(target ≤ 45)."
        )
    if default and unpruned:
        body += (
            f" Pruning spent {default['epochs'] / max(unpruned['epochs'], 1):.0%} of the epochs of no pruning "
            f"(target ≤ 60 %), best val accuracy {100 * (default['best_val'] - unpruned['best_val']):+.2f} points "
            "(target within 0.1)."
        )
    one, two, auto = by_name.get("1 worker"), by_name.get("2 workers"), by_name.get("auto workers")
    for name, packed in (("2 workers", two), ("auto workers", auto)):
        if one and packed:
            body += (
                f"\n\n{name}: {packed['wall'] / one['wall']:.2f}x the wall time of 1 worker (target ≤ 0.7x with "
                f"auto), test accuracy {packed['test']:.4f} (target ≥ 0.986), {packed['epochs']} epochs against "
                f"{one['epochs']}."
            )
    body += f"\n\nOverrides: {args.overrides or 'none'}. Plot: bench/search.html"
    record(f"bench/search: {', '.join(r['name'] for r in results if not r.get('earlier'))}", body)


if __name__ == "__main__":
    main()
