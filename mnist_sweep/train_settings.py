"""What every trial of a study shares, derived once from the sweep file: the trial code, the lecture's reference
run and `replay` all train with a TrainSettings, and a trial run's params record one (records.RunParams).

Light (no Keras), so the records can name it. Each field is a [train] key of the same name, except `hidden`
([model]) and `monitor` (study.metric): adding a train setting is its [train] key and its field here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from mnist_sweep.config import SweepConfig, TrainConfig, metric_maximizes


@dataclass(frozen=True)
class TrainSettings:
    """How each trial trains; no defaults of its own: `from_config` gives the sweep's."""

    hidden: tuple[int, ...]
    epochs: int
    early_stopping_patience: int
    monitor: str  # what early stopping and the plateau schedule watch, and which epoch counts as best
    lr_schedule: str  # "constant", "cosine" or "plateau"
    plateau_factor: float  # plateau: ReduceLROnPlateau's factor, patience and floor
    plateau_patience: int
    plateau_min_lr: float
    steps_per_execution: int
    precision: str  # a Keras dtype policy: "float32" or "mixed_bfloat16"
    loop: str  # "fit", or "compiled": each epoch one XLA loop under TensorFlow (compiled_loop.py)

    @classmethod
    def from_config(cls, cfg: SweepConfig) -> TrainSettings:
        train = {
            f.name: getattr(cfg.train, f.name) for f in dataclasses.fields(cls) if f.name in TrainConfig.model_fields
        }
        return cls(hidden=tuple(cfg.model.hidden), monitor=cfg.study.metric, **train)

    @property
    def monitor_maximizes(self) -> bool:
        return metric_maximizes(self.monitor)
