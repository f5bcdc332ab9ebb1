"""Audit a Flower app you already have: fedleak's client mod and the declaration of a batch.

Your ClientApp keeps its own model, data loading and training loop. Add the mod, and inside
your train function declare the batch you trained on and your local-training protocol:

    app = ClientApp(mods=[fedleak_mod])

    @app.train()
    def train(msg, context):
        ...  # your local training on (x, y)
        declare(x, y, mode="fedavg", learning_rate=lr, local_steps=steps, batch_size=b)
        return Message(content=RecordDict({"arrays": ..., "metrics": ...}), reply_to=msg)

The mod adds to the train reply what the curious server needs besides your arrays (which stay
the updated weights your strategy aggregates): the protocol, the partition id, and, when
declared, the batch as the audit record, which only the server's auditor reads and which the
strategy strips before your strategy sees the reply. Without a declaration the attacks still
run on the update and their reconstructions are saved, with metrics marked unavailable.

The protocol is the one fedleak's own clients follow (`fedleak.training.update`): `fedsgd`,
one SGD step on one batch of `batch_size`; `fedavg`, `local_steps` SGD steps, step k on the
cyclic mini-batch of the declared inputs starting at (k * batch_size) mod N.
"""

from __future__ import annotations

import traceback
from contextvars import ContextVar
from pathlib import Path

import torch
from flwr.app import Context, Message, MessageType
from flwr.clientapp.typing import ClientAppCallable

from fedleak.messages import Declaration, add_declaration, error_reply

_DECLARED: ContextVar[Declaration | None] = ContextVar("fedleak_declared", default=None)


def declare(
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    mode: str = "fedavg",
    learning_rate: float,
    local_steps: int = 1,
    batch_size: int | None = None,
) -> None:
    """Declare, inside a train function wrapped by `fedleak_mod`, the batch this client trained
    on this round (images in [0, 1], int64 labels) and its local-training protocol."""
    declaration = Declaration.of(inputs, labels, mode, learning_rate, local_steps, batch_size)
    _DECLARED.set(declaration)


def _raised_in_fedleak(error: BaseException) -> bool:
    """Whether `error` came from fedleak's code called by the app (`declare`), not from the
    app's own: a frame of the fedleak package below the mod's own."""
    package = Path(__file__).resolve().parents[1]
    frames = traceback.extract_tb(error.__traceback__)[1:]  # [0] is `fedleak_mod` itself
    return any(Path(frame.filename).resolve().is_relative_to(package) for frame in frames)


def fedleak_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower client mod: attach the declaration (or its absence) to train replies."""
    token = _DECLARED.set(None)
    try:
        reply = call_next(msg, context)
        declaration = _DECLARED.get()
    except Exception as error:
        if not _raised_in_fedleak(error):
            raise  # the app's own error keeps Flower's report of it
        return error_reply(msg, error)  # a refused `declare`: one line, not a traceback
    finally:
        _DECLARED.reset(token)
    if msg.metadata.message_type.split(".")[0] != MessageType.TRAIN or reply.has_error():
        return reply
    partition = context.node_config.get("partition-id")
    partition_id = int(partition) if partition is not None else context.node_id % (1 << 31)
    add_declaration(reply.content, partition_id, declaration)
    return reply
