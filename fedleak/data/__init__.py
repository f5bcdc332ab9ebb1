"""Data sets, client partitions, the attacker's auxiliary split and the per-round batch sampler."""

from fedleak.data.auxiliary import AuxiliarySplit, split_auxiliary
from fedleak.data.dataset import DatasetUnavailable, ImageDataset
from fedleak.data.federation import (
    FederatedData,
    auxiliary,
    build_federated_data,
    client_batch,
    client_rows,
    partition_rows,
    poisson_rows,
)
from fedleak.data.folder import FolderLayoutError
from fedleak.data.partition import SCHEMES, partition_indices
from fedleak.data.registry import (
    DATA_DIR_ENV,
    DATASETS,
    FOLDER_PREFIX,
    TEXT_DATASETS,
    DatasetEntry,
    UnknownDatasetError,
    data_shape,
    dataset_entry,
    dataset_modality,
    dataset_names,
    default_data_dir,
    load_corpus,
    load_dataset,
    register_dataset,
)
from fedleak.data.sampler import poisson_batch, sample_batch
from fedleak.data.stratify import DataSplitError
from fedleak.data.text import FILE_PREFIX, TOKENIZER_KINDS, TokenDataset

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "FILE_PREFIX",
    "FOLDER_PREFIX",
    "SCHEMES",
    "TEXT_DATASETS",
    "TOKENIZER_KINDS",
    "AuxiliarySplit",
    "DataSplitError",
    "DatasetEntry",
    "DatasetUnavailable",
    "FederatedData",
    "FolderLayoutError",
    "ImageDataset",
    "TokenDataset",
    "UnknownDatasetError",
    "auxiliary",
    "build_federated_data",
    "client_batch",
    "client_rows",
    "data_shape",
    "dataset_entry",
    "dataset_modality",
    "dataset_names",
    "default_data_dir",
    "load_corpus",
    "load_dataset",
    "partition_indices",
    "partition_rows",
    "poisson_batch",
    "poisson_rows",
    "register_dataset",
    "sample_batch",
    "split_auxiliary",
]
