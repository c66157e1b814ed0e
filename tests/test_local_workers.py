"""`run --workers N`: the shares (pure functions), bad counts refused, and real local workers on one study."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
from collections.abc import Iterable
from contextlib import closing
from pathlib import Path

import optuna
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from mnist_sweep import environment, placement
from mnist_sweep.config import build_config
from mnist_sweep.environment import Gpu
from mnist_sweep.errors import ConfigError
from mnist_sweep.local_workers import Children, LocalWorkers, arrange, check, check_gpus_found, child_command
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
from tests.conftest import (
    DEFAULT_SWEEP,
    REPO,
    CliRunner,
    CliStarter,
    cli,
    cli_in_process,
    created_files,
    small_sweep_args,
    sweep_args,
)
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


def test_a_share_pins_cores_and_names_its_gpu_hides_gpus_only_when_cpu_only() -> None:
    env = Placement(1, (3,), "GPU-1111aaaa-0000-0000-0000-000000000000").environment()
    assert env["MNIST_SWEEP_CPUS"] == "3"
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-1111aaaa-0000-0000-0000-000000000000"  # as given, not an index
    assert Placement(1, (3,), "").environment()["CUDA_VISIBLE_DEVICES"] == ""  # study.gpus = 0
    assert "CUDA_VISIBLE_DEVICES" not in Placement(1, (3,)).environment()  # none found: left as inherited
    cpu_only = plan(2, cpus=[0, 1], gpu_ids=[], cpu_only=True)
    assert [p.gpu for p in cpu_only] == ["", ""]
    assert [p.gpu for p in plan(2, cpus=[0, 1], gpu_ids=[])] == [None, None]


def test_threads_are_the_cores_or_the_cgroup_quota_whichever_is_smaller(monkeypatch: pytest.MonkeyPatch) -> None:
    assert placement.cpu_budget((0, 1, 2, 3), None) == 4
    assert placement.cpu_budget((0, 1, 2, 3), 2.0) == 2
    assert placement.cpu_budget((0, 1, 2, 3), 1.5) == 1  # rounded down: 2 threads on 1.5 CPUs are throttled
    assert placement.cpu_budget((0, 1), 8.0) == 2
    assert placement.cpu_budget((0,), 0.25) == 1
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    one = placement.thread_environment(1)
    assert (one["TF_NUM_INTRAOP_THREADS"], one["TF_NUM_INTEROP_THREADS"], one["OMP_NUM_THREADS"]) == ("1", "2", "1")
    assert "--xla_cpu_multi_thread_eigen=false" in one["XLA_FLAGS"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x --xla_cpu_multi_thread_eigen=false")
    assert placement.thread_environment(4)["XLA_FLAGS"] == "--xla_dump_to=/tmp/x"  # inherited from a 1-core parent


def test_size_threads_applies_the_affinity_and_the_quota_before_the_backend_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unset_for_this_test(monkeypatch, [*placement.thread_environment(1), "MNIST_SWEEP_CPUS"])
    monkeypatch.setattr(placement, "usable_cpus", lambda: (0, 1, 2, 3, 4, 5))
    monkeypatch.setattr(placement, "cgroup_cpu_limit", lambda: 3.0)

    assert placement.size_threads("cpu_limit") == 3
    assert os.environ["TF_NUM_INTRAOP_THREADS"] == "3" and os.environ["OMP_NUM_THREADS"] == "3"
    assert placement.worker_tags()[placement.THREADS_TAG] == "3"
    with pytest.raises(ConfigError, match="threads = 'fixed-8', unknown to this version"):
        placement.size_threads("fixed-8")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_is_read_in_the_process_cgroup_and_above(tmp_path: Path) -> None:
    root, membership = tmp_path / "sys", tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpu memory")
    write(membership, "0::/kubepods/pod1/worker\n")
    write(root / "kubepods" / "cpu.max", "max 100000")
    write(root / "kubepods" / "pod1" / "cpu.max", "300000 100000")  # the pod: 3 CPUs
    write(root / "kubepods" / "pod1" / "worker" / "cpu.max", "max 100000")  # its container: unlimited itself
    assert placement.cgroup_cpu_limit(root, membership) == 3.0
    write(root / "kubepods" / "pod1" / "worker" / "cpu.max", "150000 100000")
    assert placement.cgroup_cpu_limit(root, membership) == 1.5


def test_cgroup_v2_in_a_container_namespace_reads_the_mount_root(tmp_path: Path) -> None:
    root, membership = tmp_path / "sys", tmp_path / "cgroup"
    write(root / "cgroup.controllers", "cpu")
    write(membership, "0::/\n")  # what a container with its own cgroup namespace sees
    write(root / "cpu.max", "200000 100000")  # compose: deploy.resources.limits.cpus = 2
    assert placement.cgroup_cpu_limit(root, membership) == 2.0
    write(membership, "0::/docker/abc\n")  # the host's path for it, not under the namespaced mount
    assert placement.cgroup_cpu_limit(root, membership) == 2.0
    write(membership, "0::/../outside\n")  # a path outside the mount: the mount is the process's cgroup
    write(tmp_path / "outside" / "cpu.max", "50000 100000")  # not this process's: never read
    assert placement.cgroup_cpu_limit(root, membership) == 2.0
    write(root / "cpu.max", "max 100000")
    assert placement.cgroup_cpu_limit(root, membership) is None


def test_cgroup_v1_cfs_quota_and_the_hybrid_layout(tmp_path: Path) -> None:
    root, membership = tmp_path / "sys", tmp_path / "cgroup"
    write(membership, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/docker/abc\n")
    (root / "unified").mkdir(parents=True)  # v2 mounted beside v1, with no cpu controller in it
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "50000\n")
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")  # the root: no quota
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    assert placement.cgroup_cpu_limit(root, membership) == 0.5
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "-1\n")
    assert placement.cgroup_cpu_limit(root, membership) is None


def test_no_cgroup_files_mean_no_limit(tmp_path: Path) -> None:
    assert placement.cgroup_cpu_limit(tmp_path / "none", tmp_path / "missing") is None
    write(tmp_path / "cgroup", "garbage without colons\n0::/x\n")
    write(tmp_path / "sys" / "cgroup.controllers", "")
    write(tmp_path / "sys" / "x" / "cpu.max", "not numbers")
    assert placement.cgroup_cpu_limit(tmp_path / "sys", tmp_path / "cgroup") is None
    assert placement.cgroup_cpu_limit() is None or placement.cgroup_cpu_limit() > 0  # this machine's, read for real


def test_cpu_lists_read_and_write_as_the_kernel_does() -> None:
    assert cpu_list([5, 0, 1, 2]) == "0-2,5"
    assert parse_cpu_list("0-2,5") == (0, 1, 2, 5)


def test_visible_gpus_follow_cuda_visible_devices_as_given() -> None:
    assert visible_gpu_ids(2, None) == ["0", "1"]
    assert visible_gpu_ids(2, "3,GPU-ab") == ["3", "GPU-ab"]
    assert visible_gpu_ids(1, "GPU-ab,GPU-cd") == ["GPU-ab"]  # the backend found one: CUDA stopped there
    mig = "MIG-11111111-2222-3333-4444-555555555555,MIG-66666666-7777-8888-9999-000000000000"
    assert visible_gpu_ids(1, mig) == mig.split(",")  # CUDA shows a process one MIG instance: each worker gets one
    assert visible_gpu_ids(0, mig) == []
    assert chosen_gpu_ids("all", ["0", "1"]) == ["0", "1"]
    assert chosen_gpu_ids(1, ["0", "1"]) == ["0"]
    with pytest.raises(ConfigError, match=r"study.gpus = 3: only 2 GPU\(s\) visible to the Keras backend \(jax\)"):
        chosen_gpu_ids(3, ["0", "1"], backend="jax")


def test_uuids_and_mig_ids_go_to_the_workers_round_robin_as_given(monkeypatch: pytest.MonkeyPatch) -> None:
    given = "GPU-1111aaaa-0000-0000-0000-000000000000,MIG-66666666-7777-8888-9999-000000000000"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", given)
    unset_for_this_test(monkeypatch, ["CUDA_DEVICE_ORDER", *Placement(0, (0,)).environment()])
    monkeypatch.setattr(placement, "usable_cpus", lambda: (0, 1, 2))
    monkeypatch.setattr(placement, "pin_cores", lambda cpus: None)
    monkeypatch.setattr(environment, "backend_gpus_in_child", lambda: [Gpu("NVIDIA H100"), Gpu("NVIDIA H100 MIG")])
    monkeypatch.setattr(environment, "gpu_device_nodes", lambda: True)
    cfg = build_config({"study": {"workers": 3}})

    gpu_ids = check(cfg, force=False)
    cfg, spec = arrange(cfg, gpu_ids=gpu_ids, child_command=child_command_for_test, echo=no_echo)

    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # set before any backend loads, inherited by children
    assert os.environ["CUDA_VISIBLE_DEVICES"] == given.split(",")[0]  # `run` itself: worker 0
    assert spec is not None and [p.gpu for p in spec.placements] == [given.split(",")[1], given.split(",")[0]]


def test_gpus_expected_but_none_found_end_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    unset_for_this_test(monkeypatch, ["CUDA_DEVICE_ORDER"])
    monkeypatch.setattr(environment, "backend_gpus_in_child", lambda: [])
    monkeypatch.setattr(environment, "gpu_device_nodes", lambda: True)  # device files, but the backend finds none
    monkeypatch.setattr(placement, "usable_cpus", lambda: (0, 1))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1111aaaa")
    with pytest.raises(ConfigError, match=r"study.gpus = 1: only 0 GPU\(s\) visible .*'GPU-1111aaaa'"):
        check(build_config({"study": {"workers": 2, "gpus": 1}}), force=False)
    assert check(build_config({"study": {"workers": 2}}), force=False) == []  # "all" of none: the CPU, said so
    assert check(build_config({"study": {"workers": 2, "gpus": 0}}), force=False) == []
    monkeypatch.setattr(environment, "gpus", lambda: [])
    with pytest.raises(ConfigError, match=r"study.gpus = 2: only 0 GPU\(s\) visible"):
        check_gpus_found(build_config({"study": {"gpus": 2}}), as_worker=True)
    monkeypatch.setattr(environment, "gpus", lambda: [Gpu("NVIDIA H100")])
    check_gpus_found(build_config({"study": {"gpus": 2}}), as_worker=True)  # a worker's share: one GPU
    with pytest.raises(ConfigError, match=r"study.gpus = 2: only 1 GPU\(s\) visible"):
        check_gpus_found(build_config({"study": {"gpus": 2}}), as_worker=False)


def test_more_workers_than_cores_needs_force() -> None:
    with pytest.raises(ConfigError, match=r"study.workers = 3: more than the 2 core\(s\)"):
        check_worker_count(3, cpus=(0, 1), force=False)
    check_worker_count(3, cpus=(0, 1), force=True)


def test_the_sampler_lies_as_the_policy_says() -> None:
    study = build_config({}).study
    assert make_sampler(study, seed_offset=0, constant_liar=True)._constant_liar  # type: ignore[attr-defined]
    assert not make_sampler(study, seed_offset=0, constant_liar=False)._constant_liar  # type: ignore[attr-defined]


def test_one_worker_is_todays_run_and_gpus_0_still_hides_the_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    unset_for_this_test(monkeypatch, ["CUDA_VISIBLE_DEVICES", "MNIST_SWEEP_CPUS", "CUDA_DEVICE_ORDER"])

    gpu_ids = check(build_config({}), force=False)  # asks no backend and no nvidia-smi
    cfg, spec = arrange(build_config({}), gpu_ids=gpu_ids, child_command=child_command_for_test, echo=no_echo)
    assert spec is None and "CUDA_VISIBLE_DEVICES" not in os.environ and cfg.study.workers == 1

    cfg, spec = arrange(
        build_config({"study": {"gpus": 0}}), gpu_ids=[], child_command=child_command_for_test, echo=no_echo
    )
    assert spec is None and os.environ["CUDA_VISIBLE_DEVICES"] == "" and "MNIST_SWEEP_CPUS" not in os.environ


def test_run_keeps_the_first_share_and_its_workers_get_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    unset_for_this_test(monkeypatch, [*Placement(0, (0,)).environment(), "CUDA_VISIBLE_DEVICES"])
    pinned: list[str] = []
    monkeypatch.setattr(placement, "pin_cores", lambda cpus: pinned.append(placement.cpu_list(cpus)))
    monkeypatch.setattr(placement, "usable_cpus", lambda: (0, 1, 2, 3))
    cfg = build_config({"study": {"workers": 2}})

    cfg, spec = arrange(cfg, gpu_ids=["0"], child_command=child_command_for_test, echo=no_echo)

    assert pinned == ["0-1"] and os.environ["CUDA_VISIBLE_DEVICES"] == "0"
    # Its share is applied, not written into its environment: only the GPU, which CUDA reads there.
    assert "MNIST_SWEEP_CPUS" not in os.environ and "MNIST_SWEEP_WORKER" not in os.environ
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


# The first runs the CLI in a process of its own (the test below); the last asks the GPU probe, a child process.
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        pytest.param(
            ["--workers", "0"],
            'study.workers must be a number of processes >= 1 or "auto", got 0',
            marks=pytest.mark.subprocess,
        ),
        (["--workers", "-1"], 'study.workers must be a number of processes >= 1 or "auto", got -1'),
        (["--workers", "many"], "study.workers must be a number of processes >= 1 or \"auto\", got 'many'"),
        (["--workers", str(len(os.sched_getaffinity(0)) + 1)], "pass --force"),
        pytest.param(
            ["--workers", "1", "--set", "study.gpus=1"],
            "study.gpus = 1: only 0 GPU(s) visible",
            marks=pytest.mark.subprocess,
        ),
    ],
)
def test_bad_worker_counts_exit_2_and_create_nothing(
    flags: list[str], expected: str, tmp_path: Path, mnist_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi on the path: no GPU, whatever the machine
    args = ["run", *sweep_args(), *flags]
    if flags == ["--workers", "0"]:  # one in a process of its own: its exit code, and no traceback
        done = cli(*args, cwd=tmp_path, data=mnist_dir, timeout=120)
        code, stderr = done.returncode, done.stderr
    else:
        monkeypatch.setenv("MNIST_SWEEP_DATA", str(mnist_dir))
        code, stderr = cli_in_process(args, cwd=tmp_path, monkeypatch=monkeypatch)

    assert code == 2, stderr
    assert expected in stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr
    assert created_files(tmp_path) == []


# --------------------------------------------------------------------------- real local workers


def trial_runs(folder: Path) -> list[Run]:
    return [r for r in all_runs(folder) if r.data.tags.get("mnist_sweep.role") == "trial"]


def runs_of(folder: Path, *, worker: str, status: str) -> list[tuple[str, int]]:
    """(run id, pid) of worker `worker`'s trial runs in `status`, read-only from the sqlite file (no schema race)."""
    database = folder / "mlruns" / "mlflow.db"
    # Trial runs only: the lecture's reference run (role "reference") is trained by a worker too.
    query = (
        "SELECT r.run_uuid, w.value FROM runs r JOIN tags i ON i.run_uuid = r.run_uuid AND i.key = ? "
        "JOIN tags w ON w.run_uuid = r.run_uuid AND w.key = ? "
        "JOIN tags role ON role.run_uuid = r.run_uuid AND role.key = 'mnist_sweep.role' AND role.value = 'trial' "
        "WHERE i.value = ? AND r.status = ?"
    )
    try:
        with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=30)) as connection:
            rows = connection.execute(query, (WORKER_INDEX_TAG, WORKER_TAG, worker, status)).fetchall()
    except sqlite3.Error:  # not there yet, or its tables not made yet
        return []
    # The tag reads host:pid/token (processes.ProcessId.label): the pid is what follows the last ':' of host:pid.
    return [(run_id, int(where.split("/")[0].rsplit(":", 1)[1])) for run_id, where in rows]


def workers_args(*extra: str, trials: int, epochs: int = 1) -> list[str]:
    return [
        *sweep_args(trials=trials, train_limit=1500, validation=500, epochs=epochs),
        "--workers",
        "2",
        "--force",
        *extra,
    ]


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


# --------------------------------------------------------------------------- GPUs: the backend decides


FAKE_SMI = """#!/bin/sh
# nvidia-smi on a machine whose backend finds no GPU (no driver for it, a CPU-only wheel): it lists two.
echo "0, GPU-1111aaaa-0000-0000-0000-000000000000, NVIDIA H200, 143771"
echo "1, GPU-2222bbbb-0000-0000-0000-000000000000, NVIDIA H200, 143771"
"""


def fake_nvidia_smi(folder: Path) -> dict[str, str]:
    """PATH with an nvidia-smi that lists two GPUs the backend cannot use."""
    bin_dir = folder / "fake-bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}


@pytest.mark.parametrize(
    ("command", "flags"),
    [("run", ["--workers", "2", "--force"]), ("run", []), ("worker", [])],
    ids=["run --workers 2", "run (its own backend)", "worker (its own backend)"],
)
def test_gpus_expected_but_not_found_by_the_backend_exit_2_though_nvidia_smi_lists_them(
    command: str, flags: list[str], run_cli: CliRunner, tmp_path: Path
) -> None:
    env = {**fake_nvidia_smi(tmp_path), "CUDA_VISIBLE_DEVICES": "GPU-1111aaaa-0000-0000-0000-000000000000"}
    before = created_files(tmp_path)

    result = run_cli(command, str(DEFAULT_SWEEP), *small_sweep_args("--set", "study.gpus=1"), *flags, env=env)

    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("mnist-sweep: study.gpus = 1: only 0 GPU(s) visible to the Keras backend"), line
    assert "GPU-1111aaaa-0000-0000-0000-000000000000" in line
    assert created_files(tmp_path) == before  # nothing written: not even the study
    assert "trial" not in result.stdout


def test_children_get_their_gpu_as_given_and_the_pci_bus_order(monkeypatch: pytest.MonkeyPatch) -> None:
    unset_for_this_test(monkeypatch, ["CUDA_DEVICE_ORDER"])
    monkeypatch.setattr(environment, "backend_gpus_in_child", lambda: [Gpu("NVIDIA A100 MIG 1g.10gb")])
    monkeypatch.setattr(environment, "gpu_device_nodes", lambda: True)
    mig = "MIG-11111111-2222-3333-4444-555555555555,MIG-66666666-7777-8888-9999-000000000000"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", mig)
    gpu_ids = check(build_config({"study": {"workers": 2}}), force=True)
    show = "import os; print(os.environ['CUDA_VISIBLE_DEVICES'], os.environ['CUDA_DEVICE_ORDER'])"
    spec = LocalWorkers((sys.executable, "-c", show), tuple(plan(2, cpus=[0], gpu_ids=gpu_ids or ())[1:]))
    lines: list[str] = []

    children = Children(spec, echo=lambda line, final=False: lines.append(line))
    children.wait()

    assert lines == [f"[worker 1] {mig.split(',')[1]} PCI_BUS_ID"]


@pytest.mark.slow
@pytest.mark.subprocess
def test_the_backend_probe_answers_in_a_child_and_loads_no_backend_here() -> None:
    import subprocess

    probe = (
        "import sys; from mnist_sweep import environment as e; print(e.backend_gpus_in_child(), 'keras' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "False"]  # no GPU here; and the asking process imported no Keras
