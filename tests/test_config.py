"""The sweep file: defaults, overrides, and one clear line for each kind of bad input."""

from __future__ import annotations

import dataclasses
import tracemalloc
from pathlib import Path

import optuna
import pytest

from mnist_sweep.config import (
    Choice,
    ConfigError,
    Hyperparameters,
    Range,
    SearchConfig,
    StudyConfig,
    SweepConfig,
    build_config,
    load_sweep,
)
from tests.conftest import DEFAULT_SWEEP, write_sweep


def test_default_sweep_file_is_the_lecture_network_with_the_four_searched_keys() -> None:
    cfg = load_sweep(DEFAULT_SWEEP)
    assert cfg.model.hidden == [500, 500]
    assert cfg.data.validation == 5000
    assert cfg.study.direction == "maximize"
    searched = {name for name, spec in cfg.search.specs().items() if not spec.is_fixed}
    assert {"optimizer", "learning_rate", "batch_size", "activation"} <= searched


def test_defaults_without_a_file_are_the_lecture_space() -> None:
    cfg = build_config({})
    assert cfg.search.optimizer == Choice(("sgd", "adam", "rmsprop"))
    assert cfg.search.learning_rate == Range(low=1e-4, high=0.3, log=True, integer=False)
    assert cfg.search.batch_size == Choice((32, 64, 128, 256))
    assert cfg.train.lr_schedule == "constant" and cfg.search.dropout == Choice((0.0,))


def test_empty_file_takes_every_default(tmp_path: Path) -> None:
    cfg = load_sweep(write_sweep(tmp_path, ""))
    assert cfg.study.trials == 30 and cfg.train.epochs == 10
    assert cfg.tracking.uri == "sqlite:///mlruns/mlflow.db"


def test_overrides_take_toml_values_and_bare_words(tmp_path: Path) -> None:
    cfg = load_sweep(
        DEFAULT_SWEEP,
        [
            "study.trials=3",
            "data.train_limit=2000",
            "study.sampler=random",
            "search.batch_size=[64]",
            "model.hidden=[32]",
        ],
    )
    assert cfg.study.trials == 3 and cfg.data.train_limit == 2000
    assert cfg.study.sampler == "random"
    assert cfg.search.batch_size.is_fixed
    assert cfg.model.hidden == [32]


def test_val_loss_metric_defaults_to_minimize() -> None:
    assert build_config({"study": {"metric": "val_loss"}}).study.direction == "minimize"


def test_direction_is_the_metrics_and_a_file_may_say_it() -> None:
    # One fact: the metric decides it; `direction` in a sweep file (as sweeps/fcn.toml has) is checked, not stored.
    said = build_config({"study": {"metric": "val_loss", "direction": "minimize"}})
    assert said == build_config({"study": {"metric": "val_loss"}})
    assert "direction" not in StudyConfig.model_fields
    shown = said.to_dict()["study"]
    assert list(shown)[2:4] == ["metric", "direction"] and shown["direction"] == "minimize"


def test_engine_defaults_and_the_registered_model_are_filled_in_not_patched_in() -> None:
    cfg = build_config({"study": {"name": "mine", "engine": "keras-tuner"}})
    assert (cfg.study.sampler, cfg.study.pruner, cfg.tracking.registered_model) == ("bayesian", "none", "mine")
    assert SweepConfig() == build_config({})  # built in Python or from a file: the same defaults
    assert SweepConfig().tracking.registered_model == StudyConfig().name


def test_hyperparameters_hold_every_search_key_with_the_fixed_defaults_filled_in() -> None:
    assert [f.name for f in dataclasses.fields(Hyperparameters)] == list(SearchConfig.model_fields)
    point = Hyperparameters.of({"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 64, "activation": "relu"})
    assert (point.dropout, point.weight_decay, point.momentum) == (0.0, 0.0, 0.0)
    assert isinstance(point.batch_size, int) and isinstance(point.learning_rate, float)
    with pytest.raises(KeyError):  # a searched key has no one default to fall back on
        Hyperparameters.of({"optimizer": "adam", "batch_size": 64, "activation": "relu"})


def test_resolved_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = load_sweep(DEFAULT_SWEEP, ["search.dropout={low = 0.0, high = 0.5}"])
    again = load_sweep(write_sweep(tmp_path, cfg.to_toml()))
    assert again == cfg


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"study": {"trails": 3}}, "unknown key 'study.trails'"),
        ({"studdy": {}}, "unknown key 'studdy'"),
        ({"search": {"optimiser": ["adam"]}}, "unknown key 'search.optimiser'"),
        ({"study": {"trials": "many"}}, "study.trials"),
        ({"study": {"trials": 0}}, "study.trials"),
        ({"train": {"epochs": -1}}, "train.epochs"),
        ({"study": {"direction": "max"}}, "study.direction"),
        ({"study": {"metric": "val_accuracy", "direction": "minimize"}}, "contradicts"),
        ({"study": {"sampler": "grid"}}, "study.sampler"),
        ({"study": {"pruner": "hyperband"}}, "study.pruner"),
        ({"study": {"pruner_percentile": 100}}, "study.pruner_percentile"),
        ({"study": {"pruner_reduction_factor": 1}}, "study.pruner_reduction_factor"),
        ({"study": {"pruner": "successive_halving", "pruner_warmup_epochs": 0}}, "pruner_warmup_epochs"),
        ({"study": {"metric": "accuracy"}}, "study.metric"),
        ({"study": {"name": "a/b"}}, "study.name"),
        ({"search": {"optimizer": []}}, "empty"),
        ({"search": {"optimizer": ["adamax"]}}, "'adamax'"),
        ({"search": {"activation": "swish"}}, "'swish'"),
        ({"search": {"learning_rate": {"low": 0.5, "high": 0.1}}}, "low must be <= high"),
        ({"search": {"learning_rate": {"low": 0.0, "high": 0.1, "log": True}}}, "low > 0"),
        ({"search": {"learning_rate": {"low": 0.1}}}, "needs both low and high"),
        ({"search": {"batch_size": [0, 32]}}, "search.batch_size"),
        ({"search": {"batch_size": 12.5}}, "integer"),
        ({"search": {"optimizer": {"low": 1, "high": 2}}}, "categorical"),
        ({"search": {"dropout": 1.0}}, "search.dropout"),
        ({"model": {"hidden": []}}, "model.hidden"),
        ({"model": {"hidden": [500, 0]}}, "model.hidden"),
        ({"data": {"validation": 60000}}, "data.validation"),
        ({"data": {"validation": 5000, "train_limit": 56000}}, "data.train_limit"),
        ({"study": {"storage": "redis://localhost"}}, "study.storage"),
        ({"tracking": {"uri": "ftp://x"}}, "tracking.uri"),
    ],
)
def test_bad_values_name_the_key_and_value(document: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(document, origin="sweep.toml")
    message = str(caught.value)
    assert expected in message
    assert message.startswith("sweep.toml: ")
    assert "\n" not in message


def test_malformed_toml_names_the_file(tmp_path: Path) -> None:
    path = write_sweep(tmp_path, "[study\nname = 'x'\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_sweep(path)


def test_missing_sweep_file() -> None:
    with pytest.raises(ConfigError, match="sweep file not found"):
        load_sweep("does/not/exist.toml")


def test_a_huge_sweep_file_is_refused_having_read_at_most_1_mib(tmp_path: Path) -> None:
    """A 256 MiB (sparse) file named as the sweep file: reading stops one byte past the limit."""
    path = tmp_path / "huge.toml"
    with open(path, "wb") as handle:
        handle.truncate(1 << 28)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match="huge.toml: over 1 MiB"):
            load_sweep(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, f"{peak / 2**20:.0f} MiB held to refuse it"


@pytest.mark.parametrize("assignment", ["trials=3", "study.=3", "study.trials"])
def test_bad_override_syntax(assignment: str) -> None:
    with pytest.raises(ConfigError, match="--set takes section.key=value"):
        load_sweep(DEFAULT_SWEEP, [assignment])


@pytest.mark.parametrize(
    ("study", "pruner_type", "checks"),
    [
        ({"pruner": "none"}, "NopPruner", {}),
        (
            {"pruner": "median", "pruner_warmup_epochs": 2},
            "PercentilePruner",
            {"_percentile": 50.0, "_n_warmup_steps": 2},
        ),
        ({"pruner": "percentile", "pruner_percentile": 25}, "PercentilePruner", {"_percentile": 25.0}),
        (
            {"pruner": "successive_halving", "pruner_warmup_epochs": 4, "pruner_reduction_factor": 2},
            "SuccessiveHalvingPruner",
            {"_min_resource": 4, "_reduction_factor": 2},
        ),
    ],
)
def test_pruner_keys_reach_optuna(study: dict[str, object], pruner_type: str, checks: dict[str, object]) -> None:
    from mnist_sweep.study import make_pruner

    pruner = make_pruner(build_config({"study": study}).study)
    assert isinstance(pruner, getattr(optuna.pruners, pruner_type))
    assert {name: getattr(pruner, name) for name in checks} == checks
