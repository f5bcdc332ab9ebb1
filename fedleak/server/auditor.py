"""The auditor: the only place that sees the private batch, and scores reconstructions against it.

Attacks never import this module (a test enforces it): ground truth flows from the client's
audit record straight here, around the attackers.
"""

from __future__ import annotations

import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from fedleak.attacks.types import Observation, Reconstruction, converged
from fedleak.defenses import unsigned
from fedleak.lines import error_line
from fedleak.metrics import (
    assign,
    hard_labels,
    label_accuracy,
    multiset_credit,
    rouge,
    score_images,
    token_accuracy,
)

Decoder = Callable[[Sequence[int]], str]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroundTruth:
    """A client's private batch of one round, as the auditor knows it.

    `inputs` are the private originals of the batch. Under an input encoding (MixUp,
    InstaHide), `encoded` holds what the gradient was computed on, `partners` the private
    images from outside the batch that were mixed in (labels `partner_labels`), and
    `sources[i]` the indices into `private` (the batch followed by the partners) of the images
    mixed into encoded sample i, -1 for images from a public pool: those are nobody's private
    data and are never scored against. `sign_flipped`: the encoding flipped signs (InstaHide),
    so an attack can recover `encoded` only up to those flips.
    """

    client_id: int
    inputs: torch.Tensor
    labels: torch.Tensor
    encoded: torch.Tensor | None = None
    sources: torch.Tensor | None = None
    partners: torch.Tensor | None = None
    partner_labels: torch.Tensor | None = None
    sign_flipped: bool = False
    soft_labels: torch.Tensor | None = None

    @property
    def private(self) -> torch.Tensor:
        """Every private image of the round: the batch, then the encodings' partners."""
        if self.partners is None or len(self.partners) == 0:
            return self.inputs
        return torch.cat([self.inputs, self.partners.to(self.inputs.dtype)])

    @property
    def private_labels(self) -> torch.Tensor:
        """The labels of `private`."""
        if self.partner_labels is None or len(self.partner_labels) == 0:
            return self.labels
        return torch.cat([self.labels, self.partner_labels.long()])

    @classmethod
    def from_audit(cls, client_id: int, audit: Mapping[str, torch.Tensor]) -> GroundTruth:
        """Rebuild from the tensors of a reply's audit record (`fedleak.messages`)."""
        sources = audit.get("sources")
        if sources is not None and "from-public" in audit:
            sources = torch.where(audit["from-public"].bool(), -1, sources.long())
        partner_labels = audit.get("partner-labels")
        return cls(
            client_id=client_id,
            inputs=audit["inputs"],
            labels=audit["labels"].long(),
            encoded=audit.get("encoded"),
            sources=sources,
            partners=audit.get("partners"),
            partner_labels=None if partner_labels is None else partner_labels.long(),
            sign_flipped=bool(audit["sign-flipped"]) if "sign-flipped" in audit else False,
            soft_labels=audit.get("soft-labels"),
        )

    @staticmethod
    def union(truths: list[GroundTruth]) -> GroundTruth:
        """All participating clients' data as one batch (the aggregate-only view), in the
        order given (the strategy's canonical order).

        Encodings are kept when every client has them (one run, one defense). The union's
        private images are every batch, then every client's partners; each client's source
        indices move accordingly, and -1 (an image from the public pool) stays -1.
        """
        encoded = sources = None
        if all(t.encoded is not None for t in truths):
            encoded = torch.cat([t.encoded for t in truths])
        if encoded is not None and all(t.sources is not None for t in truths):
            batches = sum(len(t.inputs) for t in truths)
            shifted, batch_offset, partner_offset = [], 0, batches
            for t in truths:
                size = len(t.inputs)
                moved = torch.where(
                    t.sources < size, t.sources + batch_offset, t.sources - size + partner_offset
                )
                shifted.append(torch.where(t.sources >= 0, moved, t.sources))
                batch_offset += size
                partner_offset += 0 if t.partners is None else len(t.partners)
            sources = torch.cat(shifted)
        partners = [t.partners for t in truths if t.partners is not None and len(t.partners)]
        labels = [t.partner_labels for t in truths if t.partners is not None and len(t.partners)]
        soft = None
        if encoded is not None and all(t.soft_labels is not None for t in truths):
            soft = torch.cat([t.soft_labels for t in truths])  # type: ignore[misc]
        return GroundTruth(
            client_id=-1,
            inputs=torch.cat([t.inputs for t in truths]),
            labels=torch.cat([t.labels for t in truths]),
            encoded=encoded,
            sources=sources,
            partners=torch.cat(partners) if partners else None,
            partner_labels=torch.cat(labels).long() if labels else None,
            sign_flipped=any(t.sign_flipped for t in truths),
            soft_labels=soft,
        )


class Auditor:
    """Matches each reconstruction to the ground truth (Hungarian on MSE for images, on the
    fraction of mismatched positions for token sequences) and scores it. `decode` turns token
    ids into text for ROUGE (the run's tokenizer).

    Every row also carries the attack's convergence: the matching loss of the reconstructed
    sample at the start and the end of the optimisation (`loss_start`, `loss_final`) and
    `converged` by the rule of `fedleak.attacks.types.converged` (NaN without a matching loss).
    The auditor never ends a round: an error while scoring becomes a failed row, like an
    attack's.

    A batch update is symmetric in its samples, so its reconstructions are matched to the batch
    one to one at the lowest total cost. Per-sample updates are not: row i is sample i's own
    update and the attacker inverts it alone, so reconstruction i is scored against sample i
    (matching across rows would let a weak attack borrow a better-fitting neighbour).
    """

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
        truth: GroundTruth | None,
        context: Mapping[str, object],
    ) -> list[dict[str, object]]:
        """One row per reconstructed sample; a failed attack (or a failure to score it) gives
        one row with its status and message. Without ground truth (a client of a foreign app
        that declared no batch: a real deployment) the rows are `scored_against`
        "unavailable", with NaN metrics and the recovered labels."""
        base = self._base(observation, attack, reconstruction, context)
        if reconstruction.status == "nan" and truth is not None:
            return self._diverged(base, truth)
        if reconstruction.status != "ok":
            return [{**base, "sample": -1, "target_index": -1, "scored_against": "original"}]
        if truth is None:
            return self._unavailable(base, reconstruction)
        in_order = observation.per_sample_updates is not None
        try:
            if observation.modality == "tokens":
                rows = self._score_tokens(base, reconstruction, truth.inputs, in_order)
            else:
                rows = self._score_against(
                    base, reconstruction, truth.inputs, truth.labels, "original", in_order
                )
            if truth.encoded is not None:
                rows += self._score_against(
                    base,
                    reconstruction,
                    truth.encoded,
                    None,
                    "encoded",
                    in_order,
                    up_to_flips=truth.sign_flipped,
                )
                if truth.sources is not None:
                    rows = self._best_source(rows, reconstruction, truth)
                if truth.soft_labels is not None:
                    _score_encoded_labels(rows, reconstruction, truth.soft_labels, in_order)
            elif not in_order:
                rows += self._unreconstructed(base, rows, truth, reconstruction.labels is not None)
        except Exception as error:  # scoring must not end the round: record it instead
            log.warning("auditor failed on %s for client %s: %s", attack, base["client_id"], error)
            message = f"auditor: {error_line(error, 500)}"
            return [
                {
                    **base,
                    "status": "failed",
                    "message": message,
                    "sample": -1,
                    "target_index": -1,
                    "scored_against": "original",
                }
            ]
        return [{**row, **_convergence(reconstruction, int(row["sample"]))} for row in rows]

    @staticmethod
    def _diverged(base: Mapping[str, object], truth: GroundTruth) -> list[dict[str, object]]:
        """A run that diverged reconstructed none of the client's private samples: one row per
        sample, with no metrics, so that success rates count them as not reconstructed (a run
        that raised says nothing of its samples and keeps its one row)."""
        return [
            {**base, "sample": index, "target_index": index, "scored_against": "original"}
            for index in range(len(truth.inputs))
        ]

    @staticmethod
    def _unreconstructed(
        base: Mapping[str, object],
        rows: list[dict[str, object]],
        truth: GroundTruth,
        labelled: bool,
    ) -> list[dict[str, object]]:
        """A row, with no reconstruction and no image metrics, for each private sample left
        over when the batch held more samples than the attack reconstructed (a Poisson batch
        larger than the declared size): success rates count it as not reconstructed, and, when
        the attack recovers labels (`labelled`), label accuracy as a label not recovered
        (`fedleak.score` counts it the same way)."""
        matched = {int(row["target_index"]) for row in rows}
        classes = truth.labels.dim() == 1  # token sequences carry no class label
        return [
            {
                **base,
                "sample": -1,
                "target_index": index,
                "scored_against": "original",
                **(_label_fields(None, -1, truth.labels[index : index + 1]) if classes else {}),
                **({"label_acc": 0.0} if classes and labelled else {}),
            }
            for index in range(len(truth.inputs))
            if index not in matched
        ]

    @staticmethod
    def _unavailable(
        base: Mapping[str, object], reconstruction: Reconstruction
    ) -> list[dict[str, object]]:
        """Rows for a reconstruction with nothing to score it against."""
        return [
            {
                **base,
                "sample": sample,
                "target_index": -1,
                "scored_against": "unavailable",
                **_metric_fields({"mse": _NAN, "psnr": _NAN, "ssim": _NAN}, 0),
                **_label_fields(reconstruction, sample, None),
                **_convergence(reconstruction, sample),
            }
            for sample in range(len(reconstruction.inputs))
        ]

    @staticmethod
    def _base(
        observation: Observation,
        attack: str,
        reconstruction: Reconstruction,
        context: Mapping[str, object],
    ) -> dict[str, object]:
        return {
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

    def _score_against(
        self,
        base: Mapping[str, object],
        reconstruction: Reconstruction,
        targets: torch.Tensor,
        labels: torch.Tensor | None,
        against: str,
        in_order: bool = False,
        up_to_flips: bool = False,
    ) -> list[dict[str, object]]:
        """Rows of `reconstruction` against `targets`; `up_to_flips` compares both in their
        unsigned form (InstaHide's encodings, which an attack can read either way)."""
        recon = reconstruction.inputs.detach().float().cpu()
        shown = targets.float()
        if up_to_flips:
            recon, shown = unsigned(recon), unsigned(shown)
        if not (len(recon) and len(shown)):  # an empty Poisson batch: nothing to score
            return []
        recon_idx, truth_idx = _pairing(recon, shown, in_order, "mse")
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
        predicted = reconstruction.labels
        if (
            labels is not None
            and predicted is not None
            and not (in_order and len(recon) == len(shown))
        ):
            _score_labels_as_multiset(rows, labels.tolist(), hard_labels(predicted).tolist())
        return rows

    def _score_tokens(
        self,
        base: Mapping[str, object],
        reconstruction: Reconstruction,
        truth: torch.Tensor,
        in_order: bool = False,
    ) -> list[dict[str, object]]:
        """Token accuracy and ROUGE of each reconstructed sequence against its matched truth
        (its own sequence when each was shared alone, as for images)."""
        if self.decode is None:
            raise ValueError("scoring token sequences needs the run's tokenizer (decode)")
        recon = reconstruction.inputs.detach().long().cpu()
        truth = truth.long().cpu()
        if not (len(recon) and len(truth)):
            return []
        recon_idx, truth_idx = _pairing(recon, truth, in_order, "tokens")
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
        """Against the originals, an encoded sample counts as leaking its best-matched source:
        every private image mixed into it is scored (batch and partners alike), public ones
        never; `target_index` then indexes `truth.private`."""
        encoded = [r for r in rows if r["scored_against"] == "encoded"]
        recon = reconstruction.inputs.detach().float().cpu()
        private, private_labels = truth.private, truth.private_labels
        best_rows = []
        for row in encoded:
            sample = int(row["sample"])
            sources = [s for s in truth.sources[int(row["target_index"])].tolist() if s >= 0]
            if not sources:
                continue
            candidates = private[sources].float()
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
                    **_label_fields(reconstruction, sample, private_labels[source : source + 1]),
                }
            )
        return best_rows + encoded


_NAN = torch.tensor([math.nan])


def _pairing(
    recon: torch.Tensor, truth: torch.Tensor, in_order: bool, metric: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Which reconstruction is scored against which private sample: its own when each sample's
    update was shared alone (matching would let a weak attack borrow a better-fitting
    neighbour), else the assignment that fits best (a batch update gives them in no order)."""
    if in_order and len(recon) == len(truth):
        index = torch.arange(len(truth))
        return index, index
    return assign(recon, truth, metric=metric)


def _convergence(reconstruction: Reconstruction, sample: int) -> dict[str, float]:
    """`loss_start`, `loss_final` and `converged` of one reconstructed sample (NaN for a
    private sample that no reconstruction was matched to, `sample` -1)."""
    start, final = reconstruction.loss_start, reconstruction.loss_final
    if start is None or final is None or sample < 0:
        return {"loss_start": math.nan, "loss_final": math.nan, "converged": math.nan}
    first, last = float(start[sample]), float(final[sample])
    return {"loss_start": first, "loss_final": last, "converged": converged(first, last)}


def _metric_fields(scores: Mapping[str, torch.Tensor], j: int) -> dict[str, float]:
    """The image metrics of pair j; LPIPS nets that were not computed are NaN."""
    fields = {"lpips_alex": float("nan"), "lpips_vgg": float("nan")}
    fields.update({name: float(values[j]) for name, values in scores.items()})
    return fields


def _score_labels_as_multiset(
    rows: list[dict[str, object]], pool: list[int], predicted: list[int]
) -> None:
    """`label_acc` of rows paired by assignment: whether each row's recovered label is one of
    the batch's labels (`pool`, all of them, also those of samples no row reached), each
    counted once (`multiset_credit`), with the labels of guesses no row holds (`predicted`:
    every recovered label) crediting rows left without; `true_label` and `pred_label` keep
    the pixel pairing."""
    scored = [row for row in rows if not math.isnan(float(row["label_acc"]))]  # type: ignore[arg-type]
    spare = Counter(predicted)
    spare.subtract(int(row["pred_label"]) for row in scored)  # type: ignore[call-overload]
    credit = multiset_credit(
        [int(row["pred_label"]) for row in scored],  # type: ignore[call-overload]
        [int(row["true_label"]) for row in scored],  # type: ignore[call-overload]
        pool,
        sorted(spare.elements()),
    )
    for row, recovered in zip(scored, credit, strict=True):
        row["label_acc"] = float(recovered)


def _score_encoded_labels(
    rows: list[dict[str, object]],
    reconstruction: Reconstruction,
    soft_labels: torch.Tensor,
    in_order: bool,
) -> None:
    """Label accuracy under an encoding, apart from the pixels: a recovered label counts when
    it is the class carrying most of the mixed label of the encoded sample its reconstruction
    was paired with (the sample itself when each was shared alone; on a batch, as a multiset
    over the batch's encoded samples, as for unencoded batches). Rows against a private source
    take their encoded row's label fields: scoring the label of the source the image resembles
    credited a class-mean floor with 84% under MixUp (random labels: 47%)."""
    encoded = [row for row in rows if row["scored_against"] == "encoded"]
    dominant = hard_labels(soft_labels)
    for row in encoded:
        target = int(row["target_index"])
        row.update(_label_fields(reconstruction, int(row["sample"]), dominant[target : target + 1]))
    if reconstruction.labels is not None and not (in_order and len(encoded) == len(soft_labels)):
        predicted = hard_labels(reconstruction.labels).tolist()
        _score_labels_as_multiset(encoded, dominant.tolist(), predicted)
    by_sample = {int(row["sample"]): row for row in encoded}
    for row in rows:
        if row["scored_against"] == "original" and int(row["sample"]) in by_sample:
            own = by_sample[int(row["sample"])]
            row.update({key: own[key] for key in ("label_acc", "true_label", "pred_label")})


def _label_fields(
    reconstruction: Reconstruction | None, sample: int, true: torch.Tensor | None
) -> dict[str, object]:
    """The true label, the recovered one (-1: none; no reconstruction when `reconstruction`
    is None) and whether they agree."""
    labels = None if reconstruction is None else reconstruction.labels
    pred = None if labels is None else labels[sample : sample + 1]
    return {
        "label_acc": float("nan") if true is None else label_accuracy(pred, true),
        "true_label": -1 if true is None else int(true.item()),
        "pred_label": -1 if pred is None else int(pred.item()),
    }
