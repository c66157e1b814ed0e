"""Command line: parse, call one function, map errors to exit codes.

Exit codes: 0 done, 1 the sweep stopped (too many failed trials), 2 bad input (nothing written),
130 interrupted (Ctrl-C), 143 terminated (SIGTERM). Heavy imports (TensorFlow, MLflow, Optuna) happen
only inside the commands that need them, so `validate` stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
from collections.abc import Callable, Iterator, Sequence

from mnist_sweep import __version__, console, interrupt
from mnist_sweep.config import SweepConfig, load_sweep
from mnist_sweep.errors import EXIT_FAILED, EXIT_OK, CommandError
from mnist_sweep.masking import mask_password
from mnist_sweep.placement import THREADS_CPU_LIMIT
from mnist_sweep.toml_text import toml_string

EXIT_SIGINT = 130

ABOUT = """\
Hyperparameter sweeps of the MNIST lecture's fully connected network. An Optuna study samples the
optimizer, learning rate, batch size and activation; every trial is logged to MLflow; the best trial's
model is scored once on the held-out test set, and a report is written."""

USAGE_NOTES = """\
example:
  mnist-sweep run sweeps/fcn.toml --trials 3 --epochs 1

where results go (paths set in the sweep file; these are the defaults):
  mlruns/optuna.db                    the Optuna study: trials, params, the test result
  mlruns/mlflow.db, mlruns/artifacts  MLflow: one parent run per study, one child run per trial, models
  reports/<study>/report.html         the test report (with report.md, test_metrics.json, leaderboard.csv)
  `mnist-sweep ui SWEEP` opens the runs in the MLflow UI.

On a terminal, `run` and `worker` show live progress; piped or redirected they print one line per trial.
Every command takes --quiet (only the final result) and --verbose (the libraries' logs too).
Exit codes: 0 done, 1 too many failed trials, 2 bad input (nothing written), 130 Ctrl-C, 143 SIGTERM.
Output no one reads (stdout closed, or a reader that quit, as in `| head -1`) is dropped without an
error: the exit code is the command's own.
`mnist-sweep COMMAND --help` shows a command's options."""

# Modules whose FutureWarnings are chatter for a user of this tool (a warning's module is where it is raised).
QUIETED_LIBRARIES = r"(mlflow|optuna|keras|tensorflow|jax|torch|sklearn|pandas|plotly|sqlalchemy|alembic)(\.|$)"

# Commands whose chatter --quiet removes; the others print only their result anyway.
QUIETABLE = ("run", "worker", "finalize", "report")


def _echo_to(out: console.Console) -> Callable[..., None]:
    """`out`'s echo, passwords masked: every line a command prints on stdout."""

    def echo(line: str, *, final: bool = False) -> None:
        out.echo(mask_password(line), final=final)

    return echo


def _warn(line: str, *, final: bool = False) -> None:
    """One line on stderr, passwords masked: what ends a command with an exit code other than 0."""
    print(f"mnist-sweep: {mask_password(line)}", file=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnist-sweep",
        description=ABOUT,
        epilog=USAGE_NOTES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("sweep", metavar="SWEEP", help="the sweep file, e.g. sweeps/fcn.toml")
        sub.add_argument(
            "--set",
            dest="overrides",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a key, value in TOML syntax: --set study.trials=3",
        )
        sub.add_argument("--trials", type=int, help="shortcut for --set study.trials=N")
        sub.add_argument("--epochs", type=int, help="shortcut for --set train.epochs=N")
        sub.add_argument("--data", help="shortcut for --set data.path=PATH")
        loudness = sub.add_mutually_exclusive_group()
        loudness.add_argument(
            "-q", "--quiet", action="store_true", help="print only the final result (run, worker, finalize, report)"
        )
        loudness.add_argument(
            "-v", "--verbose", action="store_true", help="show TensorFlow's and the libraries' logs too"
        )
        return sub

    run = command("run", "run trials until study.trials are finished, then score the chosen model on the test set once")
    run.add_argument(
        "--workers",
        metavar="N|auto",
        help="train in N local processes, each pinned to its share of the cores or GPUs "
        "(shortcut for --set study.workers=N; auto: the count measured fastest on this machine)",
    )
    run.add_argument("--force", action="store_true", help="allow more --workers than cores")
    command("worker", "join the study and run trials (never touches the test set)")
    finalize = command("finalize", "score the chosen trial's model on the test set once and write the report")
    finalize.add_argument(
        "--reclaim",
        action="store_true",
        help="take over a scoring claim left by a process that died before recording a result",
    )
    finalize.add_argument(
        "--wait",
        action="store_true",
        help="while other workers still train trials of the study, wait for them (instead of refusing), then score",
    )
    command("validate", "print the resolved configuration, or the error (exit 2)")
    command("report", "rewrite report.html, report.md and test_metrics.json from what is recorded (never scores)")
    trials = command("trials", "print the leaderboard of the study's trials (Optuna + MLflow)")
    trials.add_argument("--csv", metavar="FILE", help="also write the leaderboard to FILE as CSV")
    trials.add_argument("--sort", metavar="METRIC", help="sort by this column (default: study.metric, best first)")
    ui = command("ui", "serve the MLflow UI on the sweep's tracking store at 127.0.0.1 until Ctrl-C")
    ui.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 (default: 5000)")
    dashboard = command("dashboard", "serve optuna-dashboard on the study's Optuna storage at 127.0.0.1 until Ctrl-C")
    dashboard.add_argument("--port", type=int, default=8080, help="port on 127.0.0.1 (default: 8080)")
    replay = command("replay", "retrain one trial from its MLflow run and compare with its logged metrics")
    replay.add_argument("run_id", metavar="RUN_ID", help="the trial's MLflow run id")
    return parser


def _overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.overrides)
    shortcuts = (("trials", "study.trials"), ("epochs", "train.epochs"))
    for flag, key in shortcuts:
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={value}")
    if args.data is not None:
        overrides.append("data.path=" + toml_string(args.data))
    if getattr(args, "workers", None) is not None:
        overrides.append(f"study.workers={args.workers}")
    return overrides


def _validate(cfg: SweepConfig) -> int:
    from mnist_sweep.data import resolve_source
    from mnist_sweep.preflight import check_fits_in_memory

    source = resolve_source(cfg.data.path)
    check_fits_in_memory(cfg)
    sys.stdout.write(cfg.to_toml())
    sys.stdout.write(f"# data source: {source.describe()}\n")
    return EXIT_OK


def _dispatch(args: argparse.Namespace, cfg: SweepConfig, out: console.Console) -> int:
    if args.command == "validate":
        return _validate(cfg)
    if args.command == "replay":  # writes nothing, and takes its data split from the run
        _quiet_libraries(verbose=args.verbose)
        from mnist_sweep.replay import replay

        return replay(cfg, args.run_id, echo=_echo_to(out))
    if args.command in ("run", "worker", "finalize"):
        return _train_or_score(args, cfg, out)
    return _read_recorded(args, cfg, _echo_to(out))


# Every input is checked once (preflight), before TensorFlow and MLflow are imported: a bad input answers
# in a second, and nothing is written. The flows take the data from there and check nothing again.


def _train_or_score(args: argparse.Namespace, cfg: SweepConfig, out: console.Console) -> int:
    from mnist_sweep import preflight

    echo = _echo_to(out)
    if args.command == "finalize":
        source, _ = preflight.prepare(cfg, training=False)
        _quiet_libraries(verbose=args.verbose)
        from mnist_sweep import sweep

        return sweep.finalize(
            cfg, source=source, echo=echo, reclaim=args.reclaim, wait=args.wait, progress=out.progress
        )
    from mnist_sweep import local_workers
    from mnist_sweep.keras_tuner_engine import check_workers

    if args.command == "worker":  # keras-tuner's oracle runs in one process: refused before anything is made
        check_workers(cfg, as_worker=True)
    elif isinstance(cfg.study.workers, int):
        check_workers(cfg, workers=cfg.study.workers)
    gpu_ids = local_workers.check(cfg, force=args.force) if args.command == "run" else None
    source, split = preflight.prepare(cfg, training=True)
    local = None
    if args.command == "run":  # resolves `auto` (a measurement), then pins this process to its share
        loudness = ["--quiet"] if args.quiet else ["--verbose"] if args.verbose else []
        child = functools.partial(local_workers.child_command, args.sweep, _overrides(args), loudness=loudness)
        cfg, spec = local_workers.arrange(cfg, gpu_ids=gpu_ids, child_command=child, echo=echo)
        local = local_workers.start(spec, echo=echo)
        if isinstance(out.progress, console.LiveProgress):  # its ETA shares the trials left among them
            out.progress.workers = 1 + len(spec.placements) if spec else 1
    from mnist_sweep.study import worker_policy

    # The study's record, not this process's config, says how its workers size their threads (and sample).
    _quiet_libraries(verbose=args.verbose, threads_policy=worker_policy(cfg).threads)
    local_workers.check_gpus_found(cfg, as_worker=args.command == "worker" or local is not None)
    from mnist_sweep import sweep

    return sweep.run(
        cfg,
        local=local,
        source=source,
        split=split,
        echo=echo,
        finalize=args.command == "run",
        as_worker=args.command == "worker",
        progress=out.progress,
        sweep_file=args.sweep,
    )


def _read_recorded(args: argparse.Namespace, cfg: SweepConfig, echo: Callable[..., None]) -> int:
    """report, trials, ui and dashboard: they read no data, and write at most the report folder or a CSV."""
    if args.command in ("ui", "dashboard"):
        from mnist_sweep.ui import check_port

        check_port(args.port)
    from mnist_sweep import preflight

    preflight.check_all(cfg)
    _quiet_libraries(verbose=args.verbose, keras=False)  # nothing here trains or loads a model
    from mnist_sweep import sweep

    if args.command == "report":
        return sweep.report(cfg, echo=echo, warn=_warn)
    if args.command == "trials":
        return sweep.trials(cfg, echo=echo, csv_file=args.csv, sort=args.sort)
    if args.command == "ui":
        return sweep.ui(cfg, echo=echo, port=args.port)
    if args.command == "dashboard":
        return sweep.dashboard(cfg, echo=echo, port=args.port)
    raise AssertionError(f"unhandled command {args.command!r}")


def _quiet_libraries(*, verbose: bool, keras: bool = True, threads_policy: str = THREADS_CPU_LIMIT) -> None:
    """Keras loaded for its backend (if `keras`), its threads sized by `threads_policy`; our lines only, the
    libraries' chatter off (unless --verbose)."""
    from mnist_sweep.environment import prepare_backend as load_keras
    from mnist_sweep.environment import set_mlflow_defaults

    def prepare_backend() -> None:
        if keras:
            load_keras(threads_policy)

    set_mlflow_defaults()
    if verbose:
        prepare_backend()
        return
    # 3 = errors too: the C++ runtime's ERROR lines are start-up noise (`failed call to cuInit` on a
    # machine without a GPU, at the first model build); a real failure reaches us as a Python exception.
    # Set, not defaulted: importing JAX (here or in a parent process) leaves it at 1, which lets them through.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import logging
    import warnings

    with _native_stderr_silenced():  # TensorFlow's C++ start-up lines ignore TF_CPP_MIN_LOG_LEVEL
        prepare_backend()  # imports Keras: GPUs shared, TensorFlow hidden under another backend
    import mlflow  # noqa: F401  # configures its loggers on import, so quiet them afterwards
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    for name in ("mlflow", "alembic", "tensorflow", "absl", "jax"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # It logs a database error with its traceback, then raises it: we report it once, in one line.
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=UserWarning, module="mlflow")
    # The libraries' notices about their own future, not the process's: a FutureWarning raised at a call of
    # ours (or a user's code in the same process) still shows.
    warnings.filterwarnings("ignore", category=FutureWarning, module=QUIETED_LIBRARIES)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# These train or score: a signal is acted on at a safe point, so the running trial is closed everywhere.
SAFE_POINT_COMMANDS = ("run", "worker", "finalize", "replay")


def _reopen_closed_streams() -> None:
    """A closed stdout or stderr (`>&-`) becomes /dev/null: the command runs as if its output were thrown
    away, and its exit code still says how it went (a closed pipe's reader is handled by console.py)."""
    for descriptor, name in ((1, "stdout"), (2, "stderr")):
        try:
            os.fstat(descriptor)
            continue
        except OSError:
            pass
        devnull = os.open(os.devnull, os.O_WRONLY)  # the lowest free descriptor: maybe this very one
        if devnull != descriptor:
            os.dup2(devnull, descriptor)
            os.close(devnull)
        # Python starts with sys.stdout = None where the descriptor was closed; child processes inherit it.
        stream = open(descriptor, "w", encoding="utf-8", errors="backslashreplace", closefd=False)  # noqa: SIM115
        setattr(sys, name, stream)


def main(argv: Sequence[str] | None = None) -> int:
    _reopen_closed_streams()
    args = _parser().parse_args(argv)
    out = console.stdout_console(quiet=args.quiet and args.command in QUIETABLE, verbose=args.verbose)
    safe_points = args.command in SAFE_POINT_COMMANDS
    if safe_points and argv is None:  # the process's own command line, not a call from Python
        interrupt.record_until_exit()
    signals = interrupt.deferred_signals if safe_points else interrupt.immediate_signals
    cfg: SweepConfig | None = None
    with signals():
        try:
            cfg = load_sweep(args.sweep, _overrides(args))
            code = _dispatch(args, cfg, out)
            interrupt.raise_if_requested()  # a signal during the last step still ends in its exit code
            return code
        except interrupt.Interrupted as stop:
            interrupt.acknowledge()
            print(f"mnist-sweep: {stop}; the running trial was recorded as failed, rerun to resume", file=sys.stderr)
            return stop.exit_code
        except KeyboardInterrupt:  # a second Ctrl-C, where nothing checks
            interrupt.acknowledge()
            print("mnist-sweep: interrupted; rerun to resume", file=sys.stderr)
            return EXIT_SIGINT
        except Exception as exc:
            from mnist_sweep.outages import outage_line
            from mnist_sweep.preflight import disk_full_line

            full = disk_full_line(exc, cfg)  # a full disk is no bad input: the same command works once there is room
            if full is not None:
                _warn(full)
                return EXIT_FAILED
            if isinstance(exc, CommandError):  # bad input (exit 2) or a sweep stopped by failing trials (exit 1)
                _warn(str(exc))
                return exc.exit_code
            down = outage_line(exc, cfg)  # nor is a store that stopped answering: the same command resumes
            if down is not None:
                _warn(down)
                return EXIT_FAILED
            raise


if __name__ == "__main__":
    sys.exit(main())
