"""Data sets by name: the offline embedded ones, the torchvision ones, `folder:<path>`, and the
text corpora of the language task (`TEXT_DATASETS`, loaded with `load_corpus`).

Loaded sets are cached in the process: every simulated client asks for the same set each round.
Data files always live outside the package tree (Flower's app bundle carries only source).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from fedleak.data.dataset import DatasetUnavailable, ImageDataset, with_holdout
from fedleak.data.embedded import load_cifar10_foolbox, load_mnist5k
from fedleak.data.folder import load_folder
from fedleak.data.text.corpus import (
    TEXT_DATASETS,
    TextCorpus,
    load_lee_news,
    load_wikipedia,
    load_wikitext,
)
from fedleak.data.torchvision_sets import TORCHVISION_SETS, load_torchvision_set

FOLDER_PREFIX = "folder:"
IMAGE_DATASETS: tuple[str, ...] = ("mnist5k", "cifar10-foolbox", *TORCHVISION_SETS)
DATASETS: tuple[str, ...] = (*IMAGE_DATASETS, *TEXT_DATASETS)
# Sets without an official test split get a stratified hold-out; victim-only sets get none.
_HOLDOUT = frozenset({"mnist5k", FOLDER_PREFIX})
DATA_DIR_ENV = "FEDLEAK_DATA_DIR"

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "FOLDER_PREFIX",
    "IMAGE_DATASETS",
    "TEXT_DATASETS",
    "DatasetUnavailable",
    "UnknownDatasetError",
    "dataset_modality",
    "default_data_dir",
    "load_corpus",
    "load_dataset",
]


class UnknownDatasetError(ValueError):
    """The data-set name is not in the registry."""


def default_data_dir() -> Path:
    """Where downloadable sets live: `$FEDLEAK_DATA_DIR`, else `~/.cache/fedleak/data`."""
    return Path(os.environ.get(DATA_DIR_ENV) or Path.home() / ".cache" / "fedleak" / "data")


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    download: bool = True,
) -> ImageDataset:
    """Load a data set by registry name or as `folder:<path>`.

    `seed` and `test_fraction` shape the stratified hold-out of sets without an official test
    split (mnist5k, folders); torchvision sets keep their own split and cifar10-foolbox keeps
    all 20 images for training. `data_dir` matters to torchvision sets only.
    """
    kind = FOLDER_PREFIX if name.startswith(FOLDER_PREFIX) else name
    if kind in TEXT_DATASETS:
        raise UnknownDatasetError(f"dataset={name!r} is a text corpus: load it with load_corpus")
    if kind not in IMAGE_DATASETS and kind != FOLDER_PREFIX:
        raise UnknownDatasetError(
            f"dataset={name!r}: expected one of {', '.join(DATASETS)} or {FOLDER_PREFIX}<path>"
        )
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction={test_fraction}: expected a value in [0, 1)")
    # The cache key carries only what the set depends on, so equal requests share one load.
    holdout = kind in _HOLDOUT
    if kind == FOLDER_PREFIX:
        root = str(Path(name.removeprefix(FOLDER_PREFIX)).expanduser().resolve())
    elif kind in TORCHVISION_SETS:
        root = str(Path(data_dir or default_data_dir()).expanduser().resolve())
    else:
        root = ""
    return _load(
        name,
        kind,
        root,
        seed if holdout else 0,
        test_fraction if holdout else 0.0,
        download and kind in TORCHVISION_SETS,
    )


@functools.lru_cache(maxsize=16)
def _load(
    name: str, kind: str, root: str, seed: int, test_fraction: float, download: bool
) -> ImageDataset:
    if kind == "mnist5k":
        dataset = load_mnist5k()
    elif kind == "cifar10-foolbox":
        dataset = load_cifar10_foolbox()
    elif kind == FOLDER_PREFIX:
        dataset = load_folder(Path(root), name)
    else:
        dataset = load_torchvision_set(kind, Path(root), download)
    return with_holdout(dataset, test_fraction, seed) if kind in _HOLDOUT else dataset


def dataset_modality(name: str) -> str:
    """`tokens` for the text corpora, `image` for everything else."""
    return "tokens" if name in TEXT_DATASETS else "image"


def load_corpus(
    name: str, data_dir: str | Path | None = None, *, download: bool = True
) -> TextCorpus:
    """A text corpus by name (cached in the process); `data_dir` holds WikiText's download and
    the cleaned Wikipedia articles."""
    if name not in TEXT_DATASETS:
        raise UnknownDatasetError(f"dataset={name!r}: expected one of {', '.join(TEXT_DATASETS)}")
    root = str(Path(data_dir or default_data_dir()).expanduser().resolve())
    return _load_corpus(name, root, download)


@functools.lru_cache(maxsize=4)
def _load_corpus(name: str, root: str, download: bool) -> TextCorpus:
    if name == "wikipedia":
        return load_wikipedia(Path(root))
    if name == "lee-news":
        return load_lee_news()
    return load_wikitext(name, Path(root), download)
