"""How many bytes a round moves, estimated before the run and measured while it runs.

In simulation every client's reply travels through Ray's object store and sits in the server
process until the round is aggregated, so a round's memory grows with clients x reply size.
Per-sample sharing multiplies a reply by the batch size: 64 per-sample gradients of a 600k
parameter model are 154 MB for one client. `check_payload` refuses a run whose rounds would
exceed `sim.payload-budget-mb` before any of it starts; `reply_bytes` measures what actually
arrived, for the per-round record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flwr.app import Message
from torch import nn

from fedleak.config import ConfigError, RunConfig
from fedleak.defenses import parse_defense_spec
from fedleak.lines import listed
from fedleak.models import ModelSpec, build_model, model_modality

MB = 1_000_000
FLOAT32, INT64, BOOL = 4, 8, 1
ARRAY_HEADER = 128  # each array travels as a .npy buffer with a 128-byte header


class PayloadBudgetError(ConfigError):
    """A round would move more than `sim.payload-budget-mb`."""


@dataclass(frozen=True)
class RoundPayload:
    """Bytes of one round: what each client receives and sends, and how many take part."""

    clients: int
    weights: int
    update: int
    per_sample: int
    audit: int
    bn_statistics: int
    buffers: int = 0

    @property
    def reply(self) -> int:
        """One client's reply: update, per-sample updates, audit batch, BatchNorm statistics,
        and the buffers (running statistics) after its local computation."""
        return self.update + self.per_sample + self.audit + self.bn_statistics + self.buffers

    @property
    def total(self) -> int:
        """Every participating client's download (w_t) and reply."""
        return self.clients * (self.weights + self.reply)

    @property
    def total_mb(self) -> float:
        """`total` in MB (10^6 bytes)."""
        return self.total / MB

    def describe(self, budget: float = 0.0) -> str:
        """One line: the total (with the digits that show it exceeds `budget` MB) and what one
        reply is made of."""
        parts = {
            "update": self.update,
            "per-sample": self.per_sample,
            "audit": self.audit,
            "bn-stats": self.bn_statistics,
            "buffers": self.buffers,
        }
        shown = ", ".join(f"{k} {v / MB:.2f}" for k, v in parts.items() if v)
        digits = 1
        while budget > 0 and digits < 6 and round(self.total_mb, digits) <= budget:
            digits += 1
        return (
            f"{self.total_mb:.{digits}f} MB per round = {self.clients} clients x "
            f"({self.weights / MB:.2f} MB weights + {self.reply / MB:.2f} MB reply: {shown})"
        )


def clients_per_round(config: RunConfig, num_clients: int) -> int:
    """How many clients FedAvg samples each round, as `flwr`'s FedAvg computes it."""
    train = config.train
    return min(num_clients, max(int(num_clients * train.fraction_train), train.min_clients))


def estimate_payload(
    config: RunConfig, spec: ModelSpec, num_clients: int, *, sampled: bool = False
) -> RoundPayload:
    """The bytes of one round of `config` on `spec` with `num_clients` clients, as the arrays
    travel (float32 tensors, int64 labels, a .npy header each); metrics left out. Under MixUp
    and intra-InstaHide the partners from outside the batch are counted at their maximum."""
    model = build_model(spec)
    tensors = list(model.parameters())
    parameters = sum(p.numel() for p in tensors)
    update = parameters * FLOAT32 + len(tensors) * ARRAY_HEADER
    state = model.state_dict()
    weights = sum(t.numel() for t in state.values()) * FLOAT32 + len(state) * ARRAY_HEADER
    own = dict(model.named_buffers())
    buffers = sum(t.numel() * t.element_size() for t in own.values()) + len(own) * ARRAY_HEADER
    examples = config.examples_per_round
    image = math.prod(spec.input_shape) * FLOAT32
    audit = examples * (image + INT64) + 2 * ARRAY_HEADER
    if model_modality(spec.name) == "tokens":  # int64 ids, and the same ids as targets
        audit = examples * 2 * math.prod(spec.input_shape) * INT64 + 2 * ARRAY_HEADER
    encoder = parse_defense_spec(config.defense.spec).encoder
    if encoder is not None:
        # The encoded batch, per encoded sample the k sources it mixes and which are public
        # and its mixed label, whether signs were flipped, and the private partners from
        # outside the batch: at most k - 1 per sample (intra).
        mixed = encoder.k * (INT64 + BOOL) + spec.num_classes * FLOAT32
        audit += examples * (image + mixed) + BOOL + 5 * ARRAY_HEADER
        partners = 0 if getattr(encoder, "inter", False) else examples * (encoder.k - 1)
        audit += partners * (image + INT64) + 2 * ARRAY_HEADER
    per_sample = 0
    if config.threat.share == "per-sample":
        per_sample = config.train.batch_size * parameters * FLOAT32 + len(tensors) * ARRAY_HEADER
    bn = 0
    if config.threat.bn_stats == "shared":
        layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        bn = sum(2 * (m.num_features * FLOAT32 + ARRAY_HEADER) for m in layers)
    return RoundPayload(
        clients=num_clients if sampled else clients_per_round(config, num_clients),
        weights=weights,
        update=update,
        per_sample=per_sample,
        audit=audit,
        bn_statistics=bn,
        buffers=buffers,
    )


def check_payload(
    config: RunConfig, spec: ModelSpec, num_clients: int, *, sampled: bool = False
) -> RoundPayload:
    """The round's payload; `PayloadBudgetError` when it exceeds `sim.payload-budget-mb`.
    `sampled` as in `estimate_payload`."""
    payload = estimate_payload(config, spec, num_clients, sampled=sampled)
    budget = config.sim.payload_budget_mb
    if budget > 0 and payload.total_mb > budget:
        # Only what would shrink this payload: the batch sizes per-sample updates and the
        # audit batch, not the weights or the update, so it is named where those weigh more.
        ways = ["fewer clients"]
        if payload.per_sample + payload.audit > payload.weights + payload.update:
            ways.append("a smaller batch")
        if payload.per_sample:
            ways.append("threat.share='batch'")
        raise PayloadBudgetError(
            f"sim.payload-budget-mb={budget:g}: a round would move {payload.describe(budget)}; "
            f"raise the budget, or use {listed(ways, 'or')}"
        )
    return payload


def check_round_payload(config: RunConfig, spec: ModelSpec, sampled: int) -> RoundPayload:
    """`check_payload` for a round that sampled `sampled` clients (the strategy's check)."""
    return check_payload(config, spec, sampled, sampled=True)


def reply_bytes(message: Message) -> int:
    """Bytes of the arrays one reply carried, as received (0 for an error reply)."""
    if message.has_error():
        return 0
    return sum(
        len(array.data)
        for record in message.content.array_records.values()
        for array in record.values()
    )
