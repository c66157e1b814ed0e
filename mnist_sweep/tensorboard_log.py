"""A trial's TensorBoard event files (train.tensorboard = true), written by an epoch hook into a folder of its own.

The layout and tags are those of keras.callbacks.TensorBoard (`train/` with epoch_loss, epoch_accuracy and
epoch_learning_rate, `validation/` with epoch_loss and epoch_accuracy), so `tensorboard --logdir` reads a
downloaded run as it reads a Keras one. The steps are the 1-based epochs, as in the trial's MLflow metrics.

Not Keras' callback itself: it writes through `tf.summary`, so it needs TensorFlow, which this tool hides under
the jax and torch backends (environment.prepare_backend); and its batch hook would stop Keras from dispatching
batch callbacks asynchronously. TensorBoard's own writer needs neither. This module knows neither Optuna nor
MLflow: the study uploads the folder to the trial's run.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mnist_sweep.errors import PreflightError

ARTIFACT_PATH = "tensorboard"  # the folder of the trial run's artifacts that holds the event files
# Epoch value -> (TensorBoard run, tag), as keras.callbacks.TensorBoard names them.
TAGS = {
    "loss": ("train", "epoch_loss"),
    "accuracy": ("train", "epoch_accuracy"),
    "learning_rate": ("train", "epoch_learning_rate"),
    "val_loss": ("validation", "epoch_loss"),
    "val_accuracy": ("validation", "epoch_accuracy"),
}
MISSING = (
    "train.tensorboard = true needs the tensorboard package, which is not installed; "
    "pip install 'mnist-sweep[tensorboard]', or set train.tensorboard = false"
)


def check_installed() -> None:
    """Raises PreflightError (exit 2, nothing written) where TensorBoard's event writer cannot be imported."""
    try:
        _writer_parts()
    except ImportError:
        raise PreflightError(MISSING) from None


def _writer_parts() -> tuple[Any, Any, Any]:
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.plugins.scalar.summary_v2 import scalar_pb
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    return Event, scalar_pb, EventFileWriter


class EpochEvents:
    """An epoch hook writing each epoch's numbers as TensorBoard scalars into a temporary folder it owns."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.mkdtemp(prefix="mnist-sweep-tensorboard-"))
        self._event, self._scalar, self._writer_type = _writer_parts()
        self._writers: dict[str, Any] = {}

    def __call__(self, epoch: int, values: Mapping[str, float]) -> None:
        now = time.time()
        for name, value in values.items():
            if name not in TAGS:
                continue
            run, tag = TAGS[name]
            if run not in self._writers:
                self._writers[run] = self._writer_type(str(self.folder / run))
            self._writers[run].add_event(self._event(wall_time=now, step=epoch, summary=self._scalar(tag, value)))

    def close(self) -> Path:
        """Every event on disk; returns the folder (train/, validation/) to upload."""
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
        return self.folder

    def discard(self) -> None:
        self.close()
        shutil.rmtree(self.folder, ignore_errors=True)
