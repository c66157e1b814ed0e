"""Remove each guard, run the tests that claim to check it, and say which failed: a guard whose tests all pass
is not tested. A tool, not part of the pytest run (its name is not test_*.py):

    python -m tests.mutations                 # every mutation, on a copy of this checkout
    python -m tests.mutations --only seal     # the mutations whose name holds 'seal'
    python -m tests.mutations --root DIR --before   # another checkout (the code before a change), its own tests
    python -m tests.mutations --list

Each mutation is one exact text replacement in a temporary copy of the checkout; the named tests run there
(the CLI tests start the copy's code: tests/conftest.py puts the copy's root on PYTHONPATH). A mutation whose
text is not in the checkout is reported as "not there" (the guard does not exist in that version).
Prints a Markdown table: guard removed -> tests that failed.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COPIED_IGNORE = {".git", ".venv", ".mypy_cache", ".ruff_cache", ".pytest_cache", "__pycache__", "mlruns", "reports"}
TIMEOUT_SECONDS = 1200  # a test that hangs without its guard counts as caught (CI's pytest-timeout fails it too)

SEAL = "tests/test_final.py"
BAD = "tests/test_bad_inputs.py::test_bad_input_exits_2_with_one_line_and_creates_nothing"
IDENTITY = "tests/test_processes.py"
FINALIZE_SIGNALS = "tests/test_final_signals.py"
OUTAGES = "tests/test_outages.py"
CLAIM_TESTS = (
    f"{IDENTITY}::test_a_claim_is_taken_over_only_when_its_claimant_is_proven_ended_or_its_heartbeat_is_stale",
)


@dataclass(frozen=True)
class Mutation:
    name: str  # the guard removed, as the table shows it
    path: str  # the file it is in, relative to the checkout's root
    old: str  # the guard's text
    new: str  # what stands in its place
    tests: tuple[str, ...]  # pytest node ids that must fail without it
    before: tuple[str, ...] = ()  # with --before: the tests the older checkout had for it (default: `tests`)


MUTATIONS = (
    Mutation(
        "withheld: trials run inside withholding_test_split()",
        "mnist_sweep/trial_run.py",
        "            with withholding_test_split():\n                outcome = trial_code.run_trial(",
        "            if True:\n                outcome = trial_code.run_trial(",
        (f"{SEAL}::test_trials_never_read_the_test_split",),
    ),
    Mutation(
        "withheld: replay runs inside withholding_test_split()",
        "mnist_sweep/replay.py",
        "    with withholding_test_split():\n        outcome = run_trial(",
        "    if True:\n        outcome = run_trial(",
        (f"{SEAL}::test_replay_never_reads_the_test_split",),
        before=(
            "tests/test_replay_reproducible.py::test_two_fresh_runs_agree_and_replay_matches_the_logged_metrics",
            f"{SEAL}::test_trials_never_read_the_test_split",
        ),
    ),
    Mutation(
        "withheld: load_test_split refuses while trials run",
        "mnist_sweep/data.py",
        "    if _withheld.active:\n        raise WithheldTestSplitError",
        "    if False:\n        raise WithheldTestSplitError",
        ("tests/test_data.py::test_test_split_is_sealed_while_trials_run",),
    ),
    Mutation(
        "seal: a scored study takes no more trials",
        "mnist_sweep/sweep.py",
        "if existing is not None and seal_claimed(storage, cfg.study.name):",
        "if False:",
        (f"{SEAL}::test_only_finalize_reads_the_test_set_and_a_scored_study_takes_no_more_trials",),
    ),
    Mutation(
        "once: a second claimant of the test set is refused",
        "mnist_sweep/final.py",
        "    except optuna.exceptions.DuplicatedStudyError:\n        return False",
        "    except optuna.exceptions.DuplicatedStudyError:\n"
        "        seal = optuna.load_study(study_name=seal_name(study_name), storage=storage)",
        CLAIM_TESTS,
        before=("tests/test_study_workers.py::test_two_workers_and_two_runs_share_the_local_sqlite_study",),
    ),
    Mutation(
        "once: a claim is taken over only when its heartbeat is stale",
        "mnist_sweep/final.py",
        'whose heartbeat stopped at {_iso(beat)}" if age > CLAIM_STALE_SECONDS else None',
        'whose heartbeat stopped at {beat}" if age > -1 else None',
        CLAIM_TESTS,
    ),
    Mutation(
        "once: the claimant beats while it scores",
        "mnist_sweep/final.py",
        "storage.set_study_user_attr(claim_id, CLAIM_HEARTBEAT_ATTR, _now())",
        "pass",
        (f"{IDENTITY}::test_the_claimants_heartbeat_stays_fresh_while_it_scores",),
    ),
    Mutation(
        "identity: an end is proven only in the process's own PID namespace",
        "mnist_sweep/processes.py",
        "    if (other.boot, other.namespace) != (me.boot, me.namespace):\n        return False\n",
        "",
        (
            f"{IDENTITY}::test_two_containers_sharing_a_hostname_and_a_pid_score_the_test_set_once",
            f"{IDENTITY}::test_a_run_storing_its_artifacts_is_closed_only_when_its_worker_provably_ended",
            f"{IDENTITY}::test_only_a_process_of_this_pid_namespace_can_be_proven_ended",
        ),
    ),
    Mutation(
        "tamper: the model file's sha256 is checked before scoring",
        "mnist_sweep/final.py",
        "if sha256 is not None and found != sha256:",
        "if False:",
        ("tests/test_faults.py::test_finalize_refuses_a_model_file_changed_since_it_was_logged",),
    ),
    Mutation(
        "resume: a killed trial's parameters are retried",
        "mnist_sweep/study.py",
        "    return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)",
        "    return None",
        ("tests/test_study_resume.py::test_sigkill_mid_trial_then_rerun_loses_nothing[optuna]",),
    ),
    Mutation(
        "resume: a dead worker's trial runs are closed",
        "mnist_sweep/study.py",
        "        optuna.storages.fail_stale_trials(context.study)\n    close_stale_runs(context)",
        "        optuna.storages.fail_stale_trials(context.study)",
        ("tests/test_study_resume.py::test_sigkill_mid_trial_then_rerun_loses_nothing[optuna]",),
    ),
    Mutation(
        "passwords: user:pw@ masked",
        "mnist_sweep/masking.py",
        'masked = _PASSWORD_IN_DATABASE_URI.sub(r"\\g<head>***@", text)',
        "masked = text",
        ("tests/test_masking.py::test_mask_password_hides_only_the_password",),
        before=("tests/test_masking.py",),
    ),
    Mutation(
        "passwords: ?password= masked",
        "mnist_sweep/masking.py",
        'return _PASSWORD_IN_QUERY.sub(r"\\g<head>***", masked)',
        "return masked",
        (
            "tests/test_masking.py::test_mask_password_hides_only_the_password",
            "tests/test_masking.py::test_validate_prints_both_store_passwords_masked",
        ),
    ),
    Mutation(
        "CI: a missing dependency fails under CI=true",
        "tests/conftest.py",
        'if os.environ.get("CI", "").strip().lower() in ("true", "1", "yes"):',
        "if False:",
        ("tests/test_ci_dependencies.py",),
    ),
    Mutation(
        "pins: pyproject pins keras to the version workarounds.py was written for",
        "pyproject.toml",
        '"keras==3.15.*",',
        '"keras>=3.12,<4",',
        (
            "tests/test_workarounds.py::test_pyproject_pins_each_package_to_the_version_its_workarounds_were_written_for",
        ),
    ),
    Mutation(
        "bad input: the sweep file must be a regular file (FIFO, device)",
        "mnist_sweep/config.py",
        "    if kind != FILE:\n        os.close(descriptor)\n",
        "    if False:\n        os.close(descriptor)\n",
        (
            f"{BAD}[sweep-file-is-dev-zero]",
            f"{BAD}[sweep-file-is-a-fifo]",
        ),
    ),
    Mutation(
        "bad input: the sweep file is read up to 1 MiB + 1 byte",
        "mnist_sweep/config.py",
        "raw = handle.read(MAX_SWEEP_BYTES + 1)",
        "raw = handle.read()",
        ("tests/test_config.py::test_a_huge_sweep_file_is_refused_having_read_at_most_1_mib",),
    ),
    Mutation(
        "bad input: no control character in any string of the config",
        "mnist_sweep/config.py",
        "        if isinstance(value, str) and not value.isprintable()",
        "        if False",
        (
            f"{BAD}[data-path-nul]",
            f"{BAD}[tracking-uri-with-a-newline]",
            f"{BAD}[reports-with-an-escape-sequence]",
        ),
    ),
    Mutation(
        "bad input: sqlite's lock/-wal/-shm/-journal beside a store must be regular files",
        "mnist_sweep/preflight.py",
        "            if path_kind(sidecar) not in (MISSING, FILE):",
        "            if False:",
        (f"{BAD}[storage-lock-is-a-fifo]",),
    ),
    Mutation(
        "bad input: a path name longer than NAME_MAX is refused",
        "mnist_sweep/locations.py",
        "    if len(longest) > NAME_MAX:",
        "    if False:",
        (
            f"{BAD}[storage-name-too-long]",
            f"{BAD}[csv-name-too-long]",
            f"{BAD}[sweep-file-name-too-long]",
        ),
    ),
    Mutation(
        "bad input: a path longer than PATH_MAX is refused",
        "mnist_sweep/locations.py",
        "    if len(absolute) >= PATH_MAX:",
        "    if False:",
        (
            f"{BAD}[reports-path-too-long]",
            f"{BAD}[sweep-path-too-long]",
        ),
    ),
    Mutation(
        "bad input: a store, folder or --csv must be what it is used as (file or folder)",
        "mnist_sweep/preflight.py",
        "    if kind != wanted:",
        "    if False:",
        (
            f"{BAD}[storage-is-a-fifo]",
            f"{BAD}[reports-symlink-loop]",
            f"{BAD}[csv-is-a-fifo]",
        ),
    ),
    Mutation(
        "bad input: artifact folders resolved without raising on a symlink loop",
        "mnist_sweep/locations.py",
        "    return Path(os.path.realpath(path.expanduser()))",
        "    return path.expanduser().resolve()",
        (f"{BAD}[artifacts-symlink-loop]",),
    ),
    Mutation(
        "bad input: an IDX file is read no further than its header declares",
        "mnist_sweep/data.py",
        "return header + handle.read(expected - len(header) + 1)",
        "return header + handle.read()",
        ("tests/test_data.py::test_a_gzip_bomb_is_refused_after_reading_only_what_its_header_declares",),
    ),
    Mutation(
        "bad input: a raw IDX file's size is compared with its header before reading",
        "mnist_sweep/data.py",
        "                if size != expected:",
        "                if False:",
        ("tests/test_data.py::test_a_sparse_huge_idx_file_is_refused_unread",),
    ),
    Mutation(
        "bad input: an IDX header declaring more items than the standard file is refused",
        "mnist_sweep/data.py",
        "    if not 0 <= count <= most:",
        "    if False:",
        (
            f"{BAD}[idx-declares-too-many]",
            "tests/test_data.py::test_a_header_declaring_more_than_the_standard_file_is_refused_unread",
        ),
    ),
    Mutation(
        "bad input: an IDX file must be a regular file",
        "mnist_sweep/data.py",
        "        if kind != FILE:  # a FIFO",
        "        if False:  # a FIFO",
        (f"{BAD}[idx-file-is-a-fifo]",),
    ),
    Mutation(
        "bad input: an npz array's declared shape is checked before decompressing",
        "mnist_sweep/data.py",
        "                _check_npz_shape(archive, key, most=most)",
        "                pass",
        (f"{BAD}[npz-declares-a-huge-array]",),
    ),
    Mutation(
        "bad input: study.storage and tracking.uri must be different databases",
        "mnist_sweep/config.py",
        "    if same:\n        raise ValueError(",
        "    if False:\n        raise ValueError(",
        (
            f"{BAD}[same-sqlite-file-for-both-stores]",
            f"{BAD}[same-sqlite-file-through-a-symlink]",
        ),
    ),
    Mutation(
        "bad input: search ranges must have finite bounds",
        "mnist_sweep/config.py",
        "        if not math.isfinite(bound):",
        "        if False:",
        (
            f"{BAD}[lr-range-low-nan]",
            f"{BAD}[dropout-range-nan]",
            f"{BAD}[momentum-range-nan]",
        ),
    ),
    Mutation(
        "bad input: no NaN or infinite float setting",
        "mnist_sweep/config.py",
        "strict=True, allow_inf_nan=False",
        "strict=True",
        (f"{BAD}[plateau-factor-nan]",),
    ),
    Mutation(
        "bad input: --set takes exactly one TOML value",
        "mnist_sweep/toml_text.py",
        '    if list(document) != ["value"]:',
        "    if False:",
        (f"{BAD}[set-with-a-second-line]",),
    ),
    Mutation(
        "bad input: --set text that opens like TOML but is not is refused",
        "mnist_sweep/toml_text.py",
        "        if not _starts_like_toml(raw):",
        "        if True:",
        (
            f"{BAD}[set-with-a-stray-bracket]",
            f"{BAD}[set-with-a-second-assignment]",
        ),
    ),
    Mutation(
        "bad input: integers within 64 bits",
        "mnist_sweep/config.py",
        "    for section, values in document.items():\n        walk(",
        "    for section, values in ():\n        walk(",
        (
            f"{BAD}[seed-past-int64]",
            f"{BAD}[range-bound-past-int64]",
        ),
    ),
    Mutation(
        "bad input: study.heartbeat_seconds at most a day",
        "mnist_sweep/config.py",
        "le=MAX_HEARTBEAT_SECONDS",
        "le=2**63",
        (f"{BAD}[heartbeat-past-a-day]",),
    ),
    Mutation(
        "bad input: study.trials within PostgreSQL's INTEGER",
        "mnist_sweep/config.py",
        "le=MAX_TRIALS",
        "le=2**63",
        (f"{BAD}[trials-past-int32]",),
    ),
    Mutation(
        "bad input: model.hidden at most 100 layers",
        "mnist_sweep/config.py",
        "        if len(self.hidden) > MAX_HIDDEN_LAYERS:",
        "        if False:",
        (f"{BAD}[network-too-deep]",),
    ),
    Mutation(
        "bad input: a network (times workers) must fit in the memory available",
        "mnist_sweep/preflight.py",
        "    if available is not None and needed > available:",
        "    if False:",
        (f"{BAD}[network-too-wide-for-memory]",),
    ),
    Mutation(
        "bad input: a TOML nested past Python's recursion limit is one line",
        "mnist_sweep/config.py",
        '    except RecursionError:\n        raise ConfigError(f"{shown}',
        '    except ZeroDivisionError:\n        raise ConfigError(f"{shown}',
        (f"{BAD}[sweep-file-nested-too-deeply]",),
    ),
    Mutation(
        "output: a closed stdout or stderr becomes /dev/null",
        "mnist_sweep/cli.py",
        "    _reopen_closed_streams()\n",
        "",
        ("tests/test_bad_inputs.py::test_closed_stdout_ends_quietly_with_the_commands_own_exit_code",),
    ),
    Mutation(
        "once: a result on the seal is recorded from there, never scored again",
        "mnist_sweep/final.py",
        "        _seal_result(storage, claim[0], study.study_name, result)",
        "        pass",
        (f"{FINALIZE_SIGNALS}::test_signals_while_the_test_set_is_scored_record_it_everywhere_or_nowhere_and_once",),
    ),
    Mutation(
        "once: a claim stopped before its result is released",
        "mnist_sweep/final.py",
        "                storage.delete_study(claim_id)",
        "                pass",
        (f"{FINALIZE_SIGNALS}::test_signals_while_the_test_set_is_scored_record_it_everywhere_or_nowhere_and_once",),
    ),
    Mutation(
        "report: each file replaced atomically (temp + rename)",
        "mnist_sweep/report.py",
        "        replace_atomically(path, text)",
        '        path.write_text(text, encoding="utf-8")',
        (f"{FINALIZE_SIGNALS}::test_a_report_being_written_when_finalize_is_stopped_stays_whole",),
    ),
    Mutation(
        "outage: a store that stopped answering is one line",
        "mnist_sweep/cli.py",
        "            down = outage_line(exc, cfg)",
        "            down = None",
        (f"{OUTAGES}::test_a_tracking_server_gone_mid_trial_ends_in_one_line_and_the_rerun_resumes_once_it_is_back",),
    ),
    Mutation(
        "outage: the trial heartbeat skips a beat that fails",
        "mnist_sweep/outages.py",
        "        with contextlib.suppress(Exception):  # sqlalchemy, psycopg and optuna raise many kinds",
        "        if True:",
        (f"{OUTAGES}::test_postgres_gone_mid_trial_ends_in_one_line_and_the_rerun_retries_the_trial_once_it_is_back",),
    ),
    Mutation(
        "schedule: a study keeps ASHA or keeps without it",
        "mnist_sweep/study.py",
        "        check_schedule(existing, cfg)\n",
        "",
        ("tests/test_asha.py::test_a_study_keeps_asha_or_keeps_without_it",),
    ),
    Mutation(
        "replay: an ASHA promotion goes on from its source run's model",
        "mnist_sweep/replay.py",
        "            warm_start=warm_start,\n",
        "            warm_start=None,\n",
        ("tests/test_asha.py::test_a_real_asha_sweep_tracks_every_promotion_as_its_own_run",),
    ),
)


@dataclass(frozen=True)
class Outcome:
    mutation: Mutation
    verdict: str  # "caught", "NOT CAUGHT", "not there", "no test", "error"
    failed: tuple[str, ...]
    seconds: float


def copy_checkout(root: Path, into: Path) -> Path:
    target = into / "checkout"
    shutil.copytree(root, target, ignore=lambda folder, names: [n for n in names if n in COPIED_IGNORE])
    return target


def existing(tests: tuple[str, ...], root: Path) -> tuple[str, ...]:
    """The node ids whose file, and test function, the checkout has."""
    kept = []
    for node in tests:
        path, _, name = node.partition("::")
        file = root / path
        if file.is_file() and (not name or f"def {name.partition('[')[0]}(" in file.read_text()):
            kept.append(node)
    return tuple(kept)


def run(mutation: Mutation, root: Path, *, before: bool) -> Outcome:
    started = time.monotonic()
    tests = existing((mutation.before or mutation.tests) if before else mutation.tests, root)
    source = root / mutation.path
    if not source.is_file() or mutation.old not in source.read_text():
        return Outcome(mutation, "not there", (), 0.0)
    if not tests:
        return Outcome(mutation, "no test", (), 0.0)
    with tempfile.TemporaryDirectory(prefix="mnist-sweep-mutant-") as folder:
        copy = copy_checkout(root, Path(folder))
        mutated = copy / mutation.path
        mutated.write_text(mutated.read_text().replace(mutation.old, mutation.new, 1))
        env = {**os.environ, "PYTHONPATH": str(copy), "PYTHONDONTWRITEBYTECODE": "1"}
        command = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", "-W", "ignore", *tests]
        try:
            result = subprocess.run(command, cwd=copy, env=env, capture_output=True, text=True, timeout=TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            return Outcome(mutation, "caught", (f"(timed out after {TIMEOUT_SECONDS} s)",), time.monotonic() - started)
    failed = tuple(sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+)", result.stdout, re.MULTILINE))))
    if result.returncode == 0:
        verdict = "NOT CAUGHT"
    elif result.returncode == 1 and failed:
        verdict = "caught"
    else:  # collection errors, usage errors, interrupted runs: no verdict on the guard
        verdict, failed = "error", (result.stdout + result.stderr).strip().splitlines()[-1:]
    return Outcome(mutation, verdict, failed, time.monotonic() - started)


def shown(failed: tuple[str, ...]) -> str:
    """The failed tests, one per line; the cases of one parametrized test counted, not listed."""
    cases: dict[str, list[str]] = {}
    for node in failed:
        name, _, case = node.removeprefix("tests/").partition("[")
        cases.setdefault(name, []).append(case.rstrip("]"))
    lines = [name if cases[name] == [""] else f"{name}[{cases[name][0]}]" for name in cases if len(cases[name]) == 1]
    lines += [f"{name} ({len(found)} cases)" for name, found in cases.items() if len(found) > 1]
    return "<br>".join(lines) or "-"


def table(outcomes: list[Outcome]) -> str:
    rows = ["| guard removed | in | result | tests that failed | s |", "|---|---|---|---|---|"]
    for outcome in outcomes:
        failed = shown(outcome.failed)
        rows.append(
            f"| {outcome.mutation.name} | {outcome.mutation.path} | {outcome.verdict} | {failed} "
            f"| {outcome.seconds:.0f} |"
        )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=REPO, help="the checkout to mutate (default: this one)")
    parser.add_argument("--only", action="append", default=[], help="run the mutations whose name holds this")
    parser.add_argument("--before", action="store_true", help="name the tests an older checkout had (`before`)")
    parser.add_argument("--list", action="store_true", help="list the mutations and their tests, run nothing")
    args = parser.parse_args(argv)
    chosen = [m for m in MUTATIONS if not args.only or any(word in m.name for word in args.only)]
    if args.list:
        for mutation in chosen:
            print(f"{mutation.name}  [{mutation.path}]\n    " + "\n    ".join(mutation.tests))
        return 0
    outcomes = []
    for mutation in chosen:
        outcomes.append(run(mutation, args.root.resolve(), before=args.before))
        print(f"{outcomes[-1].verdict:>10}  {mutation.name}", file=sys.stderr, flush=True)
    print(table(outcomes))
    return 1 if any(o.verdict in ("NOT CAUGHT", "error") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
