"""The language task's attacks: TAG and its defense-adaptive distances, LTI and LTI-P for text,
the frequency reference, and the wall between modalities.

The quality tests (marked slow) use gensim's news corpus, a 300-token BPE, sequences of 8 tokens
and the untrained paper transformer, B = 1 (each of a client's sequences shared alone). Their
numbers are printed (run with -s to see them).
"""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch

from fedleak.attacks.frequency import TokenFrequencyBaseline
from fedleak.attacks.learned import text as text_attacks
from fedleak.attacks.learned.text import (
    TEXT_LTI_P_PRESETS,
    TEXT_LTI_PRESETS,
    TokenInverter,
    marginal,
    matched_accuracy,
    sequence_loss,
)
from fedleak.attacks.optimization import tag as tag_module
from fedleak.attacks.optimization.attacks import InvertingGradients, ObservationError
from fedleak.attacks.optimization.tag import (
    TAG,
    TAGConfig,
    TokenObservationError,
    WarmupLinear,
    choose_tag_loss,
    layer_weights,
    nearest_tokens,
    read_tokens,
)
from fedleak.attacks.registry import build_attack
from fedleak.attacks.types import CONVERGED_RATIO, AttackerKnowledge, Budget, Observation
from fedleak.data import auxiliary, build_federated_data
from fedleak.defenses import parse_defense_spec
from fedleak.models import ModelSpec, build_model
from fedleak.server.auditor import Auditor, GroundTruth
from fedleak.settings import ConfigError, flat_values
from fedleak.training.update import LocalTraining, compute_update

VOCAB, LENGTH = 300, 8


def observe(
    spec: ModelSpec, weights: dict[str, torch.Tensor], defense: str, x: torch.Tensor
) -> Observation:
    """What the server sees when a client shares each of its sequences' defended gradient."""
    model = build_model(spec)
    model.load_state_dict(weights)
    pipeline = parse_defense_spec(defense)
    update = compute_update(
        model,
        x,
        x,
        spec.num_classes,
        pipeline,
        LocalTraining("fedsgd", x.shape[0], share="per-sample"),
        torch.Generator().manual_seed(11),
    )
    return Observation(
        round=1,
        client_id=0,
        model=spec,
        weights=weights,
        update=update.update,
        update_kind="gradient",
        num_examples=x.shape[0],
        batch_size=x.shape[0],
        local_steps=1,
        learning_rate=0.1,
        defense=pipeline.spec,
        per_sample_updates=update.per_sample,
        modality="tokens",
    )


@pytest.fixture(scope="module")
def world() -> dict[str, object]:
    fd = build_federated_data(
        "lee-news", None, 4, "iid", 0, aux_size=600, seq_len=LENGTH, vocab_size=VOCAB
    )
    spec = ModelSpec("transformer3", (LENGTH,), VOCAB)
    aux_x, aux_y = auxiliary(fd)
    knowledge = AttackerKnowledge(
        aux_inputs=aux_x, aux_labels=aux_y, input_shape=(LENGTH,), num_classes=VOCAB
    )
    index = torch.tensor(fd.partitions[1][:32].copy())
    return {
        "spec": spec,
        "weights": build_model(spec).state_dict(),
        "knowledge": knowledge,
        "private": fd.dataset.train_x[index],
        "tokenizer": fd.dataset.tokenizer,
    }


# --- TAG ------------------------------------------------------------------------------------


def test_tag_defaults_and_bad_settings() -> None:
    config = build_attack("tag", {"tag-scale": 0.5, "restarts": 2}).config
    assert (config.learning_rate, config.tag_scale, config.restarts) == (0.05, 0.5, 2)
    assert build_attack("tag-normalised").config.normalised_hinge is True
    for params in ({"restarts": 0}, {"warmup": 1.0}, {"learning-rate": 0}, {"tag-scale": -1}):
        with pytest.raises(ConfigError) as caught:
            build_attack("tag", params)
        assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="lr"):
        build_attack("tag", {"lr": 0.1})


def test_warmup_then_linear_decay() -> None:
    schedule = WarmupLinear(0.1, 0.1)
    rates = [schedule.rate(i, 100) for i in range(100)]
    assert rates[0] == pytest.approx(0.01) and rates[9] == pytest.approx(0.1)
    assert rates[10] == pytest.approx(0.1) and rates[55] == pytest.approx(0.05)
    assert rates[-1] == pytest.approx(0.1 / 90)
    assert layer_weights(4) == [1.0, 0.75, 0.5, 0.25]


def _distances(defense: str, contributors: int = 1, blocks: int = 2):
    return choose_tag_loss(
        TAGConfig(),
        parse_defense_spec(defense),
        blocks,
        samples=2,
        contributors=contributors,
        per_sample_available=True,
    )


def test_tag_distance_is_l2_plus_weighted_l1() -> None:
    loss = _distances("none")
    dummy = [torch.tensor([[1.0, 2.0]]), torch.tensor([[0.0, 1.0, 1.0]])]
    target = [torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0, 3.0]])]
    squared, absolute = 1 + 4 + 1 + 4, 1.0 * 3 + 0.5 * 3
    assert loss.name == "tag"
    assert float(loss(dummy, target, None)) == pytest.approx(squared + 0.1 * absolute)


def test_adaptive_tag_distances_follow_the_defense() -> None:
    assert _distances("prune:0.9").name == "tag+mask"
    assert _distances("gauss:0.1").name == "tag"
    dp = _distances("dpsgd:0.5:1")  # the dummy sequences' gradients clipped to C, one by one
    assert (dp.name, dp.clip, dp.needs_per_sample) == ("tag+clip", 0.5, True)
    assert _distances("sign").name == "tag-sign"
    assert _distances("sign", contributors=2).name == "tag-tanh"
    plain = choose_tag_loss(TAGConfig(adaptive=False), parse_defense_spec("sign"), 2, 1, 1, True)
    assert plain.name == "tag"
    # Sign: zero exactly when every dummy coordinate has the received sign (zeros are free).
    loss = _distances("sign", blocks=1)
    target = [torch.tensor([[1.0, -1.0, 0.0]])]
    agree = [torch.tensor([[0.3, -2.0, 5.0]])]
    disagree = [torch.tensor([[-0.3, -2.0, 5.0]])]
    assert float(loss(agree, target, None)) == 0.0 and float(loss(disagree, target, None)) > 0
    # As printed, shrinking the dummy gradient lowers it (the trivial minimum at zero) ...
    assert float(loss([0.5 * disagree[0]], target, None)) < float(loss(disagree, target, None))
    # ... which the normalised hinge removes: it is scale-invariant.
    normalised = choose_tag_loss(
        TAGConfig(normalised_hinge=True), parse_defense_spec("sign"), 1, 2, 1, True
    )
    assert float(normalised([0.5 * disagree[0]], target, None)) == pytest.approx(
        float(normalised(disagree, target, None))
    )
    # Pruning: coordinates received as zero do not count.
    masked = _distances("prune:0.9", blocks=1)
    assert float(masked([torch.tensor([[9.0, 1.0]])], [torch.tensor([[0.0, 1.0]])], None)) == 0.0


def test_nearest_tokens_find_table_rows_under_noise_and_scale() -> None:
    table = torch.empty(50, 16).uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[3, 7, 7, 49]])
    noisy = 3.0 * table[ids] + 0.01 * torch.randn(1, 4, 16, generator=torch.Generator())
    assert torch.equal(nearest_tokens(noisy, table), ids)


def test_read_tokens_takes_the_last_position_from_the_next_token_distribution() -> None:
    table = torch.empty(50, 16).uniform_(-0.1, 0.1, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[[3, 7, 9, 11]], [[5, 5, 8, 2]]])  # [targets, samples, L]
    embeddings = table[ids].clone()
    embeddings[..., -1, :] = table[0]  # the last embedding never moves: any row will do
    labels = torch.zeros(2, 1, 4, 50)
    labels[..., 1:, :] = 10 * torch.nn.functional.one_hot(ids[..., 1:], 50)
    labels[..., 1:3, 49] = 20  # middle positions still come from the embeddings
    assert torch.equal(read_tokens(embeddings, labels, table), ids)


def _captured_labels(monkeypatch: pytest.MonkeyPatch) -> list[torch.Tensor]:
    """The optimised next-token logits of every TAG run, as `optimise` returns them."""
    captured: list[torch.Tensor] = []
    optimise = tag_module.optimise

    def spy(*args: object, **kwargs: object) -> object:
        outcome = optimise(*args, **kwargs)  # type: ignore[arg-type]
        captured.append(outcome.variables[1].detach().clone())
        return outcome

    monkeypatch.setattr(tag_module, "optimise", spy)
    return captured


@pytest.mark.parametrize("name", ["tag", "tag-normalised"])
def test_tag_recovers_the_last_token_from_its_next_token_distribution(
    world: dict[str, object], one_thread: None, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """The last position's embedding gets no gradient (position L-1 predicts nothing), so TAG
    reads the last token from its optimised distribution at position L-2: without a defense it
    is recovered, as the other positions are; the embedding alone scored 0/8 in an audit."""
    captured = _captured_labels(monkeypatch)
    private = world["private"][:4]  # type: ignore[index]
    observation = observe(world["spec"], world["weights"], "none", private)  # type: ignore[arg-type]
    out = build_attack(name).reconstruct(observation, world["knowledge"], Budget(150, 1e9))
    labels = captured[-1].reshape(4, LENGTH, VOCAB)  # one sample per target: per-sample shares
    assert torch.equal(out.inputs[:, -1], labels[:, -1].argmax(dim=-1))
    assert int((out.inputs[:, -1] == private[:, -1]).sum()) >= 3


def test_tag_reads_the_last_token_of_the_kept_restart_in_a_batch_update(
    world: dict[str, object], one_thread: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = _captured_labels(monkeypatch)
    spec, weights = world["spec"], world["weights"]
    private = world["private"][:2]  # type: ignore[index]
    observation = observe(spec, weights, "none", private)  # type: ignore[arg-type]
    batch = dataclasses.replace(  # one update of both sequences: one target, two samples
        observation,
        update={n: g.mean(dim=0) for n, g in observation.per_sample_updates.items()},  # type: ignore[union-attr]
        per_sample_updates=None,
    )
    out = TAG(TAGConfig(restarts=2)).reconstruct(batch, world["knowledge"], Budget(20, 1e9))
    labels = captured[-1].reshape(2, 2, LENGTH, VOCAB)  # [restarts, samples, L, V]
    last = labels[:, :, -1].argmax(dim=-1)
    assert out.inputs.shape == (2, LENGTH)
    assert any(torch.equal(out.inputs[:, -1], last[r]) for r in range(2))


@pytest.mark.parametrize(("defense", "unadapted"), [("gauss:0.01", 0.0), ("prune:0.9", 1.0)])
def test_tag_told_to_ignore_the_defense_records_whether_adapting_would_change_it(
    world: dict[str, object], one_thread: None, defense: str, unadapted: float
) -> None:
    """Reports warn about a blind attack only where adapting would have changed its loss."""
    private = world["private"][:1]  # type: ignore[index]
    observation = observe(world["spec"], world["weights"], defense, private)  # type: ignore[arg-type]
    plain = TAG(TAGConfig(adaptive=False)).reconstruct(
        observation, world["knowledge"], Budget(1, 1e9)
    )
    assert plain.diagnostics["unadapted"] == unadapted
    adapted = TAG(TAGConfig()).reconstruct(observation, world["knowledge"], Budget(1, 1e9))
    assert "unadapted" not in adapted.diagnostics


def test_tag_rows_record_its_matching_loss_and_convergence(
    world: dict[str, object], one_thread: None
) -> None:
    """Convergence is judged on the tokens scored: the matching loss of the tokens read at
    the end against that of the tokens read at the start. The continuous iterate's loss fell
    to only 0.23 of its start on sequences recovered exactly, which read as a budget run out
    (audit BR1)."""
    private = world["private"][:2]  # type: ignore[index]
    observation = observe(world["spec"], world["weights"], "none", private)  # type: ignore[arg-type]
    knowledge, truth = world["knowledge"], GroundTruth(0, private, private)
    auditor = Auditor(lpips_nets=(), decode=world["tokenizer"].decode)  # type: ignore[attr-defined]
    attack = TAG(TAGConfig(restarts=2))
    fitted = attack.reconstruct(observation, knowledge, Budget(200, 1e9))
    untouched = attack.reconstruct(observation, knowledge, Budget(0, 1e9))
    assert fitted.loss_start is not None and fitted.loss_final is not None
    assert untouched.loss_start is not None and untouched.loss_final is not None
    assert fitted.loss_start.shape == fitted.loss_final.shape == (2,)  # one per sequence
    assert torch.equal(untouched.loss_final, untouched.loss_start)
    # The start is that of the restart kept, which the budget decides (the best at the end,
    # or at the start): with one restart, both runs read the same tokens at the start. (With
    # two, which restart won a sequence at 200 iterations differed between CPUs.)
    single = TAG(TAGConfig(restarts=1))
    moved = single.reconstruct(observation, knowledge, Budget(20, 1e9)).loss_start
    still = single.reconstruct(observation, knowledge, Budget(0, 1e9)).loss_start
    assert moved is not None and still is not None and torch.equal(moved, still)
    exact = (fitted.inputs == private).all(dim=1)
    assert bool(exact.any())  # measured: both sequences of 8 tokens, at 200 iterations
    assert (fitted.loss_final[exact] < 1e-3 * fitted.loss_start[exact]).all()
    for result in (fitted, untouched):
        rows = auditor.score(observation, attack.name, result, truth, {})
        assert len(rows) == 2
        for row in rows:
            start, final = result.loss_start[row["sample"]], result.loss_final[row["sample"]]
            assert (row["loss_start"], row["loss_final"]) == (float(start), float(final))
            cut_tenfold = row["loss_final"] <= CONVERGED_RATIO * row["loss_start"]
            assert row["converged"] == float(cut_tenfold)
            if result is fitted and row["token_acc"] == 1.0:
                assert row["converged"] == 1.0
    assert {row["converged"] for row in rows} == {0.0}  # an attack that never moved


def test_tag_on_an_update_that_is_not_finite_has_no_result(
    world: dict[str, object], one_thread: None
) -> None:
    """Tokens read from the random start were scored as TAG's result on a NaN update (audit
    BQ1, as for images); token ids cannot hold NaN, so the attack's "nan" stands."""
    from fedleak.attacks.outcome import checked

    private = world["private"][:2]  # type: ignore[index]
    observation = observe(world["spec"], world["weights"], "none", private)  # type: ignore[arg-type]
    poisoned = {k: torch.full_like(v, math.nan) for k, v in observation.update.items()}
    per_sample = {
        k: torch.full_like(v, math.nan) for k, v in observation.per_sample_updates.items()
    }  # type: ignore[union-attr]
    bad = dataclasses.replace(observation, update=poisoned, per_sample_updates=per_sample)
    result = TAG().reconstruct(bad, world["knowledge"], Budget(20, 1e9))
    assert result.status == "nan" and "was never finite" in result.message
    assert checked(result, 1.0, 2).status == "nan"
    fine = TAG().reconstruct(observation, world["knowledge"], Budget(5, 1e9))
    assert fine.status == checked(fine, 1.0, 2).status == "ok"


def test_the_sign_hinges_leave_convergence_undecided(
    world: dict[str, object], one_thread: None
) -> None:
    """The printed hinge is zero at any flat point (targets equal to the model's predictions),
    so its tenfold fall certified fits that never happened; the normalised hinge's fall did so
    too when its budget was cut (token accuracy 0.11)."""
    private = world["private"][:2]  # type: ignore[index]
    observation = observe(world["spec"], world["weights"], "sign", private)  # type: ignore[arg-type]
    knowledge, truth = world["knowledge"], GroundTruth(0, private, private)
    auditor = Auditor(lpips_nets=(), decode=world["tokenizer"].decode)  # type: ignore[attr-defined]
    printed = TAG(TAGConfig()).reconstruct(observation, knowledge, Budget(30, 1e9))
    assert printed.loss_start is None and printed.loss_final is None
    assert "convergence not judged" in printed.message
    for row in auditor.score(observation, "tag", printed, truth, {}):
        assert math.isnan(row["converged"])
    normalised = TAG(TAGConfig(normalised_hinge=True))
    undecided = normalised.reconstruct(observation, knowledge, Budget(30, 1e9))
    assert undecided.loss_start is None and undecided.loss_final is None
    plain = observe(world["spec"], world["weights"], "none", private)  # type: ignore[arg-type]
    judged = normalised.reconstruct(plain, knowledge, Budget(30, 1e9))
    assert judged.loss_start is not None and judged.loss_final is not None


def test_tag_refuses_images_and_image_attacks_refuse_tokens(world: dict[str, object]) -> None:
    spec, weights = world["spec"], world["weights"]
    observation = observe(spec, weights, "none", world["private"][:1])  # type: ignore[arg-type]
    with pytest.raises(ObservationError, match="modality='tokens'"):
        InvertingGradients().reconstruct(observation, world["knowledge"], Budget(1, 10))
    image = Observation(
        round=1,
        client_id=0,
        model=ModelSpec("lenet", (1, 28, 28), 10),
        weights={},
        update={},
        update_kind="gradient",
        num_examples=1,
        batch_size=1,
        local_steps=1,
        learning_rate=0.1,
        defense="none",
    )
    for attack in (TAG(), build_attack("lti-text", {}), TokenFrequencyBaseline()):
        with pytest.raises(ValueError, match="modality='image'"):
            attack.reconstruct(image, world["knowledge"], Budget(1, 10))
    with pytest.raises(TokenObservationError):
        TAG().reconstruct(image, world["knowledge"], Budget(1, 10))


def test_frequency_reference_predicts_the_single_mode_everywhere(
    world: dict[str, object],
) -> None:
    knowledge = world["knowledge"]
    observation = observe(world["spec"], world["weights"], "none", world["private"][:3])
    guess = TokenFrequencyBaseline().reconstruct(observation, knowledge, Budget(1, 1))
    aux = knowledge.aux_inputs  # type: ignore[union-attr]
    assert guess.inputs.shape == (3, LENGTH)
    assert (guess.inputs == int(aux.flatten().mode().values)).all()
    # Windows cut at arbitrary offsets: a per-position mode (5 at position 0, 6 at 1, 7 at 2)
    # is noise beside the token most frequent overall (4), which wins at every position.
    aux = torch.tensor([[4, 6, 4], [5, 4, 7], [5, 6, 4], [4, 6, 7], [5, 4, 7]])
    knowledge = dataclasses.replace(knowledge, aux_inputs=aux, input_shape=(3,))
    spec = ModelSpec("transformer3", (3,), 10)
    observation = dataclasses.replace(observation, model=spec)
    guess = TokenFrequencyBaseline().reconstruct(observation, knowledge, Budget(1, 1))
    assert guess.inputs.tolist() == [[4, 4, 4]] * 3
    tied = torch.tensor([[8, 3], [3, 8]])  # a tie: the lowest id
    knowledge = dataclasses.replace(knowledge, aux_inputs=tied, input_shape=(2,))
    guess = TokenFrequencyBaseline().reconstruct(observation, knowledge, Budget(1, 1))
    assert guess.inputs.tolist() == [[3, 3]] * 3


# --- LTI for text ---------------------------------------------------------------------------


def test_text_lti_defaults_are_the_papers() -> None:
    paper = TEXT_LTI_PRESETS["paper"]
    assert paper.hidden == (600, 1000) and paper.activation == "relu"
    assert (paper.batch_size, paper.epochs, paper.hash_bins) == (64, 20, 0.1)
    assert build_attack("lti-p", {"epochs": 3}).config.pseudo is True
    assert build_attack("lti-text", {}).config.pseudo is False
    assert build_attack("lti-text", {"hidden": "100,50"}).config.hidden == (100, 50)
    for params in ({"pseudo": True}, {"epochs": 0}, {"hash-bins": 2.0}, {"nope": 1}):
        with pytest.raises(ConfigError) as caught:
            build_attack("lti-text", params)
        assert "\n" not in str(caught.value)
    with pytest.raises(ConfigError, match="preset"):
        build_attack("lti-text", {"preset": "gpu"})
    # Only LTI-P draws pseudo-sequences: lti-text took the setting, recorded it and read none
    # of it (audit EK1).
    with pytest.raises(ConfigError, match=r"^attack\.lti-text\.pseudo-size: unknown setting"):
        build_attack("lti-text", {"pseudo-size": 5})
    assert build_attack("lti-p", {}).config.pseudo_size == 2000  # type: ignore[attr-defined]
    lti_text = build_attack("lti-text", {}).config  # type: ignore[attr-defined]
    assert "pseudo-size" not in flat_values(lti_text)
    # A saved inverter's key lists every field in order: those of runs from before keep
    # matching, so a resume goes on from them (audit EP1).
    for presets, pseudo in ((TEXT_LTI_PRESETS, False), (TEXT_LTI_P_PRESETS, True)):
        listed = [
            (f.name, getattr(presets["cpu"], f.name)) for f in dataclasses.fields(presets["cpu"])
        ]
        at = [name for name, _ in listed].index("block_normalise")
        assert listed[at + 1 : at + 3] == [("pseudo", pseudo), ("pseudo_size", 2000)]


def test_sequence_loss_matches_outputs_to_sequences() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 4, 11)
    targets = torch.randint(0, 11, (5, 3, 4))
    permuted = targets[:, [2, 0, 1]]
    assert float(sequence_loss(logits, targets)) == pytest.approx(
        float(sequence_loss(logits, permuted)), rel=1e-6
    )
    perfect = torch.nn.functional.one_hot(targets, 11).float() * 50
    assert float(matched_accuracy(perfect, permuted).min()) == 1.0
    inverter = TokenInverter(7, (9,), 4, 11, 3)
    assert inverter(torch.randn(2, 7)).shape == (2, 3, 4, 11)


def test_marginal_counts_tokens() -> None:
    frequencies = marginal(torch.tensor([[0, 1, 1], [1, 3, 3]]), 5)
    assert frequencies.tolist() == pytest.approx([1 / 6, 3 / 6, 0.0, 2 / 6, 0.0])


def test_text_lti_keeps_and_reuses_its_inverter(world: dict[str, object], tmp_path) -> None:
    spec, weights, full = world["spec"], world["weights"], world["knowledge"]
    knowledge = dataclasses.replace(full, aux_inputs=full.aux_inputs[:60])  # type: ignore[union-attr]
    observation = observe(spec, weights, "sign", world["private"][:2])  # type: ignore[arg-type]
    params = {
        "epochs": 1,
        "pseudo-size": 40,
        "hash-bins": 256,
        "hidden": "32",
        "cache-dir": str(tmp_path),
    }
    attack = build_attack("lti-p", params)
    first = attack.reconstruct(observation, knowledge, Budget(1, 1e9))
    assert first.inputs.shape == (2, LENGTH) and first.inputs.dtype == torch.int64
    assert first.diagnostics["train_epochs"] == 1 and first.diagnostics["train_pairs"] == 40
    assert first.diagnostics["stopped_by"] == "epochs"
    assert "trained from scratch on pseudo-sequences" in first.message
    again = attack.reconstruct(observation, knowledge, Budget(1, 1e9))
    assert again.diagnostics["train_epochs"] == 0 and torch.equal(again.inputs, first.inputs)
    # The report's training table tells a reuse from a training cut short in its first epoch
    # by `stopped_by`, which image and text inverters record alike.
    assert again.diagnostics["stopped_by"] == "reused"
    assert again.message.startswith("reused the inverter")
    # A resumed run attacking the next round at the same weights goes on from this inverter.
    later = dataclasses.replace(observation, round=observation.round + 1)
    resumed = build_attack("lti-p", params).reconstruct(later, knowledge, Budget(1, 1e9))
    assert resumed.diagnostics["train_epochs"] == 0 and torch.equal(resumed.inputs, first.inputs)
    # Only the time budget may end this training: on a quiet machine 50 epochs (or patience's
    # early stop) could come first, and did once in CI.
    endless = {"epochs": 10**6, "patience": 10**6, "hash-bins": 256, "hidden": "32"}
    stopped = build_attack("lti-text", endless).reconstruct(observation, knowledge, Budget(1, 0.5))
    assert stopped.status == "ok" and stopped.diagnostics["stopped_by"] == "seconds"
    assert "time budget ran out" in stopped.message


@pytest.mark.parametrize("name", ["lti-text", "lti-p"])
def test_a_budget_spent_while_text_pairs_are_built_stops_their_building(
    world: dict[str, object], pair_chunks: list[int], name: str
) -> None:
    """LTI-P's first epoch of pseudo-sequences took 17 s on a 2 s budget (audit DV2): the
    held-out pairs and each epoch's stop at the deadline (EV1). A clock that reads the
    budget as spent in pair building alone leaves one chunk of each built."""
    spec, weights, full = world["spec"], world["weights"], world["knowledge"]
    knowledge = dataclasses.replace(full, aux_inputs=full.aux_inputs[:60])  # type: ignore[union-attr]
    observation = observe(spec, weights, "none", world["private"][:1])  # type: ignore[arg-type]
    params = {"epochs": 3, "hash-bins": 256, "hidden": "32", "pair-chunk": 4}
    if name == "lti-p":
        params["pseudo-size"] = 40
    result = build_attack(name, params).reconstruct(observation, knowledge, Budget(1, 600))
    assert result.status == "ok" and result.diagnostics["stopped_by"] == "seconds"
    assert result.diagnostics["train_epochs"] == 0
    assert len(pair_chunks) == 2  # the held-out pairs' first chunk, then epoch 0's


def test_text_lti_inverts_fedavg_deltas(world: dict[str, object]) -> None:
    """The attacker's FedAvg pairs replay K local steps on groups of auxiliary sequences; the
    labels (a sequence each) were reshaped as one per example, and lti-text and lti-p failed
    on every update of every FedAvg run ("shape '[20, 1]' is invalid for input of size 160")."""
    spec, weights, full = world["spec"], world["weights"], world["knowledge"]
    knowledge = dataclasses.replace(full, aux_inputs=full.aux_inputs[:60])  # type: ignore[union-attr]
    model = build_model(spec)  # type: ignore[arg-type]
    model.load_state_dict(weights)  # type: ignore[arg-type]
    x = world["private"][:4]  # type: ignore[index]
    training = LocalTraining("fedavg", 2, local_steps=2, learning_rate=0.1)
    update = compute_update(
        model, x, x, VOCAB, parse_defense_spec("none"), training, torch.Generator().manual_seed(3)
    )
    observation = Observation(
        round=1,
        client_id=0,
        model=spec,  # type: ignore[arg-type]
        weights=weights,  # type: ignore[arg-type]
        update=update.update,
        update_kind="delta",
        num_examples=4,
        batch_size=2,
        local_steps=2,
        learning_rate=0.1,
        defense="none",
        modality="tokens",
    )
    params = {"epochs": 1, "hash-bins": 256, "hidden": "32"}
    for name, own in (("lti-text", {}), ("lti-p", {"pseudo-size": 40})):
        attack = build_attack(name, {**params, **own})
        result = attack.reconstruct(observation, knowledge, Budget(1, 1e9))
        assert result.status == "ok", result.message
        assert result.inputs.shape == (4, LENGTH) and result.inputs.dtype == torch.int64


def test_text_lti_holds_out_the_same_sequences_every_round(
    world: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A warm-started inverter validated on sequences it trained on in an earlier round would
    # report a token accuracy it does not have on unseen text.
    seen: list[tuple[list[tuple[int, ...]], list[tuple[int, ...]]]] = []

    class Recording(text_attacks.TokenInverterTrainer):
        def __init__(self, inverter, config, epoch_source, validation, noise_gen, cpu_gen):
            super().__init__(inverter, config, epoch_source, validation, noise_gen, cpu_gen)
            assert validation is not None
            rows = [sorted(map(tuple, t.tolist())) for t in (validation[1], epoch_source(0).aux_x)]
            seen.append((rows[0], rows[1]))

    monkeypatch.setattr(text_attacks, "TokenInverterTrainer", Recording)
    spec, weights, full = world["spec"], world["weights"], world["knowledge"]
    knowledge = dataclasses.replace(full, aux_inputs=full.aux_inputs[:60])  # type: ignore[union-attr]
    private = world["private"][:2]  # type: ignore[index]
    moved = {name: value.clone() for name, value in weights.items()}  # type: ignore[union-attr]
    moved["output.bias"] += 0.01  # the global model moved: round 2 refreshes the inverter
    rounds = [
        observe(spec, weights, "none", private),  # type: ignore[arg-type]
        dataclasses.replace(observe(spec, moved, "none", private), round=2),  # type: ignore[arg-type]
    ]
    attack = build_attack(
        "lti-text", {"epochs": 1, "finetune-epochs": 1, "hash-bins": 256, "hidden": "32"}
    )
    outcomes = [attack.reconstruct(o, knowledge, Budget(1, 1e9)) for o in rounds]
    assert [o.diagnostics["warm_start"] for o in outcomes] == [0.0, 1.0]
    (held_out, trained), (held_out_again, trained_again) = seen
    assert len(held_out) == 6 and len(held_out) + len(trained) == 60
    assert held_out == held_out_again and trained == trained_again


# --- quality bars ---------------------------------------------------------------------------

DEFENSES = ("none", "sign", "prune:0.9", "gauss:0.01")


@pytest.fixture(scope="module")
def quality(world: dict[str, object], one_thread: None) -> dict[tuple[str, str], float]:
    """Token accuracy of every attack under every defense on the same 32 private sequences
    (TAG: the first 4)."""
    spec, weights, knowledge = world["spec"], world["weights"], world["knowledge"]
    private = world["private"]
    results: dict[tuple[str, str], float] = {}
    for defense in DEFENSES:
        observation = observe(spec, weights, defense, private)  # type: ignore[arg-type]
        attacks = {
            "aux-frequency": TokenFrequencyBaseline(),
            "lti-text": build_attack("lti-text", {"epochs": 6}),
            "lti-p": build_attack("lti-p", {"epochs": 5, "pseudo-size": 400}),
        }
        for name, attack in attacks.items():
            began = time.perf_counter()
            out = attack.reconstruct(observation, knowledge, Budget(1, 1e9))
            results[name, defense] = float((out.inputs == private).float().mean())
            # The same accuracy on the 4 sequences TAG attacks, for a like-for-like comparison.
            results[f"{name} (tag's 4)", defense] = float(
                (out.inputs[:4] == private[:4]).float().mean()
            )
            print(
                f"{defense:10s} {name:13s} {results[name, defense]:.3f} "
                f"{time.perf_counter() - began:.0f}s"
            )
    runs = (("tag", "none", 200), ("tag", "sign", 150), ("tag-normalised", "sign", 150))
    for name, defense, iterations in runs:
        observation = observe(spec, weights, defense, private[:4])  # type: ignore[arg-type]
        began = time.perf_counter()
        out = build_attack(name).reconstruct(observation, knowledge, Budget(iterations, 1e9))
        results[name, defense] = float((out.inputs == private[:4]).float().mean())
        print(
            f"{defense:10s} {name:13s} {results[name, defense]:.3f} "
            f"{time.perf_counter() - began:.0f}s"
        )
    return results


@pytest.mark.slow
def test_tag_recovers_most_tokens_without_defense(quality: dict[tuple[str, str], float]) -> None:
    assert quality["tag", "none"] >= 0.6


@pytest.mark.slow
@pytest.mark.parametrize("defense", DEFENSES)
def test_learned_attacks_beat_the_frequency_reference(
    quality: dict[tuple[str, str], float], defense: str
) -> None:
    floor = quality["aux-frequency", defense]
    assert quality["lti-text", defense] >= floor + 0.15
    assert quality["lti-p", defense] >= floor + 0.1


@pytest.mark.slow
@pytest.mark.xfail(
    strict=False,
    reason="the paper's claim is not reproduced at this CPU budget: token accuracy under sign "
    "LTI-P 0.305 (32 sequences) vs TAG 0.312 (its 4) on 2026-11-30, 0.324 vs 0.312 with the "
    "held-out split fixed across rounds (2026-12-01): level within the noise of 4 sequences; "
    "see issue 18's note",
)
def test_lti_p_beats_tag_under_sign_compression(quality: dict[tuple[str, str], float]) -> None:
    assert quality["lti-p", "sign"] > quality["tag", "sign"]


def test_registered_text_attacks_declare_tokens() -> None:
    for name in ("tag", "tag-normalised", "lti-text", "lti-p", "aux-frequency"):
        assert build_attack(name).modalities == ("tokens",)  # type: ignore[attr-defined]
    assert build_attack("aux-frequency").reference is True  # type: ignore[attr-defined]


@pytest.mark.slow
def test_the_normalised_hinge_strengthens_tag_under_sign(
    quality: dict[tuple[str, str], float],
) -> None:
    assert quality["tag-normalised", "sign"] > quality["tag", "sign"]


def test_tag_under_dp_sgd_clips_its_dummy_sequences_one_by_one(
    world: dict[str, object], one_thread: None
) -> None:
    """Against a batch update under DP-SGD, TAG forms each dummy sequence's gradient, clips
    it to C and matches their mean, end to end (measured on these 2 sequences at C = 0.01, 150
    iterations: token accuracy 0.0625 clipped, 0.0 unclipped, 0.625 without a defense)."""
    spec, weights = world["spec"], world["weights"]
    private = world["private"][:2]  # type: ignore[index]
    observation = observe(spec, weights, "dpsgd:0.01:0", private)  # type: ignore[arg-type]
    batch = dataclasses.replace(  # one clipped mean of both sequences
        observation,
        update={n: g.mean(dim=0) for n, g in observation.per_sample_updates.items()},  # type: ignore[union-attr]
        per_sample_updates=None,
    )
    out = TAG().reconstruct(batch, world["knowledge"], Budget(150, 1e9))
    assert out.status == "ok" and "matching=tag+clip" in out.message
    assert out.inputs.shape == (2, LENGTH)
