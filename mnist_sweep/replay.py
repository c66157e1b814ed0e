"""Retrain one logged trial from its MLflow run and say how close it came to what was logged.

Everything comes from the run: hyperparameters, network, epochs, the data split (validation size,
training limit, split seed) and the trial's seed; the sweep file only says where MLflow and the
data are. The test set stays sealed throughout. An ASHA promotion went on from an earlier trial's model: it is
replayed from that same logged model, after the epochs that trial trained, as the sweep ran it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from mnist_sweep.asha import PROMOTED_FROM_RUN_TAG
from mnist_sweep.config import SweepConfig, build_config
from mnist_sweep.data import load_split, resolve_source, withholding_test_split
from mnist_sweep.errors import MissingParamError, UsageError
from mnist_sweep.final import load_scored_model
from mnist_sweep.records import MODEL_URI_KEY, RunParams, final_metric
from mnist_sweep.tracking import read_run
from mnist_sweep.trial import WarmStart, run_trial


def replay(cfg: SweepConfig, run_id: str, *, echo: Callable[[str], None]) -> int:
    """Retrain the trial logged as `run_id` and report the differences to its logged metrics."""
    run = read_run(cfg.tracking.uri, run_id)
    params, metrics = run.params, run.metrics
    try:
        logged = RunParams.decode(params)
    except MissingParamError as exc:
        raise UsageError(f"run {run_id!r} is not a finished mnist-sweep trial run (no {exc.args[0]})") from None
    if final_metric("val_accuracy") not in metrics:
        raise UsageError(f"run {run_id!r} is not a finished mnist-sweep trial run (no metrics)")
    # A default fills in only for a key the run lacks; a value it did record is checked as a sweep file's would be.
    build_config({"search": logged.hyperparameters}, origin=f"run {run_id!r} recorded")
    filled = RunParams.filled_in(params)
    if filled:
        shown = ", ".join(f"{key} = {value}" for key, value in filled.items())
        echo(f"run {run_id!r} was logged before these keys were recorded; replayed with their defaults: {shown}")
    split = load_split(
        resolve_source(cfg.data.path),
        validation=logged.data_validation,
        train_limit=logged.data_train_limit,
        seed=logged.data_seed,
    )
    if (len(split.y_train), len(split.y_val)) != (logged.n_train, logged.n_val):
        raise UsageError(f"run {run_id!r} trained on {logged.n_train} images; this data gives {len(split.y_train)}")
    warm_start = _promotion_start(cfg, run_id, run.tags, echo=echo)
    with withholding_test_split():
        outcome = run_trial(
            params=logged.hyperparameters,
            split=split,
            settings=logged.settings,
            seed=logged.seed,
            warm_start=warm_start,
        )
    for name, now in (("val_accuracy", outcome.val_accuracy), ("val_loss", outcome.val_loss)):
        before = metrics[final_metric(name)]
        echo(f"{name}: replayed {now:.6f}, logged {before:.6f}, difference {now - before:+.2e}")
    return 0


def _promotion_start(
    cfg: SweepConfig, run_id: str, tags: Mapping[str, str], *, echo: Callable[[str], None]
) -> WarmStart | None:
    """Where an ASHA promotion went on from (its tag names the earlier run): that run's logged model and epochs."""
    source_id = tags.get(PROMOTED_FROM_RUN_TAG)
    if not source_id:
        return None
    source = read_run(cfg.tracking.uri, source_id)
    model_uri, epochs = source.tags.get(MODEL_URI_KEY), source.params.get("epochs")
    if not model_uri or epochs is None:
        raise UsageError(
            f"run {run_id!r} went on from run {source_id!r} (an ASHA promotion), which has no logged model to "
            "replay it from"
        )
    echo(
        f"run {run_id!r} went on from run {source_id!r} (an ASHA promotion): "
        f"replayed from that run's model after its {epochs} epochs"
    )
    weights = load_scored_model(model_uri, tracking_uri=cfg.tracking.uri).get_weights()
    # ASHA's promotions restart their learning-rate schedule over their own epochs (asha.AshaScheduler.warm_start).
    return WarmStart(weights=weights, initial_epoch=int(epochs), restart_schedule=True)
