"""The reply format between a client and the curious server, defined once for both sides.

A reply holds the records FedAvg aggregates (`arrays`: the shared update; `metrics`: what the
client declares) and extra records that the strategy splits off before aggregating: the audit
batch (ground truth, simulation only), per-sample updates, BatchNorm batch statistics and the
client's BatchNorm buffers after its local computation. A foreign Flower app audited through
fedleak's client mod replies with its own arrays (updated weights) and metrics, plus the
`fedleak-declared` record (what it declared) and, when it declared its batch, the audit record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode

from fedleak.config import RunConfig
from fedleak.defenses import DPSGD, parse_defense_spec
from fedleak.lines import error_line, one_line
from fedleak.registry import is_own_error
from fedleak.training.update import ClientUpdate

ARRAYS, METRICS = "arrays", "metrics"
AUDIT, PER_SAMPLE, BN_STATS, BUFFERS = "audit", "per-sample", "bn-stats", "buffers"
DECLARED = "fedleak-declared"  # added to a foreign app's reply by fedleak's client mod
EXTRA_RECORDS = (AUDIT, PER_SAMPLE, BN_STATS, BUFFERS, DECLARED)
PARTITION_ID, NUM_EXAMPLES = "partition-id", "num-examples"
NUM_PARTITIONS = "num-partitions"
CLIENT_THREADS = "client-threads"
# Words every injected client failure (`sim.fail-rate`) says, by which the server tells them apart.
INJECTED_FAILURE = "failed on purpose"
_QUERY = "query"


def as_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """Float32 CPU copies (Flower's `Array` takes no bfloat16, and records cross processes)."""
    return ArrayRecord({name: t.detach().float().cpu().contiguous() for name, t in tensors.items()})


def state_record(tensors: dict[str, torch.Tensor]) -> ArrayRecord:
    """CPU copies that keep integer dtypes (BatchNorm's `num_batches_tracked` is int64) and
    carry floating tensors as float32."""
    return ArrayRecord(
        {
            name: (t.detach().float() if t.is_floating_point() else t.detach()).cpu().contiguous()
            for name, t in tensors.items()
        }
    )


def tensors_of(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """A record's arrays as torch tensors, by name."""
    return dict(record.to_torch_state_dict())


def reply_content(
    update: ClientUpdate, x: torch.Tensor, y: torch.Tensor, partition_id: int, config: RunConfig
) -> RecordDict:
    """Everything a simulated client sends back for one round."""
    # Under DP-SGD the loss of the private batch would be a release outside the reported ε
    # (exact for B = 1; under Poisson sampling NaN betrays an empty batch): it stays home.
    private = parse_defense_spec(config.defense.spec).find(DPSGD) is not None
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: update.num_examples,
            PARTITION_ID: partition_id,
            "batch-size": config.train.batch_size,
            "local-steps": config.train.local_steps,
            "learning-rate": config.train.lr,
            # NaN for an empty Poisson batch, which has no loss, and under DP-SGD (every reply
            # has the same keys, as Flower's aggregation requires).
            "train-loss": math.nan if private else float(update.loss),
        }
    )
    audit = {"inputs": x, "labels": y}
    if update.encoded is not None:
        # Every source of every encoded sample: indices into the batch followed by the private
        # partners, or into the public pool where `from-public` (see `EncodedBatch`).
        audit["encoded"] = update.encoded.inputs
        audit["sources"] = update.encoded.sources
        audit["from-public"] = update.encoded.from_public
        audit["partners"] = update.encoded.partners
        audit["partner-labels"] = update.encoded.partner_labels
        # Each encoded sample's mixed label: the label a reconstruction of it is scored against.
        audit["soft-labels"] = update.encoded.soft_labels
        # InstaHide's flips: the auditor scores what they leave (`fedleak.defenses.unsigned`).
        audit["sign-flipped"] = torch.tensor(update.encoded.signs is not None)
    content = RecordDict(
        {
            ARRAYS: as_record(update.update),
            METRICS: metrics,
            AUDIT: ArrayRecord({k: v.detach().cpu().contiguous() for k, v in audit.items()}),
        }
    )
    if update.per_sample is not None:
        content[PER_SAMPLE] = as_record(update.per_sample)
    if update.bn_statistics is not None:
        content[BN_STATS] = as_record(update.bn_statistics)
    if update.buffers:
        content[BUFFERS] = state_record(update.buffers)
    return content


def partition_query() -> RecordDict:
    """The one-time question the server asks a node it has not met: its partition id."""
    return RecordDict({_QUERY: ConfigRecord({"ask": PARTITION_ID})})


def partition_answer(
    partition_id: int, num_partitions: int | None = None, threads: int | None = None
) -> RecordDict:
    """A ClientApp's answer to `partition_query`: its partition id, into how many partitions
    its node was told the data is split (the federation's size, which a server behind a
    SuperLink cannot count while nodes still join) and the torch threads it computes with
    (a resume on another count would round differently)."""
    answer = {PARTITION_ID: int(partition_id)}
    if num_partitions is not None:
        answer[NUM_PARTITIONS] = int(num_partitions)
    if threads is not None:
        answer[CLIENT_THREADS] = int(threads)
    return RecordDict({METRICS: MetricRecord(answer)})


def threads_of(content: RecordDict) -> int | None:
    """The torch threads a query answer declares, or None."""
    if METRICS not in content or CLIENT_THREADS not in content[METRICS]:
        return None
    return int(content[METRICS][CLIENT_THREADS])


def num_partitions_of(content: RecordDict) -> int | None:
    """The number of partitions a query answer declares, or None."""
    if METRICS not in content or NUM_PARTITIONS not in content[METRICS]:
        return None
    return int(content[METRICS][NUM_PARTITIONS])


def partition_id_of(content: RecordDict) -> int | None:
    """The partition id a reply (train reply, query answer, or a foreign app's reply through
    fedleak's client mod) declares, or None."""
    if DECLARED in content and PARTITION_ID in content[DECLARED]:
        return int(content[DECLARED][PARTITION_ID])
    if METRICS not in content or PARTITION_ID not in content[METRICS]:
        return None
    return int(content[METRICS][PARTITION_ID])


# -- a foreign Flower app audited through fedleak's client mod (fedleak.client.audit) ----------
MODES = ("fedsgd", "fedavg")


@dataclass(frozen=True)
class Declaration:
    """What a foreign client declares: the batch it trained on and its local training."""

    inputs: torch.Tensor
    labels: torch.Tensor
    mode: str
    learning_rate: float
    local_steps: int
    batch_size: int

    @classmethod
    def of(
        cls,
        inputs: torch.Tensor,
        labels: torch.Tensor,
        mode: str,
        learning_rate: float,
        local_steps: int,
        batch_size: int | None,
    ) -> Declaration:
        """Checked values; one-line `ValueError` naming the argument."""
        if mode not in MODES:
            raise ValueError(f"declare(mode={mode!r}): expected one of {', '.join(MODES)}")
        if inputs.dim() < 2 or labels.shape != (inputs.shape[0],):
            raise ValueError(
                f"declare(inputs, labels): expected inputs [N, ...] and labels [N], got "
                f"{tuple(inputs.shape)} and {tuple(labels.shape)}"
            )
        if not inputs.is_floating_point() or not bool(torch.isfinite(inputs).all()):
            raise ValueError(
                f"declare(inputs): expected finite float images in [0, 1], got {inputs.dtype}"
                + ("" if inputs.is_floating_point() else " (token ids are not audited)")
            )
        low, high = float(inputs.min()), float(inputs.max())
        if low < 0 or high > 1:
            # Attacks reconstruct, and metrics score, in the data's range: normalisation
            # (e.g. transforms.Normalize) belongs inside the model, after the declared batch.
            raise ValueError(
                f"declare(inputs): expected images in [0, 1], found values from {low:.4g} to "
                f"{high:.4g}; declare the images before normalising them"
            )
        if labels.is_floating_point() or labels.is_complex() or bool((labels < 0).any()):
            raise ValueError(
                f"declare(labels): expected integer class indices >= 0, got {labels.dtype} "
                f"{labels.tolist()[:8]}"
            )
        size = len(inputs) if batch_size is None else int(batch_size)
        if size < 1 or int(local_steps) < 1 or not float(learning_rate) > 0:
            raise ValueError(
                f"declare(batch_size={size}, local_steps={local_steps}, "
                f"learning_rate={learning_rate}): expected positive values"
            )
        if size > len(inputs):
            raise ValueError(
                f"declare(batch_size={size}): larger than the {len(inputs)} declared inputs its "
                "mini-batches are drawn from; expected at most that"
            )
        if mode == "fedsgd" and (int(local_steps) != 1 or size != len(inputs)):
            raise ValueError(
                "declare(mode='fedsgd'): one step on one batch, so expected local_steps=1 and "
                f"batch_size={len(inputs)} (the declared inputs)"
            )
        return cls(
            inputs.detach().float().cpu().contiguous(),
            labels.detach().long().cpu().contiguous(),
            mode,
            float(learning_rate),
            int(local_steps),
            size,
        )


def add_declaration(content: RecordDict, partition_id: int, declared: Declaration | None) -> None:
    """What fedleak's client mod adds to a foreign app's train reply: that its arrays are
    weights, its partition id, and the declaration (protocol record and audit batch) if any."""
    record = ConfigRecord({"arrays": "weights", PARTITION_ID: int(partition_id)})
    if declared is not None:
        record.update(
            {
                "mode": declared.mode,
                "learning-rate": declared.learning_rate,
                "local-steps": declared.local_steps,
                "batch-size": declared.batch_size,
                NUM_EXAMPLES: len(declared.inputs),
            }
        )
        content[AUDIT] = ArrayRecord({"inputs": declared.inputs, "labels": declared.labels})
    content[DECLARED] = record


# Long enough for a refusal's remedy: the server keeps whole sentences of the reason.
_REASON_LIMIT = 2000


def error_reply(msg: Message, error: Exception) -> Message:
    """The reply to `msg` for an exception fedleak raised in a client (a refused `declare`, a
    node without its partition, an injected failure): an error reply whose reason is its one
    line, as the server reports it, where Flower and Ray would print every client's
    traceback (audit EQ2). An exception of another type than fedleak's own says its type: a
    bare "'server-round'" would not say it was a KeyError (audit EU2)."""
    text = str(error) if is_own_error(error) and str(error) else error_line(error, _REASON_LIMIT)
    reason = one_line(text, _REASON_LIMIT)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
