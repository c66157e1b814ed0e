"""A wall of bad inputs against the CLI: each exits 2 with one line naming the key and the value, no
traceback, and nothing created in the working directory or beside the inputs.

Most cases call `mnist_sweep.cli.main`, the entry point `python -m mnist_sweep` runs, in this process:
its exit code, its stderr, and any exception it lets through (which a process would show as a traceback).
Only the cases that need a process of their own spawn the CLI: file permissions dropped with setpriv, and
inputs that would hang or exhaust this process if their guard were removed (a FIFO, /dev/zero), run under
a time and memory limit.
"""

from __future__ import annotations

import gzip
import os
import resource
import shutil
import subprocess
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CLI, cli_environment, cli_in_process, write_sweep

# Valid everywhere else, so the one bad value is what fails.
VALID = """
[study]
trials = 2

[train]
epochs = 1

[data]
validation = 500
train_limit = 1000
"""


def corrupt_copy(
    mnist: Path, folder: Path, name: str, change: Callable[[bytearray], bytes], *, raw: bool = False
) -> Path:
    """A copy of the MNIST folder with `name` rewritten by `change` (gzipped again, or raw with `raw`)."""
    copy = folder / "mnist"
    shutil.copytree(mnist, copy)
    for path in copy.iterdir():
        path.chmod(0o644)
    copy.chmod(0o755)
    original = copy / f"{name}.gz"
    content = change(bytearray(gzip.decompress(original.read_bytes())))
    original.unlink()
    if raw:
        (copy / name).write_bytes(content)
    else:
        (copy / f"{name}.gz").write_bytes(gzip.compress(content, compresslevel=1))
    return copy


def set_bytes(offset: int, value: bytes) -> Callable[[bytearray], bytes]:
    def change(content: bytearray) -> bytes:
        content[offset : offset + len(value)] = value
        return bytes(content)

    return change


def swap_two_labels(content: bytearray) -> bytes:
    first = content[8]
    other = next(i for i in range(9, len(content)) if content[i] != first)
    content[8], content[other] = content[other], first
    return bytes(content)


def truncated_gzip(mnist: Path, folder: Path) -> Path:
    copy = folder / "mnist"
    shutil.copytree(mnist, copy)
    target = copy / "train-labels-idx1-ubyte.gz"
    target.chmod(0o644)
    target.write_bytes(target.read_bytes()[:20000])
    return copy


def unreadable(mnist: Path, folder: Path) -> Path:
    copy = corrupt_copy(mnist, folder, "train-labels-idx1-ubyte", bytes)
    (copy / "train-images-idx3-ubyte.gz").chmod(0)
    return copy


def empty_folder(mnist: Path, folder: Path) -> Path:
    (folder / "empty").mkdir()
    return folder / "empty"


def not_npz(mnist: Path, folder: Path) -> Path:
    (folder / "mnist.txt").write_text("not images\n")
    return folder / "mnist.txt"


def small_npz(folder: Path, **arrays: np.ndarray | None) -> Path:
    """A Keras-style mnist.npz of 1,600 training and 50 test images, with some arrays replaced (None: left out)."""
    rng = np.random.default_rng(0)
    content: dict[str, np.ndarray | None] = {
        "x_train": rng.integers(0, 255, (1600, 28, 28), dtype=np.uint8),
        "y_train": rng.integers(0, 10, 1600).astype(np.uint8),
        "x_test": rng.integers(0, 255, (50, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 50).astype(np.uint8),
    }
    content.update(arrays)
    np.savez(folder / "mnist.npz", **{k: v for k, v in content.items() if v is not None})
    return folder / "mnist.npz"


def broken_npz(mnist: Path, folder: Path) -> Path:
    (folder / "mnist.npz").write_bytes(b"PK\x03\x04 this is no zip archive")
    return folder / "mnist.npz"


@dataclass(frozen=True)
class Bad:
    """One bad input: a sweep file text or --set overrides (or a data folder), and what the line must name.

    In `overrides` and `sweep_file`, {inputs} stands for the folder that holds the sweep file and `setup`'s files.
    """

    name: str
    expect: tuple[str, ...]
    sweep: str | None = None
    overrides: tuple[str, ...] = ()
    data: Callable[[Path, Path], Path] | None = None
    unprivileged: bool = False  # needs file permissions to apply (root reads and writes anything)
    command: str = "run"
    sweep_file: str = "{inputs}/sweep.toml"
    setup: Callable[[Path], object] | None = None  # makes files in the inputs folder
    # A process of its own, under a time and memory limit: for every FIFO (whose open, without its guard,
    # waits forever for a writer) and what would take this process's memory without its guard.
    process: bool = False


def setting(name: str, assignment: str, *expect: str) -> Bad:
    key, _, value = assignment.partition("=")
    return Bad(name, expect or (key, value.strip('"')), overrides=("--set", assignment))


def plateau(name: str, *assignments: str, expect: tuple[str, ...]) -> Bad:
    """lr_schedule = "plateau" over 5 epochs (room for its default patience 2), with `assignments` on top."""
    settings = ("train.lr_schedule=plateau", "train.epochs=5", *assignments)
    return Bad(name, expect, overrides=tuple(arg for assignment in settings for arg in ("--set", assignment)))


def section(name: str, text: str, *expect: str) -> Bad:
    return Bad(name, expect, sweep=VALID + "\n" + text)


def in_study(name: str, text: str, *expect: str) -> Bad:
    """Keys added to [study] (and, after them, any sections `text` opens)."""
    return Bad(name, expect, sweep=VALID.replace("trials = 2\n", f"trials = 2\n{text}\n", 1))


def data(name: str, make: Callable[[Path, Path], Path], *expect: str, unprivileged: bool = False) -> Bad:
    return Bad(name, ("data.path", *expect), data=make, unprivileged=unprivileged)


CASES = [
    Bad("malformed-toml", ("sweep.toml", "not valid TOML", "line 1"), sweep="[study\ntrials = 2\n"),
    Bad("unknown-section", ("'studdy'",), sweep=VALID + "[studdy]\ntrials = 3\n"),
    section("unknown-key-in-file", "[model]\nhidden = [10]\nwidth = 3\n", "model.width"),
    setting("unknown-key-study", "study.trails=3", "study.trails"),
    setting("unknown-key-data", "data.vaildation=10", "data.vaildation"),
    setting("unknown-key-model", "model.hiden=[10]", "model.hiden"),
    setting("unknown-key-train", "train.epoch=3", "train.epoch"),
    setting("unknown-key-search", "search.lr=0.1", "search.lr"),
    setting("unknown-key-tracking", 'tracking.url="x"', "tracking.url"),
    setting(
        "unknown-range-key", 'search.learning_rate={low=0.001, high=0.1, scale="log"}', "search.learning_rate", "scale"
    ),
    setting("wrong-type-trials", 'study.trials="ten"', "study.trials", "ten"),
    setting("wrong-type-seed", "study.seed=1.5", "study.seed", "1.5"),
    setting("wrong-type-hidden", 'model.hidden="500"', "model.hidden", "500"),
    setting("wrong-type-batch-size", "search.batch_size=32.5", "search.batch_size", "32.5"),
    setting("wrong-type-optimizer", "search.optimizer=3", "search.optimizer", "3"),
    setting("empty-choices-optimizer", "search.optimizer=[]", "search.optimizer", "empty"),
    setting("empty-choices-batch-size", "search.batch_size=[]", "search.batch_size", "empty"),
    setting("low-above-high", "search.learning_rate={low=0.1, high=0.001}", "search.learning_rate", "0.1", "0.001"),
    setting("log-with-low-zero", "search.dropout={low=0.0, high=0.5, log=true}", "search.dropout", "low=0.0"),
    setting("unknown-optimizer", 'search.optimizer="sgdd"'),
    setting("unknown-activation", 'search.activation=["relu", "relu6"]', "search.activation", "relu6"),
    setting("unknown-sampler", 'study.sampler="grid"'),
    setting("unknown-pruner", 'study.pruner="hyperband"'),
    setting("unknown-train-loop", 'train.loop="xla"'),
    # study.engine: each engine's keys, and a space keras-tuner's HyperParameters cannot hold
    setting("unknown-engine", 'study.engine="kerastuner"'),
    setting("keras-tuner-oracle-with-optuna", 'study.sampler="hyperband"', "study.sampler", "hyperband", "optuna"),
    setting("hyperband-factor-with-optuna", "study.hyperband_factor=4", "study.hyperband_factor", "4"),
    in_study(
        "optuna-sampler-with-keras-tuner",
        'engine = "keras-tuner"\nsampler = "tpe"',
        "study.sampler",
        "'tpe'",
        "keras-tuner",
    ),
    in_study("unknown-oracle", 'engine = "keras-tuner"\nsampler = "grid"', "study.sampler", "grid"),
    in_study(
        "optuna-pruner-with-hyperband",
        'engine = "keras-tuner"\nsampler = "hyperband"\npruner = "median"',
        "study.pruner",
        "median",
        "hyperband",
    ),
    in_study(
        "optuna-pruner-key-with-hyperband",
        'engine = "keras-tuner"\nsampler = "hyperband"\npruner_warmup_epochs = 2',
        "study.pruner_warmup_epochs",
        "2",
    ),
    in_study(
        "keras-tuner-mixed-type-choice",
        'engine = "keras-tuner"\n\n[search]\nlearning_rate = [0.001, 1]',
        "search.learning_rate",
        "one type",
    ),
    in_study(
        "keras-tuner-space-smaller-than-trials",
        'engine = "keras-tuner"\nsampler = "random"\n\n[search]\noptimizer = "adam"\nlearning_rate = 0.001\n'
        "batch_size = 128\nactivation = ['relu']",
        "search",
        "1 distinct points",
        "study.trials = 2",
    ),
    in_study(
        "asha-with-keras-tuner",
        'engine = "keras-tuner"\nsampler = "random"\npruner = "asha"',
        "study.pruner",
        "asha",
        "keras-tuner",
    ),
    in_study("asha-first-rung-zero", 'pruner = "asha"\npruner_warmup_epochs = 0', "study.pruner_warmup_epochs", "0"),
    setting("asha-unknown-budget", 'study.pruner_budget="minutes"'),
    in_study(
        "seconds-budget-without-asha",
        'pruner_budget = "seconds"\npruner_min_seconds = 30',
        "study.pruner_budget",
        "seconds",
        "median",
    ),
    in_study(
        "seconds-budget-without-its-seconds",
        'pruner = "asha"\npruner_budget = "seconds"',
        "study.pruner_min_seconds",
        "0.0",
    ),
    in_study(
        "rung-seconds-with-an-epoch-budget",
        'pruner = "asha"\npruner_min_seconds = 30',
        "study.pruner_min_seconds",
        "30",
    ),
    in_study("rung-seconds-negative", 'pruner = "asha"\npruner_min_seconds = -1.0', "study.pruner_min_seconds", "-1"),
    in_study("asha-factor-one", 'pruner = "asha"\npruner_reduction_factor = 1', "study.pruner_reduction_factor", "1"),
    setting("percentile-out-of-range", "study.pruner_percentile=0", "study.pruner_percentile", "0"),
    setting("unknown-metric", 'study.metric="val_f1"'),
    setting("unknown-direction", 'study.direction="max"'),
    Bad(
        "metric-direction-contradict",
        ("study.direction", "maximize", "study.metric", "val_loss"),
        sweep=VALID.replace("trials = 2", 'trials = 2\nmetric = "val_loss"\ndirection = "maximize"'),
    ),
    setting("zero-epochs", "train.epochs=0"),
    setting("negative-epochs", "train.epochs=-1"),
    setting("zero-trials", "study.trials=0"),
    setting("negative-trials", "study.trials=-3"),
    setting("zero-batch-size", "search.batch_size=0"),
    setting("negative-batch-size", "search.batch_size=[32, -64]", "search.batch_size", "-64"),
    setting("zero-hidden", "model.hidden=[500, 0]", "model.hidden", "0"),
    setting("negative-hidden", "model.hidden=[-1]", "model.hidden", "-1"),
    setting("validation-all-images", "data.validation=60000"),
    setting("train-limit-too-large", "data.train_limit=59600", "data.train_limit", "59600"),
    Bad("set-without-section", ("--set", "trials=3"), overrides=("--set", "trials=3")),
    data("data-missing", lambda mnist, folder: folder / "nowhere", "nowhere", "does not exist"),
    data("data-unreadable", unreadable, "train-images-idx3-ubyte.gz", "Permission denied", unprivileged=True),
    data("data-folder-without-files", empty_folder, "empty", "has no train-images-idx3-ubyte"),
    data("data-not-npz", not_npz, "mnist.txt", "not an .npz"),
    data("data-broken-npz", broken_npz, "mnist.npz", "cannot read as .npz"),
    data("truncated-gzip", truncated_gzip, "train-labels-idx1-ubyte.gz", "cannot read"),
    data(
        "wrong-idx-magic",
        lambda mnist, folder: corrupt_copy(
            mnist, folder, "train-labels-idx1-ubyte", set_bytes(0, (2051).to_bytes(4, "big"))
        ),
        "train-labels-idx1-ubyte.gz",
        "magic is 2051",
    ),
    data(
        "wrong-image-size",
        lambda mnist, folder: corrupt_copy(
            mnist, folder, "train-images-idx3-ubyte", set_bytes(8, (27).to_bytes(4, "big")), raw=True
        ),
        "train-images-idx3-ubyte",
        "27x28",
    ),
    data(
        "label-out-of-range",
        lambda mnist, folder: corrupt_copy(mnist, folder, "train-labels-idx1-ubyte", set_bytes(8, bytes([10]))),
        "train-labels-idx1-ubyte.gz",
        "label 10 at index 0",
    ),
    data(
        "checksum-mismatch",
        lambda mnist, folder: corrupt_copy(mnist, folder, "train-labels-idx1-ubyte", swap_two_labels),
        "train-labels-idx1-ubyte.gz",
        "checksum mismatch",
    ),
    data(
        "test-file-wrong-magic",
        lambda mnist, folder: corrupt_copy(
            mnist, folder, "t10k-labels-idx1-ubyte", set_bytes(0, (7).to_bytes(4, "big"))
        ),
        "t10k-labels-idx1-ubyte.gz",
        "magic is 7",
    ),
    data(
        "test-label-out-of-range",
        lambda mnist, folder: corrupt_copy(mnist, folder, "t10k-labels-idx1-ubyte", set_bytes(8, bytes([10]))),
        "t10k-labels-idx1-ubyte.gz",
        "label 10 at index 0",
    ),
    data("npz-test-label-out-of-range", lambda m, f: small_npz(f, y_test=np.full(50, 12)), "y_test", "label 12"),
    data("npz-test-labels-float", lambda m, f: small_npz(f, y_test=np.full(50, 1.5)), "y_test", "float64"),
    data("npz-test-images-shape", lambda m, f: small_npz(f, x_test=np.zeros((50, 28, 27), np.uint8)), "x_test", "27"),
    data("npz-test-images-float", lambda m, f: small_npz(f, x_test=np.zeros((50, 28, 28))), "x_test", "float64"),
    data("npz-without-test", lambda m, f: small_npz(f, x_test=None), "'x_test'"),
    setting("negative-study-seed", "study.seed=-1", "study.seed", "-1"),
    setting("negative-data-seed", "data.seed=-1", "data.seed", "-1"),
    setting("huge-study-seed", "study.seed=99999999999", "study.seed", "99999999999"),
    setting("trials-boolean", "study.trials=true", "study.trials", "True"),
    setting("epochs-boolean", "train.epochs=false", "train.epochs", "False"),
    setting("study-name-too-long", "study.name=" + "a" * 300, "study.name", "100 characters", "300"),
    setting("study-name-of-a-seal", 'study.name="fcn.test-seal"', "study.name", "fcn.test-seal"),
    data("data-is-a-device", lambda mnist, folder: Path("/dev/zero"), "/dev/zero", "neither a folder"),
    setting("storage-in-memory", 'study.storage="sqlite:///:memory:"', "study.storage", "in-memory"),
    setting("tracking-in-memory", 'tracking.uri="sqlite:///:memory:"', "tracking.uri", "in-memory"),
    setting(
        "tracking-uri-with-password",
        'tracking.uri="http://alice:Secret-pw-123@127.0.0.1:1"',
        "tracking.uri",
        "alice:***@",
        "MLFLOW_TRACKING_USERNAME",
    ),
    setting(
        "storage-unreachable-with-password",
        'study.storage="postgresql://u:Secret-pw-123@127.0.0.1:1/optuna"',
        "study.storage",
        "u:***@127.0.0.1:1",
        "cannot connect",
    ),
    setting("storage-unknown-scheme", 'study.storage="mongodb://127.0.0.1/optuna"'),
    setting("storage-sqlite-without-path", 'study.storage="sqlite://optuna.db"'),
    setting("tracking-unknown-scheme", 'tracking.uri="ftp://127.0.0.1/mlflow"'),
    setting("tracking-file-store", 'tracking.uri="file:///tmp/mlruns"', "tracking.uri", "file:///tmp/mlruns", "sqlite"),
    setting(
        "storage-unreachable",
        'study.storage="postgresql://u@127.0.0.1:1/optuna"',
        "study.storage",
        "127.0.0.1:1",
        "cannot connect",
    ),
    setting(
        "tracking-db-unreachable", 'tracking.uri="postgresql://u@127.0.0.1:1/mlflow"', "tracking.uri", "127.0.0.1:1"
    ),
    setting("tracking-server-unreachable", 'tracking.uri="http://127.0.0.1:1"', "tracking.uri", "http://127.0.0.1:1"),
    Bad(
        "reports-under-a-file",
        ("tracking.reports", "sweep.toml/reports", "is a file"),
        overrides=("--set", 'tracking.reports="../inputs/sweep.toml/reports"'),
    ),
    Bad(
        "reports-is-a-file",
        ("tracking.reports", "sweep.toml", "is a file"),
        overrides=("--set", 'tracking.reports="../inputs/sweep.toml"'),
    ),
    Bad(
        "study-report-folder-is-a-file",
        ("tracking.reports", "sweep.toml", "is a file"),
        overrides=("--set", 'tracking.reports="../inputs"', "--set", 'study.name="sweep.toml"'),
    ),
    Bad(
        "artifacts-is-a-file",
        ("tracking.artifacts", "sweep.toml", "is a file"),
        overrides=("--set", 'tracking.artifacts="../inputs/sweep.toml"'),
    ),
    Bad(
        "storage-is-a-folder",
        ("study.storage", "inputs", "is a folder"),
        overrides=("--set", 'study.storage="sqlite:///../inputs"'),
    ),
    Bad(
        "unwritable-working-directory",
        ("study.storage", "sqlite:///mlruns/optuna.db", "cannot write"),
        unprivileged=True,
    ),
    # plateau together with settings it cannot use
    setting("plateau-key-without-plateau", "train.plateau_patience=4", "train.plateau_patience", "4", "constant"),
    plateau("plateau-factor-not-below-1", "train.plateau_factor=1.0", expect=("train.plateau_factor", "1.0")),
    plateau("plateau-factor-zero", "train.plateau_factor=0", expect=("train.plateau_factor", "0")),
    plateau(
        "plateau-patience-fills-the-epochs",
        "train.plateau_patience=4",
        expect=("train.plateau_patience = 4", "train.epochs = 5", "at most 3"),
    ),
    plateau(
        "plateau-after-early-stopping",
        "train.early_stopping_patience=2",
        expect=("train.early_stopping_patience = 2", "plateau", "patience 2"),
    ),
    plateau(
        "plateau-floor-above-the-searched-rates",
        "train.plateau_min_lr=0.01",
        "search.learning_rate={low=0.001, high=0.1}",
        expect=("train.plateau_min_lr = 0.01", "search.learning_rate", "0.001"),
    ),
]


LONG = "a" * 300  # one name over NAME_MAX (255 bytes)
DEEP = "/".join(["d" * 200] * 25)  # 5,000 bytes of short names: over PATH_MAX (4096)


def fifo(name: str) -> Callable[[Path], object]:
    return lambda inputs: os.mkfifo(inputs / name)


def symlink_loop(name: str) -> Callable[[Path], object]:
    def make(inputs: Path) -> None:
        os.symlink(inputs / f"{name}.b", inputs / f"{name}.a")
        os.symlink(inputs / f"{name}.a", inputs / f"{name}.b")

    return make


def mnist_files(mnist: Path, folder: Path) -> Path:
    copy = folder / "mnist"
    shutil.copytree(mnist, copy)
    for path in copy.iterdir():
        path.chmod(0o644)
    return copy


def gzip_bomb(mnist: Path, folder: Path) -> Path:
    """Labels whose header declares MNIST's 60,000 but whose 200 KB of gzip hold 256 MiB."""
    copy = mnist_files(mnist, folder)
    with gzip.open(copy / "train-labels-idx1-ubyte.gz", "wb", compresslevel=1) as handle:
        handle.write((2049).to_bytes(4, "big") + (60000).to_bytes(4, "big"))
        for _ in range(16):
            handle.write(bytes(1 << 24))
    return copy


def sparse_huge_images(mnist: Path, folder: Path) -> Path:
    """Training images with a valid header in a 256 MiB file that holds no block on disk."""
    copy = mnist_files(mnist, folder)
    (copy / "train-images-idx3-ubyte.gz").unlink()
    with open(copy / "train-images-idx3-ubyte", "wb") as handle:
        handle.write(b"".join(n.to_bytes(4, "big") for n in (2051, 60000, 28, 28)))
        handle.truncate(1 << 28)
    return copy


def idx_declaring(count: int) -> Callable[[Path, Path], Path]:
    def make(mnist: Path, folder: Path) -> Path:
        return corrupt_copy(mnist, folder, "train-labels-idx1-ubyte", set_bytes(4, count.to_bytes(4, "big")))

    return make


def fifo_among_idx(mnist: Path, folder: Path) -> Path:
    copy = mnist_files(mnist, folder)
    (copy / "train-labels-idx1-ubyte.gz").unlink()
    os.mkfifo(copy / "train-labels-idx1-ubyte")
    return copy


def npz_declaring_a_huge_array(mnist: Path, folder: Path) -> Path:
    """A mnist.npz whose x_train header declares 10^9 images, followed by a few bytes: a zip bomb's shape."""
    path = small_npz(folder, x_train=None)
    with zipfile.ZipFile(path, "a") as archive, archive.open("x_train.npy", "w", force_zip64=True) as member:
        header = {"descr": "|u1", "fortran_order": False, "shape": (10**9, 28, 28)}
        np.lib.format.write_array_header_1_0(member, header)
        member.write(bytes(100))
    return path


def data_symlink_loop(mnist: Path, folder: Path) -> Path:
    symlink_loop("d")(folder)
    return folder / "d.a"


def swapped_parts(mnist: Path, folder: Path) -> Path:
    """The test files under the training files' names, and the other way round."""
    copy = mnist_files(mnist, folder)
    for kind in ("images-idx3", "labels-idx1"):
        (copy / f"train-{kind}-ubyte.gz").rename(copy / "swap.gz")
        (copy / f"t10k-{kind}-ubyte.gz").rename(copy / f"train-{kind}-ubyte.gz")
        (copy / "swap.gz").rename(copy / f"t10k-{kind}-ubyte.gz")
    return copy


def sweep_setting(name: str, *assignments: str, expect: tuple[str, ...], **options: object) -> Bad:
    arguments = tuple(arg for assignment in assignments for arg in ("--set", assignment))
    return Bad(name, expect, overrides=arguments, **options)  # type: ignore[arg-type]


# Issue 22's third round: paths past the kernel's limits, files that are no regular file, data that
# declares less than it holds, the two stores in one file, non-finite bounds, --set with more than one
# value, numbers past what the platform holds, networks that cannot fit; then more in the same spirit.
ROUND_3 = [
    Bad("sweep-file-name-too-long", ("a" * 20, "name of 305 bytes"), command="validate", sweep_file=LONG + ".toml"),
    Bad("sweep-path-too-long", ("ddd", "bytes long"), command="validate", sweep_file=DEEP + "/x.toml"),
    Bad(
        "sweep-file-is-a-fifo",
        ("fifo.toml", "a FIFO, not a file"),
        command="validate",
        sweep_file="{inputs}/fifo.toml",
        setup=fifo("fifo.toml"),
        process=True,
    ),
    Bad("sweep-file-is-dev-zero", ("/dev/zero", "a device"), command="validate", sweep_file="/dev/zero", process=True),
    Bad("sweep-file-is-a-folder", ("inputs", "a folder, not a file"), command="validate", sweep_file="{inputs}"),
    Bad(
        "sweep-file-symlink-loop",
        ("s.a", "symbolic links"),
        command="validate",
        sweep_file="{inputs}/s.a",
        setup=symlink_loop("s"),
    ),
    Bad(
        "sweep-file-name-with-newline", ("a\\nb.toml", "not found"), command="validate", sweep_file="{inputs}/a\nb.toml"
    ),
    Bad(
        "sweep-file-too-large",
        ("big.toml", "1 MiB"),
        command="validate",
        sweep_file="{inputs}/big.toml",
        setup=lambda inputs: (inputs / "big.toml").write_text(VALID + ("#" * 999 + "\n") * 2000),
    ),
    Bad(
        "sweep-file-nested-too-deeply",
        ("sweep.toml", "nested too deeply"),
        sweep=VALID + "x = " + "[" * 3000 + "]" * 3000,
    ),
    Bad(
        "sweep-file-int-of-5000-digits",
        ("sweep.toml", "4300 digits"),
        sweep=VALID + "[model]\nhidden = [1" + "0" * 5000 + "]",
    ),
    setting(
        "set-nested-too-deeply", "model.hidden=" + "[" * 3000 + "]" * 3000, "--set model.hidden", "nested too deeply"
    ),
    setting("data-path-name-too-long", f'data.path="{LONG}"', "data.path", "aaa", "name of 300 bytes"),
    setting("data-path-too-long", f'data.path="{DEEP}"', "data.path", "ddd", "bytes long"),
    setting("data-path-nul", 'data.path="a\\u0000b"', "data.path", "a\\x00b", "control character"),
    setting("storage-name-too-long", f'study.storage="sqlite:///{LONG}.db"', "study.storage", "name of 303 bytes"),
    setting("storage-path-too-long", f'study.storage="sqlite:///{DEEP}/o.db"', "study.storage", "bytes long"),
    setting("tracking-name-too-long", f'tracking.uri="sqlite:///{LONG}.db"', "tracking.uri", "name of 303 bytes"),
    setting("artifacts-name-too-long", f'tracking.artifacts="{LONG}"', "tracking.artifacts", "name of 300 bytes"),
    setting(
        "artifacts-uri-too-long", f'tracking.artifacts="file:///tmp/{DEEP}"', "tracking.artifacts", "file:///tmp/d"
    ),
    setting("reports-name-too-long", f'tracking.reports="{LONG}"', "tracking.reports", "name of 300 bytes"),
    setting("reports-path-too-long", f'tracking.reports="{DEEP}"', "tracking.reports", "bytes long"),
    sweep_setting(  # 4,050 bytes fit; with the study's folder under them, 4,151 do not
        "study-report-folder-too-long",
        f'tracking.reports="/{DEEP[:4019]}/{"e" * 29}"',
        f'study.name="{"n" * 100}"',
        expect=("tracking.reports", "4151 bytes long"),
    ),
    Bad("csv-name-too-long", ("--csv", "name of 304 bytes"), command="trials", overrides=("--csv", LONG + ".csv")),
    sweep_setting(
        "storage-is-a-fifo",
        'study.storage="sqlite:///{inputs}/fifo.db"',
        expect=("study.storage", "fifo.db", "a FIFO, not a file"),
        setup=fifo("fifo.db"),
        process=True,
    ),
    setting("storage-is-a-device", 'study.storage="sqlite:////dev/zero"', "study.storage", "a device, not a file"),
    sweep_setting(
        "tracking-is-a-fifo",
        'tracking.uri="sqlite:///{inputs}/fifo.db"',
        expect=("tracking.uri", "a FIFO, not a file"),
        setup=fifo("fifo.db"),
        process=True,
    ),
    sweep_setting(
        "reports-is-a-fifo",
        'tracking.reports="{inputs}/fifo"',
        expect=("tracking.reports", "a FIFO, not a folder"),
        setup=fifo("fifo"),
        process=True,
    ),
    sweep_setting(
        "reports-symlink-loop",
        'tracking.reports="{inputs}/r.a"',
        expect=("tracking.reports", "a symlink loop"),
        setup=symlink_loop("r"),
    ),
    sweep_setting(
        "artifacts-symlink-loop",
        'tracking.artifacts="{inputs}/a.a"',
        expect=("tracking.artifacts", "a symlink loop"),
        setup=symlink_loop("a"),
    ),
    sweep_setting(
        "storage-symlink-loop",
        'study.storage="sqlite:///{inputs}/o.a"',
        expect=("study.storage", "a symlink loop"),
        setup=symlink_loop("o"),
    ),
    sweep_setting(
        "storage-symlink-to-nothing",
        'study.storage="sqlite:///{inputs}/o.db"',
        expect=("study.storage", "a symlink to the missing"),
        setup=lambda inputs: os.symlink(inputs / "gone" / "o.db", inputs / "o.db"),
    ),
    Bad(
        "csv-is-a-fifo",
        ("--csv", "a FIFO, not a file"),
        command="trials",
        overrides=("--csv", "{inputs}/fifo.csv"),
        setup=fifo("fifo.csv"),
        process=True,
    ),
    data("data-path-symlink-loop", data_symlink_loop, "a symlink loop"),
    Bad(
        "idx-file-is-a-fifo",
        ("data.path", "train-labels-idx1-ubyte", "a FIFO, not a regular file"),
        data=fifo_among_idx,
        process=True,
    ),
    data("idx-gzip-bomb", gzip_bomb, "train-labels-idx1-ubyte.gz", "60009 bytes or more, expected 60008"),
    data("idx-sparse-huge", sparse_huge_images, "train-images-idx3-ubyte", "268435456 bytes, expected 47040016"),
    data("idx-declares-too-many", idx_declaring(70000), "train-labels-idx1-ubyte.gz", "declares 70000 items"),
    data("idx-declares-a-negative-count", idx_declaring(2**32 - 1), "train-labels-idx1-ubyte.gz", "declares -1 items"),
    data("npz-declares-a-huge-array", npz_declaring_a_huge_array, "x_train", "(1000000000, 28, 28)", "refused unread"),
    sweep_setting(
        "same-sqlite-file-for-both-stores",
        'study.storage="sqlite:///mlruns/one.db"',
        'tracking.uri="sqlite:///mlruns/./one.db"',
        expect=("study.storage", "tracking.uri", "mlruns/one.db", "same database"),
    ),
    sweep_setting(
        "same-sqlite-file-through-a-symlink",
        'study.storage="sqlite:///{inputs}/one.db"',
        'tracking.uri="sqlite:///{inputs}/other.db"',
        expect=("study.storage", "other.db", "same database"),
        setup=lambda inputs: os.symlink(inputs / "one.db", inputs / "other.db"),
    ),
    sweep_setting(
        "same-postgres-database-for-both-stores",
        'study.storage="postgresql://u:Secret-pw-123@127.0.0.1:1/sweep"',
        'tracking.uri="postgresql+psycopg2://u@127.0.0.1:1/sweep?sslmode=disable"',
        expect=("study.storage", "u:***@127.0.0.1:1/sweep", "same database"),
    ),
    setting("lr-range-low-nan", "search.learning_rate={low=nan, high=0.1}", "search.learning_rate", "low", "nan"),
    setting("lr-range-high-inf", "search.learning_rate={low=0.001, high=inf}", "search.learning_rate", "inf"),
    setting("dropout-range-nan", "search.dropout={low=0.0, high=nan}", "search.dropout", "nan"),
    setting("momentum-range-nan", "search.momentum={low=0.0, high=nan}", "search.momentum", "nan"),
    setting("weight-decay-range-inf", "search.weight_decay={low=0.0, high=inf}", "search.weight_decay", "inf"),
    plateau("plateau-factor-nan", "train.plateau_factor=nan", expect=("train.plateau_factor", "nan", "finite")),
    setting("pruner-percentile-inf", "study.pruner_percentile=inf", "study.pruner_percentile", "inf"),
    setting("set-with-a-second-line", "study.trials=3\nstudy.seed = 4", "--set study.trials", "more than one value"),
    setting("set-with-a-stray-bracket", "study.trials=1]", "--set study.trials", "'1]'", "not one TOML value"),
    setting("set-with-a-second-assignment", "tracking.reports=out extra = 4", "--set tracking.reports", "extra = 4"),
    setting("set-with-an-unclosed-string", 'study.name="abc', "--set study.name", "abc"),
    setting("heartbeat-past-a-day", "study.heartbeat_seconds=100000000000000", "study.heartbeat_seconds", "86400"),
    # validate: the same config check as run; without its guard, run would start two billion trials here
    sweep_setting(
        "trials-past-int32", "study.trials=2147483648", expect=("study.trials", "2147483648"), command="validate"
    ),
    setting("seed-past-int64", "data.seed=100000000000000000000", "data.seed", "100000000000000000000", "64-bit"),
    setting(
        "range-bound-past-int64",
        "search.batch_size={low=1, high=100000000000000000000}",
        "search.batch_size.high",
        "64-bit",
    ),
    setting(
        "batch-size-past-mnist", "search.batch_size=[32, 1099511627776]", "search.batch_size", "1099511627776", "60000"
    ),
    sweep_setting(
        "network-too-wide-for-memory",
        "model.hidden=[65536, 65536, 65536, 65536, 65536, 65536, 65536, 65536]",
        expect=("model.hidden", "weights need at least", "GiB"),
        command="validate",  # validate estimates as run does; without the guard, run would try to train it here
    ),
    sweep_setting(
        "workers-too-many-for-memory",
        "study.workers=100000",
        expect=("study.workers = 100000", "model.hidden = [500, 500]", "times 100000 workers", "GiB"),
        command="validate",
    ),
    sweep_setting(  # validate: the same config check as run, and without its guard no 3000-layer net trains here
        "network-too-deep",
        "model.hidden=[" + ", ".join(["10"] * 3000) + "]",
        expect=("model.hidden", "3000 layers"),
        command="validate",
    ),
    setting("study-name-with-a-newline", 'study.name="a\\nb"', "study.name", "'a\\nb'"),
    setting(
        "tracking-uri-with-a-newline",
        'tracking.uri="http://127.0.0.1:1/\\n"',
        "tracking.uri",
        "'http://127.0.0.1:1/\\n'",
        "control character",
    ),
    setting("reports-with-an-escape-sequence", 'tracking.reports="\\u001b[31mred"', "tracking.reports", "\\x1b[31mred"),
    sweep_setting(
        "storage-lock-is-a-fifo",
        'study.storage="sqlite:///{inputs}/optuna.db"',
        expect=("study.storage", "optuna.db.lock is a FIFO, not a file"),
        setup=fifo("optuna.db.lock"),
        process=True,
    ),
    Bad(
        "sweep-file-unreadable",
        ("locked.toml", "Permission denied"),
        command="validate",
        sweep_file="{inputs}/locked.toml",
        setup=lambda inputs: (inputs / "locked.toml").touch(mode=0),
        unprivileged=True,
    ),
    data("data-train-and-test-swapped", swapped_parts, "train-images-idx3-ubyte.gz", "checksum mismatch"),
    setting("study-name-unicode", 'study.name="fcñ"', "study.name", "fcñ"),
    setting("empty-storage", 'study.storage=""', "study.storage", "''"),
]


@pytest.fixture
def folders(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[tuple[Path, Path]]:
    """(inputs, working directory), the latter read-only for the unwritable-directory case."""
    inputs, work = tmp_path / "inputs", tmp_path / "work"
    inputs.mkdir()
    work.mkdir()
    if request.param.name == "unwritable-working-directory":
        work.chmod(0o555)
    try:
        yield inputs, work
    finally:
        work.chmod(0o755)


def permissions_apply() -> tuple[str, ...]:
    """A command prefix under which file permissions hold: root, as the files' owner, loses its override."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv, so read/write permissions cannot be tested")
    dropped = "-dac_override,-dac_read_search"
    return ("setpriv", f"--bounding-set={dropped}", f"--inh-caps={dropped}", "--")


def everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


ALL_CASES = CASES + ROUND_3


def listing(folder: Path) -> list[str]:
    """Every path under `folder`, symlinks not followed (a loop is listed, not entered)."""
    found = []
    for root, folders, files in os.walk(folder):
        found += [str(Path(root, name).relative_to(folder)) for name in folders + files]
    return sorted(found)


def limited() -> None:
    """Run in the child: 4 GiB of address space, so a guard removed fails with MemoryError, not the machine."""
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


@pytest.mark.parametrize(
    "folders",
    # The cases that spawn the CLI carry the subprocess marker: `make test-fast` runs the in-process ones.
    [pytest.param(c, marks=pytest.mark.subprocess) if c.unprivileged or c.process else c for c in ALL_CASES],
    ids=[c.name for c in ALL_CASES],
    indirect=True,
)
def test_bad_input_exits_2_with_one_line_and_creates_nothing(
    folders: tuple[Path, Path],
    mnist_dir: Path,
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    case: Bad = request.node.callspec.params["folders"]
    inputs, work = folders
    write_sweep(inputs, case.sweep if case.sweep is not None else VALID)
    if case.setup is not None:
        case.setup(inputs)
    args = [case.command, case.sweep_file.replace("{inputs}", str(inputs))]
    args += [arg.replace("{inputs}", str(inputs)) for arg in case.overrides]
    if case.data is not None:
        args += ["--data", str(case.data(mnist_dir, inputs))]
    before = listing(inputs)

    if case.unprivileged or case.process:
        prefix = permissions_apply() if case.unprivileged else ()
        try:
            result = subprocess.run(
                [*prefix, *CLI, *args],
                cwd=work,
                env=cli_environment(mnist_dir),
                capture_output=True,
                text=True,
                timeout=60,
                preexec_fn=limited,
            )
        except subprocess.TimeoutExpired:
            pytest.fail(f"{case.name}: the command hung")
        code, stderr = result.returncode, result.stderr
    else:
        monkeypatch.setenv("MNIST_SWEEP_DATA", str(mnist_dir))
        code, stderr = cli_in_process(args, cwd=work, monkeypatch=monkeypatch)

    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("mnist-sweep: ")
    for fragment in case.expect:
        assert fragment in lines[0], f"{fragment!r} not named in: {lines[0]}"
    assert "Secret-pw-123" not in stderr
    assert listing(work) == []
    assert listing(inputs) == before


def closed_stdout_run(*args: str, redirect: str, cwd: Path, mnist_dir: Path) -> subprocess.CompletedProcess[str]:
    command = " ".join(f"'{arg}'" for arg in [*CLI, *args]) + " " + redirect
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=cli_environment(mnist_dir), capture_output=True, text=True, timeout=60
    )


@pytest.mark.subprocess
def test_closed_stdout_ends_quietly_with_the_commands_own_exit_code(tmp_path: Path, mnist_dir: Path) -> None:
    """`validate sweep >&-`: nothing to print to, so nothing printed, exit 0; a bad input still says why, exit 2."""
    sweep = write_sweep(tmp_path, VALID)
    valid = closed_stdout_run("validate", str(sweep), redirect=">&-", cwd=tmp_path, mnist_dir=mnist_dir)
    assert (valid.returncode, valid.stderr) == (0, "")
    bad = closed_stdout_run(
        "validate", str(sweep), "--set", "study.trials=0", redirect=">&-", cwd=tmp_path, mnist_dir=mnist_dir
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "study.trials" in bad.stderr
    no_stderr = closed_stdout_run(
        "validate", str(sweep), "--set", "study.trials=0", redirect="2>&-", cwd=tmp_path, mnist_dir=mnist_dir
    )
    assert no_stderr.returncode == 2
