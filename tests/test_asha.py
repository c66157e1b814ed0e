"""ASHA's promotion rule on real Optuna studies with made-up values (no training), its claim between workers, and
the scheduler the sweep file chooses."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from mnist_sweep.asha import EPOCHS_ATTR, PROMOTED_FROM_ATTR, RUNG_ATTR, AshaScheduler, Rungs, claim, promotable
from mnist_sweep.config import SweepConfig, build_config
from mnist_sweep.keras_tuner_engine import SEED_FOR_ZERO
from mnist_sweep.records import EPOCHS_TRAINED_ATTR, FIT_SECONDS_ATTR
from mnist_sweep.scheduler import OraclePlanScheduler, PrunerScheduler, make_scheduler
from mnist_sweep.space import sample_params
from tests.conftest import REPO, required_mnist
from tests.finished_sweep import ARGS, SWEEP, run_sweep

SPACE = {"search": {"optimizer": ["adam", "nadam"], "learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}}
assert SEED_FOR_ZERO  # keras-tuner's engine imports cleanly beside the schedulers


def scheduler(first: int = 1, factor: int = 3, last: int = 9) -> AshaScheduler:
    return AshaScheduler(Rungs(first=first, factor=factor, last=last), maximize=True)


def study_at(storage: str | None = None) -> optuna.Study:
    return optuna.create_study(
        study_name="asha", storage=storage, direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0)
    )


def finish(study: optuna.Study, asha: AshaScheduler, value: float) -> optuna.trial.FrozenTrial:
    """One trial as the trial run makes it: placed by the scheduler, its values sampled, told `value`."""
    trial = study.ask()
    asha.trial_begins(trial)
    sample_params(trial, build_config(SPACE).search)
    return study.tell(trial, value)


def test_rungs_grow_by_the_factor_and_the_last_is_train_epochs() -> None:
    rungs = Rungs(first=1, factor=3, last=20)
    assert [rungs.epochs(r) for r in range(5)] == [1, 3, 9, 20, 20]
    assert [rungs.epochs_for(r, None) for r in range(4)] == [1, 3, 9, 20]  # nothing measured: the epochs' rungs


def test_a_seconds_rung_gives_a_dearer_configuration_fewer_epochs() -> None:
    rungs = Rungs(first=1, factor=3, last=20, seconds=12.0)
    assert (rungs.epochs_for(0, 2.0), rungs.epochs_for(0, 4.0)) == (6, 3)  # batch 256 and batch 64, say
    assert (rungs.epochs_for(1, 4.0), rungs.epochs_for(2, 4.0)) == (9, 20)  # 36 s; 108 s, capped at train.epochs
    assert rungs.epochs_for(1, 30.0, after=3) == 4  # a promotion trains at least one epoch more than its source


def test_a_trial_is_promoted_once_it_is_in_the_top_third_of_its_rung() -> None:
    study, asha = study_at(), scheduler()
    first, second = finish(study, asha, 0.5), finish(study, asha, 0.9)
    assert (first.user_attrs[RUNG_ATTR], second.user_attrs[RUNG_ATTR]) == (0, 0)  # 2 // 3 = 0 may go on
    finish(study, asha, 0.7)
    promoted = finish(study, asha, 0.0)  # 3 done at rung 0: the best of them (0.9) goes on as this trial
    assert promoted.user_attrs[RUNG_ATTR] == 1
    assert promoted.user_attrs[PROMOTED_FROM_ATTR] == second.number
    assert promoted.params == second.params  # its values are the source's, not the sampler's
    assert promoted.system_attrs["fixed_params"] == second.params  # as an enqueued trial's: the sampler drew none


def test_an_enqueued_trial_keeps_its_values_and_is_never_made_a_promotion() -> None:
    study, asha = study_at(), scheduler()
    for value in (0.1, 0.2, 0.9):
        finish(study, asha, value)
    study.enqueue_trial({"optimizer": "nadam", "learning_rate": 0.005})  # as a redo of a lost trial is
    redo = study.ask()
    asha.trial_begins(redo)
    assert redo.user_attrs == {RUNG_ATTR: 0}
    assert sample_params(redo, build_config(SPACE).search)["learning_rate"] == 0.005


def done(study: optuna.Study, value: float, rung: int, promoted_from: int | None = None) -> None:
    attrs = {RUNG_ATTR: rung, PROMOTED_FROM_ATTR: promoted_from}
    study.add_trial(optuna.create_trial(value=value, user_attrs=attrs))


def test_with_a_seconds_budget_a_trial_trains_what_its_batch_size_affords(tmp_path: Path) -> None:
    """Rung 0 is 12 s: a new batch-64 trial gets 12 s over the median seconds per epoch of the batch-64 trials, a
    promotion its source's own cost per epoch."""
    asha = AshaScheduler(Rungs(first=1, factor=3, last=20, seconds=12.0), maximize=True)
    study = study_at(f"sqlite:///{tmp_path}/optuna.db")
    batch = optuna.distributions.CategoricalDistribution((64, 256))
    for number, (size, seconds, value) in enumerate(((64, 8.0, 0.5), (64, 12.0, 0.6), (256, 4.0, 0.9))):
        attrs = {RUNG_ATTR: 0, FIT_SECONDS_ATTR: seconds, EPOCHS_TRAINED_ATTR: 2, EPOCHS_ATTR: 2}
        study.add_trial(
            optuna.create_trial(
                value=value, params={"batch_size": size}, distributions={"batch_size": batch}, user_attrs=attrs
            )
        )
        assert study.get_trials()[number].params["batch_size"] == size
    promoted = study.ask()
    asha.trial_begins(promoted)
    assert promoted.suggest_categorical("batch_size", (64, 256)) == 256  # the 0.9 goes on
    assert asha.epochs(promoted, default=20) == 18  # 36 s at its own 2 s per epoch
    assert asha.warm_start(promoted) is None  # its source left no model here: it trains from scratch
    study.enqueue_trial({"batch_size": 64}, user_attrs={RUNG_ATTR: 0})
    new = study.ask()
    new.suggest_categorical("batch_size", (64, 256))
    assert asha.epochs(new, default=20) == 2  # 12 s at the batch-64 trials' median 5 s per epoch, rounded
    assert new.user_attrs[EPOCHS_ATTR] == 2


def test_the_highest_rung_goes_first_best_first_and_a_promoted_trial_is_not_promoted_again() -> None:
    study = study_at()
    for value in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6):  # trials 0-5 at rung 0: its top third is 5 and 4
        done(study, value, rung=0)
    for value, source in ((0.7, 5), (0.8, 4), (0.75, 3)):  # trials 6-8 at rung 1: its top third is 7
        done(study, value, rung=1, promoted_from=source)
    done(study, 0.1, rung=1)  # trial 9: a failed claim's leftover (None) claims nothing
    done(study, 0.95, rung=0)  # trial 10: rung 0's best now, with 5 the top third of its 7
    ranked = promotable(study.get_trials(), Rungs(first=1, factor=3, last=9), maximize=True)
    assert [t.number for t in ranked] == [7, 10]  # 5 has gone on already (as 6)


def test_the_top_rung_is_never_promoted_and_a_minimizing_study_promotes_the_lowest() -> None:
    asha = AshaScheduler(Rungs(first=1, factor=2, last=2), maximize=False)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.RandomSampler(seed=0))
    for value in (0.3, 0.1):
        finish(study, asha, value)
    promoted = finish(study, asha, 0.05)
    assert promoted.user_attrs[PROMOTED_FROM_ATTR] == 1  # the lower loss
    finish(study, asha, 0.2)  # rung 1 (the top) holds one trial: nothing above it to go to
    top = [t for t in promotable(study.get_trials(), asha.rungs, maximize=False) if t.user_attrs[RUNG_ATTR] == 1]
    assert top == []


def test_a_second_claim_on_the_same_trial_loses_and_leaves_no_claim(tmp_path: Path) -> None:
    """Two workers (two storage connections) decide at the same moment to promote the same trial."""
    url = f"sqlite:///{tmp_path}/optuna.db"
    study, asha = study_at(url), scheduler()
    for value in (0.1, 0.2, 0.9):
        finish(study, asha, value)
    source = study.get_trials()[2]
    other = optuna.load_study(study_name="asha", storage=url)
    mine, theirs = study.ask(), other.ask()
    assert claim(mine, source)
    assert not claim(theirs, source)
    assert theirs.user_attrs[PROMOTED_FROM_ATTR] is None  # given up: it claims nothing
    assert promotable(other.get_trials(), asha.rungs, maximize=True) == []  # 2 is the one of rung 0's top third


WORKER = """
import sys, optuna
from mnist_sweep.asha import AshaScheduler, Rungs
from mnist_sweep.config import SweepConfig, build_config
from mnist_sweep.space import sample_params
sampler = optuna.samplers.RandomSampler(seed=int(sys.argv[2]))
study = optuna.load_study(study_name="asha", storage=sys.argv[1], sampler=sampler)
asha = AshaScheduler(Rungs(first=1, factor=2, last=16), maximize=True)
search = build_config({"search": {"learning_rate": {"low": 1e-4, "high": 1e-2, "log": True}}}).search
for _ in range(int(sys.argv[3])):
    trial = study.ask()
    asha.trial_begins(trial)
    params = sample_params(trial, search)
    study.tell(trial, params["learning_rate"] * (1 + trial.user_attrs["asha_rung"]))
"""


@pytest.mark.slow
@pytest.mark.subprocess
def test_two_real_workers_never_promote_the_same_trial_twice(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/optuna.db"
    study_at(url)
    workers = [
        subprocess.Popen([sys.executable, "-c", WORKER, url, str(seed), "25"], cwd=REPO, stderr=subprocess.PIPE)
        for seed in (1, 2)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err.decode()[-2000:]
    trials = optuna.load_study(study_name="asha", storage=url).get_trials()
    assert all(t.state == TrialState.COMPLETE for t in trials) and len(trials) == 50
    sources = [t.user_attrs[PROMOTED_FROM_ATTR] for t in trials if t.user_attrs.get(PROMOTED_FROM_ATTR) is not None]
    assert len(sources) >= 10  # promotions happened, from both workers
    assert len(sources) == len(set(sources)), sorted(sources)
    by_number = {t.number: t for t in trials}
    for trial in trials:
        source = trial.user_attrs.get(PROMOTED_FROM_ATTR)
        if source is not None:
            assert trial.params == by_number[source].params
            assert trial.user_attrs[RUNG_ATTR] == by_number[source].user_attrs[RUNG_ATTR] + 1


@pytest.mark.parametrize(
    ("study", "kind"),
    [
        ({}, PrunerScheduler),
        ({"pruner": "asha"}, AshaScheduler),
        ({"engine": "keras-tuner", "sampler": "random"}, OraclePlanScheduler),
        ({"engine": "keras-tuner", "sampler": "hyperband"}, OraclePlanScheduler),
    ],
)
def test_the_sweep_file_chooses_the_scheduler(study: dict[str, str], kind: type) -> None:
    cfg = build_config({"study": study, "train": {"epochs": 4}})
    assert type(make_scheduler(cfg)) is kind


def test_asha_rungs_come_from_the_sweep_file_and_no_optuna_pruner_runs_beside_it() -> None:
    from mnist_sweep.study import make_pruner

    cfg = build_config(
        {"study": {"pruner": "asha", "pruner_warmup_epochs": 2, "pruner_reduction_factor": 2}, "train": {"epochs": 10}}
    )
    asha = make_scheduler(cfg)
    assert isinstance(asha, AshaScheduler)
    assert [asha.rungs.epochs(r) for r in range(4)] == [2, 4, 8, 10]
    assert isinstance(make_pruner(cfg.study), optuna.pruners.NopPruner)


@pytest.mark.slow
@pytest.mark.subprocess
def test_a_real_asha_sweep_tracks_every_promotion_as_its_own_run(tmp_path: Path) -> None:
    """`mnist-sweep run` with ASHA on 2,000 real images, rungs of 1, 2 and 4 epochs, read back from MLflow and
    Optuna: each promotion a COMPLETE trial and a FINISHED run with its model, going on from its source's epochs,
    its cosine decay down to 1 % at its own last epoch."""
    settings = (
        "study.pruner='asha'",
        "study.pruner_warmup_epochs=1",
        "study.pruner_reduction_factor=2",
        "model.hidden=[64]",
        "study.baseline=false",
    )
    extra = ["--trials", "8", "--epochs", "4", *[a for s in settings for a in ("--set", s)]]
    sweep = run_sweep(tmp_path, required_mnist(), *extra)
    trials = sweep.study().get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    runs = {run.info.run_id: run for run in sweep.trial_runs()}
    assert len(runs) == 8
    client, by_number = sweep.mlflow(), {t.number: t for t in trials}
    promotions = 0
    for trial in trials:
        run = runs[trial.user_attrs["mlflow_run_id"]]
        rung, source = trial.user_attrs[RUNG_ATTR], trial.user_attrs.get(PROMOTED_FROM_ATTR)
        epochs = (1, 2, 4)[rung]
        assert run.info.status == "FINISHED" and run.data.params["epochs"] == str(epochs)
        assert run.data.tags["asha.rung"] == str(rung)
        assert "val_confusion_matrix.json" in {a.path for a in client.list_artifacts(run.info.run_id)}
        assert str(trial.user_attrs["model_uri"]).startswith("models:/")
        first = 0
        if source is not None:
            promotions += 1
            earlier = by_number[source]
            assert trial.params == earlier.params and rung == earlier.user_attrs[RUNG_ATTR] + 1
            assert run.data.tags["asha.promoted_from"] == str(source)
            assert run.data.tags["asha.promoted_from_run"] == earlier.user_attrs["mlflow_run_id"]
            line = rf"trial {trial.number:4d}  COMPLETE .*\)  on from trial {source} to {epochs} epochs  \["
            assert re.search(line, sweep.first.stdout), sweep.first.stdout
            first = (1, 2, 4)[rung - 1]
        rates = client.get_metric_history(run.info.run_id, "learning_rate")
        assert [m.step for m in rates] == list(range(first + 1, epochs + 1))
        assert rates[-1].value == pytest.approx(0.01 * trial.params["learning_rate"], rel=1e-4)
    assert promotions >= 2
    assert "test accuracy 0." in sweep.first.stdout

    # `replay` of the highest promotion goes on from its source run's model, as the sweep did: the same numbers.
    top = max((t for t in trials if PROMOTED_FROM_ATTR in t.user_attrs), key=lambda t: t.user_attrs[RUNG_ATTR])
    source_run = by_number[top.user_attrs[PROMOTED_FROM_ATTR]].user_attrs["mlflow_run_id"]
    replayed = sweep.run("replay", SWEEP, *ARGS, *extra, top.user_attrs["mlflow_run_id"])
    assert replayed.returncode == 0, replayed.stderr
    assert f"went on from run {source_run!r} (an ASHA promotion)" in replayed.stdout
    differences = [float(d) for d in re.findall(r"difference ([-+0-9.e]+)", replayed.stdout)]
    assert len(differences) == 2 and all(abs(d) < 1e-5 for d in differences), replayed.stdout


def test_the_default_sweep_is_asha_and_the_median_file_is_the_old_default_and_bench_runs_both() -> None:
    from mnist_sweep.config import load_sweep
    from tests.test_bench_search import bench_module

    default, before = load_sweep(REPO / "sweeps" / "fcn.toml"), load_sweep(REPO / "sweeps" / "fcn-median.toml")
    differ = {
        (section, key)
        for section, values in before.to_dict().items()
        for key, value in values.items()
        if default.to_dict()[section][key] != value
    }
    inert = {("study", "pruner_startup_trials"), ("study", "pruner_interval_epochs")}  # the median rule's
    assert differ - inert == {
        ("study", "name"),
        ("study", "pruner"),
        ("study", "pruner_warmup_epochs"),
        ("train", "loop"),
        ("tracking", "registered_model"),
    }
    assert (default.train.loop, before.train.loop) == ("compiled", "fit")
    asha = make_scheduler(default)
    assert isinstance(asha, AshaScheduler) and [asha.rungs.epochs(r) for r in range(3)] == [3, 9, 20]
    assert isinstance(make_scheduler(before), PrunerScheduler)
    search = bench_module("search")
    assert search.SWEEP_FILES == {
        search.TODAY: REPO / "sweeps" / "fcn-median.toml",
        search.NEW: REPO / "sweeps" / "fcn.toml",
    }
    assert search.NEW_DEFAULT == []  # the new default is sweeps/fcn.toml as it stands


def test_a_study_keeps_asha_or_keeps_without_it(tmp_path: Path) -> None:
    """Rerunning a study with ASHA switched on or off is refused with the fix: ASHA reads a rung on every trial, and a
    pruner inside the epochs would judge a promotion by its short segment. A study from before the record: its trials
    say which it was."""
    from mnist_sweep.errors import StudyMismatchError
    from mnist_sweep.study import open_study

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = optuna.storages.RDBStorage(url)

    def sweep(name: str, pruner: str) -> SweepConfig:
        return build_config({"study": {"name": name, "storage": url, "pruner": pruner}, "train": {"epochs": 9}})

    assert open_study(sweep("fcn", "median"), storage)[1]
    with pytest.raises(
        StudyMismatchError,
        match=r"'fcn' .* was run with a pruner inside each trial's epochs .* says "
        r"study.pruner = 'asha'; use a new study name \(--set study.name=fcn-asha\) or --set study.pruner=median",
    ):
        open_study(sweep("fcn", "asha"), storage)
    assert not open_study(sweep("fcn", "none"), storage)[1]  # pruning off: still every trial to train.epochs
    assert open_study(sweep("fcn-asha", "asha"), storage)[1]
    with pytest.raises(StudyMismatchError, match=r"run with study.pruner = 'asha' .* or --set study.pruner=asha"):
        open_study(sweep("fcn-asha", "median"), storage)

    older = optuna.create_study(study_name="older", storage=storage, direction="maximize")  # no record of it
    assert not open_study(sweep("older", "asha"), storage)[1]  # no trials yet: it takes either
    older.add_trial(optuna.trial.create_trial(value=0.9, user_attrs={RUNG_ATTR: 0}))
    with pytest.raises(StudyMismatchError, match="'older' .* run with study.pruner = 'asha'"):
        open_study(sweep("older", "median"), storage)


def test_a_first_rung_at_train_epochs_is_one_rung_said_and_nothing_goes_on() -> None:
    """`--epochs 1` on an ASHA sweep file (the shrunk default sweep of the integration tests) runs, one rung."""
    from mnist_sweep.asha import one_rung_notice

    shrunk = build_config({"study": {"pruner": "asha", "pruner_warmup_epochs": 3}, "train": {"epochs": 1}})
    assert one_rung_notice(shrunk) == (
        "study.pruner = 'asha' with pruner_warmup_epochs = 3 and train.epochs = 1: one rung, every trial trains 1 "
        "epoch(s) and none goes on"
    )
    assert one_rung_notice(build_config({"study": {"pruner": "asha", "pruner_warmup_epochs": 3}})) is None
    assert one_rung_notice(build_config({"train": {"epochs": 1}})) is None  # the median pruner: nothing to say
    study, asha = study_at(), make_scheduler(shrunk)
    assert isinstance(asha, AshaScheduler) and asha.rungs.epochs_for(0, None) == 1
    for value in (0.5, 0.9, 0.7, 0.8):
        assert finish(study, asha, value).user_attrs[RUNG_ATTR] == 0
    assert promotable(study.get_trials(), asha.rungs, maximize=True) == []
    assert all(PROMOTED_FROM_ATTR not in t.user_attrs for t in study.get_trials())


def test_a_promoted_models_epochs_count_the_trials_it_went_on_from_in_the_leaderboard() -> None:
    """A promotion records its own segment (11 epochs from 9 to 20); its model, the report's epochs, has 20."""
    from mnist_sweep.asha import lineage, model_epochs
    from mnist_sweep.report import leaderboard_rows

    study = study_at()
    made = [(0.95, {RUNG_ATTR: 0, EPOCHS_TRAINED_ATTR: 3}), (0.97, {RUNG_ATTR: 1, EPOCHS_TRAINED_ATTR: 6})]
    made += [(0.98, {RUNG_ATTR: 2, EPOCHS_TRAINED_ATTR: 11}), (0.90, {RUNG_ATTR: 0, EPOCHS_TRAINED_ATTR: 3})]
    for number, (value, attrs) in enumerate(made):
        source = {PROMOTED_FROM_ATTR: number - 1} if attrs[RUNG_ATTR] else {}
        study.add_trial(optuna.trial.create_trial(value=value, user_attrs={**attrs, **source}))
    trials = study.get_trials()
    assert [t.number for t in lineage(trials, trials[2])] == [2, 1, 0]
    assert [model_epochs(trials, t) for t in trials] == [3, 9, 20, 3]
    rows = leaderboard_rows(study, {}, metric="val_accuracy")
    assert [(row["trial"], row["epochs"]) for row in rows] == [(2, 20), (1, 9), (0, 3), (3, 3)]
