"""The ClientApp: one simulated client computing its defended update for one round.

Besides the shared update, a simulated client also returns an audit record holding its
private batch. Only the server's auditor reads it; the strategy strips it before aggregating.
"""

from __future__ import annotations

import functools
import traceback

import numpy as np
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedleak.config import RunConfig, parse_flat
from fedleak.data import client_rows, partition_rows, poisson_rows
from fedleak.defenses import PartnerPool, parse_defense_spec
from fedleak.heap import reuse_freed_memory
from fedleak.messages import INJECTED_FAILURE, error_reply, partition_answer, reply_content
from fedleak.models import build_model
from fedleak.runtime import (
    deterministic_kernels,
    federated_data,
    local_training,
    model_spec,
    resolve_device,
)
from fedleak.seeds import mix_seed
from fedleak.training.update import compute_update


class InjectedClientFailure(RuntimeError):
    """Raised on purpose (`sim.fail-rate`) to exercise the server's handling of failed clients."""


def defense_seed(run_seed: int, partition_id: int, server_round: int) -> int:
    """The seed of a client's defense draws (noise, masks, MixUp partners) in one round."""
    return mix_seed(run_seed, partition_id, server_round, 0xDEF)


class NodeConfigError(ValueError):
    """A SuperNode started without the partition it holds."""


def node_partition(context: Context) -> tuple[int, int]:
    """(partition-id, num-partitions) from the node's config, or one line saying how to set
    them (a bare KeyError reached the server log, once per round, for every round)."""
    try:
        return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise NodeConfigError(
            "this SuperNode's node config gives no integer partition-id and num-partitions "
            f"(it has {dict(context.node_config)}); start it with --node-config "
            '"partition-id=I num-partitions=N", I from 0 to N - 1'
        ) from None


def train_reply(msg: Message, context: Context, config: RunConfig) -> Message:
    """Compute this client's update for the round and package it with its audit record."""
    partition_id, num_partitions = node_partition(context)
    server_round = int(msg.content["config"]["server-round"])
    if config.sim.fail_rate > 0:
        draw = np.random.default_rng([config.seed, partition_id, server_round, 0xFA11]).random()
        if draw < config.sim.fail_rate:
            raise InjectedClientFailure(
                f"client {partition_id} {INJECTED_FAILURE} in round {server_round} "
                f"(sim.fail-rate={config.sim.fail_rate})"
            )
    fd = federated_data(config, num_partitions)
    device = resolve_device(config.device)
    deterministic_kernels(device, config.deterministic)
    training = local_training(config)
    batches = None
    if training.sampling == "poisson":
        steps = training.local_steps if training.mode == "fedavg" else 1
        rows, batches = poisson_rows(
            fd, partition_id, server_round, training.batch_size, config.seed, steps
        )
    else:
        rows = client_rows(fd, partition_id, server_round, config.examples_per_round, config.seed)
    x, y = fd.dataset.train_x[rows], fd.dataset.train_y[rows]
    # MixUp and intra-InstaHide draw each sample's partners from the client's whole partition.
    own_data = PartnerPool(
        fd.dataset.train_x, partition_rows(fd, partition_id), fd.dataset.train_y, rows
    )
    model = build_model(model_spec(config, fd))
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.to(device)
    generator = torch.Generator(device=device)
    generator.manual_seed(defense_seed(config.seed, partition_id, server_round))
    public = fd.public_inputs().to(device) if fd.public.size else None
    update = compute_update(
        model,
        x.to(device),
        y.to(device),
        fd.dataset.num_classes,
        parse_defense_spec(config.defense.spec),
        training,
        generator,
        public=public,
        batches=None if batches is None else [b.to(device) for b in batches],
        private=own_data,
        share_bn_statistics=config.threat.bn_stats == "shared",
    )
    return Message(content=reply_content(update, x, y, partition_id, config), reply_to=msg)


@functools.lru_cache(maxsize=8)
def _config_from(items: tuple[tuple[str, object], ...]) -> RunConfig:
    return parse_flat(dict(items))


def make_client_app(
    config: RunConfig | None = None, threads: int | None = None, verbose: bool = False
) -> ClientApp:
    """A ClientApp bound to `config`, or reading Flower's run config when None (`flwr run`).
    Its errors reply in one line; `verbose` (`fedleak --verbose`) also prints their traceback.

    `threads`: torch's intra-op threads in the client's process. Ray sets OMP_NUM_THREADS to a
    client's CPUs only when the user's environment has not set it, and CPU reductions round
    differently with another thread count, so the simulation pins it (None leaves it alone).
    """
    client = ClientApp()

    @client.train()
    def train(msg: Message, context: Context) -> Message:
        reuse_freed_memory()
        if threads is not None:
            torch.set_num_threads(threads)
        try:
            resolved = config or _config_from(tuple(sorted(context.run_config.items())))
            return train_reply(msg, context, resolved)
        except Exception as error:  # one line each, as every error of fedleak's
            if verbose:
                traceback.print_exc()
            return error_reply(msg, error)

    @client.query()
    def query(msg: Message, context: Context) -> Message:
        # The server asks each node once for its partition id (the seeded client selection)
        # and, at the start, for the federation's size and the threads its clients use.
        try:
            answer = partition_answer(*node_partition(context), threads=torch.get_num_threads())
        except Exception as error:
            return error_reply(msg, error)
        return Message(content=answer, reply_to=msg)

    return client


app = make_client_app()
