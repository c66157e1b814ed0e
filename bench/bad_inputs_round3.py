"""Issue 22's third round of bad inputs, run against a checkout: the before/after table of the report.

    python bench/bad_inputs_round3.py /work/main          # before
    python bench/bad_inputs_round3.py .                   # after

Each case runs the real CLI (PYTHONPATH = the checkout) in a fresh folder and is "handled" when it ends
with exit 2 (or the documented code), one line on stderr, no traceback, and nothing created in the working
folder. Dangerous cases (a gzip bomb, a sparse huge file, /dev/zero) run under a 3 GiB address-space limit,
so a checkout that reads them whole fails with MemoryError instead of taking the machine's memory.
tests/test_bad_inputs.py holds the same cases as tests (each guard removed, and the tests that then fail:
`python -m tests.mutations --only "bad input"`); this script only prints the table.
"""

from __future__ import annotations

import gzip
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

VALID = "[study]\ntrials = 2\n\n[train]\nepochs = 1\n\n[data]\nvalidation = 500\ntrain_limit = 1000\n"
MNIST = Path(os.environ.get("MNIST_SWEEP_DATA", "/work/shared/data/mnist"))
LONG = "a" * 300
DEEP = "/".join(["d" * 200] * 25)  # 5,000 bytes: over PATH_MAX, every component short


@dataclass
class Case:
    name: str
    args: list[str]  # {inputs} is replaced by the inputs folder
    setup: Callable[[Path], object] = lambda inputs: None
    shell: str = ""  # a redirection appended to the command line (`>&-`, `| head -1`)
    expect_code: int = 2
    limit_memory: bool = False
    timeout: float = 60
    sweep: str = VALID
    notes: str = ""
    extra: list[str] = field(default_factory=list)  # NAME=VALUE for the environment


def setting(name: str, *assignments: str, command: str = "run") -> Case:
    args = [command, "{inputs}/sweep.toml"]
    for assignment in assignments:
        args += ["--set", assignment]
    return Case(name, args)


def fifo(name: str) -> Callable[[Path], None]:
    return lambda inputs: os.mkfifo(inputs / name)


def mnist_copy(inputs: Path) -> Path:
    copy = inputs / "mnist"
    shutil.copytree(MNIST, copy)
    for path in copy.iterdir():
        path.chmod(0o644)
    return copy


def gzip_bomb(inputs: Path) -> None:
    copy = mnist_copy(inputs)
    header = (2049).to_bytes(4, "big") + (60000).to_bytes(4, "big")
    with gzip.open(copy / "train-labels-idx1-ubyte.gz", "wb", compresslevel=6) as handle:
        handle.write(header)
        zeros = bytes(1 << 24)
        for _ in range(128):  # 2 GiB of zeros in about 2 MiB
            handle.write(zeros)


def sparse_huge(inputs: Path) -> None:
    copy = mnist_copy(inputs)
    (copy / "train-images-idx3-ubyte.gz").unlink()
    with open(copy / "train-images-idx3-ubyte", "wb") as handle:
        for number in (2051, 60000, 28, 28):
            handle.write(number.to_bytes(4, "big"))
        handle.truncate(8 << 30)  # 8 GiB, no block written


def fifo_idx(inputs: Path) -> None:
    copy = mnist_copy(inputs)
    (copy / "train-labels-idx1-ubyte.gz").unlink()
    os.mkfifo(copy / "train-labels-idx1-ubyte")


def loop(name: str) -> Callable[[Path], None]:
    def make(inputs: Path) -> None:
        os.symlink(inputs / f"{name}.b", inputs / f"{name}.a")
        os.symlink(inputs / f"{name}.a", inputs / f"{name}.b")

    return make


def idx_declaring(count: int) -> Callable[[Path], None]:
    def make(inputs: Path) -> None:
        copy = mnist_copy(inputs)
        labels = copy / "train-labels-idx1-ubyte.gz"
        content = bytearray(gzip.decompress(labels.read_bytes()))
        content[4:8] = count.to_bytes(4, "big")
        labels.write_bytes(gzip.compress(bytes(content), compresslevel=1))

    return make


def huge_npz(inputs: Path) -> None:
    import zipfile

    import numpy as np

    rng = np.random.default_rng(0)
    arrays = {
        "y_train": rng.integers(0, 10, 1600).astype(np.uint8),
        "x_test": rng.integers(0, 255, (50, 28, 28), dtype=np.uint8),
        "y_test": rng.integers(0, 10, 50).astype(np.uint8),
    }
    np.savez(inputs / "mnist.npz", **arrays)  # type: ignore[arg-type]
    with zipfile.ZipFile(inputs / "mnist.npz", "a") as archive, archive.open("x_train.npy", "w") as member:
        header = {"descr": "|u1", "fortran_order": False, "shape": (10**9, 28, 28)}
        np.lib.format.write_array_header_1_0(member, header)
        member.write(bytes(100))


def symlinked_db(inputs: Path) -> None:
    os.symlink(inputs / "one.db", inputs / "other.db")


def run_case(case: Case, checkout: Path) -> tuple[str, str]:
    root = Path(tempfile.mkdtemp(prefix="round3-"))
    inputs, work = root / "inputs", root / "work"
    inputs.mkdir()
    work.mkdir()
    (inputs / "sweep.toml").write_text(case.sweep)
    case.setup(inputs)
    args = [a.replace("{inputs}", str(inputs)) for a in case.args]
    env = {**os.environ, "PYTHONPATH": str(checkout.resolve()), "MNIST_SWEEP_DATA": str(MNIST)}
    for assignment in case.extra:
        name, _, value = assignment.partition("=")
        env[name] = value

    def limits() -> None:
        if case.limit_memory:
            resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    command = " ".join(_quote(a) for a in [sys.executable, "-m", "mnist_sweep", *args]) + " " + case.shell
    started = time.monotonic()
    process = subprocess.Popen(
        ["bash", "-c", command + '; echo "exit=${PIPESTATUS[0]}" >&2'],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=limits,
        errors="replace",
        start_new_session=True,  # its own process group: a hung CLI under bash is stopped with it
    )
    try:
        _, stderr = process.communicate(timeout=case.timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        shutil.rmtree(root, ignore_errors=True)
        return "NOT", f"hung (killed after {case.timeout:.0f} s)"
    seconds = time.monotonic() - started
    lines = stderr.strip().splitlines()
    code = int(lines.pop().removeprefix("exit=")) if lines and lines[-1].startswith("exit=") else -1
    created = sorted(str(p.relative_to(work)) for p in work.rglob("*"))
    shutil.rmtree(root, ignore_errors=True)
    traceback = any("Traceback" in line for line in lines)
    handled = code == case.expect_code and not traceback and not created and len(lines) <= 1
    if case.expect_code == 2 and "2>&-" not in case.shell:  # with stderr closed, the line has nowhere to go
        handled = handled and len(lines) == 1
    summary = f"exit {code}, {len(lines)} stderr lines{', traceback' if traceback else ''}"
    if created:
        summary += f", created {', '.join(created[:3])}"
    summary += f", {seconds:.1f} s"
    last = lines[-1][:150] if lines else ""
    return ("ok" if handled else "NOT"), f"{summary}: {last}"


def _quote(arg: str) -> str:
    return "'" + arg.replace("'", "'\\''") + "'"


SWEEP = "{inputs}/sweep.toml"
CASES = [
    Case("sweep-file-name-too-long", ["validate", f"{LONG}.toml"]),
    Case("sweep-path-too-long", ["validate", f"{DEEP}/x.toml"]),
    Case("sweep-file-is-a-fifo", ["validate", "{inputs}/fifo.toml"], setup=fifo("fifo.toml"), timeout=20),
    Case("sweep-file-is-dev-zero", ["validate", "/dev/zero"], limit_memory=True, timeout=30),
    Case("sweep-file-is-a-folder", ["validate", "{inputs}"]),
    Case("sweep-file-symlink-loop", ["validate", "{inputs}/s.a"], setup=loop("s")),
    Case("sweep-file-name-with-newline", ["validate", "{inputs}/a\nb.toml"]),
    Case(
        "sweep-file-huge",
        ["validate", "{inputs}/big.toml"],
        setup=lambda i: (i / "big.toml").write_text(VALID + ("#" * 1000 + "\n") * 20000),
    ),
    Case("sweep-file-deep-nesting", ["validate", SWEEP], sweep=VALID + "x = " + "[" * 3000 + "]" * 3000 + "\n"),
    setting("set-deep-nesting", "model.hidden=" + "[" * 3000 + "]" * 3000, command="validate"),
    setting("data-path-name-too-long", f'data.path="{LONG}"'),
    setting("data-path-too-long", f'data.path="{DEEP}"'),
    setting("data-path-nul-byte", 'data.path="a\\u0000b"'),
    setting("storage-name-too-long", f'study.storage="sqlite:///{LONG}.db"'),
    setting("storage-path-too-long", f'study.storage="sqlite:///{DEEP}/optuna.db"'),
    setting("tracking-name-too-long", f'tracking.uri="sqlite:///{LONG}.db"'),
    setting("artifacts-name-too-long", f'tracking.artifacts="{LONG}"'),
    setting("artifacts-uri-too-long", f'tracking.artifacts="file:///tmp/{DEEP}"'),
    setting("reports-name-too-long", f'tracking.reports="{LONG}"'),
    setting("reports-path-too-long", f'tracking.reports="{DEEP}"'),
    Case("csv-name-too-long", ["trials", SWEEP, "--csv", f"{LONG}.csv"]),
    Case(
        "storage-is-a-fifo",
        ["run", SWEEP, "--set", 'study.storage="sqlite:///{inputs}/fifo.db"'],
        setup=fifo("fifo.db"),
        timeout=30,
    ),
    setting("storage-is-dev-zero", 'study.storage="sqlite:////dev/zero"'),
    Case(
        "tracking-is-a-fifo",
        ["run", SWEEP, "--set", 'tracking.uri="sqlite:///{inputs}/fifo.db"'],
        setup=fifo("fifo.db"),
        timeout=30,
    ),
    Case("reports-is-a-fifo", ["run", SWEEP, "--set", 'tracking.reports="{inputs}/fifo"'], setup=fifo("fifo")),
    Case(
        "reports-symlink-loop", ["run", SWEEP, "--set", 'tracking.reports="{inputs}/r.a"'], setup=loop("r"), timeout=90
    ),
    Case(
        "storage-symlink-loop",
        ["run", SWEEP, "--set", 'study.storage="sqlite:///{inputs}/o.a"'],
        setup=loop("o"),
        timeout=90,
    ),
    Case("csv-is-a-fifo", ["trials", SWEEP, "--csv", "{inputs}/fifo.csv"], setup=fifo("fifo.csv"), timeout=30),
    Case("csv-is-a-folder", ["trials", SWEEP, "--csv", "{inputs}"]),
    Case("data-path-symlink-loop", ["run", SWEEP, "--data", "{inputs}/d.a"], setup=loop("d")),
    Case("idx-file-is-a-fifo", ["run", SWEEP, "--data", "{inputs}/mnist"], setup=fifo_idx, timeout=30),
    Case("idx-gzip-bomb", ["run", SWEEP, "--data", "{inputs}/mnist"], setup=gzip_bomb, limit_memory=True, timeout=120),
    Case(
        "idx-sparse-huge", ["run", SWEEP, "--data", "{inputs}/mnist"], setup=sparse_huge, limit_memory=True, timeout=120
    ),
    setting(
        "same-sqlite-both-stores", 'study.storage="sqlite:///mlruns/one.db"', 'tracking.uri="sqlite:///mlruns/./one.db"'
    ),
    Case(
        "same-sqlite-via-symlink",
        [
            "run",
            SWEEP,
            "--set",
            'study.storage="sqlite:///{inputs}/one.db"',
            "--set",
            'tracking.uri="sqlite:///{inputs}/other.db"',
        ],
        setup=symlinked_db,
        timeout=90,
    ),
    setting("lr-range-nan", "search.learning_rate={low=nan, high=0.1}", command="validate"),
    setting("lr-range-inf", "search.learning_rate={low=0.001, high=inf}", command="validate"),
    setting("dropout-range-nan", "search.dropout={low=0.0, high=nan}", command="validate"),
    setting("momentum-range-nan", "search.momentum={low=0.0, high=nan}", command="validate"),
    setting("weight-decay-range-inf", "search.weight_decay={low=0.0, high=inf}", command="validate"),
    setting(
        "plateau-min-lr-inf",
        "train.lr_schedule=plateau",
        "train.epochs=5",
        "train.plateau_min_lr=inf",
        command="validate",
    ),
    setting("set-extra-toml", "study.trials=3 extra = 4", command="validate"),
    setting("set-extra-assignment-in-a-string", "tracking.reports=reports extra = 4", command="validate"),
    setting("set-extra-line", "study.trials=3\nstudy.seed = 4", command="validate"),
    setting("set-unbalanced-bracket", "model.hidden=[10]]", command="validate"),
    setting("set-unclosed-string", 'study.name="abc', command="validate"),
    setting("heartbeat-too-large", "study.heartbeat_seconds=100000000000000"),
    setting("trials-over-int64", "study.trials=100000000000000000000", command="validate"),
    setting("data-seed-over-int64", "data.seed=100000000000000000000", command="validate"),
    setting("batch-size-huge", "search.batch_size=[32, 1099511627776]", command="validate"),
    setting("early-stopping-over-int64", "train.early_stopping_patience=100000000000000000000", command="validate"),
    setting("network-too-wide", "model.hidden=[65536, 65536, 65536]", command="validate"),
    setting("network-too-deep", "model.hidden=[" + ", ".join(["10"] * 3000) + "]", command="validate"),
    # more in the same spirit
    Case(
        "storage-lock-is-a-fifo",
        ["run", SWEEP, "--set", 'study.storage="sqlite:///{inputs}/optuna.db"'],
        setup=fifo("optuna.db.lock"),
        timeout=60,
    ),
    setting("tracking-uri-with-a-newline", 'tracking.uri="http://127.0.0.1:1/\\n"'),
    setting("reports-with-an-escape-sequence", 'tracking.reports="\\u001b[31mred"', command="validate"),
    Case(
        "artifacts-symlink-loop",
        ["run", SWEEP, "--set", 'tracking.artifacts="{inputs}/a.a"'],
        setup=loop("a"),
        timeout=90,
    ),
    Case(
        "storage-symlink-to-nothing",
        ["run", SWEEP, "--set", 'study.storage="sqlite:///{inputs}/o.db"'],
        setup=lambda inputs: os.symlink(inputs / "gone" / "o.db", inputs / "o.db"),
        timeout=90,
    ),
    Case("idx-declares-too-many", ["run", SWEEP, "--data", "{inputs}/mnist"], setup=idx_declaring(70000)),
    Case("idx-declares-negative", ["run", SWEEP, "--data", "{inputs}/mnist"], setup=idx_declaring(2**32 - 1)),
    Case(
        "npz-declares-a-huge-array",
        ["run", SWEEP, "--data", "{inputs}/mnist.npz"],
        setup=huge_npz,
        limit_memory=True,
    ),
    setting(
        "same-postgres-database",
        'study.storage="postgresql://u@127.0.0.1:1/sweep"',
        'tracking.uri="postgresql+psycopg2://u@127.0.0.1:1/sweep"',
        command="validate",
    ),
    Case("int-of-5000-digits", ["validate", SWEEP], sweep=VALID + "[model]\nhidden = [1" + "0" * 5000 + "]\n"),
    setting("trials-past-int32", "study.trials=2147483648", command="validate"),
    setting(
        "plateau-factor-nan",
        "train.lr_schedule=plateau",
        "train.epochs=5",
        "train.plateau_factor=nan",
        command="validate",
    ),
    setting("study-name-unicode", 'study.name="fcñ"', command="validate"),
    Case("data-variable-too-long", ["validate", SWEEP], extra=["MNIST_SWEEP_DATA=" + LONG]),
    Case("validate-stdout-closed", ["validate", SWEEP], shell=">&-", expect_code=0),
    Case("validate-broken-pipe", ["validate", SWEEP], shell="| head -1 >/dev/null", expect_code=0),
    Case("bad-input-stderr-closed", ["validate", SWEEP, "--set", "study.trials=0"], shell="2>&-"),
    Case("trials-stdout-closed", ["trials", SWEEP], shell=">&-"),  # no study yet: exit 2, the line on stderr
    Case("help-broken-pipe", ["run", "--help"], shell="| head -1 >/dev/null", expect_code=0),
]


def main() -> None:
    checkout = Path(sys.argv[1] if len(sys.argv) > 1 else ".")
    chosen = set(sys.argv[2:])
    handled = 0
    ran = 0
    for case in CASES:
        if chosen and case.name not in chosen:
            continue
        verdict, detail = run_case(case, checkout)
        ran += 1
        handled += verdict == "ok"
        print(f"{verdict:3} {case.name:32} {detail}", flush=True)
    print(f"{handled} of {ran} handled")


if __name__ == "__main__":
    main()
