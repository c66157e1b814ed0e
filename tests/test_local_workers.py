"""`run --workers N`: the shares (pure functions), bad counts refused, and real local workers on one study."""

from __future__ import annotations

import os
import signal
import sqlite3
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from mnist_sweep import placement
from mnist_sweep.config import build_config
from mnist_sweep.errors import ConfigError
from mnist_sweep.local_workers import arrange, child_command
from mnist_sweep.packing import Measured, candidate_layouts, choose, measure, resolve_auto
from mnist_sweep.placement import (
    CPUS_TAG,
    WORKER_INDEX_TAG,
    WORKER_TAG,
    Placement,
    check_worker_count,
    chosen_gpu_ids,
    cpu_list,
    parse_cpu_list,
    plan,
    split_cpus,
    visible_gpu_ids,
)
from mnist_sweep.study import make_sampler
from tests.conftest import DEFAULT_SWEEP, CliRunner, CliStarter, created_files, small_sweep_args
from tests.stores import all_runs, assert_nothing_running, assert_runs_linked, load_study, tracking_url, wait_for

# --------------------------------------------------------------------------- the shares


def test_cores_are_split_into_contiguous_shares() -> None:
    assert split_cpus([0, 1, 2, 3, 4], 2) == [(0, 1, 2), (3, 4)]
    assert split_cpus([0, 1], 2) == [(0,), (1,)]
    assert split_cpus([0, 1], 3) == [(0,), (1,), (0,)]  # --force: shared round-robin


def test_gpus_take_workers_round_robin_and_split_the_cores() -> None:
    placements = plan(4, cpus=range(8), gpu_ids=["2", "3"])

    assert [p.gpu for p in placements] == ["2", "3", "2", "3"]  # two workers per GPU
    assert [p.cpus for p in placements] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    assert placements[1].environment()["CUDA_VISIBLE_DEVICES"] == "3"


def test_a_cpu_share_sizes_the_thread_pools_and_hides_gpus() -> None:
    env = Placement(1, (3,)).environment()

    assert env["MNIST_SWEEP_CPUS"] == "3"
    assert env["TF_NUM_INTRAOP_THREADS"] == "1"
    assert "--xla_cpu_multi_thread_eigen=false" in env["XLA_FLAGS"]
    assert env["CUDA_VISIBLE_DEVICES"] == ""
    assert Placement(0, (0, 1, 2, 3)).environment()["TF_NUM_INTRAOP_THREADS"] == "4"


def test_cpu_lists_read_and_write_as_the_kernel_does() -> None:
    assert cpu_list([5, 0, 1, 2]) == "0-2,5"
    assert parse_cpu_list("0-2,5") == (0, 1, 2, 5)


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    assert visible_gpu_ids(2, None) == ["0", "1"]
    assert visible_gpu_ids(2, "3,GPU-ab") == ["3", "GPU-ab"]
    assert chosen_gpu_ids("all", ["0", "1"]) == ["0", "1"]
    assert chosen_gpu_ids(1, ["0", "1"]) == ["0"]
    with pytest.raises(ConfigError, match="study.gpus = 3: only 2 GPU"):
        chosen_gpu_ids(3, ["0", "1"])


def test_more_workers_than_cores_needs_force() -> None:
    with pytest.raises(ConfigError, match=r"study.workers = 3: more than the 2 core\(s\)"):
        check_worker_count(3, cpus=(0, 1), force=False)
    check_worker_count(3, cpus=(0, 1), force=True)


def test_tpe_lies_about_running_trials_only_with_several_workers() -> None:
    one = make_sampler(build_config({}).study, seed_offset=0)
    two = make_sampler(build_config({"study": {"workers": 2}}).study, seed_offset=0)

    assert not one._constant_liar  # type: ignore[attr-defined]
    assert two._constant_liar  # type: ignore[attr-defined]


def test_one_worker_is_todays_run_and_gpus_0_still_hides_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    unset_for_this_test(monkeypatch, ["CUDA_VISIBLE_DEVICES", "MNIST_SWEEP_CPUS"])

    cfg, spec = arrange(build_config({}), gpu_ids=[], child_command=child_command_for_test, echo=no_echo)
    assert spec is None and "CUDA_VISIBLE_DEVICES" not in os.environ and cfg.study.workers == 1

    cfg, spec = arrange(
        build_config({"study": {"gpus": 0}}), gpu_ids=[], child_command=child_command_for_test, echo=no_echo
    )
    assert spec is None and os.environ["CUDA_VISIBLE_DEVICES"] == "" and "MNIST_SWEEP_CPUS" not in os.environ


def test_run_keeps_the_first_share_and_its_workers_get_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    unset_for_this_test(monkeypatch, Placement(0, (0,)).environment())
    pinned: list[str] = []
    monkeypatch.setattr(placement, "pin_this_process", lambda: pinned.append(os.environ["MNIST_SWEEP_CPUS"]))
    monkeypatch.setattr(placement, "usable_cpus", lambda: (0, 1, 2, 3))
    cfg = build_config({"study": {"workers": 2}})

    cfg, spec = arrange(cfg, gpu_ids=["0"], child_command=child_command_for_test, echo=no_echo)

    assert pinned == ["0-1"] and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    assert spec is not None and spec.placements == (Placement(1, (2, 3), "0"),)
    assert spec.command[-2:] == ("--set", "study.workers=2")


def unset_for_this_test(monkeypatch: pytest.MonkeyPatch, names: Iterable[str]) -> None:
    """Absent now, and as before once the test ends (delenv alone forgets a variable that was not set)."""
    for name in names:
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def child_command_for_test(*, workers: int) -> tuple[str, ...]:
    return child_command("sweep.toml", [], workers=workers, loudness=[])


def no_echo(line: str, *, final: bool = False) -> None:
    pass


# --------------------------------------------------------------------------- auto


def test_auto_picks_the_layout_with_the_least_time_per_sample() -> None:
    one = Measured(1, {64: 10_000.0, 256: 30_000.0})
    two = Measured(2, {64: 19_000.0, 256: 31_000.0})  # packing pays at 64, hardly at 256

    workers, why = choose([one, two], [64, 256])

    assert workers == 2
    assert why.startswith("1.57x")  # (1e-4 + 3.3e-5) / (5.3e-5 + 3.2e-5)
    assert choose([one, two], [256])[0] == 2
    assert choose([one, Measured(2, {64: 9_000.0, 256: 20_000.0})], [64, 256])[0] == 1


def test_probe_layouts_one_core_each_or_one_and_two_per_gpu() -> None:
    assert [(n, len(layout)) for n, layout in candidate_layouts((0, 1), ())] == [(1, 1), (2, 2)]
    assert [(n, len(layout)) for n, layout in candidate_layouts((0,), ())] == [(1, 1)]
    gpu_layouts = candidate_layouts(range(8), ["0", "1"])
    assert [(n, [p.gpu for p in layout]) for n, layout in gpu_layouts] == [(2, ["0"]), (4, ["0", "0"])]


def test_auto_reuses_its_cached_measurement(tmp_path: Path) -> None:
    cfg = build_config({"study": {"storage": f"sqlite:///{tmp_path}/mlruns/optuna.db"}, "search": {"batch_size": 64}})
    from mnist_sweep.packing import cache_file, machine_key

    cache_file(cfg).parent.mkdir(parents=True)
    key = machine_key(cfg, (0, 1), ())
    cache_file(cfg).write_text(
        f'{{"{key}": {{"measured_at": "then", "layouts": {{"1": {{"64": 100.0}}, "2": {{"64": 190.0}}}}}}}}'
    )
    lines: list[str] = []

    workers = resolve_auto(cfg, cpus=(0, 1), gpu_ids=(), echo=lambda line, final=False: lines.append(line))

    assert workers == 2
    assert lines == [
        f"workers auto: 2, {choose([Measured(1, {64: 100.0}), Measured(2, {64: 190.0})], [64])[1]}; "
        f"measured then, kept in {cache_file(cfg)}"
    ]


@pytest.mark.slow
def test_the_probe_measures_pinned_processes_side_by_side() -> None:
    cfg = build_config({})
    layout = plan(2, cpus=sorted(os.sched_getaffinity(0))[:1] * 2, gpu_ids=())  # both on one core: cheap

    throughput = measure(layout, cfg, batch_sizes=[64], samples=1024)

    assert list(throughput) == [64] and throughput[64] > 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--workers", "0"], 'study.workers must be a number of processes >= 1 or "auto", got 0'),
        (["--workers", "-1"], 'study.workers must be a number of processes >= 1 or "auto", got -1'),
        (["--workers", "many"], "study.workers must be a number of processes >= 1 or \"auto\", got 'many'"),
        (["--workers", str(len(os.sched_getaffinity(0)) + 1)], "pass --force"),
        (["--workers", "1", "--set", "study.gpus=1"], "study.gpus = 1: only 0 GPU(s) visible"),
    ],
)
def test_bad_worker_counts_exit_2_and_create_nothing(
    flags: list[str], expected: str, run_cli: CliRunner, tmp_path: Path
) -> None:
    env = {"PATH": "/usr/bin:/bin"}  # no nvidia-smi on the path: no GPU, whatever the machine
    result = run_cli("run", str(DEFAULT_SWEEP), *small_sweep_args(), *flags, env=env, timeout=120)

    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert created_files(tmp_path) == []


# --------------------------------------------------------------------------- real local workers


def trial_runs(folder: Path) -> list[Run]:
    return [r for r in all_runs(folder) if r.data.tags.get("mnist_sweep.role") == "trial"]


def runs_of(folder: Path, *, worker: str, status: str) -> list[tuple[str, int]]:
    """(run id, pid) of worker `worker`'s trial runs in `status`, read-only from the sqlite file (no schema race)."""
    database = folder / "mlruns" / "mlflow.db"
    query = (
        "SELECT r.run_uuid, w.value FROM runs r JOIN tags i ON i.run_uuid = r.run_uuid AND i.key = ? "
        "JOIN tags w ON w.run_uuid = r.run_uuid AND w.key = ? WHERE i.value = ? AND r.status = ?"
    )
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)) as connection:
            rows = connection.execute(query, (WORKER_INDEX_TAG, WORKER_TAG, worker, status)).fetchall()
    except sqlite3.Error:  # not there yet, or its tables not made yet
        return []
    return [(run_id, int(where.rsplit(":", 1)[1])) for run_id, where in rows]


def workers_args(*extra: str, trials: int, epochs: int = 1) -> list[str]:
    args = small_sweep_args("--workers", "2", "--force", *extra, trials=trials, train_limit=1500, validation=500)
    return [str(DEFAULT_SWEEP), *args, "--epochs", str(epochs)]


@pytest.mark.slow
def test_a_killed_local_worker_loses_nothing_and_every_run_names_its_worker(
    tmp_path: Path, start_cli: CliStarter
) -> None:
    # 2 s heartbeats: the killed worker's trial goes stale after 4 s and is retried by `run`.
    run = start_cli("run", *workers_args("--set", "study.heartbeat_seconds=2", trials=6))
    # Worker 1's second trial: it has printed a finished trial's line through `run` already.
    wait_for(lambda: runs_of(tmp_path, worker="1", status="FINISHED"), process=run, timeout=240)
    running = wait_for(lambda: runs_of(tmp_path, worker="1", status="RUNNING"), process=run, timeout=120)
    killed_run, killed_pid = running[0]
    os.kill(killed_pid, signal.SIGKILL)

    out, err = run.communicate(timeout=300)

    assert run.returncode == 0, err
    assert "[worker 1] trial" in out and "COMPLETE" in out
    assert "[worker 1] exited with code -9" in err
    study, runs = load_study(tmp_path), all_runs(tmp_path)
    assert_nothing_running(study, runs)
    assert_runs_linked(study, runs)
    killed = MlflowClient(tracking_url(tmp_path)).get_run(killed_run)
    assert killed.info.status == "KILLED"
    assert study.trials[int(killed.data.tags["optuna.trial_number"])].state == optuna.trial.TrialState.FAIL
    assert study.user_attrs["test_result"]["test_accuracy"] > 0.5
    shares = {(r.data.tags[WORKER_INDEX_TAG], r.data.tags[CPUS_TAG]) for r in trial_runs(tmp_path)}
    assert {index for index, _ in shares} == {"0", "1"}
    assert len({cpus for _, cpus in shares}) == len(shares)  # each worker on its own core (two of two here)
    assert all(r.data.tags["device"].startswith(("CPU: ", "GPU: ")) for r in trial_runs(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_to_run_stops_its_workers_and_fails_every_running_trial(
    signum: signal.Signals, code: int, tmp_path: Path, start_cli: CliStarter
) -> None:
    run = start_cli("run", *workers_args(trials=4, epochs=20))
    # Both workers in a trial at once.
    wait_for(lambda: runs_of(tmp_path, worker="1", status="RUNNING"), process=run, timeout=240)
    wait_for(lambda: runs_of(tmp_path, worker="0", status="RUNNING"), process=run, timeout=120)
    (_, child_pid), *_ = runs_of(tmp_path, worker="1", status="RUNNING")

    run.send_signal(signum)  # a terminal's Ctrl-C reaches `run` alone: its workers run in their own session
    _, err = run.communicate(timeout=180)

    assert run.returncode == code, err
    assert f"[worker 1] mnist-sweep: interrupted by {signum.name}" in err
    with pytest.raises(ProcessLookupError):
        os.kill(child_pid, 0)
    study, runs = load_study(tmp_path), all_runs(tmp_path)
    assert_nothing_running(study, runs)
    killed = [r for r in trial_runs(tmp_path) if r.info.status == "KILLED"]
    assert {r.data.tags[WORKER_INDEX_TAG] for r in killed} == {"0", "1"}
    failed = {t.number for t in study.trials if t.state == optuna.trial.TrialState.FAIL}
    assert {int(r.data.tags["optuna.trial_number"]) for r in killed} <= failed
    assert "test_result" not in study.user_attrs
