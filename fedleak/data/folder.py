"""A plain image folder as a data set: one sub-folder per class, class ids in sorted name order.

Images are never resized: reconstruction quality is measured in pixels, so silently rescaling a
user's images would change what is measured. All images must therefore share one size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from fedleak.data.dataset import DatasetUnavailable, ImageDataset, dataset_from_arrays

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


class FolderLayoutError(ValueError):
    """The image folder exists but cannot be read as one data set."""


def load_folder(path: Path, name: str) -> ImageDataset:
    """Read every image under `path/<class>/` as data set `name`; gray when all images are gray,
    else RGB."""
    root = path.expanduser().resolve()
    if not root.is_dir():
        raise DatasetUnavailable(
            f"data set {name!r} is not available: looked for the folder {root}, which does not "
            "exist. Create it with one sub-folder per class holding that class's images "
            f"({', '.join(sorted(IMAGE_SUFFIXES))}), all of one size."
        )
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    files: list[tuple[Path, int]] = []
    for label, class_name in enumerate(classes):
        members = sorted(
            p
            for p in (root / class_name).iterdir()
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not members:
            raise FolderLayoutError(
                f"{name}: class folder {root / class_name} holds no images "
                f"({', '.join(sorted(IMAGE_SUFFIXES))}); remove it or add some"
            )
        files += [(p, label) for p in members]
    if not files:
        raise DatasetUnavailable(
            f"data set {name!r} is not available: looked in {root} for class sub-folders holding "
            f"images ({', '.join(sorted(IMAGE_SUFFIXES))}) and found none. Put each class's "
            "images in its own sub-folder, all of one size."
        )
    images = _read_all([p for p, _ in files], name)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return dataset_from_arrays(name, images, labels, tuple(classes), str(root))


def _read_all(paths: list[Path], name: str) -> np.ndarray:
    """uint8 NCHW pixels of `paths`, after checking that they share one size."""
    headers = []
    for path in paths:
        with Image.open(path) as image:  # opening reads only the header
            headers.append((image.size, image.mode))
    (width, height), _ = headers[0]
    for path, ((w, h), _) in zip(paths, headers, strict=True):
        if (w, h) != (width, height):
            raise FolderLayoutError(
                f"{name}: images differ in size ({paths[0]} is {width}x{height}, {path} is "
                f"{w}x{h}); fedleak does not resize, so resize them to one size first"
            )
    modes = {mode for _, mode in headers}
    mode = "L" if modes <= _GRAY_MODES else "RGB"
    pixels = []
    for path in paths:
        with Image.open(path) as image:
            pixels.append(np.asarray(image.convert(mode), dtype=np.uint8))
    stacked = np.stack(pixels)
    return stacked[:, None] if mode == "L" else stacked.transpose(0, 3, 1, 2)
