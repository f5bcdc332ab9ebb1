"""The standard benchmark sets through torchvision, kept under a data folder outside the app.

Each set keeps its official train/test split. torchvision downloads a set once when allowed;
offline, a missing set becomes `DatasetUnavailable` naming where it was looked for. Fashion-MNIST
is also read from Debian's `dataset-fashion-mnist` package when that is installed.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedleak.data.dataset import DatasetUnavailable, ImageDataset, dataset_from_arrays
from fedleak.data.embedded import DIGIT_CLASSES
from fedleak.lines import one_line

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


@dataclass(frozen=True)
class TorchvisionSet:
    """Where torchvision keeps a set under the data folder and what a user would copy there."""

    dataset_class: str
    folder: str
    files: str


TORCHVISION_SETS = {
    "cifar10": TorchvisionSet(
        "CIFAR10",
        "cifar-10-batches-py",
        "the extracted CIFAR-10 python version (data_batch_1..5, test_batch)",
    ),
    "cifar100": TorchvisionSet(
        "CIFAR100", "cifar-100-python", "the extracted CIFAR-100 python version (train, test, meta)"
    ),
    "mnist": TorchvisionSet("MNIST", "MNIST/raw", "the four MNIST idx files"),
    "fashion-mnist": TorchvisionSet(
        "FashionMNIST", "FashionMNIST/raw", "the four Fashion-MNIST idx files"
    ),
    "svhn": TorchvisionSet("SVHN", ".", "train_32x32.mat and test_32x32.mat (cropped digits)"),
}


def load_torchvision_set(name: str, root: Path, download: bool) -> ImageDataset:
    """Load `name` (a key of `TORCHVISION_SETS`) from `root`, downloading there if allowed."""
    looked = []
    if name == "fashion-mnist":
        found = _debian_fashion_mnist()
        if found is not None:
            return found
        looked.append(f"{DEBIAN_FASHION_MNIST} (Debian package dataset-fashion-mnist)")
    entry = TORCHVISION_SETS[name]
    looked.append(f"{root / entry.folder} (torchvision's layout under data_dir)")
    absent = _absent_folders(root / entry.folder)
    folder = root / entry.folder
    held = sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    try:
        x, y, classes = _read(name, root, download, train=True)
        tx, ty, _ = _read(name, root, download, train=False)
    except Exception as error:  # torchvision raises RuntimeError, URLError, tarfile errors, ...
        _remove_if_empty(absent)
        # torchvision's messages span lines; keep the paragraph one line and short.
        cause = one_line(f"{type(error).__name__}: {error}")
        if held:  # files that were there and did not read: not a failed download
            shown = ", ".join(held[:4]) + (f" and {len(held) - 4} more" if len(held) > 4 else "")
            raise DatasetUnavailable(
                f"data set {name!r}: {folder} holds {shown}, which did not read ({cause}): a "
                f"damaged or partial copy; delete them to download again, or copy "
                f"{entry.files} there anew"
            ) from error
        raise DatasetUnavailable(
            _unavailable(name, entry, root, download, looked, cause)
        ) from error
    source = f"torchvision {entry.dataset_class} at {root}"
    return dataset_from_arrays(name, x, y, classes, source, test_images=tx, test_labels=ty)


def _read(
    name: str, root: Path, download: bool, *, train: bool
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """uint8 NCHW images, labels and class names of one official split."""
    # Imported here, not at the top: importing torchvision costs seconds on every simulated
    # client's start, and runs on the embedded sets never need it.
    from torchvision import datasets

    if name in ("cifar10", "cifar100"):
        cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
        data = cls(str(root), train=train, download=download)
        return data.data.transpose(0, 3, 1, 2), np.asarray(data.targets), tuple(data.classes)
    if name in ("mnist", "fashion-mnist"):
        cls = datasets.MNIST if name == "mnist" else datasets.FashionMNIST
        data = cls(str(root), train=train, download=download)
        classes = DIGIT_CLASSES if name == "mnist" else FASHION_MNIST_CLASSES
        return data.data.numpy()[:, None], data.targets.numpy(), classes
    data = datasets.SVHN(str(root), split="train" if train else "test", download=download)
    return data.data, np.asarray(data.labels), DIGIT_CLASSES


def _absent_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    absent = []
    for path in (folder, *folder.parents):
        if path.exists():
            break
        absent.append(path)
    return absent


def _remove_if_empty(folders: list[Path]) -> None:
    """Undo the empty folders a failed download made, so a later check does not take the
    set's folder for a damaged copy of it."""
    for path in folders:
        if not path.is_dir():
            continue
        try:
            path.rmdir()
        except OSError:  # not empty: a partial download that a retry can resume
            return


def _unavailable(
    name: str, entry: TorchvisionSet, root: Path, download: bool, looked: list[str], cause: str
) -> str:
    tried = "downloading was tried and failed" if download else "downloading was off"
    debian = (
        " On Debian or Ubuntu, `apt-get install dataset-fashion-mnist` also provides it."
        if name == "fashion-mnist"
        else ""
    )
    return (
        f"data set {name!r} is not available: looked in {' and '.join(looked)}; {tried} ({cause}). "
        f"To obtain it, run once with internet access and downloading on (torchvision saves it "
        f"under data_dir for later offline runs), or copy {entry.files} into "
        f"{root / entry.folder}; point data_dir or $FEDLEAK_DATA_DIR elsewhere if the files live "
        f"in another place.{debian} Offline sets that need no download: mnist5k, cifar10-foolbox."
    )


def _debian_fashion_mnist() -> ImageDataset | None:
    """Fashion-MNIST from the Debian package's idx files, or None when they are not there."""
    paths = []
    for stem in FASHION_MNIST_FILES:
        candidates = [DEBIAN_FASHION_MNIST / f"{stem}.gz", DEBIAN_FASHION_MNIST / stem]
        path = next((p for p in candidates if p.is_file()), None)
        if path is None:
            return None
        paths.append(path)
    x, y, tx, ty = (read_idx(p) for p in paths)
    return dataset_from_arrays(
        "fashion-mnist",
        x[:, None],
        y,
        FASHION_MNIST_CLASSES,
        str(DEBIAN_FASHION_MNIST),
        test_images=tx[:, None],
        test_labels=ty,
    )


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte idx array (the MNIST file format), optionally gzip-compressed."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    # Header: two zero bytes, type code 0x08 (unsigned byte), number of dimensions, then each
    # dimension as a big-endian uint32.
    ndim = raw[3] if len(raw) >= 4 else 0
    if raw[:3] != b"\x00\x00\x08" or len(raw) < 4 + 4 * ndim:
        raise DatasetUnavailable(
            f"{path}: not an unsigned-byte idx file; replace it with an intact copy"
        )
    shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetUnavailable(
            f"{path}: holds {data.size} bytes for shape {shape}; the file is "
            "truncated, replace it with an intact copy"
        )
    return data.reshape(shape)
