"""The default sweep on full MNIST against pruning off, random sampling, keras-tuner's oracles and local workers.

The same sweep with pruning off, with the random sampler, with keras-tuner's hyperband and bayesian
oracles (study.engine = "keras-tuner"; same space, seed, data and epochs), in 1, 2 or `auto` local workers, and
with ASHA (study.pruner = "asha", `--only 9`).

Reports wall time, epochs spent, best validation accuracy and the once-scored test accuracy of each, and
plots best-validation-accuracy against epochs spent and against wall time for all of them (bench/search.html;
with --trials, --epochs or --set: bench/search-reduced.html, results in bench/search_runs/reduced/).

    python bench/search.py                       # the real benchmark (hours on 2 cores)
    python bench/search.py --only 5 --only 6 --only 7   # 1 worker, 2 workers, --workers auto (same seed)
    python bench/search.py --trials 13 --epochs 9 --set data.train_limit=10000   # every variant, reduced
    python bench/search.py --trials 4 --epochs 2 --set data.train_limit=2000     # smoke

The variants are settings on top of sweeps/fcn.toml as it stands (since issue 21: ASHA and the compiled loop;
the results saved before it, in bench/search_runs/*.json, were measured on the median pruner over model.fit).

Issue 21's benchmark: today's default (sweeps/fcn-median.toml, the default before issue 21), the new default
(sweeps/fcn.toml; --new KEY=VALUE ... adds settings on top) and the peer (bench/peer_hyperband.py, the plain
kt.Hyperband script) at each seed, interleaved, in one invocation:

    python bench/search.py --seeds 42 7 1                 # ~1.5 h per seed on 2 idle cores
    python bench/search.py --seeds 42 --trials 3 --epochs 1 --set data.train_limit=1000   # smoke

Per variant and seed: wall (the whole process, start-up and the test score included), epochs, epoch-seconds
(the seconds inside fit over every trial, pruned ones included), best val, test (scored once), and the sweep's
cost ÷ the winner's own fit (the seconds spent in trials, over the fit seconds that made the chosen model: its
own and, for a promotion, those of the trials it went on from); then the
medians per variant against the issue's targets.
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

from _common import REPO, data_dir, median, python_path, record, table

SAVED = REPO / "bench" / "search_runs"
# ASHA as sweeps/fcn.toml sets it: rungs of 3, 9 and 20 epochs, one trial in 3 goes on.
ASHA = ["study.pruner='asha'", "study.pruner_warmup_epochs=3", "study.pruner_reduction_factor=3"]
KERAS_TUNER = ["--set", "study.engine='keras-tuner'", "--set", "study.pruner='none'"]
VARIANTS = {
    "default (sweeps/fcn.toml)": [],
    "pruning off": ["--set", "study.pruner='none'"],
    "random sampler": ["--set", "study.sampler='random'"],
    # keras-tuner's oracles as keras-tuner runs them: no Optuna pruner. Hyperband trains each trial for the
    # epochs its bracket gives (a promotion on from its earlier model); at 20 epochs and factor 3, 30 trials
    # are one full iteration. Bayesian draws 3 random points per searched key before its Gaussian process.
    "hyperband (keras-tuner)": [*KERAS_TUNER, "--set", "study.sampler='hyperband'"],
    "bayesian (keras-tuner)": [*KERAS_TUNER, "--set", "study.sampler='bayesian'"],
    # Local workers, same seed, measured in one invocation (--only 5 6 7) so the wall times compare.
    "1 worker": ["--workers", "1"],
    "2 workers": ["--workers", "2"],
    "auto workers": ["--workers", "auto"],
    # The bayesian oracle with the default sweep's median pruner, as the Optuna default runs (added last so
    # the indexes above stay; --only 8).
    "median-pruned bayesian (keras-tuner)": [
        "--set",
        "study.engine='keras-tuner'",
        "--set",
        "study.sampler='bayesian'",
        "--set",
        "study.pruner='median'",
    ],
    # Asynchronous successive halving (mnist_sweep/asha.py): each promotion a trial of its own, going on from its
    # earlier trial's weights with a cosine decay over its new segment (--only 9).
    "asha (TPE + ASHA)": [arg for setting in ASHA for arg in ("--set", setting)],
}


# Issue 21: the new default is sweeps/fcn.toml as it stands (ASHA 3/9/20, compiled loop; chosen on validation only),
# today's the default before it, kept as sweeps/fcn-median.toml (median pruner, model.fit). `--new KEY=VALUE` sets
# more on top of the new default, to try a candidate.
NEW_DEFAULT: list[str] = []
TODAY, NEW, PEER = "today's default", "new default", "peer (kt.Hyperband script)"
SWEEP_FILES = {TODAY: REPO / "sweeps" / "fcn-median.toml", NEW: REPO / "sweeps" / "fcn.toml"}
SEED_SLUGS = {TODAY: "today", NEW: "new", PEER: "peer"}  # file names of the saved runs


def run_peer(overrides: list[str], seed: int, workdir: Path) -> dict[str, Any]:
    """bench/peer_hyperband.py in its own process, as a user runs it; wall from outside, as a sweep's."""
    workdir.mkdir()
    saved = workdir / "peer.json"
    command = [sys.executable, str(REPO / "bench" / "peer_hyperband.py"), "--seed", str(seed), "--json", str(saved)]
    for assignment in overrides:
        command += ["--set", assignment]
    env = {**os.environ, "PYTHONPATH": python_path(), "MNIST_SWEEP_DATA": data_dir()}
    started = time.perf_counter()
    subprocess.run(command, cwd=workdir, env=env, check=True, stdout=sys.stderr)
    return {**json.loads(saved.read_text()), "wall": time.perf_counter() - started}


def compare_seeds(
    seeds: list[int], overrides: list[str], new_default: list[str], variants: tuple[str, ...] = (TODAY, NEW, PEER)
) -> None:
    """Today's default, the new default and the peer at each seed, interleaved so a load change hits all three
    (`variants`: fewer of them, in this order, e.g. to finish seeds that a run cut short left out)."""
    backend = os.environ.get("KERAS_BACKEND", "tensorflow")
    saved = SAVED / "seeds"
    saved.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as folder:
        for seed in seeds:
            for name in variants:
                workdir = Path(folder) / f"{SEED_SLUGS[name]}-{seed}"
                if name == PEER:
                    result = run_peer(overrides, seed, workdir)
                else:
                    extra = new_default if name == NEW else []
                    settings = [*overrides, f"study.seed={seed}", *extra]
                    result = run_sweep([], settings, workdir, sweep_file=SWEEP_FILES[name])
                result.update(name=name, seed=seed, backend=backend, overrides=overrides, new_default=new_default)
                (saved / f"{workdir.name}-{backend}.json").write_text(json.dumps(result, indent=1))
                results.append(result)
    record(
        f"bench/search --seeds {' '.join(map(str, seeds))} ({backend})", seeds_report(results, overrides, new_default)
    )


def saved_seeds(folder: Path, backend: str) -> list[dict[str, Any]]:
    """The per-variant results an earlier --seeds run saved (one file each, written as each variant ends), in the
    order it ran them: a run cut short before its last variant still gives its table (--from-saved)."""
    paths = sorted(folder.glob(f"*-{backend}.json"), key=lambda path: path.stat().st_mtime)
    results = [json.loads(path.read_text()) for path in paths]
    seeds = list(dict.fromkeys(r["seed"] for r in results))
    order = [TODAY, NEW, PEER]
    return sorted(results, key=lambda r: (seeds.index(r["seed"]), order.index(r["name"])))


def seeds_report(results: list[dict[str, Any]], overrides: list[str], new_default: list[str]) -> str:
    """The per-seed rows, the medians per variant, and the issue's targets checked on the medians."""

    def cost(r: dict[str, Any]) -> float:
        return float(r["trial_seconds"]) / max(float(r["winner_fit_seconds"]), 1e-9)

    header = ["variant", "seed", "wall min", "epochs", "epoch-s", "best val", "test (once)", "cost ÷ winner fit"]
    rows: list[list[object]] = [
        [r["name"], r["seed"], r["wall"] / 60, r["epochs"], r["epoch_seconds"], r["best_val"], r["test"], cost(r)]
        for r in results
    ]
    medians: dict[str, dict[str, float]] = {}
    for name in dict.fromkeys(r["name"] for r in results):
        mine = [r for r in results if r["name"] == name]
        medians[name] = {
            key: median([float(r[key]) for r in mine])
            for key in ("wall", "epochs", "epoch_seconds", "best_val", "test")
        }
        medians[name]["cost"] = median([cost(r) for r in mine])
        # The fixed costs: per trial, what is not fit (sampling, build, compile outside fit, tracking); per sweep,
        # what is not trials (start-up, data, the test score, the report).
        medians[name]["per_trial"] = median([(r["trial_seconds"] - r["epoch_seconds"]) / r["trials"] for r in mine])
        medians[name]["per_sweep"] = median([r["wall"] - r["trial_seconds"] for r in mine])
    median_rows: list[list[object]] = [
        [name, "median", m["wall"] / 60, m["epochs"], m["epoch_seconds"], m["best_val"], m["test"], m["cost"]]
        for name, m in medians.items()
    ]
    body = table(header, rows) + "\n\n" + table(header, median_rows)
    today, new, peer = medians.get(TODAY), medians.get(NEW), medians.get(PEER)
    if today and new and peer:
        body += (
            f"\n\nTargets (medians): new default's wall {new['wall'] / peer['wall']:.2f}x the peer's (≤ 0.6); "
            f"best val {100 * (new['best_val'] - today['best_val']):+.2f} points and test "
            f"{100 * (new['test'] - today['test']):+.2f} points against today's default (≥ -0.10); "
            f"sweep cost {new['cost']:.1f}x its winner's own fit (≤ 8)."
        )
    body += "\n\nFixed costs (medians): " + "; ".join(
        f"{name}: {m['per_trial']:.2f} s per trial outside its fit, {m['per_sweep']:.1f} s per sweep outside its trials"
        for name, m in medians.items()
    )
    body += f".\n\nNew default: {new_default}. Overrides: {overrides or 'none'}."
    return body


def run_variant(name: str, extra: list[str], overrides: list[str], folder: Path) -> dict[str, Any]:
    """One sweep through the real CLI in its own folder; returns what the study recorded."""
    result = {"name": name, **run_sweep(extra, overrides, folder / slug(name))}
    result["threads"] = os.environ.get("TF_NUM_INTRAOP_THREADS", "default")
    result["overrides"] = overrides
    SAVED.mkdir(parents=True, exist_ok=True)
    (SAVED / f"{slug(name)}.json").write_text(json.dumps(result, indent=1))
    return result


def run_sweep(
    extra: list[str], overrides: list[str], workdir: Path, *, sweep_file: Path = REPO / "sweeps" / "fcn.toml"
) -> dict[str, Any]:
    """`mnist-sweep run` on a sweep file (the default's) in `workdir`: its wall time and what the study recorded."""
    workdir.mkdir()
    command = [sys.executable, "-m", "mnist_sweep", "run", str(sweep_file), *extra]
    for assignment in overrides:
        command += ["--set", assignment]
    env = {**os.environ, "PYTHONPATH": str(REPO), "MNIST_SWEEP_DATA": data_dir()}
    started = time.perf_counter()
    subprocess.run(command, cwd=workdir, env=env, check=True, stdout=sys.stderr)
    return {"wall": time.perf_counter() - started, **read_study(workdir)}


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

    from mnist_sweep.records import FIT_SECONDS_ATTR, TEST_RESULT_ATTR, TestResult

    storage = f"sqlite:///{workdir / 'mlruns' / 'optuna.db'}"
    (summary,) = [s for s in optuna.get_all_study_summaries(storage) if not s.study_name.endswith(".test-seal")]
    study = optuna.load_study(study_name=summary.study_name, storage=storage)
    curve: list[tuple[int, float]] = []
    curve_time: list[tuple[float, float]] = []  # seconds since the first trial started, best so far
    epochs = 0
    best = 0.0
    trials = sorted(study.trials, key=lambda t: t.number)
    started = min((t.datetime_start for t in trials if t.datetime_start), default=None)
    for trial in trials:
        epochs += len(trial.intermediate_values)
        if trial.intermediate_values:
            best = max(best, max(trial.intermediate_values.values()))
        curve.append((epochs, best))
        if started and trial.datetime_complete:
            curve_time.append(((trial.datetime_complete - started).total_seconds(), best))
    result = TestResult.from_dict(study.user_attrs[TEST_RESULT_ATTR])
    chosen = next(t for t in study.trials if t.number == result.trial_number)
    ended = [t for t in trials if t.datetime_start and t.datetime_complete]
    return {
        # Complete and pruned trials record their fit seconds; a failed trial's are missing (counted in trial_seconds).
        "epoch_seconds": sum(float(t.user_attrs.get(FIT_SECONDS_ATTR, 0.0)) for t in trials),
        "trial_seconds": sum((t.datetime_complete - t.datetime_start).total_seconds() for t in ended),  # type: ignore[operator]
        "winner_fit_seconds": lineage_fit_seconds(study.trials, chosen),
        "chosen_trial": {"number": chosen.number, "params": chosen.params, "value": chosen.value},
        "states": {state: sum(t.state.name == state for t in study.trials) for state in ("COMPLETE", "PRUNED", "FAIL")},
        "epochs": epochs,
        "best_val": best,
        "test": result.test_accuracy,
        "curve": curve,
        "curve_time": curve_time,
        "engine": study.user_attrs.get("engine", "optuna"),
        "trials": len(study.trials),
    }


def lineage_fit_seconds(trials: list[Any], chosen: Any) -> float:
    """The fit seconds that made the chosen model: its own, plus those of each earlier trial it went on from
    (an ASHA promotion continues from its source's weights), so a promoted winner is not counted by its last
    segment alone. bench/peer_hyperband.py counts the peer's Hyperband promotions the same way."""
    from mnist_sweep.asha import lineage
    from mnist_sweep.records import FIT_SECONDS_ATTR

    return sum(float(t.user_attrs.get(FIT_SECONDS_ATTR, 0.0)) for t in lineage(trials, chosen))


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    figure = make_subplots(rows=1, cols=2, subplot_titles=("against epochs spent", "against wall time"))
    for index, result in enumerate(results):
        color = qualitative.Plotly[index % len(qualitative.Plotly)]
        for column, key in ((1, "curve"), (2, "curve_time")):
            if not result.get(key):  # runs saved before wall time was recorded
                continue
            xs, ys = zip(*result[key], strict=True)
            xs = tuple(x / 60 for x in xs) if key == "curve_time" else xs
            figure.add_trace(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="lines+markers",
                    name=result["name"],
                    legendgroup=result["name"],
                    showlegend=column == 1,
                    line={"shape": "hv", "color": color},
                ),
                row=1,
                col=column,
            )
    figure.update_xaxes(title_text="epochs spent (all trials)", row=1, col=1)
    figure.update_xaxes(title_text="minutes since the first trial started", row=1, col=2)
    figure.update_yaxes(title_text="best val_accuracy so far", row=1, col=1)
    figure.update_layout(title="best validation accuracy so far, every variant")
    figure.write_html(path, include_plotlyjs="cdn")  # a small file to commit; plotly.js comes from its CDN


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--trials", type=int, help="study.trials of every variant (a smaller budget)")
    parser.add_argument("--epochs", type=int, help="train.epochs of every variant (hyperband's max_epochs)")
    parser.add_argument(
        "--only",
        choices=range(len(VARIANTS)),
        type=int,
        action="append",
        help="run only these variants (" + ", ".join(f"{index} {name}" for index, name in enumerate(VARIANTS)) + ")",
    )
    parser.add_argument("--replot", action="store_true", help="only redraw bench/search.html from bench/search_runs/")
    parser.add_argument("--seeds", type=int, nargs="+", help="issue 21: today's default, the new default, the peer")
    parser.add_argument("--new", action="append", metavar="KEY=VALUE", help=f"the new default (default {NEW_DEFAULT})")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(SEED_SLUGS.values()),
        help="with --seeds: only these (today, new, peer), in this order at each seed",
    )
    parser.add_argument(
        "--from-saved",
        type=Path,
        metavar="FOLDER",
        help="the --seeds table again from what a run saved in FOLDER (bench/search_runs/seeds), e.g. one cut short",
    )
    args = parser.parse_args()
    args.overrides += [f"study.trials={args.trials}"] if args.trials else []
    args.overrides += [f"train.epochs={args.epochs}"] if args.epochs else []
    global SAVED  # a reduced budget keeps its results apart: the full benchmark's stay as measured
    SAVED = SAVED / "reduced" if args.overrides else SAVED
    plot_path = REPO / "bench" / ("search-reduced.html" if args.overrides else "search.html")
    if args.seeds:
        by_slug = {slug: name for name, slug in SEED_SLUGS.items()}
        variants = tuple(by_slug[slug] for slug in args.variants) if args.variants else (TODAY, NEW, PEER)
        compare_seeds(args.seeds, args.overrides, args.new or NEW_DEFAULT, variants)
        return
    if args.from_saved:
        backend = os.environ.get("KERAS_BACKEND", "tensorflow")
        results = saved_seeds(args.from_saved, backend)
        if not results:
            sys.exit(f"no saved --seeds results for {backend} in {args.from_saved}")
        seeds = " ".join(str(seed) for seed in dict.fromkeys(r["seed"] for r in results))
        body = seeds_report(results, results[0]["overrides"], results[0]["new_default"])
        record(f"bench/search --seeds {seeds} ({backend}), from the results saved in {args.from_saved}", body)
        return
    if args.replot:
        plot(saved_results(skip=set()), plot_path)
        return
    chosen = [name for index, name in enumerate(VARIANTS) if args.only is None or index in args.only]
    results = []
    with tempfile.TemporaryDirectory() as folder:
        for name in chosen:
            results.append(run_variant(name, VARIANTS[name], args.overrides, Path(folder)))
    results += saved_results(skip={r["name"] for r in results})
    results.sort(key=lambda r: list(VARIANTS).index(r["name"]))
    plot(results, plot_path)
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
    default, unpruned = by_name.get("default (sweeps/fcn.toml)"), by_name.get("pruning off")
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
    body += f"\n\nOverrides: {args.overrides or 'none'}. Plot: {plot_path.relative_to(REPO)}"
    record(f"bench/search: {', '.join(r['name'] for r in results if not r.get('earlier'))}", body)


if __name__ == "__main__":
    main()
