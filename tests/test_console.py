"""What the terminal shows: the live display on a TTY, plain lines in a pipe, --quiet, --verbose, --help,
--version, and pipes closed early. The real CLI throughout, read back from Optuna and MLflow."""

from __future__ import annotations

import fcntl
import importlib.metadata
import importlib.util
import io
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import pyte
import pytest
from mlflow.tracking import MlflowClient
from rich.console import Console as RichConsole

from mnist_sweep import __version__
from mnist_sweep.console import Console, LiveProgress, ReaderSafeStream, duration
from mnist_sweep.data import Split
from mnist_sweep.trial import run_trial
from tests.conftest import (
    DEFAULT_SWEEP,
    cli,
    cli_command,
    cli_environment,
    required_mnist,
    run_in_process,
    small_sweep_args,
)
from tests.test_trial import train_settings

# A line the C++ runtime writes (absl/glog format): `E0000 00:00:1795882744.594102  7725 cuda_platform.cc:52] ...`
NATIVE_LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:.]+\s+\d+ \S+:\d+\]", re.MULTILINE)
NATIVE_NOISE = ("cuInit", "oneDNN", "absl::InitializeLog", "cuda drivers", "cpu_feature_guard")


def assert_no_native_noise(stderr: str) -> None:
    assert not NATIVE_LOG_LINE.search(stderr), stderr
    assert not any(noise in stderr for noise in NATIVE_NOISE), stderr


# ---- fast: the pieces ----------------------------------------------------------------------------------


def rendered(progress: LiveProgress) -> str:
    out = io.StringIO()
    RichConsole(file=out, width=140, color_system=None).print(progress.render())
    return out.getvalue()


def test_live_display_shows_trial_epoch_batch_metric_best_trials_and_eta() -> None:
    progress = LiveProgress(RichConsole(file=io.StringIO()))
    progress.study(metric="val_accuracy", finished=2, target=10, best=0.9712)
    progress.number, progress.epochs, progress.trial_started_at = 7, 4, time.monotonic() - 30
    progress.trial_seconds = [100.0, 140.0]
    progress.epoch(1, {"val_accuracy": 0.9501, "val_loss": 0.2})
    progress.batch(2, 215, 430)
    text = rendered(progress)
    assert re.search(r"trial 7\s+epoch 2/4\s+\S+\s+batch 215/430\s+val_accuracy 0\.9501", text), text
    assert re.search(r"study\s+2/10 trials done\s+\S+\s+best val_accuracy 0\.9712\s+ETA \d:\d\d:\d\d", text), text
    # 30 s for 37.5 % of this trial: 50 s left, then 7 more trials at the 120 s mean
    assert progress.eta_seconds() == pytest.approx(50 + 7 * 120, abs=2)


def test_eta_shares_the_trials_left_among_local_workers() -> None:
    progress = LiveProgress(RichConsole(file=io.StringIO()))
    progress.study(metric="val_accuracy", finished=2, target=10, best=None)
    progress.number, progress.epochs, progress.trial_started_at = 7, 4, time.monotonic() - 30
    progress.trial_seconds, progress.workers = [100.0, 140.0], 2
    progress.epoch(1, {"val_accuracy": 0.95})
    progress.batch(2, 215, 430)

    # 50 s left of this trial, then 7 more at the 120 s mean, two at a time
    assert progress.eta_seconds() == pytest.approx(50 + 7 * 120 / 2, abs=2)


def test_eta_before_anything_is_known_is_a_dash_then_the_mean_trial() -> None:
    progress = LiveProgress(RichConsole(file=io.StringIO()))
    progress.study(metric="val_loss", finished=0, target=3, best=None)
    progress.number, progress.epochs, progress.trial_started_at = 0, 2, time.monotonic() - 2
    progress.batch(1, 1, 250)  # the first step: mostly compilation, too early to extrapolate
    text = rendered(progress)
    assert "ETA -" in text and "best val_loss -" in text and "batch 1/250" in text
    progress.trial_seconds = [10.0]  # a later trial, this early: the mean trial decides
    assert progress.eta_seconds() == pytest.approx((10 - 2) + 2 * 10, abs=1)
    assert duration(3725.4) == "1:02:05"


def test_quiet_console_prints_only_the_final_line() -> None:
    out = io.StringIO()
    console = Console(out, quiet=True)
    console.echo("trial 0 COMPLETE")
    console.echo("test accuracy 0.98", final=True)
    assert out.getvalue() == "test accuracy 0.98\n"


def test_a_reader_that_went_away_ends_nothing() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = ReaderSafeStream(io.TextIOWrapper(os.fdopen(write_end, "wb"), encoding="utf-8"))
    Console(stream).echo("a line nobody reads")  # write + flush: EPIPE, swallowed
    assert stream.reader_gone
    stream.write("more")
    stream.flush()
    assert not stream.isatty()


def test_batch_hook_sees_every_step_of_every_epoch(synthetic_mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = synthetic_mnist
    x = images.astype(np.float32) / 255.0
    split = Split(x_train=x[:1000], y_train=labels[:1000], x_val=x[1000:], y_val=labels[1000:])
    calls: list[tuple[int, int, int]] = []
    epochs: list[int] = []
    run_trial(
        params={"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 100, "activation": "relu"},
        split=split,
        settings=train_settings(hidden=(32,), epochs=2, steps_per_execution=4),
        seed=0,
        epoch_hooks=[lambda epoch, values: epochs.append(epoch)],
        batch_hooks=[lambda epoch, done, steps: calls.append((epoch, done, steps))],
    )
    assert epochs == [1, 2]
    assert {steps for _, _, steps in calls} == {10}  # 1000 images / batch 100
    for epoch in (1, 2):
        done = [d for e, d, _ in calls if e == epoch]
        # one call per executed step of 4 batches, the last one at the epoch's last batch
        assert done == sorted(done) and done[-1] == 10 and len(done) <= 4, calls


def test_help_is_written_for_users_and_version_is_the_package_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shown = run_in_process(["--help"], cwd=tmp_path, monkeypatch=monkeypatch)
    assert shown.returncode == 0
    for expected in ("Optuna", "MLflow", "test set", "example:", "mnist-sweep run sweeps/fcn.toml", "reports/"):
        assert expected in shown.stdout
    for command in ("run", "worker", "finalize", "validate", "report", "trials", "ui", "replay"):
        assert re.search(rf"^\s+{command}\s", shown.stdout, re.MULTILINE), command
    assert "map errors to exit codes" not in shown.stdout  # the developers' docstring is not the help
    version = run_in_process(["--version"], cwd=tmp_path, monkeypatch=monkeypatch)
    assert version.returncode == 0 and version.stdout == f"mnist-sweep {__version__}\n"
    assert __version__ == importlib.metadata.version("mnist-sweep")  # pyproject.toml says the same


# ---- slow: the real CLI --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data() -> Path:
    location = required_mnist()
    return location


@dataclass
class TerminalRun:
    returncode: int
    screens: list[str]  # what the terminal showed after each chunk of output, in order
    stderr: str

    @property
    def final_screen(self) -> str:
        return self.screens[-1]


def run_on_terminal(*args: str, cwd: Path, data: Path, rows: int = 40, cols: int = 200) -> TerminalRun:
    """The CLI with its stdout on a pseudo-terminal, drawn by a terminal emulator (pyte)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    env = cli_environment(data, {"TERM": "xterm-256color", "COLUMNS": str(cols), "LINES": str(rows)})
    with (cwd / "stderr.txt").open("w+") as stderr:
        process = subprocess.Popen(
            cli_command(*args), cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=stderr
        )
        os.close(slave)
        screen = pyte.Screen(cols, rows)
        stream = pyte.ByteStream(screen)
        screens: list[str] = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            stream.feed(chunk)
            screens.append("\n".join(line.rstrip() for line in screen.display).rstrip())
        os.close(master)
        returncode = process.wait(timeout=60)
        stderr.seek(0)
        return TerminalRun(returncode, screens, stderr.read())


@pytest.mark.slow
@pytest.mark.subprocess
def test_terminal_shows_live_progress_then_the_trial_lines(tmp_path: Path, data: Path) -> None:
    args = small_sweep_args(trials=2, train_limit=8000)
    args[args.index("--epochs") + 1] = "2"
    done = run_on_terminal(
        "run",
        str(DEFAULT_SWEEP),
        *args,
        "--set",
        "search.batch_size=32",
        "--set",
        "train.steps_per_execution=1",
        "--set",
        "study.baseline=false",  # no reference run: the screen holds the trials' progress lines alone
        # model.fit's progress inside an epoch (the compiled loop shows an epoch's once it ends), and the median
        # pruner: the default file's ASHA, shrunk to 2 epochs, would say its one-rung line first
        "--set",
        'train.loop="fit"',
        "--set",
        'study.pruner="median"',
        cwd=tmp_path,
        data=data,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert_no_native_noise(done.stderr)

    def shown(pattern: str) -> list[re.Match[str]]:
        return [m for s in done.screens if (m := re.search(pattern, s, re.MULTILINE))]

    mid_epoch = shown(r"^trial 0\s+epoch 1/2\s+\S+\s+batch (\d+)/(\d+)")
    assert any(0 < int(m[1]) < int(m[2]) == 250 for m in mid_epoch), "batch progress inside epoch 1 (8000/32)"
    assert shown(r"^trial 0\s+epoch 2/2\s+\S+\s+batch \d+/250\s+val_accuracy 0\.\d{4}"), "epoch 1's metric shown"
    assert shown(r"^study\s+0/2 trials done\s+\S+\s+best val_accuracy -\s+ETA \d+:\d\d:\d\d")
    # after trial 0: its permanent line above, the display below with the best so far
    after_first = shown(
        r"^trial    0  COMPLETE .*\[1/2 finished\]\n(.*\n)*trial 1\s+epoch \d/2.*\nstudy\s+1/2 trials done"
    )
    assert after_first, done.screens[-5:]
    assert shown(r"^study\s+1/2 trials done\s+\S+\s+best val_accuracy 0\.\d{4}\s+ETA \d+:\d\d:\d\d")
    # at the end the display is gone and the lines read as they do in a log
    final = done.final_screen
    assert "ETA" not in final and "batch" not in final
    lines = final.splitlines()
    assert lines[0].startswith("no GPU found, training on CPU")
    assert lines[1].startswith("study 'fcn': 0/2 trials finished")
    assert lines[2].startswith("trial    0  COMPLETE") and lines[3].startswith("trial    1  COMPLETE")
    # The result line, wrapped at the terminal's width, ends naming the registered champion (registry.py).
    result_at = max(i for i, line in enumerate(lines) if line.startswith("test accuracy 0."))
    assert "".join(lines[result_at:]).endswith("(models:/fcn@champion)"), lines[result_at:]


@dataclass
class PipedRun:
    workdir: Path
    data: Path
    first_lines: list[str]
    returncode: int
    stderr: str

    def optuna_study(self) -> optuna.Study:
        return optuna.load_study(study_name="fcn", storage=f"sqlite:///{self.workdir / 'mlruns' / 'optuna.db'}")

    def parent_run(self):  # type: ignore[no-untyped-def]
        client = MlflowClient(tracking_uri=f"sqlite:///{self.workdir / 'mlruns' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("fcn")
        assert experiment is not None
        (parent,) = [
            r for r in client.search_runs([experiment.experiment_id]) if r.data.tags.get("mnist_sweep.role") == "study"
        ]
        return parent


# The piped study's arguments, for `run` and for the commands that read it.
PIPED_ARGS = small_sweep_args(trials=3, train_limit=1000, validation=500)


@pytest.fixture(scope="module")
def run_into_head(tmp_path_factory: pytest.TempPathFactory, data: Path) -> Iterator[PipedRun]:
    """`mnist-sweep run ... | head -5`: the reader takes five lines (the first trial's last) and goes away while
    trials still run."""
    workdir = tmp_path_factory.mktemp("head")
    with (workdir / "stderr.txt").open("w+") as stderr:
        process = subprocess.Popen(
            cli_command("run", str(DEFAULT_SWEEP), *PIPED_ARGS),
            cwd=workdir,
            env=cli_environment(data),
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        assert process.stdout is not None
        first_lines = [process.stdout.readline() for _ in range(5)]
        process.stdout.close()  # as head does after its five lines
        returncode = process.wait(timeout=600)
        stderr.seek(0)
        yield PipedRun(workdir, data, first_lines, returncode, stderr.read())


@pytest.mark.slow
@pytest.mark.subprocess
def test_run_into_a_closed_pipe_finishes_every_trial_and_scores_the_test_set(run_into_head: PipedRun) -> None:
    done = run_into_head
    assert done.first_lines[0].startswith("no GPU found, training on CPU")
    assert done.first_lines[1].startswith("study 'fcn': 0/3 trials finished")
    # The default file's ASHA, shrunk to 1 epoch: one rung, said once
    assert done.first_lines[2].startswith(
        "study.pruner = 'asha' with pruner_warmup_epochs = 3 and train.epochs = 1: one rung"
    )
    assert done.first_lines[3].startswith("the lecture's network (reference, not a trial): ")
    assert done.first_lines[4].startswith("trial    0  ")
    assert "\x1b" not in "".join(done.first_lines), "no cursor movement in a pipe"
    assert done.returncode == 0 and "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr
    assert_no_native_noise(done.stderr)
    study = done.optuna_study()
    assert len(study.get_trials(states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))) == 3
    assert study.user_attrs["test_result"]["test_images"] == 10000
    parent = done.parent_run()
    assert parent.info.status == "FINISHED"  # not KILLED
    assert "test_accuracy" in parent.data.metrics
    assert (done.workdir / "reports" / "fcn" / "report.html").exists()


def closed_pipe() -> int:
    """The write end of a pipe whose reader has already gone (like `| true`)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    return write_end


@pytest.mark.slow
@pytest.mark.parametrize("command", ["trials", "validate", "report"])
@pytest.mark.subprocess
def test_printing_commands_exit_quietly_into_a_closed_pipe(run_into_head: PipedRun, command: str) -> None:
    write_end = closed_pipe()
    try:
        done = subprocess.run(
            cli_command(command, str(DEFAULT_SWEEP), *PIPED_ARGS),
            cwd=run_into_head.workdir,
            env=cli_environment(run_into_head.data),
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(write_end)
    assert done.returncode == 0 and done.stderr == "", done.stderr


@pytest.mark.slow
@pytest.mark.subprocess
def test_shell_pipelines_into_head_and_true_print_no_traceback(run_into_head: PipedRun) -> None:
    python = " ".join(cli_command())
    sweep = f"{DEFAULT_SWEEP} " + " ".join(PIPED_ARGS)
    script = (
        f"set -o pipefail; {python} validate {sweep} | head -1 && {python} trials {sweep} | true "
        f"&& {python} trials {sweep} | head -1"
    )
    done = subprocess.run(
        ["bash", "-c", script],
        cwd=run_into_head.workdir,
        env=cli_environment(run_into_head.data),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.splitlines()[0] == "[study]" and len(done.stdout.splitlines()) == 2


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
@pytest.mark.subprocess
def test_quiet_prints_only_the_final_result(tmp_path: Path, data: Path, backend: str) -> None:
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"Keras backend {backend} is not installed")
    done = cli(
        "run",
        str(DEFAULT_SWEEP),
        *small_sweep_args(trials=1, train_limit=1000, validation=500),
        "--quiet",  # the lecture's network's line is one it keeps out
        cwd=tmp_path,
        data=data,
        env={"KERAS_BACKEND": backend},  # on JAX, Keras imports TensorFlow later, during the first fit
    )
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"test accuracy 0\.\d{4} \(95% CI [^\n]*, scored [^\n]*\n", done.stdout), done.stdout
    assert_no_native_noise(done.stderr)
    study = optuna.load_study(study_name="fcn", storage=f"sqlite:///{tmp_path / 'mlruns' / 'optuna.db'}")
    assert len(study.trials) == 1 and "test_result" in study.user_attrs


@pytest.mark.slow
@pytest.mark.subprocess
def test_verbose_brings_back_the_library_logs(tmp_path: Path, data: Path) -> None:
    done = cli(
        "run",
        str(DEFAULT_SWEEP),
        *small_sweep_args(trials=1, train_limit=1000, validation=500),
        "--set",
        "study.baseline=false",  # not what is checked: the libraries' logs of one trial are
        "--verbose",
        cwd=tmp_path,
        data=data,
        env={"TF_CPP_MIN_LOG_LEVEL": "0"},  # TensorFlow's default; importing JAX in this process set it to 1
    )
    assert done.returncode == 0, done.stderr
    assert NATIVE_LOG_LINE.search(done.stderr), "TensorFlow's C++ log lines"
    assert "Trial 0 finished with value" in done.stderr, "Optuna's INFO log"
    assert "trial    0  COMPLETE" in done.stdout and "test accuracy 0." in done.stdout
