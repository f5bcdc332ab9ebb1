"""What every process of a run derives from its configuration: the device, the data split, the
model's public architecture and the clients' declared local training.

Clients, the server and adaptive attackers' helpers all call these, so that each process builds
exactly the same objects from the same `RunConfig`.
"""

from __future__ import annotations

import os
import warnings

import torch

from fedleak.config import RunConfig
from fedleak.data import FederatedData, build_federated_data
from fedleak.models.spec import ModelSpec
from fedleak.training.update import LocalTraining


def resolve_device(requested: str) -> torch.device:
    """`auto` takes CUDA when this process can see a GPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA device is visible to this process")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def deterministic_kernels(device: torch.device, enabled: bool) -> None:
    """On CUDA, keep this process to kernels that give the same bits on every repeat.

    cuDNN picks convolution algorithms by timing them and several CUDA backward kernels sum
    with atomics, so two runs of one seed differ in the last bits, which the attacks amplify.
    cuBLAS reads its workspace setting when its first handle is made, which in every fedleak
    process comes after this call. Nothing changes on the CPU, whose kernels are
    deterministic already and where torch's switch would fill every new tensor with NaN.
    A kernel torch has no deterministic form of warns once instead of failing the run.
    """
    if not enabled or device.type != "cuda":
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)
    warnings.filterwarnings("once", message=".*does not have a deterministic implementation")


def federated_data(config: RunConfig, num_partitions: int) -> FederatedData:
    """The run's data split, identical in every client and in the server."""
    data = config.data
    return build_federated_data(
        data.dataset,
        data.data_dir or None,
        num_partitions,
        data.partition,
        config.seed,
        alpha=data.dirichlet_alpha,
        shards_per_partition=data.shards_per_client,
        aux_size=data.aux_size,
        aux_beta=data.aux_beta,
        test_fraction=data.test_fraction,
        public_size=data.public_size,
        seq_len=data.seq_len,
        vocab_size=data.vocab_size,
        tokenizer=data.tokenizer,
    )


def model_spec(config: RunConfig, fd: FederatedData) -> ModelSpec:
    """The public architecture, shaped by the data set."""
    return ModelSpec(
        name=config.model.name,
        input_shape=fd.dataset.input_shape,
        num_classes=fd.dataset.num_classes,
        init=config.model.init,
        seed=config.seed,
    )


def local_training(config: RunConfig) -> LocalTraining:
    """What every client declares about its local computation."""
    train = config.train
    return LocalTraining(
        mode=train.mode,
        batch_size=train.batch_size,
        local_steps=train.local_steps,
        learning_rate=train.lr,
        share=config.threat.share,
        sampling=config.defense.dp_sampling,
    )
