"""The top-level flows, each a straight line: run, worker, finalize, report."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna

from mnist_sweep import preflight
from mnist_sweep.config import SweepConfig
from mnist_sweep.data import DataSource, Split, check_test_split_present, load_split, resolve_source
from mnist_sweep.final import recorded_result, result_line, score_test_set, seal_claimed
from mnist_sweep.report import study_summary, write_report
from mnist_sweep.study import (
    Objective,
    count_finished,
    load_existing_study,
    make_storage,
    open_study,
    parent_run_id,
    run_trials,
    wait_for_running_trials,
    worker_salt,
)
from mnist_sweep.tracking import Tracker

Echo = Callable[[str], None]


class StudySealedError(RuntimeError):
    """More trials were asked of a study whose test set was already scored."""


class NoSuchStudyError(RuntimeError):
    """finalize/report on a study that is not in the storage."""


def prepare_data(cfg: SweepConfig) -> tuple[DataSource, Split]:
    """Training/validation data read and checked; the test files only looked at, never read."""
    source = resolve_source(cfg.data.path)
    split = load_split(source, validation=cfg.data.validation, train_limit=cfg.data.train_limit, seed=cfg.data.seed)
    check_test_split_present(source)
    return source, split


def make_tracker(cfg: SweepConfig) -> Tracker:
    return Tracker(uri=cfg.tracking.uri, artifacts=cfg.tracking.artifacts, experiment=cfg.study.name)


def run(cfg: SweepConfig, *, echo: Echo, finalize: bool, as_worker: bool = False) -> int:
    """Join or create the study, run trials until study.trials are finished, then (run) finalize."""
    source, split = prepare_data(cfg)
    preflight.check_all(cfg)
    storage = make_storage(cfg.study)
    existing = load_existing_study(cfg, storage)
    if existing is not None and seal_claimed(storage, cfg.study.name):
        return _already_scored(cfg, existing, echo)
    tracker = make_tracker(cfg)
    study, created = open_study(cfg, storage, worker_salt=worker_salt() if as_worker else 0)
    parent = parent_run_id(study, tracker, created=created, config=cfg.to_dict())
    echo(
        f"study {cfg.study.name!r}: {count_finished(study)}/{cfg.study.trials} trials finished; "
        f"{len(split.y_train)} training and {len(split.y_val)} validation images; MLflow run {parent}"
    )
    objective = Objective(cfg=cfg, split=split, tracker=tracker, parent_run_id=parent, data_source=source.describe())
    tracker.set_parent_status(parent, "RUNNING")  # a rerun after an interrupt: the study is running again
    status = "KILLED"
    try:
        run_trials(study, objective, target=cfg.study.trials, max_failures=cfg.study.max_failures, echo=echo)
        if finalize:  # score only once every trial has ended, so none is left RUNNING behind the seal
            wait_for_running_trials(study, tracker, parent, poll_seconds=cfg.study.heartbeat_seconds, echo=echo)
        status = "FINISHED"
    finally:
        tracker.set_parent_status(parent, status)
    if finalize:
        _finalize(cfg, study, storage, tracker, parent, source, echo=echo, reclaim=False)
    return 0


def _already_scored(cfg: SweepConfig, study: optuna.Study, echo: Echo) -> int:
    finished = count_finished(study)
    if finished < cfg.study.trials:
        raise StudySealedError(
            f"study {cfg.study.name!r} had its test set scored and takes no more trials "
            f"({finished} finished, study.trials = {cfg.study.trials}); start a new study name, "
            f"e.g. --set study.name={cfg.study.name}-2"
        )
    result = recorded_result(study)
    echo("test set already scored; nothing trained or scored again")
    echo(result_line(result) if result else "the test set is being scored by another process")
    return 0


def finalize(cfg: SweepConfig, *, echo: Echo, reclaim: bool = False) -> int:
    """Score the chosen trial on the test set (once) and write the report."""
    source = resolve_source(cfg.data.path)
    preflight.check_all(cfg)
    storage = make_storage(cfg.study)
    study = _existing_study(cfg, storage)
    tracker = make_tracker(cfg)
    parent = parent_run_id(study, tracker, created=False, config=cfg.to_dict())
    _finalize(cfg, study, storage, tracker, parent, source, echo=echo, reclaim=reclaim)
    return 0


def _existing_study(cfg: SweepConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    study = load_existing_study(cfg, storage)
    if study is None:
        raise NoSuchStudyError(
            f"study {cfg.study.name!r} does not exist in {cfg.study.storage}; run `mnist-sweep run` first"
        )
    return study


def _finalize(
    cfg: SweepConfig,
    study: optuna.Study,
    storage: optuna.storages.BaseStorage,
    tracker: Tracker,
    parent: str,
    source: DataSource,
    *,
    echo: Echo,
    reclaim: bool,
) -> dict[str, Any]:
    result, scored_now = score_test_set(
        study=study,
        storage=storage,
        tracker=tracker,
        parent_run_id=parent,
        source=source,
        metric=cfg.study.metric,
        echo=echo,
        reclaim=reclaim,
    )
    if not scored_now:
        echo("test set already scored; nothing scored again")
    folder = Path(cfg.tracking.reports) / cfg.study.name
    write_report(folder, result, study_summary(study))
    tracker.log_folder(parent, folder, "report")
    echo(f"report: {folder / 'report.md'}")
    echo(result_line(result))
    return result
