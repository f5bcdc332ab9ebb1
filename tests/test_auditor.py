"""The auditor scores only against private sources and against every one of them (partners from
the client's data included), records convergence, and never ends a round."""

from __future__ import annotations

import dataclasses
import math

import torch

import fedleak
from fedleak.attacks.types import CONVERGED_RATIO, Observation, Reconstruction, converged
from fedleak.defenses import fold_toward, unsigned
from fedleak.models.spec import ModelSpec
from fedleak.server.auditor import Auditor, GroundTruth


def _observation(examples: int, defense: str = "none") -> Observation:
    return Observation(
        round=1,
        client_id=0,
        model=ModelSpec("mlp", (1, 4, 4), 10),
        weights={},
        update={},
        update_kind="gradient",
        num_examples=examples,
        batch_size=examples,
        local_steps=1,
        learning_rate=0.1,
        defense=defense,
    )


def _images(count: int, seed: int) -> torch.Tensor:
    return torch.rand(count, 1, 4, 4, generator=torch.Generator().manual_seed(seed))


def test_public_partners_are_never_scored_against() -> None:
    # Inter-InstaHide at B = 2: each image mixed with two public ones, whose indices into the
    # public pool (7, 12, ...) are not batch indices. The audit record says which are public.
    private, public = _images(2, 0), _images(20, 1)
    sources = torch.tensor([[0, 7, 12], [1, 19, 3]])
    from_public = torch.tensor([[False, True, True], [False, True, True]])
    mixed = 0.5 * private + 0.25 * public[sources[:, 1]] + 0.25 * public[sources[:, 2]]
    audit = {
        "inputs": private,
        "labels": torch.tensor([4, 5]),
        "encoded": mixed,
        "sources": sources,
        "from-public": from_public,
        "partners": torch.zeros(0, 1, 4, 4),
        "partner-labels": torch.zeros(0, dtype=torch.int64),
    }
    truth = GroundTruth.from_audit(0, audit)
    assert truth.sources.tolist() == [[0, -1, -1], [1, -1, -1]]
    # An attack that recovers the public image 7 exactly leaks nothing private.
    guess = Reconstruction(inputs=torch.stack([public[7], public[19]]), labels=None)
    rows = Auditor(lpips_nets=()).score(_observation(2), "a", guess, truth, {})
    original = [r for r in rows if r["scored_against"] == "original"]
    assert sorted((r["sample"], r["target_index"]) for r in original) == [(0, 0), (1, 1)]
    for row in original:
        expected = float(
            (guess.inputs[row["sample"]] - private[row["target_index"]]).square().mean()
        )
        assert math.isclose(row["mse"], expected, rel_tol=1e-5) and row["mse"] > 1e-3


def test_every_private_source_counts_partners_from_outside_the_batch_included() -> None:
    # MixUp at B = 1 with two partners drawn from the client's partition (not in the batch).
    batch, partners = _images(1, 2), _images(2, 3)
    private = torch.cat([batch, partners])
    audit = {
        "inputs": batch,
        "labels": torch.tensor([3]),
        "encoded": 0.4 * batch + 0.35 * partners[:1] + 0.25 * partners[1:],
        "sources": torch.tensor([[0, 2, 1]]),
        "from-public": torch.zeros(1, 3, dtype=torch.bool),
        "partners": partners,
        "partner-labels": torch.tensor([8, 9]),
    }
    truth = GroundTruth.from_audit(0, audit)
    assert torch.equal(truth.private, private) and truth.private_labels.tolist() == [3, 8, 9]
    # The attack recovers the second partner exactly: that private image leaked.
    guess = Reconstruction(inputs=partners[1:].clone(), labels=torch.tensor([9]))
    rows = Auditor(lpips_nets=()).score(_observation(1, "mixup:3"), "a", guess, truth, {})
    (best,) = [r for r in rows if r["scored_against"] == "original"]
    assert best["target_index"] == 2 and best["mse"] == 0.0


def test_a_label_under_an_encoding_is_scored_apart_from_the_pixels() -> None:
    """Scored against the source an image resembles, a label followed the pixels: a class-mean
    floor (each image its label's mean) read 84% under MixUp, random labels 47%. The label of
    an encoded sample is the class carrying most of its mixed label, whatever the image."""
    batch, partners = _images(2, 4), _images(4, 5)
    sources = torch.tensor([[0, 2, 3], [1, 4, 5]])
    coefficients = torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.5, 0.3]])
    labels, partner_labels = torch.tensor([3, 4]), torch.tensor([8, 9, 6, 7])
    private = torch.cat([batch, partners])
    every_label = torch.cat([labels, partner_labels])
    soft = torch.zeros(2, 10)
    for i in range(2):
        soft[i].index_add_(0, every_label[sources[i]], coefficients[i])
    encoded = torch.einsum("bk,bkchw->bchw", coefficients, private[sources])
    audit = {
        "inputs": batch,
        "labels": labels,
        "encoded": encoded,
        "sources": sources,
        "from-public": torch.zeros(2, 3, dtype=torch.bool),
        "partners": partners,
        "partner-labels": partner_labels,
        "soft-labels": soft,
    }
    truth = GroundTruth.from_audit(0, audit)
    auditor = Auditor(lpips_nets=())
    # Exact partners (8 in sample 0, 6 in sample 1) labelled as those partners: the images
    # leak, the labels are not the encoded samples' (3 and 6 carry most of their labels).
    copies = Reconstruction(inputs=partners[[0, 2]].clone(), labels=torch.tensor([8, 7]))
    rows = auditor.score(_observation(2, "mixup:3"), "a", copies, truth, {})
    original = sorted(
        (r for r in rows if r["scored_against"] == "original"), key=lambda r: r["sample"]
    )
    assert [r["target_index"] for r in original] == [2, 4] and original[0]["mse"] == 0.0
    assert [r["true_label"] for r in original] == [3, 6]
    assert [r["label_acc"] for r in original] == [0.0, 0.0]
    # Blank images with the encoded samples' labels: right, however poor the pixels.
    blank = Reconstruction(inputs=torch.zeros(2, 1, 4, 4), labels=torch.tensor([6, 3]))
    rows = auditor.score(_observation(2, "mixup:3"), "a", blank, truth, {})
    for against in ("original", "encoded"):
        assert [r["label_acc"] for r in rows if r["scored_against"] == against] == [1.0, 1.0]


def test_instahide_is_scored_on_what_its_signs_leave() -> None:
    # The same mixture shared under MixUp and under InstaHide, and an attack that recovers
    # exactly what each lets it see: the mixture itself, or (InstaHide) the mixture up to its
    # flips about the middle of the range. Only the first recovers the originals' pixels.
    batch, partners = _images(1, 4), _images(1, 5)
    mixture = 0.6 * batch + 0.4 * partners
    signs = torch.where(
        torch.rand(mixture.shape, generator=torch.Generator().manual_seed(6)) < 0.5, -1.0, 1.0
    )
    flipped = 0.5 + (mixture - 0.5) * signs

    def rows(encoded: torch.Tensor, defense: str, guess: torch.Tensor) -> dict[str, float]:
        audit = {
            "inputs": batch,
            "labels": torch.tensor([1]),
            "encoded": encoded,
            "sources": torch.tensor([[0, 1]]),
            "from-public": torch.zeros(1, 2, dtype=torch.bool),
            "partners": partners,
            "partner-labels": torch.tensor([2]),
        }
        if defense.startswith("instahide"):
            audit["sign-flipped"] = torch.tensor(True)
        truth = GroundTruth.from_audit(0, audit)
        recon = Reconstruction(inputs=guess, labels=None)
        scored = Auditor(lpips_nets=()).score(_observation(1, defense), "a", recon, truth, {})
        return {r["scored_against"]: r["mse"] for r in scored}

    mixup = rows(mixture, "mixup:2", mixture.clone())
    instahide = rows(flipped, "instahide:2", unsigned(flipped))
    # Each attack recovered all it could see of its encoding, whichever way it read the
    # flips (here: every pixel below the middle)...
    assert mixup["encoded"] == 0.0 and instahide["encoded"] < 1e-12
    lower = fold_toward(flipped, torch.zeros(()))
    assert rows(flipped, "instahide:2", lower)["encoded"] < 1e-12
    assert torch.allclose(unsigned(flipped), unsigned(mixture))
    # ...but the flips cost InstaHide's attacker the pixels below the middle.
    assert instahide["original"] > 2 * mixup["original"]


def test_the_union_keeps_each_clients_partners_apart() -> None:
    def client(seed: int, batch: int, partners: int, sources: list[list[int]]) -> GroundTruth:
        return GroundTruth(
            seed,
            _images(batch, seed),
            torch.arange(batch),
            encoded=_images(batch, seed + 10),
            sources=torch.tensor(sources),
            partners=_images(partners, seed + 20),
            partner_labels=torch.arange(partners) + 5,
        )

    first = client(0, 2, 1, [[0, 2], [1, -1]])
    second = client(1, 1, 2, [[0, 2]])
    union = GroundTruth.union([first, second])
    # Private images of the union: both batches, then both clients' partners.
    assert torch.equal(
        union.private,
        torch.cat([first.inputs, second.inputs, first.partners, second.partners]),
    )
    assert union.sources.tolist() == [[0, 3], [1, -1], [2, 5]]
    for row, owner in zip(union.sources.tolist(), (first, first, second), strict=True):
        owned = torch.cat([owner.inputs, owner.partners])
        for s in row:
            if s >= 0:
                assert any(torch.equal(union.private[s], image) for image in owned)


def test_an_error_while_scoring_becomes_a_failed_row() -> None:
    truth = GroundTruth(0, _images(2, 0), torch.tensor([0, 1]))
    wrong = Reconstruction(inputs=torch.rand(2, 3, 5, 5), labels=None)
    rows = Auditor(lpips_nets=()).score(_observation(2), "a", wrong, truth, {"defense": "none"})
    assert len(rows) == 1 and rows[0]["status"] == "failed" and rows[0]["sample"] == -1
    assert rows[0]["message"].startswith("auditor: ") and rows[0]["defense"] == "none"


def test_a_diverged_run_leaves_a_row_per_private_sample_and_a_failed_one_a_single_row() -> None:
    truth = GroundTruth(0, _images(3, 0), torch.tensor([0, 1, 2]))
    nan = torch.full((3, 1, 4, 4), math.nan)
    auditor = Auditor(lpips_nets=())
    diverged = Reconstruction(inputs=nan, labels=None, status="nan", message="NaN")
    rows = auditor.score(_observation(3), "a", diverged, truth, {})
    assert [(r["sample"], r["target_index"], r["status"]) for r in rows] == [
        (i, i, "nan") for i in range(3)
    ]
    assert all(r["scored_against"] == "original" and "psnr" not in r for r in rows)
    failed = Reconstruction(inputs=torch.empty(0), labels=None, status="failed", message="x")
    rows = auditor.score(_observation(3), "a", failed, truth, {})
    assert len(rows) == 1 and rows[0]["sample"] == -1
    # Without ground truth there is nothing to count: one row, as for a failed run.
    assert len(auditor.score(_observation(3), "a", diverged, None, {})) == 1


def test_rows_carry_the_matching_losses_and_the_convergence_rule() -> None:
    truth = GroundTruth(0, _images(3, 0), torch.tensor([0, 1, 2]))
    guess = Reconstruction(
        inputs=truth.inputs.clone(),
        labels=None,
        loss_start=torch.tensor([1.0, 1.0, 0.5]),
        loss_final=torch.tensor([0.05, 0.5, math.inf]),
    )
    rows = Auditor(lpips_nets=()).score(_observation(3), "a", guess, truth, {})
    by_sample = {r["sample"]: r for r in rows}
    assert [by_sample[i]["converged"] for i in range(3)] == [1.0, 0.0, 0.0]
    assert by_sample[1]["loss_start"] == 1.0 and by_sample[1]["loss_final"] == 0.5
    plain = Reconstruction(inputs=truth.inputs.clone(), labels=None)
    for row in Auditor(lpips_nets=()).score(_observation(3), "a", plain, truth, {}):
        assert math.isnan(row["loss_start"]) and math.isnan(row["converged"])
    assert converged(1.0, CONVERGED_RATIO) == 1.0 and converged(1.0, 0.11) == 0.0
    assert math.isnan(converged(0.0, 0.0)) and math.isnan(converged(math.nan, 1.0))
    # A loss infinite from the start to the end never fitted anything (audit BQ1).
    assert converged(math.inf, math.inf) == 0.0 and math.isnan(converged(math.inf, 1.0))


def test_a_poisson_batch_of_another_size_leaves_every_private_sample_one_row() -> None:
    truth = GroundTruth(0, _images(3, 0), torch.tensor([4, 5, 6]))
    # The client declared 2 and drew 3: the attack reconstructed 2, one of them exactly.
    guess = Reconstruction(
        inputs=torch.stack([truth.inputs[2], _images(1, 9)[0]]),
        labels=torch.tensor([6, 1]),
        loss_start=torch.tensor([1.0, 1.0]),
        loss_final=torch.tensor([0.01, 0.9]),
    )
    auditor = Auditor(lpips_nets=())
    rows = auditor.score(_observation(2), "a", guess, truth, {})
    assert sorted(r["target_index"] for r in rows) == [0, 1, 2]
    exact = next(r for r in rows if r["target_index"] == 2)
    assert exact["sample"] == 0 and exact["mse"] == 0.0 and exact["label_acc"] == 1.0
    (missed,) = [r for r in rows if r["sample"] == -1]
    # Its label was not recovered either: counted 0, not left out (the report read 2/2 where
    # `fedleak.score` read 2/3 of the same batch's labels).
    assert missed["status"] == "ok" and "mse" not in missed and missed["label_acc"] == 0.0
    assert missed["true_label"] in (4, 5) and missed["pred_label"] == -1
    unlabelled = dataclasses.replace(guess, labels=None)
    (missed,) = [
        r for r in auditor.score(_observation(2), "a", unlabelled, truth, {}) if r["sample"] == -1
    ]
    assert math.isnan(missed["label_acc"])  # an attack that recovers no labels is not scored
    assert math.isnan(missed["loss_final"]) and math.isnan(missed["converged"])
    # Labels the batch holds count wherever the pixels paired them: two right labels of a
    # batch of four read 2/4 here and in `fedleak.score` (the rows read 0/4).
    four = GroundTruth(0, _images(4, 3), torch.tensor([0, 2, 6, 9]))
    two = Reconstruction(inputs=four.inputs[2:].clone(), labels=torch.tensor([0, 2]))
    rows = auditor.score(_observation(2), "a", two, four, {})
    assert sum(r["label_acc"] for r in rows) == 2.0 and len(rows) == 4
    assert fedleak.score(two, four.inputs, four.labels, lpips=False).label_accuracy == 0.5
    # More guesses than samples: the label recovered counts whichever image carries it.
    single = GroundTruth(0, _images(1, 4), torch.tensor([4]))
    for labels in ([1, 4], [4, 1]):
        guesses = torch.stack([single.inputs[0], _images(1, 5)[0]])
        surplus = Reconstruction(inputs=guesses, labels=torch.tensor(labels))
        (row,) = auditor.score(_observation(2), "a", surplus, single, {})
        assert row["label_acc"] == 1.0, labels
        api = fedleak.score(surplus, single.inputs, single.labels, lpips=False)
        assert api.label_accuracy == 1.0, labels
    # A surplus guess credits only a label no paired guess already took, and one the batch
    # holds: [1, 0] on the two exact images plus a 5 recover one of [1, 1] (audit DJ1).
    pair = GroundTruth(0, _images(2, 3), torch.tensor([1, 1]))
    for labels, recovered in (([1, 0, 5], 1.0), ([1, 0, 1], 2.0), ([0, 0, 0], 0.0)):
        extra = Reconstruction(
            inputs=torch.cat([pair.inputs.clone(), _images(1, 9)]), labels=torch.tensor(labels)
        )
        rows = auditor.score(_observation(3), "a", extra, pair, {})
        assert sum(r["label_acc"] for r in rows) == recovered, labels
        api = fedleak.score(extra, pair.inputs, pair.labels, lpips=False)
        assert api.label_accuracy == recovered / 2, labels
    # Drew none: nothing private to score, so no rows.
    empty = GroundTruth(0, _images(0, 0), torch.zeros(0, dtype=torch.long))
    assert auditor.score(_observation(2), "a", guess, empty, {}) == []
    # Drew fewer than declared: the surplus reconstruction has no private sample to match.
    one = GroundTruth(0, truth.inputs[2:], truth.labels[2:])
    assert [
        (r["sample"], r["target_index"])
        for r in auditor.score(_observation(2), "a", guess, one, {})
    ] == [(0, 0)]


def test_a_batchs_labels_are_scored_as_a_multiset_not_by_the_pixel_pairing() -> None:
    """A batch update reveals which labels the batch holds, not which image carries which: an
    exactly recovered multiset scores 100% however the images pair, each label once."""
    truth = GroundTruth(0, _images(4, 0), torch.tensor([1, 5, 7, 7]))
    # Each guess is nearest to the next private image, so the pixel pairing puts every
    # recovered label beside another image's truth.
    shifted = truth.inputs[[1, 2, 3, 0]] + 0.01
    guess = Reconstruction(inputs=shifted, labels=torch.tensor([1, 5, 7, 7]))
    rows = Auditor(lpips_nets=()).score(_observation(4), "a", guess, truth, {})
    assert sum(r["pred_label"] == r["true_label"] for r in rows) == 1  # the pairing's view
    assert [r["label_acc"] for r in rows] == [1.0] * 4
    # A repeat counts as often as the batch holds it: [7, 7, 7, 1] recovers 1, 7, 7 of four.
    repeated = Reconstruction(inputs=shifted, labels=torch.tensor([7, 7, 7, 1]))
    rows = Auditor(lpips_nets=()).score(_observation(4), "a", repeated, truth, {})
    assert sum(r["label_acc"] for r in rows) == 3.0
    # Each sample shared alone keeps its own pairing: there the position is known.
    alone = Reconstruction(inputs=truth.inputs.clone(), labels=torch.tensor([5, 1, 7, 7]))
    single = dataclasses.replace(_observation(4), per_sample_updates={})
    rows = Auditor(lpips_nets=()).score(single, "a", alone, truth, {})
    assert sum(r["label_acc"] for r in rows) == 2.0
