"""The ClientApp: one simulated client computing its defended update for one round.

Besides the shared update, a simulated client also returns an audit record holding its
private batch. Only the server's auditor reads it; the strategy strips it before aggregating.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedleak.client.update import ClientUpdate, LocalTraining, compute_update
from fedleak.config import RunConfig, parse_flat
from fedleak.data import FederatedData, build_federated_data, client_batch
from fedleak.defenses import parse_defense_spec
from fedleak.models import build_model
from fedleak.models.spec import ModelSpec


class InjectedClientFailure(RuntimeError):
    """Raised on purpose (`sim.fail-rate`) to exercise the server's handling of failed clients."""


def resolve_device(requested: str) -> torch.device:
    """`auto` takes CUDA when this process can see a GPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' but no CUDA device is visible to this process")
    if requested == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


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
    )


def _seed_of(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(p) for p in parts]).generate_state(1)[0])


def train_reply(msg: Message, context: Context, config: RunConfig) -> Message:
    """Compute this client's update for the round and package it with its audit record."""
    partition_id = int(context.node_config["partition-id"])
    num_partitions = int(context.node_config["num-partitions"])
    server_round = int(msg.content["config"]["server-round"])
    if config.sim.fail_rate > 0:
        draw = np.random.default_rng([config.seed, partition_id, server_round, 0xFA11]).random()
        if draw < config.sim.fail_rate:
            raise InjectedClientFailure(
                f"client {partition_id} failed on purpose in round {server_round} "
                f"(sim.fail-rate={config.sim.fail_rate})"
            )
    fd = federated_data(config, num_partitions)
    device = resolve_device(config.device)
    x, y = client_batch(
        fd, partition_id, server_round, config.train.examples_per_round, config.seed
    )
    model = build_model(model_spec(config, fd))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.to(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(_seed_of(config.seed, partition_id, server_round, 0xDEF))
    public = fd.public_inputs().to(device) if fd.public.size else None
    update = compute_update(
        model,
        x.to(device),
        y.to(device),
        fd.dataset.num_classes,
        parse_defense_spec(config.defense.spec),
        local_training(config),
        generator,
        public=public,
        share_bn_statistics=config.threat.bn_stats == "shared",
    )
    return Message(content=_reply_content(update, x, y, partition_id, config), reply_to=msg)


def _cpu(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord({name: t.detach().float().cpu().contiguous() for name, t in tensors.items()})


def _reply_content(
    update: ClientUpdate, x: torch.Tensor, y: torch.Tensor, partition_id: int, config: RunConfig
) -> RecordDict:
    metrics = MetricRecord(
        {
            "num-examples": update.num_examples,
            "partition-id": partition_id,
            "batch-size": config.train.batch_size,
            "local-steps": config.train.local_steps,
            "learning-rate": config.train.lr,
            "train-loss": float(update.loss),
        }
    )
    audit = {"inputs": x, "labels": y}
    if update.encoded is not None:
        audit["encoded"] = update.encoded.inputs
        audit["sources"] = update.encoded.sources
    content = RecordDict(
        {
            "arrays": _cpu(update.update),
            "metrics": metrics,
            "audit": ArrayRecord({k: v.detach().cpu().contiguous() for k, v in audit.items()}),
        }
    )
    if update.per_sample is not None:
        content["per-sample"] = _cpu(update.per_sample)
    if update.bn_statistics is not None:
        content["bn-stats"] = _cpu(update.bn_statistics)
    return content


@functools.lru_cache(maxsize=8)
def _config_from(items: tuple[tuple[str, object], ...]) -> RunConfig:
    return parse_flat(dict(items))


def make_client_app(config: RunConfig | None = None) -> ClientApp:
    """A ClientApp bound to `config`, or reading Flower's run config when None (`flwr run`)."""
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        resolved = config or _config_from(tuple(sorted(context.run_config.items())))
        return train_reply(msg, context, resolved)

    return client


app = make_client_app()
