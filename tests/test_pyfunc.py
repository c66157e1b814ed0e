"""Every logged model predicts through MLflow's generic interface (pyfunc), as Keras does, under each backend.

`mlflow models serve`, `mlflow models predict`, batch scoring and `spark_udf` all load a model through pyfunc.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, cli_environment
from tests.test_backends import needs

# In a fresh interpreter under KERAS_BACKEND: a trained model logged as a trial's model, loaded back both ways.
LOG_AND_LOAD = """
import sys
from tests.test_pyfunc import log_and_load_both_ways
log_and_load_both_ways(sys.argv[1])
"""


def log_and_load_both_ways(folder: str) -> None:
    """Log a trained model the way a trial does (Tracker, real sqlite store), load it through pyfunc and through
    Keras, and check pyfunc gives (N, 10) probabilities identical to Keras' own."""
    import keras
    import mlflow
    from mlflow.exceptions import MlflowException

    from mnist_sweep.ledger import StudyLedger
    from mnist_sweep.model import compiled_model
    from mnist_sweep.tracking import Tracker

    tracker = Tracker(uri=f"sqlite:///{folder}/mlflow.db", artifacts=f"{folder}/artifacts", experiment="pyfunc")
    ledger = StudyLedger.create(tracker, study_name="pyfunc", config={})
    run_id = ledger.start_trial_run(trial_number=0, params={})
    rng = np.random.default_rng(0)
    images = rng.random((64, 28, 28), dtype=np.float32)  # float32 in [0, 1]: what the data module hands a model
    model = compiled_model(
        {"optimizer": "adam", "learning_rate": 1e-3, "batch_size": 64, "activation": "relu"},
        (16,),
        schedule="constant",
        total_steps=1,
    )
    model.fit(images, rng.integers(0, 10, 64), epochs=1, verbose=0)
    model_id, model_uri = ledger.reserve_model(run_id)
    ledger.models.save(run_id, model, model_id)

    mlflow.set_tracking_uri(tracker.uri)
    served = mlflow.pyfunc.load_model(model_uri)
    probabilities = served.predict(images)
    assert isinstance(probabilities, np.ndarray) and probabilities.shape == (64, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)
    reloaded = mlflow.keras.load_model(model_uri)
    np.testing.assert_array_equal(probabilities, reloaded.predict(images, verbose=0))
    np.testing.assert_array_equal(probabilities, keras.ops.convert_to_numpy(model.predict(images, verbose=0)))
    # The signature takes float32 images; other dtypes and shapes are refused by MLflow, not guessed at.
    for wrong in (images.astype(np.float64), images.reshape(64, 784)):
        try:
            served.predict(wrong)
        except MlflowException as exc:
            assert "enforce schema" in str(exc)
        else:
            raise AssertionError(f"pyfunc took {wrong.dtype} {wrong.shape}")
    print("pyfunc ok under", keras.backend.backend())


def _in_backend(backend: str, folder: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LOG_AND_LOAD, str(folder)],
        cwd=REPO,
        env=cli_environment(REPO, {"KERAS_BACKEND": backend}),
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_logged_model_predicts_through_pyfunc_as_keras_does(tmp_path: Path) -> None:
    log_and_load_both_ways(str(tmp_path))


@pytest.mark.backend
@pytest.mark.subprocess
def test_a_model_logged_under_jax_predicts_through_pyfunc(tmp_path: Path) -> None:
    needs("jax")
    done = _in_backend("jax", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "pyfunc ok under jax" in done.stdout
