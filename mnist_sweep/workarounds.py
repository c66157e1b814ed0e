"""Workarounds that reach into third-party internals, all in this one module.

Each was written for the versions in WRITTEN_FOR; tests/test_workarounds.py fails when the installed
versions differ or an internal has moved, so an upgrade is checked here, not discovered as a slow leak.
Each warns (WorkaroundSkipped) when it cannot apply, and the sweep goes on without it.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import keras

WRITTEN_FOR = {"tensorflow": "2.21", "keras": "3.15"}  # major.minor


class WorkaroundSkipped(UserWarning):
    """A workaround could not apply: the internal it needs is not where it was."""


# --------------------------------------------------------------------------- TensorFlow's gradient registry


class TracedGradients:
    """Work around a TensorFlow leak: ~14 MiB per trial, so memory grew without bound over a sweep.

    Every trace of Keras' train step registers a `tf.custom_gradient` (from the optimizer's all-reduce of
    gradients) in TensorFlow's global gradient registry, which keeps that trial's whole traced graph alive
    forever; clear_session() does not remove it. After clear_session nothing can use an earlier trial's
    graphs, so their entries go. The first call notes what was registered before any trial; `forget`
    drops that note. Other backends have no such registry.
    """

    def __init__(self) -> None:
        self._before_first_trial: set[str] | None = None

    def drop_since_first_trial(self) -> None:
        """Call after keras.backend.clear_session(), before each trial."""
        registry = gradient_registry()
        if registry is None:
            return
        if self._before_first_trial is None:
            self._before_first_trial = set(registry)
            return
        before = self._before_first_trial
        for name in [n for n in registry if n.startswith("CustomGradient-") and n not in before]:
            del registry[name]

    def forget(self) -> None:
        self._before_first_trial = None


def gradient_registry() -> dict[str, Any] | None:
    """TensorFlow's registry of gradient functions (private), or None: another backend, or it moved (warned)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return None
    try:
        from tensorflow.python.framework import ops

        registry = ops.gradient_registry._registry
    except (ImportError, AttributeError) as exc:
        _skipped(f"TensorFlow's gradient registry is not at ops.gradient_registry._registry ({exc})")
        return None
    if not isinstance(registry, dict):
        _skipped(f"TensorFlow's ops.gradient_registry._registry is a {type(registry).__name__}, not a dict")
        return None
    return registry


# --------------------------------------------------------------------------- saving a model without its optimizer


@contextlib.contextmanager
def saved_as_uncompiled(model: keras.Model, *, keep_optimizer: bool) -> Iterator[None]:
    """Within, unless `keep_optimizer`, the model saves as if uncompiled: architecture and weights only.

    Keras 3's .keras format always saves a compiled model's optimizer (it ignores include_optimizer), so
    `model.optimizer` and `model.compiled` are flipped for the save and restored after it. The model loads
    back uncompiled; scoring it needs predict only.
    """
    if keep_optimizer:
        yield
        return
    if not (hasattr(model, "compiled") and hasattr(model, "optimizer")):
        _skipped("the Keras model has no `compiled`/`optimizer` attribute: it is saved with its optimizer state")
        yield
        return
    if not model.compiled:
        yield
        return
    optimizer = model.optimizer
    model.optimizer, model.compiled = None, False
    try:
        yield
    finally:
        model.optimizer, model.compiled = optimizer, True


def _skipped(what: str) -> None:
    warnings.warn(f"mnist-sweep workaround skipped: {what}", WorkaroundSkipped, stacklevel=3)
