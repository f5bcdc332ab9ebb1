"""The auditor: the only place that sees the private batch, and scores reconstructions against it.

Attacks never import this module (a test enforces it): ground truth flows from the client's
audit record straight here, around the attackers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedleak.attacks.types import Observation, Reconstruction
from fedleak.metrics import assign, label_accuracy, rouge, score_images, token_accuracy

Decoder = Callable[[Sequence[int]], str]


@dataclass(frozen=True)
class GroundTruth:
    """A client's private batch of one round, as the auditor knows it.

    `inputs` are the private originals. Under an input encoding (MixUp, InstaHide),
    `encoded` holds what the gradient was computed on and `sources[i]` lists the indices of
    the private images mixed into encoded sample i (-1 for images from a public pool).
    """

    client_id: int
    inputs: torch.Tensor
    labels: torch.Tensor
    encoded: torch.Tensor | None = None
    sources: torch.Tensor | None = None

    @classmethod
    def from_audit(cls, client_id: int, audit: Mapping[str, torch.Tensor]) -> GroundTruth:
        """Rebuild from the tensors of a reply's audit record."""
        return cls(
            client_id=client_id,
            inputs=audit["inputs"],
            labels=audit["labels"].long(),
            encoded=audit.get("encoded"),
            sources=audit.get("sources"),
        )

    @staticmethod
    def union(truths: list[GroundTruth]) -> GroundTruth:
        """All participating clients' data as one batch (the aggregate-only view).

        Encodings are kept when every client has them (one run, one defense), with each
        client's source indices shifted past the originals of the clients before it; -1 (an
        image from the public pool) stays -1.
        """
        encoded = sources = None
        if all(t.encoded is not None for t in truths):
            encoded = torch.cat([t.encoded for t in truths])
        if encoded is not None and all(t.sources is not None for t in truths):
            shifted, offset = [], 0
            for t in truths:
                shifted.append(torch.where(t.sources >= 0, t.sources + offset, t.sources))
                offset += len(t.inputs)
            sources = torch.cat(shifted)
        return GroundTruth(
            client_id=-1,
            inputs=torch.cat([t.inputs for t in truths]),
            labels=torch.cat([t.labels for t in truths]),
            encoded=encoded,
            sources=sources,
        )


class Auditor:
    """Matches each reconstruction to the ground truth (Hungarian on MSE for images, on the
    fraction of mismatched positions for token sequences) and scores it. `decode` turns token
    ids into text for ROUGE (the run's tokenizer)."""

    def __init__(
        self, lpips_nets: tuple[str, ...] = ("alex",), decode: Decoder | None = None
    ) -> None:
        self.lpips_nets = lpips_nets
        self.decode = decode

    def score(
        self,
        observation: Observation,
        attack: str,
        reconstruction: Reconstruction,
        truth: GroundTruth,
        context: Mapping[str, object],
    ) -> list[dict[str, object]]:
        """One row per reconstructed sample; a failed attack gives one row with its status."""
        base = {
            "round": observation.round,
            "client_id": observation.client_id,
            "attack": attack,
            "batch_size": observation.batch_size,
            "seconds": reconstruction.seconds,
            "iterations": reconstruction.iterations,
            "status": reconstruction.status,
            "message": reconstruction.message,
            "label_method": reconstruction.label_method,
            "diagnostics": json.dumps(reconstruction.diagnostics, sort_keys=True),
            "modality": observation.modality,
            **context,
        }
        if reconstruction.status != "ok":
            return [{**base, "sample": -1, "target_index": -1, "scored_against": "original"}]
        if observation.modality == "tokens":
            return self._score_tokens(base, reconstruction, truth.inputs)
        rows = self._score_against(base, reconstruction, truth.inputs, truth.labels, "original")
        if truth.encoded is not None:
            rows += self._score_against(base, reconstruction, truth.encoded, None, "encoded")
            if truth.sources is not None:
                rows = self._best_source(rows, reconstruction, truth)
        return rows

    def _score_against(
        self,
        base: Mapping[str, object],
        reconstruction: Reconstruction,
        targets: torch.Tensor,
        labels: torch.Tensor | None,
        against: str,
    ) -> list[dict[str, object]]:
        recon = reconstruction.inputs.detach().float().cpu()
        # InstaHide encodings live in [-1, 1]; their magnitude is what an image attack can see.
        shown = targets.float().abs() if against == "encoded" else targets.float()
        recon_idx, truth_idx = assign(recon, shown, metric="mse")
        scores = score_images(recon[recon_idx], shown[truth_idx], self.lpips_nets)
        rows = []
        for j, (r, t) in enumerate(zip(recon_idx.tolist(), truth_idx.tolist(), strict=True)):
            true = None if labels is None else labels[t : t + 1]
            rows.append(
                {
                    **base,
                    "sample": r,
                    "target_index": t,
                    "scored_against": against,
                    **_metric_fields(scores, j),
                    **_label_fields(reconstruction, r, true),
                }
            )
        return rows

    def _score_tokens(
        self, base: Mapping[str, object], reconstruction: Reconstruction, truth: torch.Tensor
    ) -> list[dict[str, object]]:
        """Token accuracy and ROUGE of each reconstructed sequence against its matched truth."""
        if self.decode is None:
            raise ValueError("scoring token sequences needs the run's tokenizer (decode)")
        recon = reconstruction.inputs.detach().long().cpu()
        truth = truth.long().cpu()
        recon_idx, truth_idx = assign(recon, truth, metric="tokens")
        matched, targets = recon[recon_idx], truth[truth_idx]
        accuracy = token_accuracy(matched, targets)
        scores = rouge(
            [self.decode(r.tolist()) for r in matched], [self.decode(t.tolist()) for t in targets]
        )
        return [
            {
                **base,
                "sample": r,
                "target_index": t,
                "scored_against": "original",
                "token_acc": float(accuracy[j]),
                **{name: values[j] for name, values in scores.items()},
            }
            for j, (r, t) in enumerate(zip(recon_idx.tolist(), truth_idx.tolist(), strict=True))
        ]

    def _best_source(
        self, rows: list[dict[str, object]], reconstruction: Reconstruction, truth: GroundTruth
    ) -> list[dict[str, object]]:
        """Against the originals, an encoded sample counts as leaking its best-matched source."""
        encoded = [r for r in rows if r["scored_against"] == "encoded"]
        recon = reconstruction.inputs.detach().float().cpu()
        best_rows = []
        for row in encoded:
            sample = int(row["sample"])
            sources = [s for s in truth.sources[int(row["target_index"])].tolist() if s >= 0]
            if not sources:
                continue
            candidates = truth.inputs[sources].float()
            scores = score_images(
                recon[sample : sample + 1].expand_as(candidates), candidates, self.lpips_nets
            )
            best = int(torch.argmin(scores["mse"]))
            source = sources[best]
            best_rows.append(
                {
                    **row,
                    "scored_against": "original",
                    "target_index": source,
                    **_metric_fields(scores, best),
                    **_label_fields(reconstruction, sample, truth.labels[source : source + 1]),
                }
            )
        return best_rows + encoded


def _metric_fields(scores: Mapping[str, torch.Tensor], j: int) -> dict[str, float]:
    """The image metrics of pair j; LPIPS nets that were not computed are NaN."""
    fields = {"lpips_alex": float("nan"), "lpips_vgg": float("nan")}
    fields.update({name: float(values[j]) for name, values in scores.items()})
    return fields


def _label_fields(
    reconstruction: Reconstruction, sample: int, true: torch.Tensor | None
) -> dict[str, object]:
    pred = None if reconstruction.labels is None else reconstruction.labels[sample : sample + 1]
    return {
        "label_acc": float("nan") if true is None else label_accuracy(pred, true),
        "true_label": -1 if true is None else int(true.item()),
        "pred_label": -1 if pred is None else int(pred.item()),
    }
