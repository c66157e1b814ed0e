"""MNIST in: IDX (gz or raw) and npz readers, their error messages, the split, and the sealed test set."""

from __future__ import annotations

import gzip
import shutil
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from mnist_sweep import data
from mnist_sweep.data import (
    DataError,
    WithheldTestSplitError,
    load_split,
    load_test_split,
    read_idx,
    resolve_source,
    withholding_test_split,
)


def idx_bytes(array: np.ndarray, *, images: bool, magic: int | None = None) -> bytes:
    header = struct.pack(">ii", magic or (2051 if images else 2049), len(array))
    if images:
        header += struct.pack(">ii", *array.shape[1:])
    return header + array.astype(np.uint8).tobytes()


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    data.forget_decoded()  # each test writes its own files under paths a previous test may have read


@pytest.mark.parametrize("gz", [True, False])
def test_idx_round_trip(tmp_path: Path, synthetic_mnist: tuple[np.ndarray, np.ndarray], gz: bool) -> None:
    images = synthetic_mnist[0]
    suffix = ".gz" if gz else ""
    path = tmp_path / f"images{suffix}"
    payload = idx_bytes(images, images=True)
    path.write_bytes(gzip.compress(payload) if gz else payload)
    assert np.array_equal(read_idx(path, images=True), images)


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda raw: struct.pack(">i", 9999) + raw[4:], "IDX magic is 9999"),
        (lambda raw: raw[:8] + struct.pack(">ii", 32, 32) + raw[16:], "images are 32x32"),
        (lambda raw: raw[:-10], "bytes, expected"),
        (lambda raw: raw[:5], "too short"),
    ],
)
def test_corrupt_idx_is_named(
    tmp_path: Path, synthetic_mnist: tuple[np.ndarray, np.ndarray], mutate, expected: str
) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "images"
    path.write_bytes(mutate(idx_bytes(synthetic_mnist[0], images=True)))
    with pytest.raises(DataError, match=expected) as caught:
        read_idx(path, images=True)
    assert str(caught.value).startswith(path.name)


def test_truncated_gzip(tmp_path: Path, synthetic_mnist: tuple[np.ndarray, np.ndarray]) -> None:
    path = tmp_path / "images.gz"
    path.write_bytes(gzip.compress(idx_bytes(synthetic_mnist[0], images=True))[:500])
    with pytest.raises(DataError, match="cannot read"):
        read_idx(path, images=True)


def test_standard_name_with_wrong_content_fails_the_checksum(
    tmp_path: Path, synthetic_mnist: tuple[np.ndarray, np.ndarray]
) -> None:
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(idx_bytes(synthetic_mnist[1], images=False))
    with pytest.raises(DataError, match="checksum mismatch"):
        read_idx(path, images=False)


def test_label_out_of_range(tmp_path: Path, synthetic_mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = synthetic_mnist
    labels = labels.copy()
    labels[7] = 12
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=images, y_train=labels, x_test=images, y_test=labels)
    with pytest.raises(DataError, match="label 12 at index 7"):
        load_split(resolve_source(str(path)), validation=100, train_limit=0, seed=0)


def test_source_resolution(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    assert resolve_source("").kind == "download"
    with pytest.raises(DataError, match="does not exist"):
        resolve_source(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no train-images-idx3-ubyte"):
        resolve_source(str(tmp_path / "empty"))
    monkeypatch.setenv(data.DATA_ENV, str(tmp_path / "missing"))
    with pytest.raises(DataError, match=r"\$MNIST_SWEEP_DATA"):
        resolve_source("")


def test_npz_source_and_split(tmp_path: Path, synthetic_mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = synthetic_mnist
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=images, y_train=labels, x_test=images[:50], y_test=labels[:50])
    source = resolve_source(str(path))
    split = load_split(source, validation=200, train_limit=500, seed=3)
    assert split.x_train.shape == (500, 28, 28) and split.x_val.shape == (200, 28, 28)
    assert split.x_train.dtype == np.float32 and float(split.x_train.max()) <= 1.0
    assert load_split(source, validation=200, train_limit=500, seed=3) is split, "decoded and split once"
    data.forget_decoded()
    again = load_split(source, validation=200, train_limit=500, seed=3)
    assert again is not split and np.array_equal(again.y_val, split.y_val), "same seed, same split"
    other = load_split(source, validation=200, train_limit=500, seed=4)
    assert not np.array_equal(other.y_val, split.y_val)
    x_test, y_test = load_test_split(source)
    assert x_test.shape == (50, 28, 28) and len(y_test) == 50


def test_validation_must_leave_training_images(tmp_path: Path, synthetic_mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = synthetic_mnist
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=images, y_train=labels, x_test=images, y_test=labels)
    with pytest.raises(DataError, match="data.validation = 1200"):
        load_split(resolve_source(str(path)), validation=1200, train_limit=0, seed=0)


def test_test_split_is_sealed_while_trials_run(tmp_path: Path, synthetic_mnist: tuple[np.ndarray, np.ndarray]) -> None:
    images, labels = synthetic_mnist
    path = tmp_path / "mnist.npz"
    np.savez(path, x_train=images, y_train=labels, x_test=images[:10], y_test=labels[:10])
    source = resolve_source(str(path))
    with withholding_test_split(), pytest.raises(WithheldTestSplitError):
        load_test_split(source)
    assert len(load_test_split(source)[1]) == 10  # unsealed again afterwards


def test_real_mnist_files(mnist_dir: Path) -> None:
    source = resolve_source(str(mnist_dir))
    images, labels = data.read_part(source, "train")
    assert images.shape == (60000, 28, 28)
    assert labels[:5].tolist() == [5, 0, 4, 1, 9]
    _, test_labels = load_test_split(source)
    assert np.bincount(test_labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_real_files_uncompressed_also_read(tmp_path: Path, mnist_dir: Path) -> None:
    for name in data.TRAIN_FILES + data.TEST_FILES:
        with gzip.open(mnist_dir / f"{name}.gz", "rb") as src, open(tmp_path / name, "wb") as dst:
            shutil.copyfileobj(src, dst)
    split = load_split(resolve_source(str(tmp_path)), validation=5000, train_limit=0, seed=0)
    assert len(split.y_train) == 55000 and len(split.y_val) == 5000


def read_with_peak(path: Path, *, images: bool) -> tuple[str, int]:
    """read_idx's error and the most memory Python held while it read."""
    tracemalloc.start()
    try:
        with pytest.raises(DataError) as refused:
            read_idx(path, images=images)
        return str(refused.value), tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_gzip_bomb_is_refused_after_reading_only_what_its_header_declares(tmp_path: Path) -> None:
    """256 MiB of zeros behind a header that declares 100 labels: reading stops one byte past the 108."""
    path = tmp_path / "labels-idx1-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=1) as handle:
        handle.write(struct.pack(">ii", 2049, 100))
        for _ in range(16):
            handle.write(bytes(1 << 24))
    message, peak = read_with_peak(path, images=False)
    assert "109 bytes or more, expected 108 for 100 items" in message
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB held to refuse it"


def test_a_sparse_huge_idx_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "images-idx3-ubyte"
    with open(path, "wb") as handle:
        handle.write(struct.pack(">iiii", 2051, 100, 28, 28))
        handle.truncate(1 << 28)  # 256 MiB, no block written
    message, peak = read_with_peak(path, images=True)
    assert f"{1 << 28} bytes, expected {16 + 100 * 784}" in message
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB held to refuse it"


def test_a_header_declaring_more_than_the_standard_file_is_refused_unread(tmp_path: Path) -> None:
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(struct.pack(">ii", 2049, 10001) + bytes(10001))
    with pytest.raises(DataError, match="declares 10001 items, expected 0 to 10000"):
        read_idx(path, images=False)


@pytest.mark.parametrize(
    ("value", "expect"),
    [("a" * 300, "File name too long"), ("/dev/zero", "a device"), ("loop", "a symlink loop")],
)
def test_a_data_variable_that_names_no_folder_or_file_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, expect: str
) -> None:
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(data.DATA_ENV, value)
    with pytest.raises(DataError, match=f"^\\$MNIST_SWEEP_DATA = '{value[:20]}.*{expect}"):
        resolve_source("")
