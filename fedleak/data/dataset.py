"""The in-memory image data set every other part of fedleak reads, and the errors of loading one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from fedleak.data.content import copies_of
from fedleak.data.stratify import holdout_split


class DatasetUnavailable(RuntimeError):
    """The data set's files are not where fedleak looked; the message names every place and a way
    to obtain them."""


class DatasetError(ValueError):
    """A loaded data set breaks the form every metric relies on (e.g. pixels outside [0, 1])."""


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """Images as float32 NCHW tensors in [0, 1] with int64 labels.

    `test_x` may hold no rows: victim-only sets keep every image for the clients, and the server
    then reports no test accuracy. `source` says where the images were read from.
    """

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    class_names: tuple[str, ...]
    source: str

    modality = "image"

    def __post_init__(self) -> None:
        # A loader bug here would silently corrupt every metric (PSNR assumes a peak of 1, the
        # cross-entropy labels below num_classes), so the form is checked once per load.
        for split, x, y in (
            ("train", self.train_x, self.train_y),
            ("test", self.test_x, self.test_y),
        ):
            if x.ndim != 4 or x.dtype != torch.float32:
                self._refuse(
                    f"{split}_x must be float32 NCHW, got {x.dtype} of shape {tuple(x.shape)}"
                )
            if x.shape[1] not in (1, 3):
                # LPIPS, the image grids and the report read grey or RGB images only; found
                # after a round's training, it failed every attack or lost the round.
                self._refuse(
                    f"{split}_x must hold 1 (grey) or 3 (RGB) channels, got {x.shape[1]} "
                    f"(shape {tuple(x.shape)})"
                )
            if y.ndim != 1 or y.dtype != torch.int64 or len(y) != len(x):
                self._refuse(
                    f"{split}_y must be int64 with one label per image, got {y.dtype} of shape "
                    f"{tuple(y.shape)} for {len(x)} images"
                )
            if len(x) and not (torch.isfinite(x).all() and x.min() >= 0 and x.max() <= 1):
                self._refuse(
                    f"{split}_x must hold pixels in [0, 1] (fedleak scores and attacks in that "
                    f"range; normalise inside the model), found {float(x.min()):.4g} to "
                    f"{float(x.max()):.4g}"
                )
            if len(y) and (y.min() < 0 or y.max() >= self.num_classes):
                self._refuse(
                    f"{split}_y must hold labels 0 to {self.num_classes - 1} ({self.num_classes} "
                    f"classes), found {int(y.min())} to {int(y.max())}"
                )
        if self.test_x.shape[1:] != self.train_x.shape[1:]:
            self._refuse(
                f"test images {tuple(self.test_x.shape[1:])} differ from training images "
                f"{tuple(self.train_x.shape[1:])}"
            )
        if len(self.class_names) != self.num_classes:
            self._refuse(f"{len(self.class_names)} class names for {self.num_classes} classes")
        if self.num_classes < 2:
            # Cross-entropy over one class is 0 for every input: every update would be 0 and
            # every "reconstruction" scored against nothing learned.
            self._refuse(f"{self.num_classes} class; expected at least 2")

    def _refuse(self, problem: str) -> None:
        raise DatasetError(f"data set {self.name!r}: {problem}")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image."""
        _, c, h, w = self.train_x.shape
        return int(c), int(h), int(w)


def images_to_tensor(images: np.ndarray) -> Tensor:
    """uint8 or uint16 NCHW pixels -> float32 in [0, 1] (each type's full range); done once per
    load so batches are plain slices."""
    if images.dtype not in (np.uint8, np.uint16) or images.ndim != 4:
        raise ValueError(f"expected uint8 or uint16 NCHW pixels, got {images.dtype} {images.shape}")
    top = float(np.iinfo(images.dtype).max)
    if images.dtype == np.uint16:
        images = images.astype(np.int32)  # torch has no uint16 arithmetic on every version
    # from_numpy needs a writable buffer; idx files and PIL can hand over read-only ones.
    return torch.from_numpy(np.require(images, requirements=["C", "W"])).float().div_(top)


def dataset_from_arrays(
    name: str,
    images: np.ndarray,
    labels: np.ndarray,
    class_names: tuple[str, ...],
    source: str,
    *,
    test_images: np.ndarray | None = None,
    test_labels: np.ndarray | None = None,
) -> ImageDataset:
    """Build an `ImageDataset` from uint8 (or 16-bit) NCHW arrays; no test arrays means an empty
    test split."""
    if test_images is None or test_labels is None:
        test_images = np.zeros((0, *images.shape[1:]), dtype=images.dtype)
        test_labels = np.zeros(0, dtype=np.int64)
    return ImageDataset(
        name=name,
        train_x=images_to_tensor(images),
        train_y=torch.from_numpy(np.asarray(labels, dtype=np.int64).copy()),
        test_x=images_to_tensor(test_images),
        test_y=torch.from_numpy(np.asarray(test_labels, dtype=np.int64).copy()),
        num_classes=len(class_names),
        class_names=class_names,
        source=source,
    )


def with_holdout(dataset: ImageDataset, test_fraction: float, seed: int) -> ImageDataset:
    """Move a stratified `test_fraction` of the training images into the (empty) test split,
    less those whose pixels a training image repeats: a copy on both sides (common in scraped
    folders) would measure accuracy on images the model trained on."""
    if len(dataset.test_x):
        raise ValueError(f"{dataset.name} already has a test split")
    train, test = holdout_split(dataset.train_y.numpy(), test_fraction, seed)
    train_t, test_t = torch.from_numpy(train), torch.from_numpy(test)
    seen = copies_of(dataset.train_x[test_t], dataset.train_x[train_t])
    source = dataset.source
    if seen.any():
        if seen.all():
            raise DatasetError(
                f"data set {dataset.name!r}: each of the {len(seen)} images held out for the "
                "test split repeats a training image's pixels, so no test split is left; "
                "remove the copies from the data"
            )
        # Said where the run records the data's provenance (environment.json, the report).
        source = f"{source} (test split less {int(seen.sum())} copies of training images)"
    test_t = test_t[torch.from_numpy(~seen)]
    return ImageDataset(
        name=dataset.name,
        train_x=dataset.train_x[train_t],
        train_y=dataset.train_y[train_t],
        test_x=dataset.train_x[test_t],
        test_y=dataset.train_y[test_t],
        num_classes=dataset.num_classes,
        class_names=dataset.class_names,
        source=source,
    )
