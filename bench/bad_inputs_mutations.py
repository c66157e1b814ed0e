"""Each guard of issue 22's bad inputs removed in a copy of the checkout, and the tests that must then fail.

    python bench/bad_inputs_mutations.py [TEXT ...]    # only the guards whose text holds one of TEXT

A guard whose tests still pass without it is reported as SURVIVED: its tests cannot fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BAD = "tests/test_bad_inputs.py::test_bad_input_exits_2_with_one_line_and_creates_nothing"

# (file, the guard as written, what replaces it, the tests that must fail)
MUTATIONS = [
    (
        "mnist_sweep/config.py",
        "    if kind != FILE:\n        os.close(descriptor)\n",
        "    if False:\n        os.close(descriptor)\n",
        [f"{BAD}[sweep-file-is-dev-zero]", f"{BAD}[sweep-file-is-a-fifo]"],
    ),
    (
        "mnist_sweep/config.py",
        "raw = handle.read(MAX_SWEEP_BYTES + 1)",
        "raw = handle.read()",
        ["tests/test_config.py::test_a_huge_sweep_file_is_refused_having_read_at_most_1_mib"],
    ),
    (
        "mnist_sweep/config.py",
        "        if isinstance(value, str) and not value.isprintable()",
        "        if False",
        [f"{BAD}[data-path-nul]", f"{BAD}[tracking-uri-with-a-newline]", f"{BAD}[reports-with-an-escape-sequence]"],
    ),
    (
        "mnist_sweep/preflight.py",
        "            if path_kind(sidecar) not in (MISSING, FILE):",
        "            if False:",
        [f"{BAD}[storage-lock-is-a-fifo]"],
    ),
    (
        "mnist_sweep/locations.py",
        "    if len(longest) > NAME_MAX:",
        "    if False:",
        [f"{BAD}[storage-name-too-long]", f"{BAD}[csv-name-too-long]", f"{BAD}[sweep-file-name-too-long]"],
    ),
    (
        "mnist_sweep/locations.py",
        "    if len(absolute) >= PATH_MAX:",
        "    if False:",
        [f"{BAD}[reports-path-too-long]", f"{BAD}[sweep-path-too-long]"],
    ),
    (
        "mnist_sweep/preflight.py",
        "    if kind != wanted:",
        "    if False:",
        [f"{BAD}[storage-is-a-fifo]", f"{BAD}[reports-symlink-loop]", f"{BAD}[csv-is-a-fifo]"],
    ),
    (
        "mnist_sweep/locations.py",
        "    return Path(os.path.realpath(path.expanduser()))",
        "    return path.expanduser().resolve()",
        [f"{BAD}[artifacts-symlink-loop]"],
    ),
    (
        "mnist_sweep/data.py",
        "return header + handle.read(expected - len(header) + 1)",
        "return header + handle.read()",
        ["tests/test_data.py::test_a_gzip_bomb_is_refused_after_reading_only_what_its_header_declares"],
    ),
    (
        "mnist_sweep/data.py",
        "                if size != expected:",
        "                if False:",
        ["tests/test_data.py::test_a_sparse_huge_idx_file_is_refused_unread"],
    ),
    (
        "mnist_sweep/data.py",
        "    if not 0 <= count <= most:",
        "    if False:",
        [
            f"{BAD}[idx-declares-too-many]",
            "tests/test_data.py::test_a_header_declaring_more_than_the_standard_file_is_refused_unread",
        ],
    ),
    (
        "mnist_sweep/data.py",
        "        if kind != FILE:  # a FIFO",
        "        if False:  # a FIFO",
        [f"{BAD}[idx-file-is-a-fifo]"],
    ),
    (
        "mnist_sweep/data.py",
        "                _check_npz_shape(archive, key, most=most)",
        "                pass",
        [f"{BAD}[npz-declares-a-huge-array]"],
    ),
    (
        "mnist_sweep/config.py",
        "    if same:\n        raise ValueError(",
        "    if False:\n        raise ValueError(",
        [f"{BAD}[same-sqlite-file-for-both-stores]", f"{BAD}[same-sqlite-file-through-a-symlink]"],
    ),
    (
        "mnist_sweep/config.py",
        "        if not math.isfinite(bound):",
        "        if False:",
        [f"{BAD}[lr-range-low-nan]", f"{BAD}[dropout-range-nan]", f"{BAD}[momentum-range-nan]"],
    ),
    ("mnist_sweep/config.py", "strict=True, allow_inf_nan=False", "strict=True", [f"{BAD}[plateau-factor-nan]"]),
    (
        "mnist_sweep/config.py",
        '    if list(document) != ["value"]:',
        "    if False:",
        [f"{BAD}[set-with-a-second-line]"],
    ),
    (
        "mnist_sweep/config.py",
        "        if not _starts_like_toml(raw):",
        "        if True:",
        [f"{BAD}[set-with-a-stray-bracket]", f"{BAD}[set-with-a-second-assignment]"],
    ),
    (
        "mnist_sweep/config.py",
        "    for section, values in document.items():\n        walk(",
        "    for section, values in ():\n        walk(",
        [f"{BAD}[seed-past-int64]", f"{BAD}[range-bound-past-int64]"],
    ),
    (
        "mnist_sweep/config.py",
        "le=MAX_HEARTBEAT_SECONDS",
        "le=2**63",
        [f"{BAD}[heartbeat-past-a-day]"],
    ),
    ("mnist_sweep/config.py", "le=MAX_TRIALS", "le=2**63", [f"{BAD}[trials-past-int32]"]),
    (
        "mnist_sweep/config.py",
        "        if len(self.hidden) > MAX_HIDDEN_LAYERS:",
        "        if False:",
        [f"{BAD}[network-too-deep]"],
    ),
    (
        "mnist_sweep/preflight.py",
        "    if available is not None and needed > available:",
        "    if False:",
        [f"{BAD}[network-too-wide-for-memory]"],
    ),
    (
        "mnist_sweep/config.py",
        '    except RecursionError:\n        raise ConfigError(f"{shown}',
        '    except ZeroDivisionError:\n        raise ConfigError(f"{shown}',
        [f"{BAD}[sweep-file-nested-too-deeply]"],
    ),
    (
        "mnist_sweep/cli.py",
        "    _reopen_closed_streams()\n",
        "",
        ["tests/test_bad_inputs.py::test_closed_stdout_ends_quietly_with_the_commands_own_exit_code"],
    ),
]


def main() -> int:
    survived = 0
    with tempfile.TemporaryDirectory(prefix="mutations-") as scratch:
        copy = Path(scratch) / "checkout"
        tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        for name in tracked.splitlines():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, copy / name)
        chosen = sys.argv[1:]
        every_test = sorted({test for _, guard, _, tests in MUTATIONS for test in tests})
        baseline = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *every_test],
            cwd=copy,
            env={**os.environ, "PYTHONPATH": str(copy)},
            capture_output=True,
            text=True,
        )
        if baseline.returncode != 0:  # a failure below must come from the guard removed, nothing else
            print(f"the tests fail with every guard in place:\n{baseline.stdout[-2000:]}")
            return 1
        for path, guard, replacement, tests in MUTATIONS:
            if chosen and not any(text in guard for text in chosen):
                continue
            target = copy / path
            original = target.read_text()
            if original.count(guard) != 1:
                print(f"STALE    {path}: the guard {guard.strip()[:60]!r} is not there once")
                survived += 1
                continue
            target.write_text(original.replace(guard, replacement))
            env = {**os.environ, "PYTHONPATH": str(copy)}
            try:
                result = subprocess.run(
                    [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                    cwd=copy,
                    env=env,
                    capture_output=True,
                    text=True,
                    timeout=300,
                )
                code = result.returncode
            except subprocess.TimeoutExpired:
                code = -1  # a test that hangs without its guard fails too (CI's own timeout)
            target.write_text(original)
            verdict = "failed" if code != 0 else "SURVIVED"
            survived += code == 0
            print(f"{verdict:8} {path}: {guard.strip()[:60]!r} -> {replacement.strip()[:30]!r}: {' '.join(tests)}")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
