"""The top-level flows, each a straight line: run, worker, finalize, report, trials, ui, dashboard."""

from __future__ import annotations

from pathlib import Path

import optuna

from mnist_sweep import local_workers, preflight
from mnist_sweep.artifacts import global_tracking_uri
from mnist_sweep.asha import one_rung_notice
from mnist_sweep.baseline import train_reference
from mnist_sweep.config import SweepConfig
from mnist_sweep.console import NO_PROGRESS, Echo, TrialProgress
from mnist_sweep.data import DataSource, Split
from mnist_sweep.databases import nothing_recorded
from mnist_sweep.environment import device_line, gpus
from mnist_sweep.errors import EXIT_BAD_INPUT, NoSuchStudyError, RegistryError, StudySealedError
from mnist_sweep.final import recorded_result, result_line, score_test_set, seal_claimed
from mnist_sweep.ledger import StudyLedger
from mnist_sweep.live import settle_before_scoring
from mnist_sweep.local_workers import Children
from mnist_sweep.records import REGISTERED_MODEL_ATTR, Registration, TestResult
from mnist_sweep.registry import register_champion
from mnist_sweep.report import baseline_gain, gain_line, leaderboard_rows, leaderboard_table, write_report
from mnist_sweep.space import searched_names
from mnist_sweep.study import (
    StudyContext,
    count_finished,
    load_existing_study,
    make_storage,
    open_study,
    recorded_policy,
    worker_salt,
)
from mnist_sweep.tracking import Tracker, recorded_trial_metrics
from mnist_sweep.trial_loop import run_trials
from mnist_sweep.trial_run import Trials
from mnist_sweep.ui import serve_dashboard, serve_mlflow_ui


def make_tracker(cfg: SweepConfig) -> Tracker:
    return Tracker(
        uri=cfg.tracking.uri,
        artifacts=cfg.tracking.artifacts,
        experiment=cfg.study.name,
        model_optimizer_state=cfg.tracking.model_optimizer_state,
        background_uploads=cfg.tracking.background_uploads,
    )


def run(
    cfg: SweepConfig,
    *,
    source: DataSource,
    split: Split,
    echo: Echo,
    finalize: bool,
    as_worker: bool = False,
    progress: TrialProgress = NO_PROGRESS,
    sweep_file: str = "",
    local: Children | None = None,
) -> int:
    """Join or create the study, run trials until study.trials are finished, then (run) finalize.

    `source` and `split` come from `preflight.prepare`, which has checked every input already; `local`,
    the `worker` processes `run --workers N` started beside this one (they end before the test set is scored).
    """
    storage = make_storage(cfg.study)
    existing = load_existing_study(cfg, storage)
    if existing is not None and seal_claimed(storage, cfg.study.name):
        return _already_scored(cfg, existing, echo)
    context = _join_study(cfg, storage, split=split, echo=echo, as_worker=as_worker, sweep_file=sweep_file)
    study, ledger = context.study, context.ledger
    status = "KILLED"
    try:
        with local_workers.running(local) as children:  # they load TensorFlow while this one does
            trials = Trials(
                cfg=cfg,
                split=split,
                context=context,
                data_source=source.describe(),
                progress=progress,
                run_tags=recorded_policy(study.user_attrs, cfg.study).tags(),  # the sampler this process built
            )
            # Beside the trials, once per study: what the report measures the sweep against.
            train_reference(
                cfg=cfg,
                context=context,
                split=split,
                session=trials.session,
                echo=echo,
            )
            run_trials(
                trials,
                target=cfg.study.trials,
                max_failures=cfg.study.max_failures,
                echo=echo,
                sealed=lambda: seal_claimed(storage, cfg.study.name),
            )
            if children is not None:
                children.wait()
        if finalize:  # other workers' trials could still beat the best: wait for them, then score
            _settle(cfg, context, wait=True, reclaim=False, echo=echo, progress=progress)
        status = "FINISHED"
    finally:
        ledger.set_status(status)
    if finalize:
        _finalize(cfg, context, source, echo=echo, reclaim=False)
    return 0


def _join_study(
    cfg: SweepConfig,
    storage: optuna.storages.BaseStorage,
    *,
    split: Split,
    echo: Echo,
    as_worker: bool,
    sweep_file: str,
) -> StudyContext:
    """The study opened (or created) with its MLflow parent run, described, said, and marked running."""
    tracker = make_tracker(cfg)
    study, created = open_study(cfg, storage, worker_salt=worker_salt() if as_worker else 0)
    ledger = StudyLedger.open(study, tracker, created=created, config=cfg.to_dict())
    ledger.describe(study_description(cfg, sweep_file=sweep_file))
    echo(device_line(gpus()))
    echo(
        f"study {cfg.study.name!r}: {count_finished(study)}/{cfg.study.trials} trials finished; "
        f"{len(split.y_train)} training and {len(split.y_val)} validation images; MLflow run {ledger.parent_run_id}"
    )
    if notice := one_rung_notice(cfg):
        echo(notice)
    ledger.set_status("RUNNING")  # a rerun after an interrupt: the study is running again
    return StudyContext(study, storage, ledger)


def study_description(cfg: SweepConfig, *, sweep_file: str = "") -> str:
    """What the study is, for its parent run's description in the MLflow UI (Markdown)."""
    study, searched = cfg.study, ", ".join(f"`{name}`" for name in searched_names(cfg.search))
    source = f" from `{sweep_file}`" if sweep_file else ""
    hidden = "-".join(str(units) for units in cfg.model.hidden)
    return (
        f"Optuna study **{study.name}**{source}: {study.trials} trials of the MNIST fully connected network "
        f"(hidden layers {hidden}, up to {cfg.train.epochs} epochs), {_chooser(cfg)}, {study.pruner} pruner.\n\n"
        f"Searched: {searched or 'nothing (every hyperparameter fixed)'}. The trial with the best `{study.metric}` "
        f"({study.direction}) on the validation split is chosen, and its model is scored once on the held-out test set "
        "(the `test_*` metrics of this run, and `report/report.html`).\n\n"
        "Each trial is a child run `trial-NNNN`: compare them by the columns `final_val_accuracy`, `final_val_loss` "
        "and the searched params."
    )


def _chooser(cfg: SweepConfig) -> str:
    """Who picks each trial's hyperparameters, in words."""
    study = cfg.study
    if study.engine == "optuna":
        return f"{study.sampler} sampler"
    factor = f" (factor {study.hyperband_factor})" if study.sampler == "hyperband" else ""
    return f"keras-tuner's {study.sampler} oracle{factor}"


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
    echo(final_line(study, result) if result else "the test set is being scored by another process", final=True)
    return 0


def finalize(
    cfg: SweepConfig,
    *,
    source: DataSource,
    echo: Echo,
    reclaim: bool = False,
    wait: bool = False,
    progress: TrialProgress = NO_PROGRESS,
) -> int:
    """Score the chosen trial on the test set (once) and write the report; inputs checked by `preflight.prepare`.

    Refused (exit 2, nothing sealed) while a trial of the study is live; with `wait`, once none is.
    """
    _recorded_study(cfg)  # a study that is not there: one line, and no storage created for it
    storage = make_storage(cfg.study)
    study = _existing_study(cfg, storage)
    ledger = StudyLedger.open(study, make_tracker(cfg), created=False, config=cfg.to_dict())
    context = StudyContext(study, storage, ledger)
    _settle(cfg, context, wait=wait, reclaim=reclaim, echo=echo, progress=progress)
    _finalize(cfg, context, source, echo=echo, reclaim=reclaim)
    return 0


def _settle(
    cfg: SweepConfig,
    context: StudyContext,
    *,
    wait: bool,
    reclaim: bool,
    echo: Echo,
    progress: TrialProgress,
) -> None:
    """No trial of the study live before the test set is scored (live.py); nothing to settle where it is scored
    already, or being scored by another process (its claim is waited for instead), unless that claim is taken over."""
    if recorded_result(context.study) is not None or (seal_claimed(context.storage, cfg.study.name) and not reclaim):
        return
    settle_before_scoring(
        context=context,
        metric=cfg.study.metric,
        target=cfg.study.trials,
        wait=wait,
        quiet_seconds=2 * cfg.study.heartbeat_seconds,  # the storage's grace period (make_storage)
        poll_seconds=min(cfg.study.heartbeat_seconds, WAIT_POLL_SECONDS),
        echo=echo,
        progress=progress,
    )


WAIT_POLL_SECONDS = 2.0


def _existing_study(cfg: SweepConfig, storage: optuna.storages.BaseStorage) -> optuna.Study:
    study = load_existing_study(cfg, storage)
    if study is None:
        raise NoSuchStudyError(
            f"study {cfg.study.name!r} does not exist in {cfg.study.storage}; run `mnist-sweep run` first"
        )
    return study


def _finalize(cfg: SweepConfig, context: StudyContext, source: DataSource, *, echo: Echo, reclaim: bool) -> TestResult:
    study = context.study
    result, scored_now = score_test_set(
        context=context,
        source=source,
        metric=cfg.study.metric,
        echo=echo,
        reclaim=reclaim,
    )
    if not scored_now:
        echo("test set already scored; nothing scored again")
    refused = _register(cfg, context, result)
    _write_report(cfg, study, result, ledger=context.ledger, echo=echo)
    echo(final_line(study, result), final=True)
    if refused is not None:  # the result is sealed and reported all the same; the next finalize registers it
        raise refused
    return result


def _register(cfg: SweepConfig, context: StudyContext, result: TestResult) -> RegistryError | None:
    """The scored model as the registered model's champion (registry.py), recorded on the study; the refusal
    where the registry refuses it."""
    name = cfg.tracking.registered_model
    if not name:
        return None
    report = (Path(cfg.tracking.reports) / cfg.study.name / "report.html").absolute()
    tracker, parent = context.ledger.tracker, context.ledger.parent_run_id
    where = f"`{report}`, and `report/report.html` in the study's MLflow run `{parent}`"
    try:
        with global_tracking_uri(tracker.uri):  # MLflow resolves the version's models:/ source through it
            registration = register_champion(
                tracker.client, name=name, result=result, parent_run_id=parent, report=where
            )
    except RegistryError as refused:
        return refused
    context.study.set_user_attr(REGISTERED_MODEL_ATTR, registration.to_dict())
    return None


def final_line(study: optuna.Study, result: TestResult) -> str:
    """The test result, and the registered model, version and alias where the model is registered."""
    registration = Registration.from_dict(study.user_attrs.get(REGISTERED_MODEL_ATTR))
    return result_line(result) + (f"; {registration.line()}" if registration else "")


def _write_report(
    cfg: SweepConfig,
    study: optuna.Study,
    result: TestResult | None,
    *,
    ledger: StudyLedger | None,
    echo: Echo,
) -> None:
    """Write the report folder from what is recorded, and log it to the study's parent run (if any)."""
    folder = Path(cfg.tracking.reports) / cfg.study.name
    run_metrics = recorded_trial_metrics(uri=cfg.tracking.uri, experiment=cfg.study.name)
    write_report(folder, study=study, result=result, metric=cfg.study.metric, run_metrics=run_metrics)
    if ledger is not None:
        ledger.log_report_folder(folder)
    echo(f"report: {folder / 'report.html'} (and report.md, test_metrics.json, leaderboard.csv)")
    gain = baseline_gain(study, metric=cfg.study.metric)
    if gain is not None:
        echo(gain_line(gain))


def _recorded_study(cfg: SweepConfig) -> optuna.Study:
    """The stored study, for commands that only read: a missing sqlite file is a missing study, not a new one."""
    if nothing_recorded(cfg.study.storage):
        return _existing_study(cfg, optuna.storages.InMemoryStorage())
    return _existing_study(cfg, make_storage(cfg.study))


def report(cfg: SweepConfig, *, echo: Echo, warn: Echo) -> int:
    """Rewrite the report from the recorded study and test result; never reads or scores the test set.

    Exit 2 where the test set is not scored yet: the report is written all the same, marked so.
    """
    study = _recorded_study(cfg)
    ledger = StudyLedger.recorded(study, uri=cfg.tracking.uri)  # makes no store, experiment or run
    result = recorded_result(study)
    _write_report(cfg, study, result, ledger=ledger, echo=echo)
    if result is None:
        warn(
            f"study {cfg.study.name!r} has no scored test set yet; the report says so "
            "(`mnist-sweep finalize SWEEP` scores it once)"
        )
        return EXIT_BAD_INPUT
    echo(final_line(study, result), final=True)
    return 0


def trials(cfg: SweepConfig, *, echo: Echo, csv_file: str | None, sort: str | None) -> int:
    """Print the leaderboard (Optuna + MLflow), best first by `sort` (default: the study metric)."""
    if csv_file:
        preflight.check_creatable("--csv", csv_file, Path(csv_file))
    study = _recorded_study(cfg)
    run_metrics = recorded_trial_metrics(uri=cfg.tracking.uri, experiment=cfg.study.name)
    rows = leaderboard_rows(study, run_metrics, metric=cfg.study.metric)
    table = leaderboard_table(rows, sort=sort or cfg.study.metric)
    echo(table.to_string(index=False, float_format=lambda v: f"{v:.4g}") if len(table) else "no trials yet", final=True)
    gain = baseline_gain(study, metric=cfg.study.metric)
    if gain is not None:
        echo(gain_line(gain), final=True)
    if csv_file:
        Path(csv_file).parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(csv_file, index=False)
        echo(f"leaderboard: {csv_file}")
    return 0


def ui(cfg: SweepConfig, *, echo: Echo, port: int) -> int:
    """The MLflow UI on the sweep's tracking store, bound to 127.0.0.1, until Ctrl-C."""
    _recorded_study(cfg)
    tracking = cfg.tracking
    serve_mlflow_ui(uri=tracking.uri, artifacts=tracking.artifacts, experiment=cfg.study.name, port=port, echo=echo)
    return 0


def dashboard(cfg: SweepConfig, *, echo: Echo, port: int) -> int:
    """optuna-dashboard on the sweep's Optuna storage, bound to 127.0.0.1, until Ctrl-C."""
    _recorded_study(cfg)
    serve_dashboard(storage=make_storage(cfg.study), study_name=cfg.study.name, port=port, echo=echo)
    return 0
