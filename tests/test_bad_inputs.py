"""A wall of bad inputs against the real CLI: each exits 2 with one line naming the key and the value,
no traceback, and nothing created in the working directory."""

from __future__ import annotations

import gzip
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import CliRunner, write_sweep

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
    """One bad input: a sweep file text or --set overrides (or a data folder), and what the line must name."""

    name: str
    expect: tuple[str, ...]
    sweep: str | None = None
    overrides: tuple[str, ...] = ()
    data: Callable[[Path, Path], Path] | None = None
    unprivileged: bool = False  # needs file permissions to apply (root reads and writes anything)


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


@pytest.mark.parametrize("folders", CASES, ids=[c.name for c in CASES], indirect=True)
@pytest.mark.parametrize("command", ["run"])
def test_bad_input_exits_2_with_one_line_and_creates_nothing(
    folders: tuple[Path, Path], run_cli: CliRunner, mnist_dir: Path, command: str, request: pytest.FixtureRequest
) -> None:
    case: Bad = request.node.callspec.params["folders"]
    inputs, work = folders
    sweep = write_sweep(inputs, case.sweep) if case.sweep is not None else write_sweep(inputs, VALID)
    args = [command, str(sweep), *case.overrides]
    if case.data is not None:
        args += ["--data", str(case.data(mnist_dir, inputs))]
    prefix = permissions_apply() if case.unprivileged else ()

    result = run_cli(*args, cwd=work, prefix=prefix, timeout=120)

    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("mnist-sweep: ")
    for fragment in case.expect:
        assert fragment in lines[0], f"{fragment!r} not named in: {lines[0]}"
    assert "Secret-pw-123" not in result.stdout + result.stderr
    assert everything_under(work) == []
