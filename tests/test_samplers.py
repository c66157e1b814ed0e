"""The table of engines and samplers: every name it offers builds its class and runs a real sweep; a name it
does not offer is refused in one line; a sampler whose package is missing is refused before any trial."""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path

import optuna
import pytest
from mlflow.tracking import MlflowClient

from mnist_sweep.config import StudyConfig, build_config
from mnist_sweep.data import Split
from mnist_sweep.errors import ConfigError, PreflightError
from mnist_sweep.samplers import ENGINE_TRAITS, ENGINES, OPTUNA_SAMPLERS, check_installed
from mnist_sweep.study import SAMPLER_TAG, make_sampler, new_study_policy
from tests.conftest import DEFAULT_SWEEP, REPO, cli, created_files, required_module
from tests.test_trial_loop import Sweep, split, sweep_config

__all__ = ["split"]  # the fixture, shared with test_trial_loop.py

BUILT = {
    "tpe": optuna.samplers.TPESampler,
    "random": optuna.samplers.RandomSampler,
    "gp": optuna.samplers.GPSampler,
    "cmaes": optuna.samplers.CmaEsSampler,
}


def study_with(sampler: str, engine: str = "optuna") -> StudyConfig:
    return build_config({"study": {"engine": engine, "sampler": sampler}}).study


def test_each_optuna_name_builds_its_sampler_and_only_tpe_lies() -> None:
    assert set(OPTUNA_SAMPLERS) == set(BUILT)
    for name, expected in BUILT.items():
        study = study_with(name)
        assert type(make_sampler(study, seed_offset=0, constant_liar=True)) is expected, name
        assert new_study_policy(study).constant_liar is (name == "tpe"), name
    for oracle in ENGINES["keras-tuner"]:
        assert new_study_policy(study_with(oracle, "keras-tuner")).constant_liar is False


def test_a_name_the_table_lacks_never_falls_back_to_another_sampler() -> None:
    # Config refuses it (below); were one to slip past, make_sampler must fail, not quietly run TPE.
    study = StudyConfig.model_construct(**{**study_with("tpe").__dict__, "sampler": "grid"})
    with pytest.raises(KeyError):
        make_sampler(study, seed_offset=0, constant_liar=False)


def test_each_engine_defaults_to_a_sampler_it_offers_and_the_config_takes_its_defaults() -> None:
    assert set(ENGINE_TRAITS) == set(ENGINES)
    for engine, traits in ENGINE_TRAITS.items():
        assert traits.default_sampler in ENGINES[engine]
        study = build_config({"study": {"engine": engine}}).study
        assert (study.sampler, study.pruner) == (traits.default_sampler, traits.default_pruner)


@pytest.mark.parametrize(
    ("engine", "sampler", "offered"),
    [
        ("optuna", "grid", "tpe, random, gp, cmaes"),
        ("optuna", "hyperband", "tpe, random, gp, cmaes (set study.engine = 'keras-tuner' to use it)"),
        ("keras-tuner", "cmaes", "random, bayesian, hyperband (set study.engine = 'optuna' to use it)"),
        ("keras-tuner", "grid", "random, bayesian, hyperband"),
    ],
)
def test_an_unknown_sampler_is_one_line_naming_the_key_value_and_the_names(
    engine: str, sampler: str, offered: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        study_with(sampler, engine)
    message = str(caught.value)
    assert message.endswith(
        f"study.sampler = {sampler!r} is not a sampler of study.engine = {engine!r}, which offers {offered}"
    )
    assert "\n" not in message


def test_a_sampler_whose_package_is_missing_is_refused_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed: find_spec answers None
    with pytest.raises(PreflightError) as caught:
        check_installed(study_with("gp"))
    assert str(caught.value) == (
        "study.sampler = 'gp' needs the Python package torch, which is not installed (pip install -e '.[torch]'); "
        "or choose another sampler: tpe, random, cmaes"
    )
    check_installed(study_with("tpe"))  # nothing extra to need


@pytest.mark.subprocess
@pytest.mark.slow
def test_run_with_gp_and_no_torch_exits_2_before_any_trial(tmp_path: Path, mnist_dir: Path) -> None:
    hide = tmp_path / "hide-torch"  # torch hidden from the CLI, whether or not it is installed here
    hide.mkdir()
    (hide / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None\n")
    work = tmp_path / "work"
    work.mkdir()

    result = cli(
        "run",
        str(DEFAULT_SWEEP),
        "--trials",
        "2",
        "--set",
        'study.sampler="gp"',
        cwd=work,
        data=mnist_dir,
        env={"PYTHONPATH": f"{hide}:{REPO}"},
    )

    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "mnist-sweep: study.sampler = 'gp' needs the Python package torch, which is not installed "
        "(pip install -e '.[torch]'); or choose another sampler: tpe, random, cmaes"
    ]
    assert created_files(work) == []


def sweep_with(sampler: str, tmp_path: Path, split: Split) -> Sweep:
    """A real 3-trial sweep (1 epoch, synthetic images) whose trials `sampler` chooses; run, then returned."""
    cfg = sweep_config(tmp_path, f'study.sampler="{sampler}"', "study.trials=3")
    sweep = Sweep(cfg, split)
    assert sweep.run() == 3
    return sweep


def check_chosen_by(sweep: Sweep, expected: type[optuna.samplers.BaseSampler]) -> None:
    assert type(sweep.study.sampler) is expected
    trials = sweep.study.get_trials()
    assert [t.state for t in trials] == [optuna.trial.TrialState.COMPLETE] * 3
    client = MlflowClient(tracking_uri=sweep.cfg.tracking.uri)
    for trial in trials:
        assert client.get_run(trial.user_attrs["mlflow_run_id"]).data.tags[SAMPLER_TAG] == expected.__name__
    assert len({repr(sorted(t.params.items())) for t in trials}) == 3  # it drew, not repeated one point


@pytest.mark.slow
def test_a_cmaes_sweep_runs_its_trials_with_cmaes(tmp_path: Path, split: Split) -> None:
    required_module("cmaes", "cmaes is not installed: pip install -e . (a dependency of mnist-sweep)")
    # CMA-ES hands the categorical keys to its independent sampler by design: no warning per key and trial
    # (Optuna logs it, rather than warning).
    said: list[str] = []
    listener = logging.Handler()
    listener.emit = lambda record: said.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("optuna").addHandler(listener)
    try:
        sweep = sweep_with("cmaes", tmp_path, split)
    finally:
        logging.getLogger("optuna").removeHandler(listener)
    assert not [line for line in said if "independently" in line], said
    check_chosen_by(sweep, optuna.samplers.CmaEsSampler)


@pytest.mark.slow
def test_a_gp_sweep_runs_its_trials_with_gp(tmp_path: Path, split: Split) -> None:
    if importlib.util.find_spec("torch") is None:  # an optional extra, as for the torch backend's tests
        pytest.skip("torch is not installed: pip install -e '.[torch]' (GPSampler needs it)")
    check_chosen_by(sweep_with("gp", tmp_path, split), optuna.samplers.GPSampler)
