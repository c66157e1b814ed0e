"""What a run's artifacts are made of: the confusion matrix and per-class metrics as files (JSON, CSV, PNG, HTML),
and a trained Keras model saved into its MLflow logged model with its checksum. The ledger (ledger.StudyLedger)
decides which run they go to and when."""

from __future__ import annotations

import contextlib
import csv
import functools
import io
import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from mnist_sweep import environment
from mnist_sweep.data import IMAGE_SIDE, NUM_CLASSES, file_sha256
from mnist_sweep.figures import confusion_matrix_html, confusion_matrix_png
from mnist_sweep.metrics import ClassificationReport
from mnist_sweep.workarounds import saved_as_uncompiled

if TYPE_CHECKING:
    import keras

# What ModelWriter writes: MLflow's keras flavor, Keras' own .keras zip, never a TF SavedModel.
MODEL_FILE = Path("data") / "model.keras"


def report_files(report: ClassificationReport, *, prefix: str, title: str) -> dict[str, bytes]:
    """The confusion matrix (JSON, CSV, PNG, HTML) and the per-class metrics, by file name."""
    matrix = report.matrix
    title = f"{title} confusion matrix"
    counts = {"labels": list(range(matrix.shape[0])), "rows": "true", "columns": "predicted"}
    return {
        f"{prefix}_confusion_matrix.json": json.dumps({**counts, "counts": matrix.tolist()}).encode(),
        f"{prefix}_confusion_matrix.csv": _matrix_csv(matrix).encode(),
        f"{prefix}_per_class_metrics.csv": _csv_text(report.per_class_rows()).encode(),
        f"{prefix}_confusion_matrix.png": confusion_matrix_png(matrix, title=title),
        f"{prefix}_confusion_matrix.html": confusion_matrix_html(matrix, title=title).encode(),
    }


def _csv_text(rows: Iterable[Mapping[str, Any]]) -> str:
    rows = list(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _matrix_csv(matrix: np.ndarray[Any, Any]) -> str:
    header = "true\\predicted," + ",".join(str(k) for k in range(matrix.shape[1]))
    body = [f"{k}," + ",".join(str(int(v)) for v in row) for k, row in enumerate(matrix)]
    return "\n".join([header, *body]) + "\n"


class ModelWriter:
    """Saves trained models into their reserved MLflow logged models (StudyLedger.reserve_model)."""

    def __init__(self, client: MlflowClient, *, uri: str, keep_optimizer: bool) -> None:
        self.client = client
        self.uri = uri
        self.keep_optimizer = keep_optimizer

    @functools.cached_property
    def _requirements(self) -> list[str]:
        # Computed at the first model, so `report` and `trials` never import Keras and TensorFlow.
        return model_pip_requirements()

    def save(self, run_id: str, model: keras.Model, model_id: str) -> str:
        """Save `model` into its logged model, logged by run `run_id`; returns its file's sha256."""
        from mlflow.models import Model

        name = self.client.get_logged_model(model_id).name
        flavor = _ChecksummedKeras()
        # Model.log takes the run id, so the run is not resumed as the active run around it (0.03 s).
        with saved_as_uncompiled(model, keep_optimizer=self.keep_optimizer), global_tracking_uri(self.uri):
            Model.log(
                artifact_path=None,
                name=name,
                flavor=flavor,
                run_id=run_id,
                model_id=model_id,
                model=model,
                pip_requirements=self._requirements,
                signature=_model_signature(),
            )
        return flavor.sha256


class _ChecksummedKeras:
    """mlflow.keras as the flavor Model.log saves with, noting the sha256 of the model file it wrote, before the
    upload: finalize checks the file it downloads against it (final.load_scored_model)."""

    __name__ = "mlflow.keras"

    def __init__(self) -> None:
        self.sha256 = ""

    def save_model(self, path: str, **kwargs: Any) -> None:
        import mlflow.keras

        mlflow.keras.save_model(path=path, **kwargs)
        self.sha256 = file_sha256(Path(path) / MODEL_FILE)


def model_pip_requirements() -> list[str]:
    """Explicit requirements: inferring them spawns a subprocess that costs ~10 s per model.

    The backend's package is the one the model was trained with (tensorflow, jax or torch): a model
    saved under JAX reloads without TensorFlow.
    """
    import keras

    backend = keras.backend.backend()
    packages = {"jax": ["jax", "jaxlib"]}.get(backend, [environment.BACKEND_PACKAGES.get(backend, backend)])
    requirements = [f"mlflow=={mlflow.__version__}", f"keras=={keras.__version__}"]
    for package in [*packages, "numpy"]:
        installed = environment.package_version(package)
        # A local build label (torch's "+cpu") names no release on PyPI.
        requirements.append(package if installed == "not installed" else f"{package}=={installed.split('+')[0]}")
    return requirements


def _model_signature() -> Any:
    """float32 images (N, 28, 28) in, (N, 10) probabilities out.

    The input is unnamed: a named tensor makes pyfunc (and so `mlflow models serve`) hand the model a dict
    {name: images}, which a Sequential model refuses.
    """
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, IMAGE_SIDE, IMAGE_SIDE))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, NUM_CLASSES), "probabilities")]),
    )


@contextlib.contextmanager
def global_tracking_uri(uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking URI set to `uri` only within, for the MLflow calls that read it: Model.log
    uploads through it, and a models:/ URI is resolved through it (whatever tracking_uri is passed)."""
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None  # type: ignore[no-untyped-call]
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)  # type: ignore[arg-type]  # None: unset again, as MLflow's own helper does
