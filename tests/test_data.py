"""The data room: real embedded sets, partitions, the auxiliary split and the batch sampler."""

from __future__ import annotations

import gzip
import importlib.util
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import fedleak.data.torchvision_sets as torchvision_sets
from fedleak.data import (
    DATASETS,
    DatasetUnavailable,
    DataSplitError,
    FolderLayoutError,
    UnknownDatasetError,
    auxiliary,
    build_federated_data,
    client_batch,
    load_dataset,
    partition_indices,
    poisson_batch,
    poisson_rows,
    sample_batch,
    split_auxiliary,
)
from fedleak.data.dataset import DatasetError, ImageDataset

MNIST5K_LABELS = np.repeat(np.arange(10), 500)


# --- data sets ------------------------------------------------------------------------------


def test_mnist5k_is_the_real_5000_image_subset():
    data = load_dataset("mnist5k", test_fraction=0.0)
    assert data.train_x.shape == (5000, 1, 28, 28)
    assert data.input_shape == (1, 28, 28)
    assert data.train_x.dtype == torch.float32 and data.train_y.dtype == torch.int64
    assert torch.bincount(data.train_y).tolist() == [500] * 10
    assert data.train_x.min() == 0.0 and data.train_x.max() == 1.0
    # MNIST's pixel mean is about 0.13; random or blank data would not land there.
    assert 0.10 < float(data.train_x.mean()) < 0.16
    assert len(data.test_x) == 0 and data.test_x.shape[1:] == (1, 28, 28)
    assert data.class_names == tuple("0123456789")


def test_mnist5k_holdout_is_stratified_disjoint_and_seeded():
    full = load_dataset("mnist5k", test_fraction=0.0).train_x.flatten(1)
    a = load_dataset("mnist5k", seed=3, test_fraction=0.2)
    assert (len(a.train_x), len(a.test_x)) == (4000, 1000)
    assert torch.bincount(a.test_y).tolist() == [100] * 10
    # Every image sits in exactly one split: compare pixel sums as a cheap fingerprint.
    sums = torch.cat([a.train_x, a.test_x]).flatten(1).sum(1).sort().values
    assert torch.allclose(sums, full.sum(1).sort().values)
    again = load_dataset("mnist5k", seed=3, test_fraction=0.2)
    assert again is a  # cached in the process
    other = load_dataset("mnist5k", seed=4, test_fraction=0.2)
    assert not torch.equal(other.test_x, a.test_x)


def test_cifar10_foolbox_images_and_labels_match_file_names():
    data = load_dataset("cifar10-foolbox")
    assert data.train_x.shape == (20, 3, 32, 32) and len(data.test_x) == 0
    assert data.num_classes == 10 and data.class_names[3] == "cat"
    folder = Path(importlib.util.find_spec("foolbox").submodule_search_locations[0]) / "data"
    named = sorted(
        (int(m.group(1)), int(m.group(2)), p)
        for p in folder.iterdir()
        if (m := re.fullmatch(r"cifar10_(\d+)_(\d+)\.png", p.name))
    )
    assert data.train_y.tolist() == [label for _, label, _ in named]
    first = np.array(Image.open(named[0][2]).convert("RGB"))
    assert torch.equal(data.train_x[0], torch.from_numpy(first).permute(2, 0, 1).float() / 255)
    # Colour images: the channels differ.
    assert float((data.train_x[:, 0] - data.train_x[:, 2]).abs().max()) > 0.2


def test_missing_torchvision_set_names_every_place_looked(tmp_path):
    with pytest.raises(DatasetUnavailable) as caught:
        load_dataset("cifar10", tmp_path, download=False)
    message = str(caught.value)
    assert str(tmp_path / "cifar-10-batches-py") in message
    assert "downloading was off" in message and "internet" in message
    assert "mnist5k" in message and "\n" not in message


def test_a_damaged_copy_is_said_to_be_damaged_not_a_failed_download(tmp_path):
    """Truncated idx files read as "downloading was tried and failed" (audit AP3)."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
        (raw / stem).write_bytes(b"\x00\x00\x08\x03" + (60000).to_bytes(4, "big") + bytes(16))
    for stem in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
        (raw / stem).write_bytes(b"\x00\x00\x08\x01" + (60000).to_bytes(4, "big") + bytes(8))
    for download in (False, True):
        with pytest.raises(DatasetUnavailable) as caught:
            load_dataset("mnist", tmp_path, download=download)
        message = str(caught.value)
        assert f"{raw} holds t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte," in message
        assert "damaged or partial copy" in message and "downloading was" not in message


def test_a_failed_download_leaves_no_empty_folders_but_keeps_partial_files(tmp_path, monkeypatch):
    def failing_download(name, root, download, *, train):  # as torchvision does offline
        (root / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
        if partial:
            (root / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f")
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision_sets, "_read", failing_download)
    (tmp_path / "kept").mkdir()
    for partial in (False, True):
        with pytest.raises(DatasetUnavailable, match="downloading was tried and failed"):
            load_dataset("mnist", tmp_path / "data", download=True)
        assert (tmp_path / "data" / "MNIST" / "raw").is_dir() == partial
    assert (tmp_path / "kept").is_dir()


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (
            {"train_x": torch.full((4, 1, 2, 2), 255.0)},
            r"train_x must hold pixels in \[0, 1\].* 255 to 255",
        ),
        (
            {"test_x": torch.full((2, 1, 2, 2), float("nan"))},
            r"test_x must hold pixels in \[0, 1\]",
        ),
        ({"train_y": torch.tensor([1, 2, 3, 10])}, r"train_y must hold labels 0 to 9 .* 1 to 10"),
        ({"test_y": torch.tensor([-1, 0])}, r"test_y must hold labels 0 to 9"),
        ({"train_x": torch.zeros(4, 1, 2, 2, dtype=torch.float64)}, "train_x must be float32 NCHW"),
        # LPIPS and the image grids read grey or RGB: found after training (audit AP2).
        (
            {"train_x": torch.rand(4, 4, 2, 2), "test_x": torch.rand(2, 4, 2, 2)},
            r"train_x must hold 1 \(grey\) or 3 \(RGB\) channels, got 4",
        ),
    ],
)
def test_a_data_set_that_would_corrupt_every_metric_is_refused(change, match):
    parts = {
        "train_x": torch.rand(4, 1, 2, 2),
        "train_y": torch.tensor([0, 1, 2, 9]),
        "test_x": torch.rand(2, 1, 2, 2),
        "test_y": torch.tensor([3, 4]),
    }
    with pytest.raises(DatasetError, match=match) as caught:
        ImageDataset(
            "mine", **(parts | change), num_classes=10, class_names=tuple("abcdefghij"), source=""
        )
    assert str(caught.value).startswith("data set 'mine': ") and "\n" not in str(caught.value)
    ImageDataset("mine", **parts, num_classes=10, class_names=tuple("abcdefghij"), source="")


def test_a_data_set_of_one_class_is_refused() -> None:
    """One class: the loss is 0 for every input, every update 0, and the run still scored
    every row ok at label accuracy 1 (audit AP4)."""
    x = torch.rand(4, 1, 2, 2)
    with pytest.raises(DatasetError, match=r"data set 'one': 1 class; expected at least 2"):
        ImageDataset(
            "one",
            x,
            torch.zeros(4, dtype=torch.int64),
            x,
            torch.zeros(4, dtype=torch.int64),
            1,
            ("only",),
            "",
        )


def test_missing_fashion_mnist_names_debian_and_torchvision_places(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision_sets, "DEBIAN_FASHION_MNIST", tmp_path / "debian")
    with pytest.raises(DatasetUnavailable) as caught:
        load_dataset("fashion-mnist", tmp_path / "data", download=False)
    message = str(caught.value)
    assert str(tmp_path / "debian") in message
    assert str(tmp_path / "data" / "FashionMNIST" / "raw") in message
    assert "apt-get install dataset-fashion-mnist" in message


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _fake_mnist(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)


def test_torchvision_mnist_files_are_converted_once_to_float(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (x, y), (tx, ty) = _fake_mnist(30, 0), _fake_mnist(12, 1)
    for stem, array in (
        ("train-images-idx3-ubyte", x),
        ("train-labels-idx1-ubyte", y),
        ("t10k-images-idx3-ubyte", tx),
        ("t10k-labels-idx1-ubyte", ty),
    ):
        _write_idx(raw / stem, array)
    data = load_dataset("mnist", tmp_path, download=False)
    assert data.train_x.shape == (30, 1, 28, 28) and data.test_x.shape == (12, 1, 28, 28)
    assert torch.equal(data.train_x[:, 0], torch.from_numpy(x).float() / 255)
    assert data.test_y.tolist() == ty.tolist()


def test_fashion_mnist_reads_debian_idx_files(tmp_path, monkeypatch):
    (x, y), (tx, ty) = _fake_mnist(25, 2), _fake_mnist(7, 3)
    for stem, array in (
        ("train-images-idx3-ubyte", x),
        ("train-labels-idx1-ubyte", y),
        ("t10k-images-idx3-ubyte", tx),
        ("t10k-labels-idx1-ubyte", ty),
    ):
        _write_idx(tmp_path / f"{stem}.gz", array)
    monkeypatch.setattr(torchvision_sets, "DEBIAN_FASHION_MNIST", tmp_path)
    data = load_dataset("fashion-mnist", tmp_path / "unused", download=False)
    assert data.train_x.shape == (25, 1, 28, 28) and len(data.test_x) == 7
    assert torch.equal(data.test_x[:, 0], torch.from_numpy(tx).float() / 255)
    assert data.train_y.tolist() == y.tolist() and data.class_names[9] == "Ankle boot"


def test_truncated_idx_file_is_reported(tmp_path):
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">3I", 10, 28, 28) + b"\x00" * 99)
    with pytest.raises(DatasetUnavailable, match="truncated"):
        torchvision_sets.read_idx(path)


def test_unknown_name_lists_the_allowed_names():
    with pytest.raises(UnknownDatasetError) as caught:
        load_dataset("imagenet")
    message = str(caught.value)
    assert "'imagenet'" in message and "\n" not in message
    assert all(name in message for name in DATASETS) and "folder:<path>" in message


def _save_png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def test_image_folder_loads_classes_in_name_order(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 6, 5), dtype=np.uint8)
    for i, pixels in enumerate(images):
        _save_png(tmp_path / ("b" if i % 2 else "a") / f"{i:02d}.png", pixels)
    data = load_dataset(f"folder:{tmp_path}", test_fraction=0.2, seed=0)
    assert data.class_names == ("a", "b") and data.input_shape == (1, 6, 5)
    assert (len(data.train_x), len(data.test_x)) == (8, 2)
    assert sorted(data.test_y.tolist()) == [0, 1]
    every = torch.cat([data.train_x, data.test_x]).flatten(1).sum(1).sort().values
    assert torch.allclose(
        every, torch.from_numpy(images).float().flatten(1).sum(1).sort().values / 255
    )


def test_image_folder_reads_the_nested_folders_of_a_class(tmp_path):
    """Half a class in `class/batch2/` was left out without a word (audit EO2); a hidden
    folder stays out, as at the top."""
    where = ("a/0.png", "a/batch2/1.png", "a/batch2/deeper/2.png", "b/3.png", "b/.git/4.png")
    for i, path in enumerate(where):
        _save_png(tmp_path / path, np.full((4, 4), 40 * i, dtype=np.uint8))
    data = load_dataset(f"folder:{tmp_path}", test_fraction=0.2, seed=0)
    assert data.class_names == ("a", "b")
    labels = torch.cat([data.train_y, data.test_y]).tolist()
    assert sorted(labels) == [0, 0, 0, 1]
    # A linked sub-folder is read too, once, and a link to a folder above ends (audit EP4).
    linked = tmp_path / "linked"
    for i, path in enumerate(("a/0.png", "a/1.png", "b/2.png", "elsewhere/3.png")):
        _save_png(
            linked.parent / ("" if path.startswith("elsewhere") else "linked") / path,
            np.full((4, 4), 30 * i, dtype=np.uint8),
        )
    (linked / "b" / "more").symlink_to(tmp_path / "elsewhere")
    (linked / "b" / "loop").symlink_to(linked / "b")
    # ... at any depth: a nested folder's link to itself (audit ER7).
    (linked / "a" / "sub").mkdir()
    (linked / "a" / "1.png").rename(linked / "a" / "sub" / "1.png")
    (linked / "a" / "sub" / "loop").symlink_to(linked / "a" / "sub")
    data = load_dataset(f"folder:{linked}", test_fraction=0.2, seed=0)
    assert sorted(torch.cat([data.train_y, data.test_y]).tolist()) == [0, 0, 1, 1]


def test_image_folder_rejects_mixed_sizes_and_missing_folders(tmp_path):
    _save_png(tmp_path / "a" / "0.png", np.zeros((8, 8, 3), dtype=np.uint8))
    _save_png(tmp_path / "b" / "1.png", np.zeros((9, 8, 3), dtype=np.uint8))
    with pytest.raises(FolderLayoutError, match="differ in size"):
        load_dataset(f"folder:{tmp_path}")
    with pytest.raises(DatasetUnavailable, match=re.escape(str(tmp_path / "nowhere"))):
        load_dataset(f"folder:{tmp_path / 'nowhere'}")


def test_image_folder_refuses_a_link_to_an_image_that_is_gone(tmp_path):
    """Skipped without a word, it left an image out of its class (audit ER12); ImageFolder
    lists it and fails on it."""
    for i, path in enumerate(("a/0.png", "a/1.png", "b/2.png", "b/3.png")):
        _save_png(tmp_path / path, np.full((4, 4), 40 * i, dtype=np.uint8))
    moved = tmp_path / "a" / "moved.png"
    moved.symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(FolderLayoutError, match=re.escape(f"{moved} cannot be read (")):
        load_dataset(f"folder:{tmp_path}")
    moved.unlink()
    moved.symlink_to(moved)  # a loop: "internal error (RuntimeError ...)" (audit EU3)
    with pytest.raises(FolderLayoutError, match=re.escape(f"{moved} cannot be read (")):
        load_dataset(f"folder:{tmp_path}")


def test_image_folder_names_the_file_pil_cannot_read(tmp_path):
    # A cut PNG opens (its header is whole) and fails on decoding, with PIL's words alone.
    rng = np.random.default_rng(0)
    for i in range(3):
        _save_png(tmp_path / "a" / f"{i}.png", rng.integers(0, 256, (32, 32), dtype=np.uint8))
    cut = tmp_path / "a" / "1.png"
    cut.write_bytes(cut.read_bytes()[:500])
    with pytest.raises(FolderLayoutError, match=re.escape(f"{cut} cannot be read")):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "a" / "1.png").write_bytes(b"not an image")
    with pytest.raises(FolderLayoutError, match=re.escape(f"{cut} cannot be read")):
        load_dataset(f"folder:{tmp_path}")


def test_image_folder_refuses_a_file_reached_twice_through_links(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        _save_png(tmp_path / "a" / f"{i}.png", rng.integers(0, 256, (8, 8), dtype=np.uint8))
    (tmp_path / "b").symlink_to(tmp_path / "a")  # every image again, under another label
    with pytest.raises(FolderLayoutError, match="are the same file"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "b").unlink()
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "link.png").symlink_to(tmp_path / "a" / "0.png")
    with pytest.raises(FolderLayoutError, match=re.escape(str(tmp_path / "b" / "link.png"))):
        load_dataset(f"folder:{tmp_path}")


# --- partitions -----------------------------------------------------------------------------


def _check_partitions(parts: list[np.ndarray], pool: np.ndarray, n: int) -> None:
    assert len(parts) == n
    assert all(len(p) > 0 for p in parts)
    joined = np.concatenate(parts)
    assert len(joined) == len(np.unique(joined))  # disjoint
    assert np.array_equal(np.sort(joined), np.sort(pool))  # cover


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), min_size=1, max_size=200),
    n=st.integers(1, 12),
    scheme=st.sampled_from(["iid", "dirichlet", "dirichlet-clients", "shards"]),
    seed=st.integers(0, 2**32 - 1),
    alpha=st.floats(0.01, 10.0),
    shards=st.integers(1, 4),
    use_pool=st.booleans(),
)
def test_partitions_are_disjoint_cover_the_pool_and_repeat(
    labels, n, scheme, seed, alpha, shards, use_pool
):
    labels = np.array(labels)
    pool = np.arange(len(labels))[::2] if use_pool else None
    expected = np.arange(len(labels)) if pool is None else pool
    kwargs = {"alpha": alpha, "shards_per_partition": shards, "pool": pool}
    needed = n * shards if scheme == "shards" else n
    if len(expected) < needed:
        with pytest.raises(DataSplitError, match="exceed"):
            partition_indices(labels, n, scheme, seed, **kwargs)
        return
    parts = partition_indices(labels, n, scheme, seed, **kwargs)
    _check_partitions(parts, expected, n)
    again = partition_indices(labels, n, scheme, seed, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def _dominant_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[p]).max() / len(p) for p in parts]))


def test_small_alpha_dirichlet_is_skewed_and_iid_is_not():
    skewed = partition_indices(MNIST5K_LABELS, 10, "dirichlet", 0, alpha=0.05)
    iid = partition_indices(MNIST5K_LABELS, 10, "iid", 0)
    assert _dominant_share(MNIST5K_LABELS, skewed) > 0.6
    assert _dominant_share(MNIST5K_LABELS, iid) < 0.2
    shards = partition_indices(MNIST5K_LABELS, 10, "shards", 0, shards_per_partition=2)
    assert all(len(np.unique(MNIST5K_LABELS[p])) <= 2 for p in shards)
    assert not np.array_equal(partition_indices(MNIST5K_LABELS, 10, "iid", 1)[0], iid[0])


def test_per_client_dirichlet_gives_equal_clients_whose_mix_follows_alpha():
    """Hsu et al.'s form: each client draws its class mix, all clients the same size."""
    for alpha, low, high in ((0.05, 0.8, 1.0), (100.0, 0.0, 0.3)):
        parts = partition_indices(MNIST5K_LABELS, 10, "dirichlet-clients", 0, alpha=alpha)
        _check_partitions(parts, np.arange(len(MNIST5K_LABELS)), 10)
        assert {len(p) for p in parts} == {len(MNIST5K_LABELS) // 10}
        assert low < _dominant_share(MNIST5K_LABELS, parts) < high
    # The per-class form at the same alpha gives clients of very different sizes.
    per_class = partition_indices(MNIST5K_LABELS, 10, "dirichlet", 0, alpha=0.05)
    assert max(len(p) for p in per_class) > 2 * min(len(p) for p in per_class)


def test_tiny_alpha_still_gives_every_partition_an_image():
    parts = partition_indices(MNIST5K_LABELS[:40], 30, "dirichlet", 7, alpha=1e-3)
    _check_partitions(parts, np.arange(40), 30)


def test_bad_partition_settings_are_named():
    with pytest.raises(DataSplitError, match="scheme='random'"):
        partition_indices(MNIST5K_LABELS, 2, "random", 0)
    with pytest.raises(DataSplitError, match="num_partitions=11 exceeds the 10 images"):
        partition_indices(MNIST5K_LABELS[:10], 11, "iid", 0)
    with pytest.raises(DataSplitError, match="alpha=0"):
        partition_indices(MNIST5K_LABELS, 2, "dirichlet", 0, alpha=0)


# --- auxiliary split ------------------------------------------------------------------------


def test_aux_is_stratified_and_disjoint_from_every_client():
    fd = build_federated_data(
        "mnist5k", None, 8, "dirichlet", 0, alpha=0.3, aux_size=1000, public_size=40
    )
    labels = fd.dataset.train_y.numpy()
    assert np.bincount(labels[fd.aux]).tolist() == [100] * 10
    assert len(fd.public) == 40
    for part in fd.partitions:
        assert not np.intersect1d(part, fd.aux).size
        assert not np.intersect1d(part, fd.public).size
    assert not np.intersect1d(fd.aux, fd.public).size
    everyone = np.concatenate([fd.aux, fd.public, *fd.partitions])
    assert np.array_equal(np.sort(everyone), np.arange(len(labels)))
    x, y = auxiliary(fd)
    assert torch.equal(x, fd.dataset.train_x[torch.from_numpy(fd.aux.copy())])
    assert y.tolist() == labels[fd.aux].tolist()
    with pytest.raises(ValueError, match="read-only"):
        fd.aux[0] = 0


def test_server_with_one_partition_sees_the_clients_aux():
    clients = build_federated_data("mnist5k", None, 6, "iid", 2, aux_size=300, public_size=10)
    server = build_federated_data("mnist5k", None, 1, "iid", 2, aux_size=300, public_size=10)
    assert np.array_equal(clients.aux, server.aux)
    assert np.array_equal(clients.public, server.public)
    assert (
        build_federated_data("mnist5k", None, 6, "iid", 2, aux_size=300, public_size=10) is clients
    )


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_beta_sets_the_in_distribution_share_and_clients_hold_in_classes(beta):
    in_classes = None if beta < 1 else (0, 1, 2, 3, 4)
    split = split_auxiliary(MNIST5K_LABELS, 1000, 0, beta=beta, in_classes=in_classes)
    aux_labels = MNIST5K_LABELS[split.aux]
    assert len(split.aux) == 1000
    assert int((aux_labels < 5).sum()) == round(beta * 1000)
    assert set(MNIST5K_LABELS[split.clients]) == {0, 1, 2, 3, 4}
    assert len(split.clients) == 2500 - round(beta * 1000)
    assert not np.intersect1d(split.aux, split.clients).size


def test_under_the_aux_shift_the_model_is_tested_on_the_clients_classes():
    # The clients hold classes 0-4 only; test images of 5-9 capped accuracy at 0.5.
    shifted = build_federated_data("mnist5k", None, 4, "iid", 0, aux_size=1000, aux_beta=0.5)
    clients = np.unique(shifted.dataset.train_y.numpy()[np.concatenate(shifted.partitions)])
    assert clients.tolist() == [0, 1, 2, 3, 4]
    assert np.unique(shifted.dataset.test_y.numpy()).tolist() == [0, 1, 2, 3, 4]
    assert len(shifted.dataset.test_y) == 500  # 100 per class, as without the shift
    plain = build_federated_data("mnist5k", None, 4, "iid", 0, aux_size=1000)
    assert np.unique(plain.dataset.test_y.numpy()).tolist() == list(range(10))
    assert torch.equal(plain.dataset.test_x[plain.dataset.test_y < 5], shifted.dataset.test_x)


def test_plain_aux_keeps_all_classes_for_clients_and_is_seeded():
    split = split_auxiliary(MNIST5K_LABELS, 50, 0)
    assert np.bincount(MNIST5K_LABELS[split.aux]).tolist() == [5] * 10
    assert len(split.clients) == 4950
    assert not np.array_equal(split_auxiliary(MNIST5K_LABELS, 50, 1).aux, split.aux)
    assert np.array_equal(split_auxiliary(MNIST5K_LABELS, 50, 0).aux, split.aux)


def test_aux_never_draws_an_image_whose_pixels_another_repeats():
    repeated = np.zeros(len(MNIST5K_LABELS), dtype=bool)
    repeated[::3] = True
    for beta, in_classes in ((1.0, None), (0.3, None), (1.0, (0, 1, 2, 3, 4))):
        split = split_auxiliary(
            MNIST5K_LABELS, 600, 0, beta=beta, in_classes=in_classes, repeated=repeated
        )
        assert len(split.aux) == 600 and not repeated[split.aux].any()
        # Without repeated images the draw is the one made without the mask.
        unmasked = split_auxiliary(MNIST5K_LABELS, 600, 0, beta=beta, in_classes=in_classes)
        masked = split_auxiliary(
            MNIST5K_LABELS, 600, 0, beta=beta, in_classes=in_classes, repeated=repeated & False
        )
        assert np.array_equal(unmasked.aux, masked.aux)
        assert np.array_equal(unmasked.clients, masked.clients)
    with pytest.raises(DataSplitError, match=r"aux_size=4000 needs 4000 .* only 3333"):
        split_auxiliary(MNIST5K_LABELS, 4000, 0, repeated=repeated)


def test_a_copied_folder_image_never_reaches_the_attacker(tmp_path):
    # Half of 40 images saved twice under other names (one copy in the other class): drawn by
    # index, 20 auxiliary images of 60 would take a copy of some client's image.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 6, 6, 3), dtype=np.uint8)
    for i, pixels in enumerate(images):
        _save_png(tmp_path / "ab"[i % 2] / f"{i:02d}.png", pixels)
        if i < 20:
            _save_png(tmp_path / "ab"[(i + 1) % 2] / f"copy-{i:02d}.png", pixels)
    fd = build_federated_data(f"folder:{tmp_path}", None, 3, "iid", 0, aux_size=20)
    x = fd.dataset.train_x.flatten(1)
    aux = {tuple(row.tolist()) for row in x[torch.from_numpy(fd.aux.copy())]}
    clients = np.concatenate(fd.partitions)
    assert len(aux) == 20 and len(clients) == len(x) - 20
    assert not aux & {tuple(row.tolist()) for row in x[torch.from_numpy(clients)]}


def test_bad_aux_settings_are_named():
    with pytest.raises(DataSplitError, match="aux_size=5000 leaves none"):
        split_auxiliary(MNIST5K_LABELS, 5000, 0)
    with pytest.raises(DataSplitError, match=r"beta=1\.5"):
        split_auxiliary(MNIST5K_LABELS, 10, 0, beta=1.5)
    with pytest.raises(DataSplitError, match="out-of-distribution"):
        split_auxiliary(MNIST5K_LABELS, 3000, 0, beta=0.0)
    with pytest.raises(DataSplitError, match="aux_size=21"):
        build_federated_data("cifar10-foolbox", None, 2, "iid", 0, aux_size=21)


def test_cifar10_foolbox_runs_without_aux():
    fd = build_federated_data("cifar10-foolbox", None, 4, "iid", 0, aux_size=0)
    assert [len(p) for p in fd.partitions] == [5, 5, 5, 5]
    x, y = auxiliary(fd)
    assert x.shape == (0, 3, 32, 32) and y.shape == (0,)


# --- batch sampler --------------------------------------------------------------------------


def test_batches_repeat_per_seed_client_round_and_vary_otherwise():
    partition = np.arange(100, 164)
    batch = sample_batch(partition, 8, 0, 3, 1)
    assert len(np.unique(batch)) == 8 and np.isin(batch, partition).all()
    assert np.array_equal(batch, sample_batch(partition, 8, 0, 3, 1))
    for other in (
        sample_batch(partition, 8, 0, 3, 2),
        sample_batch(partition, 8, 0, 4, 1),
        sample_batch(partition, 8, 1, 3, 1),
    ):
        assert not np.array_equal(batch, other)
    whole = sample_batch(partition, 64, 0, 3, 1)
    assert np.array_equal(np.sort(whole), partition)  # without replacement
    with pytest.raises(DataSplitError, match="batch_size=65"):
        sample_batch(partition, 65, 0, 3, 1)


def test_a_poisson_batch_draws_each_example_at_rate_b_over_n_and_repeats_per_seed():
    partition = np.arange(1000, 1200)

    def draw(batch_size: int, server_round: int, steps: int = 1) -> list[np.ndarray]:
        return poisson_batch(partition, batch_size, 0, 3, server_round, steps)

    (batch,) = draw(8, 1)
    assert np.array_equal(batch, draw(8, 1)[0])
    assert not np.array_equal(batch, draw(8, 2)[0])
    assert len(np.unique(batch)) == len(batch) and np.isin(batch, partition).all()
    sizes = np.array([len(draw(8, r)[0]) for r in range(2000)])
    # Binomial(200, 0.04): mean 8, variance 7.68; the mean of 2,000 rounds within 4 sigma.
    assert abs(sizes.mean() - 8) < 4 * math.sqrt(7.68 / 2000)
    assert sizes.var() == pytest.approx(7.68, rel=0.15)
    counts = np.bincount(np.concatenate([draw(8, r)[0] for r in range(2000)]))
    assert counts[partition].min() > 0  # every example is drawn in some round
    # At B = 1 a batch is empty about (1 - 1/n)^n of the time, and sometimes holds several.
    ones = [len(draw(1, r)[0]) for r in range(2000)]
    assert ones.count(0) / 2000 == pytest.approx((1 - 1 / 200) ** 200, abs=0.04)
    assert max(ones) >= 3
    # FedAvg's steps: each its own draw from the whole partition; the first is FedSGD's batch.
    steps = draw(8, 1, steps=3)
    assert np.array_equal(steps[0], batch) and len(steps) == 3
    assert not np.array_equal(steps[1], steps[2])
    with pytest.raises(DataSplitError, match="batch_size=201"):
        draw(201, 1)


def test_poisson_rows_hold_each_drawn_example_once_and_each_steps_positions():
    fd = build_federated_data("mnist5k", None, 5, "iid", 1, aux_size=100)
    rows, batches = poisson_rows(fd, 2, 3, 16, 1, steps=4)
    drawn = poisson_batch(fd.partitions[2], 16, 1, 2, 3, steps=4)
    assert torch.equal(rows, torch.from_numpy(np.unique(np.concatenate(drawn))))
    for positions, batch in zip(batches, drawn, strict=True):
        assert torch.equal(rows[positions], torch.from_numpy(batch))
    with pytest.raises(DataSplitError, match="partition_id=5"):
        poisson_rows(fd, 5, 1, 4, 1)


def test_client_batch_returns_that_partitions_images():
    fd = build_federated_data("mnist5k", None, 5, "shards", 1, aux_size=100)
    x, y = client_batch(fd, 2, 3, 4, 1)
    chosen = sample_batch(fd.partitions[2], 4, 1, 2, 3)
    assert torch.equal(x, fd.dataset.train_x[torch.from_numpy(chosen)])
    assert torch.equal(y, fd.dataset.train_y[torch.from_numpy(chosen)])
    with pytest.raises(DataSplitError, match="partition_id=5"):
        client_batch(fd, 5, 1, 4, 1)


def test_the_hold_out_keeps_no_copy_of_a_training_image() -> None:
    """Every image with a copy: the stratified hold-out put copies on both sides, and the test
    accuracy counted images the model trained on (audit AP5)."""
    from fedleak.data.dataset import with_holdout

    distinct = torch.rand(20, 1, 4, 4)
    x = torch.cat([distinct, distinct])  # each image twice
    y = torch.arange(20).remainder(2).repeat(2)
    none_x, none_y = torch.zeros(0, 1, 4, 4), torch.zeros(0, dtype=torch.int64)
    dataset = ImageDataset("dups", x, y, none_x, none_y, 2, ("a", "b"), "")
    split = with_holdout(dataset, 0.5, seed=0)
    train = {row.numpy().tobytes() for row in split.train_x}
    assert len(split.test_x) and not any(row.numpy().tobytes() in train for row in split.test_x)
    assert len(split.train_x) == 20  # the training side is as drawn
    dropped = 20 - len(split.test_x)
    assert split.source.endswith(f"(test split less {dropped} copies of training images)")
    # Every held-out image a copy: no test split was left, silently (audit AS3).
    same = ImageDataset("same", torch.zeros(40, 1, 4, 4), y, none_x, none_y, 2, ("a", "b"), "")
    with pytest.raises(DatasetError, match=r"each of the 20 images held out .* no test split"):
        with_holdout(same, 0.5, seed=0)


def test_too_few_training_images_for_any_auxiliary_set_say_so() -> None:
    """One training image left (a high test fraction): the refusal said "use at most 0",
    which no attack that needs auxiliary images accepts (audit AP6)."""
    from fedleak.data import DataSplitError, split_auxiliary

    with pytest.raises(DataSplitError, match=r"aux_size=8: the training split holds 1 image"):
        split_auxiliary(np.array([0]), 8, seed=0)
