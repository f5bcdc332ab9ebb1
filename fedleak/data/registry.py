"""Data sets by name: the offline embedded ones, the torchvision ones, `folder:<path>`, yours,
and the text corpora of the language task (`TEXT_DATASETS`, loaded with `load_corpus`).

A data set is registered with a loader `(root, download) -> ImageDataset`, where `root` is the
data folder (`data.data-dir`, else `$FEDLEAK_DATA_DIR` or `~/.cache/fedleak/data`) for sets
that live there:

    @register_dataset("my-set", holdout=True, input_shape=(3, 32, 32), num_classes=10)
    def my_set(root: Path, download: bool) -> ImageDataset: ...

`holdout`: the set has no official test split, so a stratified `data.test-fraction` is held out
(seeded by the run) when the loader returns none. `input_shape` and `num_classes`, when
declared, let configuration checks (BatchNorm, payload) run without loading the set. A
package makes a set available to every process with an entry point in group
`fedleak.datasets` (see `fedleak.registry`).

Loaded sets are cached in the process: every simulated client asks for the same set each round.
Data files always live outside the package tree (Flower's app bundle carries only source).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from fedleak.data.dataset import DatasetError, DatasetUnavailable, ImageDataset, with_holdout
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
from fedleak.registry import Registry, UnknownNameError
from fedleak.settings import ConfigError, shown_value

FOLDER_PREFIX = "folder:"
DATA_DIR_ENV = "FEDLEAK_DATA_DIR"

Loader = Callable[[Path, bool], ImageDataset]

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "FOLDER_PREFIX",
    "TEXT_DATASETS",
    "DatasetEntry",
    "DatasetUnavailable",
    "UnknownDatasetError",
    "data_shape",
    "dataset_entry",
    "dataset_modality",
    "dataset_names",
    "default_data_dir",
    "load_corpus",
    "load_dataset",
    "register_dataset",
]

UnknownDatasetError = UnknownNameError


@dataclass(frozen=True)
class DatasetEntry:
    """A registered data set: its loader and what is known without loading it."""

    name: str
    load: Loader
    holdout: bool = True
    uses_data_dir: bool = False
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None

    def __post_init__(self) -> None:
        shape = _checked_options(
            self.name, self.holdout, self.uses_data_dir, self.input_shape, self.num_classes
        )
        object.__setattr__(self, "input_shape", shape)


_LOADER = "a data-set loader (root, download) -> ImageDataset"


def _checked_options(
    name: str, holdout: object, uses_data_dir: object, input_shape: object, num_classes: object
) -> tuple[int, ...] | None:
    """Refuse, in one line naming the argument, what a data set could never be checked with;
    the input shape as a tuple."""
    for argument, value in (("holdout", holdout), ("uses_data_dir", uses_data_dir)):
        if not isinstance(value, bool):
            raise DATASETS.refusal(name, f"{argument}={shown_value(value)}: expected True or False")
    shape = None
    if input_shape is not None:
        sizes = tuple(input_shape) if isinstance(input_shape, tuple | list) else ()
        if not sizes or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in sizes):
            raise DATASETS.refusal(
                name,
                f"input_shape={shown_value(input_shape)}: expected None or a tuple of positive "
                "integers, e.g. (3, 32, 32)",
            )
        shape = sizes
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise DATASETS.refusal(
            name, f"num_classes={shown_value(num_classes)}: expected None or an integer >= 1"
        )
    return shape


def _adopt(name: str, obj: object) -> DatasetEntry:
    if isinstance(obj, DatasetEntry):
        return dataclasses.replace(obj, name=name)
    if not callable(obj):
        raise TypeError(f"expected {_LOADER}, got {obj!r}")
    return DatasetEntry(name, obj, uses_data_dir=True)


def _builtins() -> None:
    register_dataset(
        "mnist5k",
        lambda _root, _download: load_mnist5k(),
        holdout=True,
        input_shape=(1, 28, 28),
        num_classes=10,
    )
    register_dataset(
        "cifar10-foolbox",
        lambda _root, _download: load_cifar10_foolbox(),
        holdout=False,
        input_shape=(3, 32, 32),
        num_classes=10,
    )
    shapes = {
        "cifar10": ((3, 32, 32), 10),
        "cifar100": ((3, 32, 32), 100),
        "mnist": ((1, 28, 28), 10),
        "fashion-mnist": ((1, 28, 28), 10),
        "svhn": ((3, 32, 32), 10),
    }
    for name in TORCHVISION_SETS:
        shape, classes = shapes[name]
        register_dataset(
            name,
            functools.partial(load_torchvision_set, name),
            holdout=False,
            uses_data_dir=True,
            input_shape=shape,
            num_classes=classes,
        )


DATASETS: Registry[DatasetEntry] = Registry(
    "data set",
    "fedleak.datasets",
    "data.dataset",
    adopt=_adopt,
    builtins=_builtins,
    owner=lambda entry: entry.load,
    forbidden=",:",
)


def register_dataset(
    name: str,
    load: Loader | None = None,
    *,
    holdout: bool = True,
    uses_data_dir: bool = True,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    replace: bool = False,
) -> object:
    """Register a loader `(root, download) -> ImageDataset`; usable as a decorator. Arguments
    of the wrong type are refused here, in one line naming the argument."""
    DATASETS.check_name(name)
    shape = _checked_options(name, holdout, uses_data_dir, input_shape, num_classes)

    def add(loader: Loader) -> Loader:
        if not callable(loader):
            raise DATASETS.refusal(name, f"expected {_LOADER}, got {shown_value(loader)}")
        entry = DatasetEntry(name, loader, holdout, uses_data_dir, shape, num_classes)
        DATASETS.add(name, entry, replace=replace)
        return loader

    return add if load is None else add(load)


def dataset_names() -> tuple[str, ...]:
    """Every registered data-set name, plugins included (`folder:<path>` aside)."""
    return DATASETS.names()


def dataset_entry(name: str) -> DatasetEntry:
    """The entry of an image set `name`; a one-line error naming every registered set and
    `folder:<path>` (a text corpus is loaded with `load_corpus`)."""
    if not isinstance(name, str):
        raise ConfigError(f"data.dataset={name!r}: expected a name (a string)")
    if name.startswith(FOLDER_PREFIX):
        return DatasetEntry(name, lambda root, _download: load_folder(root, name), holdout=True)
    if name in TEXT_DATASETS:
        raise UnknownNameError(
            f"data.dataset={name!r} is a text corpus: load it with fedleak.data.load_corpus "
            "(the language task runs through `fedleak run text-quickstart`)"
        )
    try:
        return DATASETS.get(name)
    except UnknownNameError:
        raise UnknownNameError(
            f"data.dataset={name!r}: expected one of "
            f"{', '.join((*dataset_names(), *TEXT_DATASETS))} or {FOLDER_PREFIX}<path>"
        ) from None


def dataset_modality(name: str) -> str:
    """`tokens` for the text corpora, `image` for everything else."""
    return "tokens" if name in TEXT_DATASETS else "image"


def load_corpus(
    name: str, data_dir: str | Path | None = None, *, download: bool = True
) -> TextCorpus:
    """A text corpus by name (cached in the process); `data_dir` holds WikiText's download and
    the cleaned Wikipedia articles."""
    if name not in TEXT_DATASETS:
        raise UnknownNameError(f"dataset={name!r}: expected one of {', '.join(TEXT_DATASETS)}")
    root = str(Path(data_dir or default_data_dir()).expanduser().resolve())
    return _load_corpus(name, root, download)


@functools.lru_cache(maxsize=4)
def _load_corpus(name: str, root: str, download: bool) -> TextCorpus:
    if name == "wikipedia":
        return load_wikipedia(Path(root))
    if name == "lee-news":
        return load_lee_news()
    return load_wikitext(name, Path(root), download)


def data_shape(name: str) -> tuple[tuple[int, ...], int] | None:
    """(input shape, number of classes) when the set declares them, else None."""
    entry = dataset_entry(name)
    if entry.input_shape is None or entry.num_classes is None:
        return None
    return entry.input_shape, entry.num_classes


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
    split (mnist5k, folders, plugins that say so); the others keep their own split.
    `data_dir` matters to sets that live in the data folder only.
    """
    entry = dataset_entry(name)
    if not 0.0 <= test_fraction < 1.0:
        raise ConfigError(f"data.test-fraction={test_fraction}: expected a number in [0, 1)")
    # The cache key carries only what the set depends on, so equal requests share one load.
    if name.startswith(FOLDER_PREFIX):
        root = str(Path(name.removeprefix(FOLDER_PREFIX)).expanduser().resolve())
    elif entry.uses_data_dir:
        root = str(Path(data_dir or default_data_dir()).expanduser().resolve())
    else:
        root = ""
    holdout = entry.holdout
    return _load(
        name,
        root,
        seed if holdout else 0,
        test_fraction if holdout else 0.0,
        download and entry.uses_data_dir,
    )


@functools.lru_cache(maxsize=16)
def _load(name: str, root: str, seed: int, test_fraction: float, download: bool) -> ImageDataset:
    dataset = _read(name, root, download)
    # A loader that brings its own test split keeps it (an entry point's loader is adopted
    # with holdout=True, whatever it returns).
    if dataset_entry(name).holdout and not len(dataset.test_x):
        return with_holdout(dataset, test_fraction, seed)
    return dataset


@functools.lru_cache(maxsize=8)
def _read(name: str, root: str, download: bool) -> ImageDataset:
    # Cached apart from the hold-out: runs that differ only in their seed share one read.
    # A plug-in's loader that raises gives one line naming the set (PluginFailed).
    entry = dataset_entry(name)
    load = DATASETS.guarded(name, entry.load, "loader")
    try:
        dataset = load(Path(root), download)
    except DatasetError as error:  # the form its constructor checks: say it as the setting's
        problem = str(error).split(": ", 1)[-1]
        raise ConfigError(f"data.dataset={name!r}: {problem}") from None
    # Only an ImageDataset has had its pixels, dtypes and labels checked (its constructor):
    # an object that merely carries the same fields would take 0..255 pixels into every metric.
    if not isinstance(dataset, ImageDataset):
        raise ConfigError(
            f"data.dataset={name!r}: the loader returned {type(dataset).__name__}, expected an "
            "ImageDataset (fedleak.data.dataset.dataset_from_arrays builds one)"
        )
    # The declared shape and classes stand in for the set in checks made without loading it
    # (BatchNorm, payload, the model's spec): they must be the loaded set's.
    declared = (entry.input_shape, entry.num_classes)
    loaded = (tuple(dataset.input_shape), dataset.num_classes)
    if any(d is not None and d != value for d, value in zip(declared, loaded, strict=True)):
        raise ConfigError(
            f"data.dataset={name!r}: registered with input_shape={entry.input_shape} and "
            f"num_classes={entry.num_classes}, but its loader returned images of shape "
            f"{loaded[0]} in {loaded[1]} classes; declare what it returns (or neither)"
        )
    return dataset
