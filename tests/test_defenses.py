"""Defense spec parsing and the behaviour of every defense (fedleak.defenses)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedleak.defenses import (
    DPSGD,
    MAX_COEFFICIENT,
    DefensePipeline,
    DefenseSpecError,
    EncodingError,
    GaussianNoise,
    InstaHide,
    MixUp,
    PartnerPool,
    Prune,
    SignCompression,
    fold_toward,
    parse_defense_spec,
    pruned_count,
    unsigned,
)
from fedleak.defenses.encode import bounded_coefficients


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _grads(seed: int = 0, batch: int | None = None) -> dict[str, torch.Tensor]:
    """Gradient-like tensors of a few shapes with distinct magnitudes (no ties)."""
    g = _gen(seed)
    lead = () if batch is None else (batch,)
    return {
        "conv.weight": torch.randn(*lead, 6, 3, 5, 5, generator=g),
        "conv.bias": torch.randn(*lead, 6, generator=g),
        "fc.weight": torch.randn(*lead, 10, 37, generator=g),
        "fc.bias": torch.randn(*lead, 10, generator=g),
    }


# --- spec parsing ----------------------------------------------------------------------------

_number = st.one_of(
    st.integers(0, 50).map(str),
    st.floats(0, 20, allow_nan=False).map(repr),
    st.sampled_from(["0.5", ".25", "1e-3", "2.", "0.0001", "1E+1"]),
)
_rate = st.floats(0, 0.999999, allow_nan=False).map(repr)
_positive = st.floats(1e-6, 100, allow_nan=False).map(repr)
_k = st.integers(2, 9).map(str)

_PART_STRATEGIES = {
    "encoder": st.one_of(
        st.builds(lambda k: f"mixup:{k}", _k),
        st.builds(lambda k, m: f"instahide:{k}{m}", _k, st.sampled_from(["", ":intra", ":inter"])),
    ),
    "dpsgd": st.builds(lambda c, z: f"dpsgd:{c}:{z}", _positive, _number),
    "gauss": st.builds(lambda s: f"gauss:{s}", _number),
    "prune": st.builds(
        lambda p, s: f"prune:{p}{s}", _rate, st.sampled_from(["", ":layer", ":global"])
    ),
    "sign": st.just("sign"),
}


@st.composite
def well_formed_specs(draw: st.DrawFn) -> tuple[str, int]:
    """A spec of distinct kinds in any order, case and spacing, and how many parts it has."""
    kinds = draw(st.lists(st.sampled_from(sorted(_PART_STRATEGIES)), unique=True, max_size=5))
    parts = [draw(_PART_STRATEGIES[kind]) for kind in kinds]
    parts = [draw(st.sampled_from([p, p.upper(), f"  {p} "])) for p in parts]
    return ("+".join(draw(st.permutations(parts))) if parts else "none"), len(parts)


@settings(max_examples=300, deadline=None)
@given(well_formed_specs())
def test_well_formed_specs_parse_and_round_trip(case: tuple[str, int]) -> None:
    spec, num_parts = case
    pipeline = parse_defense_spec(spec)
    again = parse_defense_spec(pipeline.spec)
    assert again == pipeline
    assert again.spec == pipeline.spec
    ranks = [_declared_rank(step) for step in pipeline.steps]
    assert ranks == sorted(ranks)
    assert len(pipeline.steps) == num_parts


def _declared_rank(step: object) -> int:
    order = [(MixUp, InstaHide), (DPSGD,), (GaussianNoise,), (Prune,), (SignCompression,)]
    return next(i for i, classes in enumerate(order) if isinstance(step, classes))


_spec_alphabet = st.sampled_from([*"prunesigaudpmxhtlobalint:+.-0123456789eE ", "\n", "é"])


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.text(), st.text(_spec_alphabet, max_size=40)))
def test_any_string_parses_or_raises_one_line_spec_error(spec: str) -> None:
    try:
        pipeline = parse_defense_spec(spec)
    except DefenseSpecError as error:
        message = str(error)
        assert "\n" not in message and "\r" not in message
        assert "allowed:" in message
    else:
        assert parse_defense_spec(pipeline.spec) == pipeline


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("", "empty part"),
        ("prune:0.9++sign", "empty part"),
        ("foo", "unknown defense 'foo'; allowed"),
        ("sgin", "unknown defense 'sgin' (did you mean sign?)"),  # audit BT D6
        ("prnue:0.5", "unknown defense 'prnue' (did you mean prune?)"),
        ("none+sign", "'none' cannot be combined"),
        ("prune", "expected the form prune:P[:layer|:global]"),
        ("prune:1", "rate P=1.0 must be a number in [0, 1)"),
        ("prune:-0.1", "rate P=-0.1"),
        ("prune:0.9:rows", "scope 'rows' must be one of layer, global"),
        ("prune:abc", "P='abc' is not a finite number"),
        ("prune:nan", "P='nan' is not a finite number"),
        ("dpsgd:inf:1", "C='inf' is not a finite number"),
        ("sign:1", "expected the form sign"),
        ("gauss:-1", "SIGMA=-1.0 must be a finite number >= 0"),
        ("gauss:1e999", "SIGMA=inf"),
        ("gauss", "expected the form gauss:SIGMA"),
        ("dpsgd:1", "expected the form dpsgd:C:Z"),
        ("dpsgd:0:1", "C=0.0 must be a finite number > 0"),
        ("dpsgd:1:-1", "Z=-1.0 must be a finite number >= 0"),
        # Noise beyond float32's range made every update infinite at run time (audit BQ4).
        ("gauss:1e39", "SIGMA=1e+39 must be at most 2.127e+37 (float32's largest number"),
        ("dpsgd:1e20:1e20", "C x Z = 1e+40 must be at most 2.127e+37"),
        # Within float32's range, yet a draw of a few standard deviations overflowed (EF4).
        ("gauss:5e37", "SIGMA=5e+37 must be at most 2.127e+37 (float32's largest number over 16"),
        # 1e-50 is 0 in float32: every update was zero, the run trained nothing (audit EF4).
        ("dpsgd:1e-50:1", "C=1e-50 must be at least 1.175e-38 (float32's smallest normal"),
        ("dpsgd:1e-40:1", "C=1e-40 must be at least 1.175e-38"),
        ("mixup:1", "K=1 must be an integer >= 2"),
        ("mixup:2.5", "K='2.5' is not a whole number"),
        ("instahide:4:outer", "mode 'outer' must be intra or inter"),
        ("mixup:4+instahide:4", "'mixup:4' and 'instahide:4' (two input encodings)"),
        ("instahide:2+instahide:4:inter", "two input encodings"),
        ("prune:0.9+prune:0.5:global", "'prune:0.9' and 'prune:0.5:global' (prune twice)"),
        ("sign+SIGN", "(sign twice)"),
        ("gauss:0.1+gauss:0.2", "(gauss twice)"),
    ],
)
def test_bad_specs_name_the_part_and_the_allowed_forms(spec: str, expected: str) -> None:
    with pytest.raises(DefenseSpecError) as caught:
        parse_defense_spec(spec)
    message = str(caught.value)
    assert expected in message
    assert f"defense spec {spec!r}" in message
    assert "allowed: none | prune:P" in message
    assert "\n" not in message


def test_non_string_spec_is_refused() -> None:
    with pytest.raises(DefenseSpecError, match="must be a string"):
        parse_defense_spec(0.9)  # type: ignore[arg-type]


def test_canonical_forms_and_accessors() -> None:
    pipeline = parse_defense_spec(" Sign + prune:0.90:layer+INSTAHIDE:4:intra+gauss:0.010 ")
    assert pipeline.spec == "instahide:4+gauss:0.01+prune:0.9+sign"
    assert str(pipeline) == pipeline.spec
    assert pipeline.encoder == InstaHide(4)
    assert pipeline.find(Prune) == Prune(0.9, "layer")
    assert pipeline.find(DPSGD) is None
    assert not pipeline.needs_per_sample
    assert parse_defense_spec("dpsgd:1.0:1.1").spec == "dpsgd:1:1.1"
    assert parse_defense_spec("dpsgd:1:0").needs_per_sample
    assert parse_defense_spec("prune:0.5:global").spec == "prune:0.5:global"
    assert parse_defense_spec("instahide:3:inter").spec == "instahide:3:inter"
    assert parse_defense_spec("NONE") == DefensePipeline() and DefensePipeline().spec == "none"
    # `+` joins parts but is also an exponent sign; canonical numbers never carry it.
    assert parse_defense_spec("gauss:1e+3+sign").spec == "gauss:1000+sign"
    assert parse_defense_spec("gauss:1E+16").spec == "gauss:1e16"
    # After a colon it is a value's sign, not a join: the refusal names the value as typed,
    # not an empty 'mixup:' and a stray part '4' (audit CY4).
    with pytest.raises(DefenseSpecError, match=r"bad part 'mixup:\+4': K='\+4' is not a whole"):
        parse_defense_spec("mixup:+4")


def test_written_order_does_not_change_the_pipeline() -> None:
    parts = ["instahide:4", "prune:0.9", "gauss:0.01", "sign"]
    pipelines = {parse_defense_spec("+".join(p)) for p in itertools.permutations(parts)}
    assert len(pipelines) == 1
    (pipeline,) = pipelines
    assert [type(s) for s in pipeline.steps] == [InstaHide, GaussianNoise, Prune, SignCompression]
    direct = DefensePipeline((SignCompression(), Prune(0.9), InstaHide(4), GaussianNoise(0.01)))
    assert direct == pipeline


def test_step_constructors_validate_their_parameters() -> None:
    for make in (
        lambda: Prune(1.0),
        lambda: Prune(0.5, "rows"),  # type: ignore[arg-type]
        lambda: GaussianNoise(float("nan")),
        lambda: DPSGD(0.0, 1.0),
        lambda: MixUp(1),
        lambda: InstaHide(True),  # type: ignore[arg-type]
    ):
        with pytest.raises(DefenseSpecError):
            make()


# --- gradient defenses -----------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_prune_per_layer_keeps_exactly_the_largest_of_each_tensor(rate: float) -> None:
    grads = _grads()
    pruned = Prune(rate)(grads)
    for name, g in grads.items():
        n = g.numel()
        kept = pruned[name] != 0
        assert int(kept.sum()) == n - math.floor(rate * n + 1e-6)
        assert torch.equal(pruned[name][kept], g[kept])
        if kept.any() and (~kept).any():
            assert g[~kept].abs().max() <= g[kept].abs().min()


def test_pruned_count_avoids_binary_rounding_surprises() -> None:
    assert pruned_count(0.29, 100) == 29  # 0.29 * 100 == 28.999999999999996
    assert pruned_count(0.9, 10) == 9
    assert pruned_count(0.0, 7) == 0
    # A rate just under 1 prunes all but one of a 12-weight bias, not all of it.
    assert pruned_count(0.99999999, 12) == 11
    assert pruned_count(0.99, 100) == 99 and pruned_count(0.999, 1000) == 999


@pytest.mark.parametrize("rate", [0.5, 0.9, 0.999])
def test_prune_global_keeps_the_largest_over_all_parameters(rate: float) -> None:
    grads = _grads(1)
    pruned = Prune(rate, "global")(grads)
    flat = torch.cat([g.flatten() for g in grads.values()])
    kept_flat = torch.cat([p.flatten() for p in pruned.values()]) != 0
    n = flat.numel()
    assert int(kept_flat.sum()) == n - math.floor(rate * n + 1e-6)
    threshold = flat.abs().sort(descending=True).values[int(kept_flat.sum()) - 1]
    assert torch.equal(kept_flat, flat.abs() >= threshold)
    # Global pruning lets one layer keep more than its share: not the same as per-layer.
    layer_kept = {name: int((p != 0).sum()) for name, p in Prune(rate)(grads).items()}
    global_kept = {name: int((p != 0).sum()) for name, p in pruned.items()}
    assert layer_kept != global_kept


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_prune_batched_prunes_each_sample_independently(scope: str) -> None:
    batch = _grads(2, batch=3)
    together = Prune(0.8, scope)(batch, batched=True)  # type: ignore[arg-type]
    for i in range(3):
        alone = Prune(0.8, scope)({k: v[i] for k, v in batch.items()})  # type: ignore[arg-type]
        for name in batch:
            assert torch.equal(together[name][i], alone[name])


def test_sign_outputs_are_in_minus_one_zero_one() -> None:
    grads = Prune(0.5)(_grads())
    signs = SignCompression()(grads)
    for name, s in signs.items():
        assert set(s.unique().tolist()) <= {-1.0, 0.0, 1.0}
        assert torch.equal(s, torch.sign(grads[name]))
        assert torch.equal(s == 0, grads[name] == 0)


def test_gaussian_noise_has_the_requested_std_and_is_reproducible() -> None:
    zeros = {"w": torch.zeros(200_000), "b": torch.zeros(50, 20)}
    noisy = GaussianNoise(0.05)(zeros, _gen(3))
    std = torch.cat([t.flatten() for t in noisy.values()]).std().item()
    assert abs(std - 0.05) < 0.05 * 0.01
    again = GaussianNoise(0.05)(zeros, _gen(3))
    assert all(torch.equal(noisy[k], again[k]) for k in zeros)
    other = GaussianNoise(0.05)(zeros, _gen(4))
    assert not torch.equal(noisy["w"], other["w"])
    assert GaussianNoise(0.0)(zeros, _gen(3))["w"].abs().max() == 0


def _norms(per_sample: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.sqrt(sum(t.flatten(1).square().sum(1) for t in per_sample.values()))


def test_dpsgd_clips_each_sample_over_all_parameters() -> None:
    per_sample = _grads(5, batch=16)
    scale = torch.linspace(0.01, 3.0, 16)
    per_sample = {k: v * scale.reshape(-1, *[1] * (v.dim() - 1)) for k, v in per_sample.items()}
    dp = DPSGD(clip_norm=2.0, noise_multiplier=1.0)
    before, after = _norms(per_sample), _norms(dp.clip(per_sample))
    assert (after <= 2.0 * (1 + 1e-6)).all()
    small = before <= 2.0
    assert small.any() and (~small).any()
    assert torch.allclose(after[small], before[small])
    assert torch.allclose(after[~small], torch.full_like(after[~small], 2.0))
    # Clipping scales a sample as a whole: directions are kept.
    clipped = dp.clip(per_sample)
    ratio = clipped["fc.weight"][-1] / per_sample["fc.weight"][-1]
    assert torch.allclose(ratio, ratio.flatten()[0].expand_as(ratio))


def test_dpsgd_clips_a_scalar_parameters_gradient_with_the_others() -> None:
    """A learnable scalar (a temperature) has per-sample gradients of shape [B]: flatten(1)
    raised IndexError on them."""
    per_sample = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]]), "t": torch.tensor([0.0, 0.0])}
    clipped = parse_defense_spec("dpsgd:1:1").clip(per_sample)
    assert torch.allclose(clipped["w"], torch.tensor([[0.6, 0.8], [0.3, 0.4]]))
    assert torch.equal(clipped["t"], per_sample["t"])


def test_the_public_defense_calls_refuse_what_they_cannot_defend_in_one_line() -> None:
    """Each raised Python's or torch's own error (ZeroDivisionError, IndexError) or went on
    with a meaningless value, e.g. a batch of -1 (audit BU7)."""
    spec = parse_defense_spec("dpsgd:1:1")
    grads = {"w": torch.ones(4, 3), "b": torch.ones(3)}
    for batch in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=rf"^batch_size={batch!r}: expected an integer >= 1"):
            spec.share(grads, batch, _gen())  # type: ignore[arg-type]
    assert spec.share(grads, np.int64(4), _gen()).keys() == grads.keys()  # numpy's integers too
    with pytest.raises(ValueError, match=r"^per_sample: tensors of shapes \(4, 3\), \(3,\)"):
        spec.clip({"w": torch.ones(4, 3), "b": torch.ones(3)})  # a batch gradient
    x = torch.rand(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"^y_onehot: torch\.int64 of shape \(2,\); expected"):
        parse_defense_spec("mixup:2").encode(x, torch.tensor([0, 1]), _gen())


def test_dpsgd_noise_std_is_z_c_over_b() -> None:
    dp = DPSGD(clip_norm=1.5, noise_multiplier=2.0)
    batch = 8
    assert dp.noise_std(batch) == pytest.approx(2.0 * 1.5 / 8)
    mean = {"w": torch.zeros(400_000)}
    noisy = dp.noise(mean, batch, _gen(0))["w"]
    assert noisy.std().item() == pytest.approx(0.375, rel=0.01)
    # The full call: clip, mean, noise; with Z = 0 it is the mean of the clipped gradients.
    per_sample = _grads(6, batch=batch)
    exact = DPSGD(1.5, 0.0)(per_sample, _gen(0))
    clipped = dp.clip(per_sample)
    for k in per_sample:
        assert torch.allclose(exact[k], clipped[k].mean(0))


# --- the pipeline's share / share_each --------------------------------------------------------


def test_share_applies_noise_then_prune_then_sign() -> None:
    pipeline = parse_defense_spec("sign+prune:0.7+gauss:0.1")
    grads = _grads(7)
    shared = pipeline.share(grads, 4, _gen(11))
    by_hand = SignCompression()(Prune(0.7)(GaussianNoise(0.1)(grads, _gen(11))))
    assert all(torch.equal(shared[k], by_hand[k]) for k in grads)


def test_share_names_the_form_it_expects() -> None:
    """A list (what `torch.autograd.grad` returns) failed in `dict()` with "dictionary update
    sequence element #0 has length 4"."""
    grads = list(_grads(7).values())
    with pytest.raises(TypeError, match=r"^the update to defend: expected a parameter name -> "):
        parse_defense_spec("gauss:0.01").share(grads, 1, _gen(0))  # type: ignore[arg-type]


def test_share_adds_dp_noise_before_gauss() -> None:
    pipeline = parse_defense_spec("gauss:0.2+dpsgd:1:3")
    grads = _grads(8)
    shared = pipeline.share(grads, 10, _gen(1))
    g = _gen(1)
    by_hand = GaussianNoise(0.2)(DPSGD(1, 3).noise(grads, 10, g), g)
    assert all(torch.equal(shared[k], by_hand[k]) for k in grads)
    delta = pipeline.share_delta(grads, _gen(1))  # FedAvg: DP noise was added per local step
    assert all(torch.equal(delta[k], GaussianNoise(0.2)(grads, _gen(1))[k]) for k in grads)


def test_share_each_equals_share_on_each_sample_for_deterministic_steps() -> None:
    pipeline = parse_defense_spec("prune:0.9:global+sign")
    per_sample = _grads(9, batch=5)
    each = pipeline.share_each(per_sample, _gen(0))
    for i in range(5):
        alone = pipeline.share({k: v[i] for k, v in per_sample.items()}, 1, _gen(0))
        assert all(torch.equal(each[k][i], alone[k]) for k in per_sample)


def test_share_each_uses_dp_noise_of_a_batch_of_one() -> None:
    pipeline = parse_defense_spec("dpsgd:0.5:2")
    per_sample = {"w": torch.zeros(64, 5000)}
    clipped = pipeline.clip(per_sample)
    noisy = pipeline.share_each(clipped, _gen(2))["w"]
    assert noisy.std().item() == pytest.approx(2 * 0.5, rel=0.01)
    # Independent noise per sample.
    assert not torch.equal(noisy[0], noisy[1])


def test_no_defense_is_the_identity() -> None:
    pipeline = parse_defense_spec("none")
    grads = _grads()
    assert all(torch.equal(pipeline.share(grads, 3, _gen())[k], grads[k]) for k in grads)
    assert all(torch.equal(pipeline.clip(grads)[k], grads[k]) for k in grads)
    x, y = torch.rand(3, 1, 4, 4), torch.eye(5)[:3]
    encoded = pipeline.encode(x, y, _gen())
    assert encoded.inputs is x and encoded.soft_labels is y and encoded.signs is None
    assert encoded.k == 1 and torch.equal(encoded.sources[:, 0], torch.arange(3))
    assert torch.equal(encoded.coefficients, torch.ones(3, 1))


# --- input encodings --------------------------------------------------------------------------


def _batch(n: int = 16, classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    x = torch.rand(n, 3, 8, 8, generator=g)
    y = torch.nn.functional.one_hot(torch.randint(0, classes, (n,), generator=g), classes).float()
    return x, y


@pytest.mark.parametrize("k", [2, 4, 6])
def test_mixup_coefficients_sources_and_labels(k: int) -> None:
    x, y = _batch(32)
    encoded = MixUp(k)(x, y, _gen(1))
    coefficients = encoded.coefficients
    assert coefficients.shape == (32, k) and encoded.sources.shape == (32, k)
    assert torch.allclose(coefficients.sum(1), torch.ones(32), atol=1e-6)
    assert (coefficients >= 0).all() and (coefficients <= MAX_COEFFICIENT).all()
    assert torch.equal(encoded.sources[:, 0], torch.arange(32))  # each sample mixes itself
    for row in encoded.sources.tolist():
        assert len(set(row)) == k  # K distinct images
    assert not encoded.from_public.any() and encoded.signs is None
    by_hand = torch.stack(
        [
            sum(c * x[s] for c, s in zip(cs, ss, strict=True))
            for cs, ss in zip(coefficients, encoded.sources, strict=True)
        ]
    )
    assert torch.allclose(encoded.inputs, by_hand, atol=1e-6)
    labels = torch.stack(
        [
            sum(c * y[s] for c, s in zip(cs, ss, strict=True))
            for cs, ss in zip(coefficients, encoded.sources, strict=True)
        ]
    )
    assert torch.allclose(encoded.soft_labels, labels, atol=1e-6)
    assert encoded.inputs.min() >= 0 and encoded.inputs.max() <= 1


def test_mixup_coefficients_span_the_bounded_simplex() -> None:
    x, y = _batch(200)
    coefficients = MixUp(2)(x, y, _gen(2)).coefficients
    # K = 2: the own image's lambda is Beta(3, 1) on [0.35, 0.65] after rejection, density
    # 3 l^2: mean (3/4) (0.65^4 - 0.35^4) / (0.65^3 - 0.35^3) = 0.529.
    assert coefficients.min() < 0.37 and coefficients.max() > 0.63
    assert coefficients[:, 0].mean().item() == pytest.approx(0.529, abs=0.02)


def test_mixing_coefficients_follow_gradattacks_law() -> None:
    # Dirichlet(3, 1, 1, 1) conditioned on every coefficient <= 0.65, drawn apart by numpy.
    rng = np.random.default_rng(0)
    reference = rng.dirichlet([3.0, 1.0, 1.0, 1.0], size=200_000)
    reference = reference[reference.max(axis=1) <= MAX_COEFFICIENT]
    drawn = bounded_coefficients(20_000, 4, _gen(3), torch.device("cpu"), torch.float64).numpy()
    assert drawn.shape == (20_000, 4) and np.allclose(drawn.sum(axis=1), 1.0)
    assert drawn.max() <= MAX_COEFFICIENT
    assert drawn[:, 0].mean() == pytest.approx(reference[:, 0].mean(), abs=0.005)
    assert drawn[:, 1:].mean() == pytest.approx(reference[:, 1:].mean(), abs=0.005)
    own_largest = (drawn.argmax(axis=1) == 0).mean()
    assert own_largest == pytest.approx((reference.argmax(axis=1) == 0).mean(), abs=0.015)
    assert own_largest > 0.55  # the own image dominates: not the uniform law's 1 in 4


def test_mixup_is_reproducible_from_the_generator() -> None:
    x, y = _batch()
    a, b = MixUp(4)(x, y, _gen(5)), MixUp(4)(x, y, _gen(5))
    c = MixUp(4)(x, y, _gen(6))
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.sources, b.sources)
    assert not torch.equal(a.coefficients, c.coefficients)


def test_mixup_needs_k_images_in_the_batch() -> None:
    x, y = _batch(3)
    with pytest.raises(EncodingError, match="batch holds 3"):
        MixUp(4)(x, y, _gen())


def test_instahide_masks_are_signs_reproducible_from_the_seed() -> None:
    x, y = _batch(16)
    encoded = InstaHide(4)(x, y, _gen(7))
    again = InstaHide(4)(x, y, _gen(7))
    other = InstaHide(4)(x, y, _gen(8))
    assert encoded.signs is not None and encoded.signs.shape == x.shape
    assert set(encoded.signs.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(encoded.signs, again.signs) and torch.equal(encoded.inputs, again.inputs)
    assert not torch.equal(encoded.signs, other.signs)
    # Masks differ between encoded images and flip about half the pixels.
    assert not torch.equal(encoded.signs[0], encoded.signs[1])
    assert (encoded.signs == -1).float().mean().item() == pytest.approx(0.5, abs=0.02)
    mixed = MixUp(4)(x, y, _gen(7))  # same draws before the mask
    # A flip reflects the mixture about the middle of the image range: 1 - m where the sign
    # is -1, so encodings stay in [0, 1] like the images the model is tested on.
    flipped = encoded.signs < 0
    assert torch.allclose(encoded.inputs[flipped], 1 - mixed.inputs[flipped])
    assert torch.allclose(encoded.inputs[~flipped], mixed.inputs[~flipped])
    assert torch.equal(encoded.soft_labels, mixed.soft_labels)
    assert encoded.inputs.min() >= 0 and encoded.inputs.max() <= 1
    # What survives the signs is the mixture's distance from the middle: not the mixture (a
    # flip about 0 would leave |m| = m on non-negative images and hide nothing).
    assert torch.allclose(unsigned(encoded.inputs), unsigned(mixed.inputs))
    assert (unsigned(encoded.inputs) - mixed.inputs).abs().max() > 0.1


def test_an_instahide_pixel_is_read_toward_the_attackers_prior() -> None:
    x = torch.tensor([0.1, 0.3, 0.7, 0.9])
    dark, light = torch.zeros(4), torch.ones(4)
    assert torch.allclose(fold_toward(x, dark), torch.tensor([0.1, 0.3, 0.3, 0.1]))
    assert torch.allclose(fold_toward(x, light), torch.tensor([0.9, 0.7, 0.7, 0.9]))
    # Either reading is the same pixel up to a flip, and a flip changes neither.
    assert torch.allclose(unsigned(fold_toward(x, dark)), unsigned(x))
    assert torch.allclose(fold_toward(1 - x, dark), fold_toward(x, dark))


def test_inter_instahide_mixes_with_the_public_pool() -> None:
    x, y = _batch(8)
    public = torch.rand(50, 3, 8, 8, generator=_gen(9))
    encoded = InstaHide(3, inter=True)(x, y, _gen(10), public)
    assert torch.equal(encoded.sources[:, 0], torch.arange(8))
    assert not encoded.from_public[:, 0].any() and encoded.from_public[:, 1:].all()
    assert encoded.sources[:, 1:].max() < 50 and encoded.sources[:, 1:].max() >= 8
    for row in encoded.sources[:, 1:].tolist():
        assert len(set(row)) == 2
    c, s = encoded.coefficients, encoded.sources
    mixture = (
        c[:, 0, None, None, None] * x
        + c[:, 1, None, None, None] * public[s[:, 1]]
        + c[:, 2, None, None, None] * public[s[:, 2]]
    )
    manual = 0.5 + (mixture - 0.5) * encoded.signs
    assert torch.allclose(encoded.inputs, manual, atol=1e-6)
    # Public images carry no label: only the private share lambda_1 * y_1 remains.
    assert torch.allclose(encoded.soft_labels, c[:, :1] * y, atol=1e-6)
    assert torch.allclose(encoded.reapply(x, public), encoded.inputs)
    with pytest.raises(EncodingError, match="public pool"):
        InstaHide(3, inter=True)(x, y, _gen(10))
    with pytest.raises(EncodingError, match="at least 2 images"):
        InstaHide(3, inter=True)(x, y, _gen(10), public[:1])


def test_reapply_is_differentiable_in_the_private_images() -> None:
    x, y = _batch(6)
    encoded = InstaHide(3)(x, y, _gen(12))
    dummy = torch.rand_like(x).requires_grad_()
    out = encoded.reapply(dummy)
    assert torch.allclose(encoded.reapply(x), encoded.inputs, atol=1e-6)
    out.square().sum().backward()
    assert dummy.grad is not None and dummy.grad.abs().sum() > 0


def test_pipeline_encode_uses_its_encoder() -> None:
    x, y = _batch(8)
    pipeline = parse_defense_spec("prune:0.9+mixup:3")
    encoded = pipeline.encode(x, y, _gen(3), public=torch.rand(5, 3, 8, 8))
    assert torch.equal(encoded.inputs, MixUp(3)(x, y, _gen(3)).inputs)


def _partition(n: int = 30, classes: int = 10) -> PartnerPool:
    images, onehot = _batch(n, classes, seed=11)
    return PartnerPool(images, torch.arange(n), onehot.argmax(1), torch.tensor([5]))


@pytest.mark.parametrize("encoder", [MixUp(4), InstaHide(4)])
def test_partners_come_from_the_whole_partition_so_one_image_can_be_encoded(encoder) -> None:
    pool = _partition()
    x, y = pool.images[5:6], torch.nn.functional.one_hot(pool.labels[5:6], 10).float()
    seen: set[int] = set()
    for seed in range(20):
        encoded = encoder(x, y, _gen(seed), private=pool)
        assert encoded.sources.shape == (1, 4) and encoded.sources[0, 0] == 0
        # Three partners from outside the batch, sent along: the batch followed by them.
        assert encoded.partners.shape == (3, 3, 8, 8)
        assert sorted(encoded.sources[0, 1:].tolist()) == [1, 2, 3]
        rows = [
            next(r for r in range(30) if torch.equal(pool.images[r], p)) for p in encoded.partners
        ]
        assert 5 not in rows  # never its own partner
        assert encoded.partner_labels.tolist() == pool.labels[rows].tolist()
        seen.update(rows)
        private = torch.cat([x, encoded.partners])
        order = encoded.sources[0]
        mixed = (encoded.coefficients[0].view(4, 1, 1, 1) * private[order]).sum(0, keepdim=True)
        if encoded.signs is not None:
            mixed = 0.5 + (mixed - 0.5) * encoded.signs
        assert torch.allclose(encoded.inputs, mixed, atol=1e-6)
        labels = torch.cat([y, torch.nn.functional.one_hot(encoded.partner_labels, 10).float()])
        assert torch.allclose(encoded.soft_labels, encoded.coefficients @ labels[order], atol=1e-6)
        assert torch.allclose(encoded.reapply(private), encoded.inputs, atol=1e-6)
    assert len(seen) > 20  # partners spread over the partition, not a fixed few


def test_a_partner_that_is_in_the_batch_is_recorded_as_that_sample() -> None:
    pool = _partition(6)
    rows = torch.tensor([0, 1, 2, 3, 4])
    pool = PartnerPool(pool.images, pool.members, pool.labels, rows)
    x = pool.images[rows]
    y = torch.nn.functional.one_hot(pool.labels[rows], 10).float()
    encoded = MixUp(3)(x, y, _gen(3), private=pool)
    # Six images in all: every partner is another batch sample or the one image outside it.
    assert len(encoded.partners) <= 1
    for i, row in enumerate(encoded.sources.tolist()):
        assert row[0] == i and i not in row[1:] and len(set(row)) == 3
    private = torch.cat([x, encoded.partners])
    assert torch.allclose(encoded.reapply(private), encoded.inputs, atol=1e-6)
    if len(encoded.partners):
        assert torch.equal(encoded.partners[0], pool.images[5])


def test_an_encoding_needs_k_images_in_the_clients_data() -> None:
    images, onehot = _batch(3)
    pool = PartnerPool(images, torch.arange(3), onehot.argmax(1), torch.tensor([2]))
    with pytest.raises(EncodingError, match=r"the client's data holds 3 \(2 besides the image"):
        MixUp(4)(images[2:], onehot[2:], _gen(), private=pool)


@dataclass(frozen=True)
class _Broken:
    """A plugin release step with one of the bugs a user's defense may have."""

    bug: str
    kind: ClassVar[str] = "test-broken"
    stage: ClassVar[str] = "release"
    rank: ClassVar[float] = 3.5

    @property
    def spec(self) -> str:
        return f"test-broken:{self.bug}"

    def release(self, grads, generator, *, batched, dp_batch_size):
        first = next(iter(grads))
        if self.bug == "batched":
            return {k: v[0] for k, v in grads.items()} if batched else grads
        if self.bug == "fedsgd-only":  # works wherever a batch size is given
            return {k: v / dp_batch_size**0.5 for k, v in grads.items()}
        if self.bug == "drop":
            return {first: grads[first]}
        if self.bug == "flatten":
            return {k: v.flatten() for k, v in grads.items()}
        if self.bug == "nan":
            return {k: torch.full_like(v, math.nan) for k, v in grads.items()}
        return {k: v.numpy() for k, v in grads.items()}


@pytest.mark.parametrize(
    ("bug", "problem"),
    [
        ("drop", r"changed the update's keys \(missing \['0.bias'\], added \[\]\)"),
        ("flatten", r"changed the shape of '0.weight' from \(3, 4\) to \(12,\)"),
        ("numpy", r"returned ndarray for '0.weight', expected a tensor"),
        # A NaN update made a NaN global model, reported at accuracy 0.100 and DONE.
        ("nan", r"turned the finite '0.weight' into NaN or infinite values"),
    ],
)
def test_a_plugin_defense_that_changes_the_update_is_refused_before_and_during_a_run(
    bug: str, problem: str
) -> None:
    from fedleak.config import ConfigError
    from fedleak.defenses import DefenseOutputError, register_defense
    from fedleak.defenses.registry import DEFENSES
    from fedleak.models.spec import ModelSpec
    from fedleak.server.validate import check_defense

    register_defense("test-broken", lambda args: _Broken(args[0]), form="test-broken:BUG")
    try:
        pipeline = parse_defense_spec(f"prune:0.5+test-broken:{bug}")
        update = {"0.weight": torch.randn(3, 4), "0.bias": torch.randn(3)}
        with pytest.raises(DefenseOutputError, match=f"defense 'test-broken:{bug}' {problem}"):
            pipeline.share(update, 2, torch.Generator().manual_seed(0))
        with pytest.raises(ConfigError, match=f"defense.spec='test-broken:{bug}': fails on an"):
            check_defense(f"test-broken:{bug}", ModelSpec("mlp", (1, 2, 2), 3))
        check_defense("prune:0.5+sign", ModelSpec("mlp", (1, 2, 2), 3))  # built-ins: no work
    finally:
        DEFENSES.remove("test-broken")


def test_a_plugin_defense_broken_on_per_sample_updates_only_is_refused_before_a_run() -> None:
    """It passed the check, which released one batch update, and failed every client in the
    run's first round (audit DM6)."""
    from fedleak.config import ConfigError
    from fedleak.defenses import register_defense
    from fedleak.defenses.registry import DEFENSES
    from fedleak.models.spec import ModelSpec
    from fedleak.server.validate import check_defense

    register_defense("test-broken", lambda args: _Broken(args[0]), form="test-broken:BUG")
    try:
        with pytest.raises(
            ConfigError,
            match=r"defense.spec='test-broken:batched': fails on per-sample updates of model "
            r"mlp \(DefenseOutputError: defense 'test-broken:batched' changed the shape of",
        ):
            check_defense("test-broken:batched", ModelSpec("mlp", (1, 2, 2), 3))
        # A step that reads dp_batch_size works in FedSGD runs, whose clients always give one;
        # only FedAvg's deltas come without (audit DP2: it was refused for FedSGD too).
        check_defense("test-broken:fedsgd-only", ModelSpec("mlp", (1, 2, 2), 3), "fedsgd")
        with pytest.raises(ConfigError, match=r"fails on a FedAvg delta of model mlp"):
            check_defense("test-broken:fedsgd-only", ModelSpec("mlp", (1, 2, 2), 3), "fedavg")
    finally:
        DEFENSES.remove("test-broken")


def test_noise_that_overflows_says_why_not_that_a_plugin_broke_its_contract() -> None:
    """Noise within float32's range overflows once added to an update near its largest
    number: the failure blamed a plugin's contract on a built-in defense (audit BT D3)."""
    from fedleak.defenses import DefenseOutputError

    update = {"0.weight": torch.full((64, 64), 3.3e38)}
    with pytest.raises(DefenseOutputError) as error:
        parse_defense_spec("gauss:2e37").share(update, 1, torch.Generator().manual_seed(0))
    message = str(error.value)
    assert message.startswith("defense 'gauss:2e37' turned the finite '0.weight' into NaN")
    assert "updates are float32" in message and "a defense returns every tensor" not in message


@pytest.mark.parametrize("spec", ["prune:0.7", "prune:0.7:global", "prune:0.7+sign"])
def test_a_released_update_is_told_from_one_the_defense_cannot_have_released(spec: str) -> None:
    """Pruning leaves at least floor(P n) zeros (per tensor, or over all of them with
    `global`) and signs are -1, 0 or 1: exactly that many zeros pass, one fewer does not
    (audit FG1: a plain gradient declared as defended was attacked as if defended)."""
    pipeline = parse_defense_spec(spec)
    torch.manual_seed(0)
    grads = {"a": torch.randn(10), "b": torch.randn(4, 5)}
    released = pipeline.share(grads, 1, torch.Generator())
    assert pipeline.contradiction(released) is None
    assert sum(int((t == 0).sum()) for t in released.values()) == 7 + 14
    short = {name: t.clone() for name, t in released.items()}
    short["b"].view(-1)[int((short["b"] == 0).flatten().nonzero()[0])] = 1.0
    reason = pipeline.contradiction(short)
    assert reason is not None and "zeros among" in reason


@dataclass(frozen=True)
class _ScalesAfterSign:
    """A plug-in's release step ranked after sign: it may change anything sign left."""

    kind: ClassVar[str] = "test-scale"
    stage: ClassVar[str] = "release"
    rank: ClassVar[float] = 5.0
    spec: ClassVar[str] = "test-scale"

    def release(self, grads, generator, *, batched, dp_batch_size):
        return {name: 0.01 * g for name, g in grads.items()}


def test_a_plug_in_step_after_sign_and_prune_ends_the_check() -> None:
    """What a plug-in's later step releases is not checked against the steps before it: a
    scaled sign, or a pruned update it fills, is what such a client sends (audit FH5)."""
    pipeline = DefensePipeline((SignCompression(), Prune(0.5), _ScalesAfterSign()))
    assert isinstance(pipeline.steps[-1], _ScalesAfterSign)
    released = pipeline.share({"a": torch.randn(8)}, 1, torch.Generator())
    assert float(released["a"].abs().max()) == pytest.approx(0.01)
    assert pipeline.contradiction(released) is None
    assert pipeline.contradiction({"a": torch.randn(8)}) is None


def test_signs_and_each_samples_zeros_are_checked() -> None:
    signs = parse_defense_spec("sign").contradiction
    assert signs({"a": torch.tensor([1.0, -1.0, 0.0])}) is None
    assert signs({"a": torch.tensor([1.0, 0.5])}) == (
        "'a' holds 0.5, yet sign compression shares only -1, 0 and 1"
    )
    rows = {"a": torch.tensor([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]])}
    assert parse_defense_spec("prune:0.6").contradiction(rows, batched=True) is None
    assert parse_defense_spec("prune:0.67").contradiction(rows, batched=True) == (
        "'a' has 1 zeros among 3 coordinates in a sample, yet prune:0.67 leaves at least 2"
    )
