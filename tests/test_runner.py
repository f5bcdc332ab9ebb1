"""The inline attack runner isolates failures: a raising or NaN attack becomes a recorded row."""

from __future__ import annotations

import logging

import pytest
import torch

from fedleak.attacks.baseline import AuxMeanBaseline
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation, Reconstruction
from fedleak.models.spec import ModelSpec
from fedleak.server.auditor import Auditor, GroundTruth
from fedleak.server.runner import AttackJob, InlineRunner


class Raising:
    name = "raising"

    def reconstruct(self, observation, knowledge, budget) -> Reconstruction:
        raise RuntimeError("diverged\nsecond line")


class NotANumber:
    name = "nan"

    def reconstruct(self, observation, knowledge, budget) -> Reconstruction:
        return Reconstruction(inputs=torch.full((2, 1, 4, 4), float("nan")), labels=None)


def _observation() -> Observation:
    return Observation(
        round=1,
        client_id=3,
        model=ModelSpec("mlp", (1, 4, 4), 2),
        weights={},
        update={},
        update_kind="gradient",
        num_examples=2,
        batch_size=2,
        local_steps=1,
        learning_rate=0.1,
        defense="none",
    )


def _knowledge() -> AttackerKnowledge:
    aux = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return AttackerKnowledge(aux, torch.tensor([0] * 7 + [1] * 3), (1, 4, 4), 2)


def test_failures_are_recorded_and_do_not_stop_other_attacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    attacks = {"raising": Raising(), "nan": NotANumber(), "aux-mean": AuxMeanBaseline()}
    runner = InlineRunner(attacks, _knowledge(), Budget(10, 5.0))
    observation = _observation()
    runner.submit([AttackJob(i, name, observation) for i, name in enumerate(attacks)])
    with caplog.at_level(logging.WARNING, logger="fedleak.server.runner"):
        results = {r.job.attack: r.reconstruction for r in runner.ready()}
    # The warning is one line, as the row's message (the error's second line stayed in it).
    assert [r.getMessage() for r in caplog.records] == [
        "attack raising failed on client 3: RuntimeError: diverged"
    ]
    assert results["raising"].status == "failed"
    assert results["raising"].message == "RuntimeError: diverged"
    assert results["nan"].status == "nan"
    assert results["aux-mean"].status == "ok"
    assert results["aux-mean"].labels.tolist() == [0, 0]
    assert runner.ready() == []


def test_auditor_scores_a_failure_as_one_row_and_a_success_per_sample() -> None:
    truth = GroundTruth(3, torch.rand(2, 1, 4, 4), torch.tensor([1, 0]))
    observation = _observation()
    failed = Reconstruction(inputs=torch.empty(0), labels=None, status="failed", message="x")
    rows = Auditor(lpips_nets=()).score(observation, "a", failed, truth, {})
    assert [(r["status"], r["sample"]) for r in rows] == [("failed", -1)]
    exact = Reconstruction(inputs=truth.inputs.flip(0), labels=torch.tensor([0, 1]))
    rows = Auditor(lpips_nets=()).score(observation, "a", exact, truth, {"defense": "none"})
    assert sorted((r["sample"], r["target_index"]) for r in rows) == [(0, 1), (1, 0)]
    assert all(r["mse"] == 0 and r["label_acc"] == 1.0 for r in rows)
    assert all(r["defense"] == "none" and r["scored_against"] == "original" for r in rows)


def test_per_sample_updates_are_scored_in_order_not_matched() -> None:
    """Row i of per-sample updates is sample i's: a swapped guess scores as swapped."""
    import dataclasses

    truth = GroundTruth(3, torch.rand(2, 1, 4, 4), torch.tensor([1, 0]))
    swapped = Reconstruction(inputs=truth.inputs.flip(0), labels=torch.tensor([0, 1]))
    per_sample = dataclasses.replace(_observation(), per_sample_updates={"w": torch.zeros(2, 1)})
    rows = Auditor(lpips_nets=()).score(per_sample, "a", swapped, truth, {})
    assert [(r["sample"], r["target_index"]) for r in rows] == [(0, 0), (1, 1)]
    assert all(r["mse"] > 0 and r["label_acc"] == 0.0 for r in rows)


def test_encoded_samples_are_scored_against_their_best_private_source() -> None:
    private = torch.stack([torch.zeros(1, 4, 4), torch.ones(1, 4, 4)])
    encoded = 0.6 * private + 0.4 * private.flip(0)
    truth = GroundTruth(
        0, private, torch.tensor([0, 1]), encoded=encoded, sources=torch.tensor([[0, 1], [1, 0]])
    )
    guess = Reconstruction(inputs=encoded.clone(), labels=torch.tensor([0, 1]))
    rows = Auditor(lpips_nets=()).score(_observation(), "a", guess, truth, {})
    against = {r["scored_against"] for r in rows}
    assert against == {"original", "encoded"}
    for row in rows:
        if row["scored_against"] == "encoded":
            assert row["mse"] == 0
        else:
            # 0.4 of the way to the other image: the nearer source is the dominant one.
            assert row["target_index"] == row["sample"]
            assert abs(row["mse"] - 0.16) < 1e-6


class Finite:
    """Returns a finite guess but calls it diverged after running out of time."""

    name = "finite"

    def __init__(self, shape: tuple[int, ...] = (2, 1, 4, 4)) -> None:
        self.shape = shape

    def reconstruct(self, observation, knowledge, budget) -> Reconstruction:
        return Reconstruction(
            inputs=torch.rand(self.shape),
            labels=None,
            status="nan",
            diagnostics={"stopped_by": "seconds"},
        )


def test_one_status_rule_any_finite_reconstruction_of_the_right_shape_is_scored() -> None:
    attacks = {"finite": Finite(), "wrong": Finite((2, 1, 5, 5)), "few": Finite((1, 1, 4, 4))}
    runner = InlineRunner(attacks, _knowledge(), Budget(10, 5.0))
    runner.submit([AttackJob(i, name, _observation()) for i, name in enumerate(attacks)])
    results = {r.job.attack: r.reconstruction for r in runner.ready()}
    # Running out of budget is a diagnostic: the guess is kept and scored.
    assert results["finite"].status == "ok"
    assert results["finite"].diagnostics["stopped_by"] == "seconds"
    assert (
        results["wrong"].status == "failed" and "expected (2, 1, 4, 4)" in results["wrong"].message
    )
    assert results["few"].status == "failed" and "1 samples, expected 2" in results["few"].message


class Returns:
    """Returns whatever it was built with, as a plug-in with a bug might."""

    def __init__(self, value: object) -> None:
        self.value = value

    def reconstruct(self, observation, knowledge, budget) -> object:
        return self.value


def test_an_attack_that_returns_no_reconstruction_fails_alone_and_images_are_scored_in_range():
    scaled = Reconstruction(inputs=torch.rand(2, 1, 4, 4) * 255, labels=None)
    attacks = {
        "bare": Returns(torch.rand(2, 1, 4, 4)),
        "scaled": Returns(scaled),
        "labels": Returns(Reconstruction(inputs=torch.rand(2, 1, 4, 4), labels=torch.zeros(5))),
        # Crashed the whole run with "'list' object has no attribute 'detach'" (audit BU1).
        "listed": Returns(Reconstruction(inputs=torch.rand(2, 1, 4, 4), labels=[0, 1])),  # type: ignore[arg-type]
        "array": Returns(Reconstruction(inputs=torch.rand(2, 1, 4, 4).numpy(), labels=None)),  # type: ignore[arg-type]
        "aux-mean": AuxMeanBaseline(),
    }
    runner = InlineRunner(attacks, _knowledge(), Budget(10, 5.0))
    runner.submit([AttackJob(i, name, _observation()) for i, name in enumerate(attacks)])
    results = {r.job.attack: r.reconstruction for r in runner.ready()}
    assert results["bare"].status == "failed"
    assert results["bare"].message == "the attack returned Tensor, not a Reconstruction"
    assert results["scaled"].status == "ok"
    assert torch.equal(results["scaled"].inputs, scaled.inputs.clamp(0, 1))
    assert "clamped to [0, 1] for scoring" in results["scaled"].message
    assert results["labels"].status == "failed"
    assert results["labels"].message == "labels of shape (5,), expected (2,)"
    assert results["listed"].status == results["array"].status == "failed"
    assert results["listed"].message == "the attack's labels is a list, not a tensor"
    assert results["array"].message == "the attack's inputs is a ndarray, not a tensor"
    assert results["aux-mean"].status == "ok" and results["aux-mean"].message == ""


def test_recovered_labels_must_be_class_indices_of_the_model() -> None:
    """A plug-in's label 99 of 10 classes was scored `ok` with label accuracy 0."""
    images = torch.rand(2, 1, 4, 4)
    classes = _observation().model.num_classes
    attacks = {
        "beyond": Returns(Reconstruction(images, torch.tensor([1, classes]))),
        "negative": Returns(Reconstruction(images, torch.tensor([-1, 0]))),
        "soft": Returns(Reconstruction(images, torch.tensor([0.0, 1.0]))),
        "fine": Returns(Reconstruction(images, torch.tensor([0, classes - 1]))),
    }
    runner = InlineRunner(attacks, _knowledge(), Budget(10, 5.0))
    runner.submit([AttackJob(i, name, _observation()) for i, name in enumerate(attacks)])
    results = {r.job.attack: r.reconstruction for r in runner.ready()}
    bound = f"expected class indices 0 to {classes - 1}"
    assert (results["beyond"].status, results["beyond"].message) == (
        "failed",
        f"labels from 1 to {classes}; {bound}",
    )
    assert results["negative"].status == "failed" and bound in results["negative"].message
    assert (
        results["soft"].message == "labels of dtype torch.float32; expected integer class indices"
    )
    assert results["fine"].status == "ok"


class CountingThreads:
    name = "threads"

    def __init__(self) -> None:
        self.seen: list[int] = []

    def reconstruct(self, observation, knowledge, budget) -> Reconstruction:
        self.seen.append(torch.get_num_threads())
        return Reconstruction(inputs=torch.zeros(2, 1, 4, 4), labels=None)


def test_a_runs_attacks_compute_with_one_thread_whatever_fedleak_threads_says(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FEDLEAK_THREADS tunes `fedleak.reconstruct`; in a run it changed DLG's rows, which
    nothing recorded, so the run's inline attacks keep to one thread as every server path."""
    monkeypatch.setenv("FEDLEAK_THREADS", "2")
    counting = CountingThreads()
    runner = InlineRunner({"threads": counting}, _knowledge(), Budget(10, 5.0))
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runner.submit([AttackJob(0, "threads", _observation())])
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
    assert counting.seen == [1]


def test_a_long_failure_is_stored_cut_at_a_word_and_marked() -> None:
    """A plugin's 600-character error was stored as its first 500 characters, mid-word and
    unmarked (audit BT D5)."""
    from fedleak.attacks.outcome import failed_reconstruction

    error = ValueError("the update is " + "not what this attack reads in any way " * 20)
    message = failed_reconstruction(error, 1.0).message
    assert len(message) <= 500 and message.endswith("...")
    assert message.startswith("ValueError: the update is not what")
    words = {"not", "what", "this", "attack", "reads", "in", "any", "way"}
    assert message[:-3].rsplit(" ", 1)[1] in words
