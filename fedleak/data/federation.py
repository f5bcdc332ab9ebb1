"""Everything a run needs from the data room, built the same way in the server and every client.

Order of the splits (all drawn from the training images, the test split stays with the server):
1. the attacker's auxiliary images (`split_auxiliary`; never an image whose pixels another
   training image repeats),
2. an optional public pool (for InstaHide's inter-data-set mixing) from what is left,
3. the clients' partitions of the rest.
Steps 1 and 2 do not depend on the number of partitions, so a server that builds the data with
one partition sees exactly the auxiliary set and public pool that the clients see.

Text corpora are split by whole documents instead (`fedleak.data.text.split`): test, auxiliary
and client documents, a tokenizer trained on the auxiliary text, sequences of L tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedleak.data.auxiliary import split_auxiliary
from fedleak.data.content import repeated_images
from fedleak.data.dataset import ImageDataset
from fedleak.data.partition import partition_indices
from fedleak.data.registry import load_corpus, load_dataset
from fedleak.data.sampler import poisson_batch, sample_batch
from fedleak.data.stratify import DataSplitError, stratified_sample
from fedleak.data.text import TEXT_DATASETS, TokenDataset, split_text

# Stream tag keeping the public-pool draw independent of the other draws made from the same seed.
_PUBLIC_STREAM = 0x5055424C


@dataclass(frozen=True, eq=False)
class FederatedData:
    """A data set and its disjoint splits, as sorted, read-only indices into `dataset.train_x`.

    The instance is cached and shared within a process: treat its tensors as read-only too.
    """

    dataset: ImageDataset | TokenDataset
    aux: np.ndarray
    partitions: tuple[np.ndarray, ...]
    public: np.ndarray

    @property
    def num_partitions(self) -> int:
        return len(self.partitions)

    def public_inputs(self) -> Tensor:
        """The public pool's images (no labels: InstaHide mixes public images only)."""
        return self.dataset.train_x[_index(self.public)]


def build_federated_data(
    dataset_name: str,
    data_dir: str | Path | None,
    num_partitions: int,
    scheme: str,
    seed: int,
    *,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    aux_size: int = 0,
    aux_beta: float = 1.0,
    aux_in_classes: tuple[int, ...] | None = None,
    test_fraction: float = 0.2,
    public_size: int = 0,
    download: bool = True,
    seq_len: int = 16,
    vocab_size: int = 8192,
    tokenizer: str = "bpe",
) -> FederatedData:
    """Load the data set and split it into auxiliary, public and client data (cached).

    `seq_len`, `vocab_size` and `tokenizer` shape the text corpora's token sequences.
    """
    root = None if data_dir in (None, "") else str(Path(data_dir).expanduser().resolve())
    if dataset_name in TEXT_DATASETS:
        return _build_text(
            dataset_name,
            root,
            num_partitions,
            scheme,
            seed,
            aux_size,
            aux_beta,
            test_fraction,
            public_size,
            download,
            seq_len,
            vocab_size,
            tokenizer,
        )
    in_classes = None if aux_in_classes is None else tuple(int(c) for c in aux_in_classes)
    return _build(
        dataset_name,
        root,
        num_partitions,
        scheme,
        seed,
        alpha,
        shards_per_partition,
        aux_size,
        aux_beta,
        in_classes,
        test_fraction,
        public_size,
        download,
    )


@functools.lru_cache(maxsize=8)
def _build(
    dataset_name: str,
    data_dir: str | None,
    num_partitions: int,
    scheme: str,
    seed: int,
    alpha: float,
    shards_per_partition: int,
    aux_size: int,
    aux_beta: float,
    aux_in_classes: tuple[int, ...] | None,
    test_fraction: float,
    public_size: int,
    download: bool,
) -> FederatedData:
    dataset = load_dataset(
        dataset_name, data_dir, seed=seed, test_fraction=test_fraction, download=download
    )
    labels = dataset.train_y.numpy()
    split = split_auxiliary(
        labels,
        aux_size,
        seed,
        beta=aux_beta,
        in_classes=aux_in_classes,
        repeated=repeated_images(dataset.train_x) if aux_size else None,
    )
    if aux_beta < 1.0 or aux_in_classes is not None:
        dataset = _tested_on(dataset, np.unique(labels[split.clients]))
    if not 0 <= public_size < len(split.clients):
        raise DataSplitError(
            f"public_size={public_size}: expected 0..{len(split.clients) - 1}, since "
            f"{len(split.clients)} training images remain after the auxiliary split and the "
            "clients need some"
        )
    rng = np.random.default_rng([seed, _PUBLIC_STREAM])
    public = stratified_sample(labels, split.clients, public_size, rng)
    pool = np.setdiff1d(split.clients, public, assume_unique=True)
    partitions = partition_indices(
        labels,
        num_partitions,
        scheme,
        seed,
        alpha=alpha,
        shards_per_partition=shards_per_partition,
        pool=pool,
    )
    return FederatedData(
        dataset, _frozen(split.aux), tuple(_frozen(p) for p in partitions), _frozen(public)
    )


def _tested_on(dataset: ImageDataset, classes: np.ndarray) -> ImageDataset:
    """The data set with its test split cut to `classes`: under the auxiliary distribution
    shift the clients hold only the in-distribution classes, and test images of the others
    would cap the model's accuracy at their share (0.5 for half the classes)."""
    keep = torch.from_numpy(np.isin(dataset.test_y.numpy(), classes))
    return dataclasses.replace(dataset, test_x=dataset.test_x[keep], test_y=dataset.test_y[keep])


def client_rows(
    fd: FederatedData, partition_id: int, server_round: int, batch_size: int, seed: int
) -> Tensor:
    """The rows of `dataset.train_x` partition `partition_id` trains on in `server_round`."""
    _check_partition(fd, partition_id)
    return _index(
        sample_batch(fd.partitions[partition_id], batch_size, seed, partition_id, server_round)
    )


def poisson_rows(
    fd: FederatedData,
    partition_id: int,
    server_round: int,
    batch_size: int,
    seed: int,
    steps: int = 1,
) -> tuple[Tensor, list[Tensor]]:
    """DP-SGD's Poisson batches of partition `partition_id` in `server_round`, one per local
    step: the rows of `dataset.train_x` any step uses (each once, ascending), and each step's
    batch as positions into them."""
    _check_partition(fd, partition_id)
    batches = poisson_batch(
        fd.partitions[partition_id], batch_size, seed, partition_id, server_round, steps
    )
    rows = np.unique(np.concatenate(batches))
    return _index(rows), [_index(np.searchsorted(rows, batch)) for batch in batches]


def _check_partition(fd: FederatedData, partition_id: int) -> None:
    if not 0 <= partition_id < fd.num_partitions:
        raise DataSplitError(f"partition_id={partition_id}: expected 0..{fd.num_partitions - 1}")


@functools.lru_cache(maxsize=4)
def _build_text(
    dataset_name: str,
    data_dir: str | None,
    num_partitions: int,
    scheme: str,
    seed: int,
    aux_size: int,
    aux_beta: float,
    test_fraction: float,
    public_size: int,
    download: bool,
    seq_len: int,
    vocab_size: int,
    tokenizer: str,
) -> FederatedData:
    for setting, value, allowed in (
        ("data.partition", scheme, "iid"),
        ("data.aux-beta", aux_beta, 1.0),
        ("data.public-size", public_size, 0),
    ):
        if value != allowed:
            raise DataSplitError(
                f"{setting}={value!r}: text corpora are split by whole documents with no classes "
                f"or public pool, so expected {allowed!r} for {dataset_name!r}"
            )
    corpus = load_corpus(dataset_name, data_dir, download=download)
    split = split_text(
        corpus,
        num_partitions,
        seed,
        aux_size=aux_size,
        test_fraction=test_fraction,
        seq_len=seq_len,
        vocab_size=vocab_size,
        tokenizer_kind=tokenizer,
    )
    return FederatedData(
        split.dataset,
        _frozen(split.aux),
        tuple(_frozen(p) for p in split.partitions),
        _frozen(np.zeros(0, dtype=np.int64)),
    )


def client_batch(
    fd: FederatedData, partition_id: int, server_round: int, batch_size: int, seed: int
) -> tuple[Tensor, Tensor]:
    """The images and labels partition `partition_id` trains on in `server_round`."""
    chosen = client_rows(fd, partition_id, server_round, batch_size, seed)
    return fd.dataset.train_x[chosen], fd.dataset.train_y[chosen]


def partition_rows(fd: FederatedData, partition_id: int) -> Tensor:
    """The rows of `dataset.train_x` that partition `partition_id` holds."""
    return _index(fd.partitions[partition_id])


def auxiliary(fd: FederatedData) -> tuple[Tensor, Tensor]:
    """The attacker's auxiliary images and labels; zero rows when the run gives it none, so an
    attack that needs auxiliary data must check and say so."""
    chosen = _index(fd.aux)
    return fd.dataset.train_x[chosen], fd.dataset.train_y[chosen]


def _frozen(indices: np.ndarray) -> np.ndarray:
    # The arrays are shared through the cache; a stray in-place edit must fail loudly.
    indices = np.asarray(indices, dtype=np.int64).copy()
    indices.flags.writeable = False
    return indices


def _index(indices: np.ndarray) -> Tensor:
    # torch.tensor copies, so read-only index arrays are fine (from_numpy would warn on them).
    return torch.tensor(indices, dtype=torch.int64)
