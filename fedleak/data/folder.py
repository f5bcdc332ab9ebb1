"""A plain image folder as a data set: one sub-folder per class, class ids in sorted name order.

Images are never resized: reconstruction quality is measured in pixels, so silently rescaling a
user's images would change what is measured. All images must therefore share one size.
16-bit grayscale images are read at their full range (0..65535 -> [0, 1]); 8-bit images in the
same folder are scaled to match. Images whose range is unknown (32-bit integer or float
pixels outside 0..65535) are refused.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from fedleak.data.dataset import DatasetUnavailable, ImageDataset, dataset_from_arrays

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
# Modes whose pixels do not fit 8 bits: read as numbers, never through convert("L"), which clips.
_WIDE_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


class FolderLayoutError(ValueError):
    """The image folder exists but cannot be read as one data set."""


def load_folder(path: Path, name: str) -> ImageDataset:
    """Read every image under `path/<class>/`, in nested folders too (as torchvision's
    ImageFolder does; half a class in `class/batch2/` was left out without a word, audit EO2),
    as data set `name`; gray when all images are gray, else RGB."""
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
        members = _images_under(root / class_name)
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
    _check_each_file_once([p for p, _ in files], name)
    images = _read_all([p for p, _ in files], name)
    labels = np.array([label for _, label in files], dtype=np.int64)
    return dataset_from_arrays(name, images, labels, tuple(classes), str(root))


def _images_under(folder: Path) -> list[Path]:
    """The image files in `folder` and its sub-folders, hidden ones aside, in path order; a
    linked sub-folder is read as ImageFolder does, once (a link to a folder above would never
    end; a file reached twice is refused by `_check_each_file_once`). A link named like an
    image whose target is gone is listed, as ImageFolder lists it, for `_read_all` to refuse:
    skipped, it left an image out without a word."""
    found = []
    entered = {folder.resolve()}
    for here, folders, names in os.walk(folder, followlinks=True):
        kept = []
        for name in sorted(folders):
            real = (Path(here) / name).resolve()
            if not name.startswith(".") and real not in entered:
                entered.add(real)
                kept.append(name)
        folders[:] = kept
        found += [Path(here) / n for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def _check_each_file_once(paths: list[Path], name: str) -> None:
    """Refuse a file reached twice through links (a linked class folder, a linked image): its
    copies could land with a client and in the auxiliary or test split, under two labels."""
    seen: dict[Path, Path] = {}
    for path in paths:
        try:
            real = path.resolve()
        except (OSError, RuntimeError) as error:  # a link loop named like an image
            raise FolderLayoutError(
                f"{name}: {path} cannot be read ({error}); repair or remove it"
            ) from None
        if real in seen:
            raise FolderLayoutError(
                f"{name}: {path} and {seen[real]} are the same file (through a link); each "
                "image must appear once, or the splits that must be disjoint could share it"
            )
        seen[real] = path


def _read_all(paths: list[Path], name: str) -> np.ndarray:
    """uint8 NCHW pixels of `paths`, after checking that they share one size."""
    headers = []
    for path in paths:
        with _opened(path, name) as image:  # opening reads only the header
            headers.append((image.size, image.mode))
    (width, height), _ = headers[0]
    for path, ((w, h), _) in zip(paths, headers, strict=True):
        if (w, h) != (width, height):
            raise FolderLayoutError(
                f"{name}: images differ in size ({paths[0]} is {width}x{height}, {path} is "
                f"{w}x{h}); fedleak does not resize, so resize them to one size first"
            )
    modes = {mode for _, mode in headers}
    wide = modes & _WIDE_MODES
    if wide and not modes <= _GRAY_MODES:
        raise FolderLayoutError(
            f"{name}: mixes 16-bit or wider grayscale images ({', '.join(sorted(wide))}) with "
            "colour ones; convert them to one kind first"
        )
    mode = "L" if modes <= _GRAY_MODES else "RGB"
    pixels = []
    for path in paths:
        with _opened(path, name) as image:
            pixels.append(
                _wide_gray(image, path, name) if wide else np.asarray(image.convert(mode))
            )
    stacked = np.stack(pixels)
    return stacked[:, None] if mode == "L" else stacked.transpose(0, 3, 1, 2)


@contextlib.contextmanager
def _opened(path: Path, name: str) -> Iterator[Image.Image]:
    """`path` opened by PIL; what PIL cannot read (a cut file, an image past its decompression
    limit) is one line naming the file, so it can be found among thousands."""
    try:
        with Image.open(path) as image:
            yield image
    except (OSError, Image.DecompressionBombError) as error:
        raise FolderLayoutError(
            f"{name}: {path} cannot be read ({error}); repair or remove it"
        ) from None


def _wide_gray(image: Image.Image, path: Path, name: str) -> np.ndarray:
    """One grayscale image as uint16 at full range: 16-bit as is, 8-bit x 257, others refused."""
    if image.mode not in _WIDE_MODES:
        return np.asarray(image.convert("L"), dtype=np.uint16) * np.uint16(257)
    if image.mode == "F":
        raise FolderLayoutError(
            f"{name}: {path} has floating-point pixels, whose range fedleak cannot know; "
            "convert it to an 8- or 16-bit image"
        )
    values = np.asarray(image)
    if values.min() < 0 or values.max() > 65535:
        raise FolderLayoutError(
            f"{name}: {path} has {image.mode} pixels outside 0..65535 (range "
            f"{values.min():g}..{values.max():g}); fedleak reads 8- and 16-bit images only, "
            "so convert it to one of those"
        )
    return values.astype(np.uint16)
