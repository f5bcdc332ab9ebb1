"""The reply format between a client and the curious server, defined once for both sides.

A reply holds the records FedAvg aggregates (`arrays`: the shared update; `metrics`: what the
client declares) and extra records that the strategy splits off before aggregating: the audit
batch (ground truth, simulation only), per-sample updates, BatchNorm batch statistics and the
client's BatchNorm buffers after its local computation.
"""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from fedleak.config import RunConfig
from fedleak.training.update import ClientUpdate

ARRAYS, METRICS = "arrays", "metrics"
AUDIT, PER_SAMPLE, BN_STATS, BUFFERS = "audit", "per-sample", "bn-stats", "buffers"
EXTRA_RECORDS = (AUDIT, PER_SAMPLE, BN_STATS, BUFFERS)
PARTITION_ID, NUM_EXAMPLES = "partition-id", "num-examples"
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
    metrics = MetricRecord(
        {
            NUM_EXAMPLES: update.num_examples,
            PARTITION_ID: partition_id,
            "batch-size": config.train.batch_size,
            "local-steps": config.train.local_steps,
            "learning-rate": config.train.lr,
            "train-loss": float(update.loss),
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


def partition_answer(partition_id: int) -> RecordDict:
    """A ClientApp's answer to `partition_query`."""
    return RecordDict({METRICS: MetricRecord({PARTITION_ID: int(partition_id)})})


def partition_id_of(content: RecordDict) -> int | None:
    """The partition id a reply (train reply or query answer) declares, or None."""
    if METRICS not in content or PARTITION_ID not in content[METRICS]:
        return None
    return int(content[METRICS][PARTITION_ID])
