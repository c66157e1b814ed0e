"""The network and optimizers follow the one list of names and MNIST's one shape."""

from __future__ import annotations

import pytest

from mnist_sweep.config import OPTIMIZERS
from mnist_sweep.data import IMAGE_SIDE, NUM_CLASSES
from mnist_sweep.model import build_model, build_optimizer


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_a_sweep_file_accepts_builds(name: str) -> None:
    assert build_optimizer(name=name, learning_rate=1e-3, momentum=0.5) is not None


def test_an_unknown_optimizer_names_the_ones_a_sweep_file_accepts() -> None:
    with pytest.raises(ValueError, match=f"optimizer must be one of {', '.join(OPTIMIZERS)}, got 'lion'"):
        build_optimizer(name="lion", learning_rate=1e-3)


def test_the_network_takes_mnist_images_and_scores_every_digit() -> None:
    model = build_model(hidden=[8], activation="relu")
    assert tuple(model.input_shape) == (None, IMAGE_SIDE, IMAGE_SIDE)
    assert tuple(model.output_shape) == (None, NUM_CLASSES)
