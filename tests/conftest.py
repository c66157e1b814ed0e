"""Shared fixtures: real MNIST from ../shared (never downloaded), synthetic arrays, and the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SWEEP = REPO / "sweeps" / "fcn.toml"
SHARED_MNIST = REPO.parent / "shared" / "data" / "mnist"


def mnist_location() -> Path | None:
    """$MNIST_SWEEP_DATA if set, else ../shared/data/mnist beside the checkout."""
    configured = os.environ.get("MNIST_SWEEP_DATA")
    candidate = Path(configured) if configured else SHARED_MNIST
    return candidate if candidate.exists() else None


@pytest.fixture(autouse=True)
def _no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never download: the Keras fallback raises if anything reaches it."""
    import mnist_sweep.data as data

    def refuse() -> str:
        raise AssertionError("a test tried to download MNIST")

    monkeypatch.setattr(data, "_download_keras_npz", refuse)


@pytest.fixture
def mnist_dir() -> Path:
    location = mnist_location()
    if location is None:
        pytest.skip("no MNIST files: set MNIST_SWEEP_DATA or lay ../shared/data/mnist beside the checkout")
    return location


@pytest.fixture
def synthetic_mnist() -> tuple[np.ndarray, np.ndarray]:
    """1,200 MNIST-shaped uint8 images whose class is written in their brightest row: learnable."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, size=1200)
    images = rng.integers(0, 40, size=(1200, 28, 28), dtype=np.uint8)
    for index, label in enumerate(labels):
        images[index, 2 + 2 * label, :] = 255
    return images, labels.astype(np.int64)


CliRunner = Callable[..., subprocess.CompletedProcess[str]]
CliStarter = Callable[..., subprocess.Popen[str]]


def cli_env(mnist_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment the CLI runs with in tests: this checkout's code and the real data."""
    return {**os.environ, "MNIST_SWEEP_DATA": str(mnist_dir), "PYTHONPATH": str(REPO), **(extra or {})}


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "mnist_sweep", *args]


@pytest.fixture
def run_cli(tmp_path: Path, mnist_dir: Path) -> CliRunner:
    """Runs `python -m mnist_sweep ARGS` in tmp_path (this checkout's code, real data), returns the result."""

    def runner(
        *args: str, cwd: Path = tmp_path, env: dict[str, str] | None = None, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cli_command(*args), cwd=cwd, env=cli_env(mnist_dir, env), capture_output=True, text=True, timeout=timeout,
        )

    return runner


@pytest.fixture
def start_cli(tmp_path: Path, mnist_dir: Path) -> CliStarter:
    """Starts `python -m mnist_sweep ARGS` in tmp_path without waiting (for signals and concurrent workers)."""

    def starter(*args: str, cwd: Path = tmp_path, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        return subprocess.Popen(
            cli_command(*args), cwd=cwd, env=cli_env(mnist_dir, env),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )

    return starter


def small_sweep_args(*extra: str, trials: int = 3, train_limit: int = 2000, validation: int = 1000) -> list[str]:
    """The default sweep shrunk: few trials, 1 epoch, a small real subset."""
    return [
        "--trials", str(trials), "--epochs", "1",
        "--set", f"data.train_limit={train_limit}", "--set", f"data.validation={validation}",
        *extra,
    ]


def write_sweep(folder: Path, text: str, name: str = "sweep.toml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def created_files(folder: Path, ignore: Sequence[str] = ()) -> list[str]:
    """Every file under `folder`, relative, except those named in `ignore`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in ignore)
