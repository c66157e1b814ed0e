"""MNIST in, split and normalised; the test split withheld from trials.

Sources, in order: `data.path` (a folder of the four IDX files, gz or raw, or a Keras `mnist.npz`),
then $MNIST_SWEEP_DATA, then Keras' download. Training images are decoded once per process. The test
images are read only by `load_test_split`, which raises while the test split is withheld (i.e. while
trials run), so no trial can look at them, even by accident.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import os
import struct
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from mnist_sweep.errors import DataError, WithheldTestSplitError
from mnist_sweep.locations import FILE, FOLDER, MISSING, path_kind

DATA_ENV = "MNIST_SWEEP_DATA"
KERAS_MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
KERAS_MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"

IMAGE_MAGIC, LABEL_MAGIC = 2051, 2049
IMAGE_SIDE = 28
NUM_CLASSES = 10

# MNIST's well-known md5s of the uncompressed files: a file under a standard name must match.
STANDARD_MD5 = {
    "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
    "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
    "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
    "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
}
# Items in each standard file: a header declaring more is refused before anything past it is read (or
# decompressed), so a small .gz that expands hugely or a sparse file of terabytes costs nothing.
STANDARD_COUNT = {name: 60000 if name.startswith("train") else 10000 for name in STANDARD_MD5}
MAX_ITEMS = 1_000_000  # for a file under another name: 784 MB of images
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

Images = npt.NDArray[np.float32]
Labels = npt.NDArray[np.int64]


@dataclass(frozen=True)
class Split:
    """Training and validation images (float32 in [0, 1], shape (n, 28, 28)) and int labels."""

    x_train: Images
    y_train: Labels
    x_val: Images
    y_val: Labels


@dataclass(frozen=True)
class DataSource:
    """Where MNIST is read from: a folder of IDX files, an npz file, or Keras' download."""

    kind: str  # "idx", "npz" or "download"
    location: str
    origin: str = "data.path"  # the key that named it, for error messages

    def describe(self) -> str:
        return f"{self.kind}:{self.location}" if self.location else self.kind

    def error(self, detail: str) -> DataError:
        """A one-line error naming the key, its value and what is wrong."""
        return DataError(f"{self.origin} = {self.location!r}: {detail}")


# --------------------------------------------------------------------------- the test split withheld from trials
# (Not the test set's seal, final.py's once-only claim on scoring it: this guard only keeps trials off it.)


class _Withheld(threading.local):
    """Per thread: whether the code running now trains (a trial, the reference, a replay)."""

    active = False


_withheld = _Withheld()


@contextlib.contextmanager
def withholding_test_split() -> Iterator[None]:
    """While inside, `load_test_split` raises: trials run here."""
    previous = _withheld.active
    _withheld.active = True
    try:
        yield
    finally:
        _withheld.active = previous


def _refuse_if_withheld() -> None:
    if _withheld.active:
        raise WithheldTestSplitError("the test split was asked for while trials run; it is scored once, at the end")


# --------------------------------------------------------------------------- locating the data


def resolve_source(path: str) -> DataSource:
    """The data source for `data.path` ('' falls back to $MNIST_SWEEP_DATA, then to Keras' download)."""
    chosen = path or os.environ.get(DATA_ENV, "")
    if not chosen:
        return DataSource("download", "")
    where = "data.path" if path else f"${DATA_ENV}"
    candidate = Path(chosen).expanduser()
    kind = path_kind(candidate)
    if kind == FOLDER:
        source = DataSource("idx", str(candidate.resolve()), where)
        for name in TRAIN_FILES + TEST_FILES:
            _find_idx(source, name)
        return source
    if kind == FILE:
        if candidate.suffix != ".npz":
            raise DataError(f"{where} = {chosen!r} is a file but not an .npz; give a folder of IDX files or mnist.npz")
        return DataSource("npz", str(candidate.resolve()), where)
    if kind == MISSING:
        raise DataError(f"{where} = {chosen!r} does not exist")
    # a device, a FIFO, a socket (reading it would hang or never end), a symlink loop
    raise DataError(f"{where} = {chosen!r} is {kind}, neither a folder nor a regular file")


def _find_idx(source: DataSource, name: str) -> Path:
    folder = Path(source.location)
    for candidate in (folder / f"{name}.gz", folder / name):
        kind = path_kind(candidate)
        if kind == MISSING:
            continue
        if kind != FILE:  # a FIFO would hang the read, a device never end it
            raise source.error(f"{candidate.name} is {kind}, not a regular file")
        try:
            with open(candidate, "rb"):
                pass  # opening is the only honest test: os.access says yes to root
        except OSError as exc:
            raise source.error(f"cannot open {candidate.name} ({exc.strerror})") from None
        return candidate
    raise source.error(f"has no {name}[.gz]; it needs the four MNIST IDX files")


# --------------------------------------------------------------------------- reading IDX files


def _read_bytes(path: Path, *, images: bool) -> bytes:
    """The whole file (decompressed), read no further than its header declares: one byte past it tells
    a file that holds more than it says."""
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
            header = handle.read(16 if images else 8)
            expected = _declared_size(path, header, images=images)
            if path.suffix != ".gz":  # a raw file's size is known before reading: a sparse giant costs nothing
                size = os.fstat(handle.fileno()).st_size
                if size != expected:
                    raise DataError(f"{path.name}: {size} bytes, expected {expected} as its header declares")
            return header + handle.read(expected - len(header) + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path.name}: cannot read ({exc})") from None


def _declared_size(path: Path, header: bytes, *, images: bool) -> int:
    """The file size its IDX header declares, once the header is checked (magic, 28x28, a plausible count)."""
    magic_expected = IMAGE_MAGIC if images else LABEL_MAGIC
    header_size = 16 if images else 8
    if len(header) < header_size:
        raise DataError(f"{path.name}: too short for an IDX header ({len(header)} bytes)")
    magic, count = struct.unpack(">ii", header[:8])
    if magic != magic_expected:
        raise DataError(f"{path.name}: IDX magic is {magic}, expected {magic_expected}")
    item_size = 1
    if images:
        rows, cols = struct.unpack(">ii", header[8:16])
        if (rows, cols) != (IMAGE_SIDE, IMAGE_SIDE):
            raise DataError(f"{path.name}: images are {rows}x{cols}, expected 28x28")
        item_size = IMAGE_SIDE * IMAGE_SIDE
    most = STANDARD_COUNT.get(path.name.removesuffix(".gz"), MAX_ITEMS)
    if not 0 <= count <= most:
        raise DataError(f"{path.name}: its header declares {count} items, expected 0 to {most}; refused unread")
    return header_size + int(count) * item_size


def _parse_idx(path: Path, raw: bytes, *, images: bool) -> npt.NDArray[np.uint8]:
    expected_bytes = _declared_size(path, raw[: 16 if images else 8], images=images)
    count = struct.unpack(">i", raw[4:8])[0]
    shape = (count, IMAGE_SIDE, IMAGE_SIDE) if images else (count,)
    if len(raw) != expected_bytes:
        more = " or more" if len(raw) > expected_bytes else ""
        raise DataError(f"{path.name}: {len(raw)} bytes{more}, expected {expected_bytes} for {count} items")
    return np.frombuffer(raw, dtype=np.uint8, offset=16 if images else 8).reshape(shape)


def read_idx(path: Path, *, images: bool) -> npt.NDArray[np.uint8]:
    """One IDX file, gz or raw, checked: magic, sizes, label range, and the standard md5 for standard names."""
    raw = _read_bytes(path, images=images)
    # The header and label checks come first: they say more precisely what is wrong than a checksum.
    array = _parse_idx(path, raw, images=images)
    if not images:
        _check_labels(path.name, array)
    expected_md5 = STANDARD_MD5.get(path.name.removesuffix(".gz"))
    if expected_md5 is not None:
        actual = hashlib.md5(raw, usedforsecurity=False).hexdigest()
        if actual != expected_md5:
            raise DataError(
                f"{path.name}: checksum mismatch (md5 {actual}, expected {expected_md5}); "
                "the file is not the standard MNIST file"
            )
    return array


def _check_labels(path: str, labels: npt.NDArray[Any]) -> Labels:
    outside = (labels < 0) | (labels >= NUM_CLASSES)
    if outside.any():
        bad = int(np.argmax(outside))
        raise DataError(f"{path}: label {int(labels[bad])} at index {bad} is out of range 0..9")
    return labels.astype(np.int64)


def _check_pair(where: str, images: npt.NDArray[np.uint8], labels: npt.NDArray[np.uint8]) -> None:
    if len(images) != len(labels):
        raise DataError(f"{where}: {len(images)} images but {len(labels)} labels")


# --------------------------------------------------------------------------- loading


# A process decodes each part once and splits it once (a sweep, then `finalize`; the tests, which share the files):
# held by the two functions below, the only ones that keep anything. `forget_decoded` empties both.


@functools.lru_cache(maxsize=2)  # a training and a test part
def _decoded(source: DataSource, part: str) -> tuple[npt.NDArray[np.uint8], Labels]:
    """uint8 images and int labels of one part ('train' or 'test'), decoded once per process."""
    return read_part(source, part)


def forget_decoded() -> None:
    """Forget every decoded part and split (a test, or a process that reads a changed folder again)."""
    _decoded.cache_clear()
    load_split.cache_clear()


def read_part(source: DataSource, part: str) -> tuple[npt.NDArray[np.uint8], Labels]:
    """One part ('train' or 'test') read from disk and checked, uncached; errors name the key that chose the source."""
    if source.kind == "download":
        source = _downloaded()
    try:
        if source.kind == "npz":
            return _load_npz(Path(source.location), part)
        names = TRAIN_FILES if part == "train" else TEST_FILES
        image_path, label_path = (_find_idx(source, name) for name in names)
        images = read_idx(image_path, images=True)
        labels = read_idx(label_path, images=False)
        _check_pair(f"{image_path.name} and {label_path.name}", images, labels)
        return images, labels.astype(np.int64)
    except DataError as exc:
        if str(exc).startswith(source.origin):
            raise
        raise source.error(str(exc)) from None


def _downloaded() -> DataSource:
    hint = "put the four IDX files (or mnist.npz) in a folder and set data.path or MNIST_SWEEP_DATA to it"
    try:
        location = _download_keras_npz()
    except DataError as exc:
        raise DataError(f"{exc}; {hint}") from None
    except Exception as exc:  # urllib and ssl raise many kinds; offline is the usual one
        raise DataError(
            f"no data.path or ${DATA_ENV}, and the download of {KERAS_MNIST_URL} failed: {exc}; {hint}"
        ) from None
    return DataSource("npz", location, "the Keras download")


def _load_npz(path: Path, part: str) -> tuple[npt.NDArray[np.uint8], Labels]:
    x_key, y_key = f"x_{part}", f"y_{part}"
    try:
        # NpzFile reads an array only when its key is accessed: the test arrays stay on disk here.
        with np.load(path, allow_pickle=False) as archive:
            missing = [k for k in (x_key, y_key) if k not in archive.files]
            if missing:
                raise DataError(f"no {missing[0]!r} array; a Keras mnist.npz has x_train, y_train, x_test, y_test")
            most = STANDARD_COUNT[TRAIN_FILES[0] if part == "train" else TEST_FILES[0]]
            for key in (x_key, y_key):
                _check_npz_shape(archive, key, most=most)
            images, labels = archive[x_key], archive[y_key]
    except DataError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read as .npz ({exc})") from None
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(f"{x_key} has shape {images.shape}, expected (n, 28, 28)")
    if images.dtype != np.uint8:  # casting floats in [0, 1] to uint8 would make every image black
        raise DataError(f"{x_key} has dtype {images.dtype}, expected uint8 pixels 0..255 as in Keras' mnist.npz")
    if labels.ndim != 1:
        raise DataError(f"{y_key} has shape {labels.shape}, expected (n,)")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{y_key} has dtype {labels.dtype}, expected integer labels 0..9")
    _check_pair(f"{x_key} and {y_key}", images, labels)
    return images.astype(np.uint8, copy=False), _check_labels(y_key, labels.astype(np.int64))


def _check_npz_shape(archive: Any, key: str, *, most: int) -> None:
    """An array's shape, from its .npy header, within MNIST's size: a member that would inflate to more
    (a zip bomb, a wrong file) is refused before it is decompressed."""
    with archive.zip.open(f"{key}.npy") as member:
        version = np.lib.format.read_magic(member)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape = read_header(member)[0]
    items = shape[0] if shape else 1
    per_item = int(np.prod(shape[1:])) if len(shape) > 1 else 1
    if items > most or per_item > IMAGE_SIDE * IMAGE_SIDE:
        raise DataError(f"{key} declares shape {shape}, more than MNIST's {most} items; refused unread")


def _download_keras_npz() -> str:
    """Keras' own mnist.npz (what keras.datasets.mnist.load_data fetches), kept in ~/.keras/datasets.

    Fetched with the standard library, so reading MNIST needs NumPy only, whatever the Keras backend.
    """
    import tempfile
    import urllib.request

    folder = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "datasets"
    target = folder / "mnist.npz"
    if target.is_file() and file_sha256(target) == KERAS_MNIST_SHA256:
        return str(target)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".mnist.npz.", delete=False) as partial:
        try:
            with urllib.request.urlopen(KERAS_MNIST_URL, timeout=60) as response:
                while chunk := response.read(1 << 20):
                    partial.write(chunk)
        except OSError as exc:
            Path(partial.name).unlink(missing_ok=True)
            detail = f"no data.path or ${DATA_ENV}, and the download of {KERAS_MNIST_URL} failed: {exc}"
            raise DataError(detail) from None
    if file_sha256(Path(partial.name)) != KERAS_MNIST_SHA256:
        Path(partial.name).unlink(missing_ok=True)
        raise DataError(f"the download of {KERAS_MNIST_URL} does not match its sha256; try again")
    os.replace(partial.name, target)  # atomic: a concurrent worker sees the whole file or none
    return str(target)


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _normalise(images: npt.NDArray[np.uint8]) -> Images:
    return (images.astype(np.float32) / np.float32(255.0)).astype(np.float32, copy=False)


@functools.lru_cache(maxsize=2)
def load_split(source: DataSource, *, validation: int, train_limit: int, seed: int) -> Split:
    """The training images shuffled with `seed`, the first `validation` held out, then `train_limit`; made once
    per process for the same arguments (the same object returned)."""
    images, labels = _decoded(source, "train")
    if validation >= len(images):
        raise source.error(f"data.validation = {validation} must be smaller than the {len(images)} training images")
    order = np.random.default_rng(seed).permutation(len(images))
    val_idx, train_idx = order[:validation], order[validation:]
    if train_limit:
        if train_limit > len(train_idx):
            raise source.error(f"data.train_limit = {train_limit} exceeds the {len(train_idx)} training images left")
        train_idx = train_idx[:train_limit]
    return Split(
        x_train=_normalise(images[train_idx]),
        y_train=labels[train_idx],
        x_val=_normalise(images[val_idx]),
        y_val=labels[val_idx],
    )


def check_test_split_present(source: DataSource) -> None:
    """Before any trial: the test files are read and checked like the training files (header, shape,
    dtype, label range, checksum) and thrown away. Checking their form is not looking at them: no trial
    gets them, and `load_test_split` still refuses while trials run."""
    read_part(source, "test")


def load_test_split(source: DataSource) -> tuple[Images, Labels]:
    """The 10,000 test images and labels. Only the final step calls this, once per study."""
    _refuse_if_withheld()
    images, labels = _decoded(source, "test")
    return _normalise(images), labels
