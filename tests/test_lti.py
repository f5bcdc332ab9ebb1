"""Learning To Invert: training pairs, inverter, refresh policies, cache, and quality bars.

The quality tests (marked slow) use MNIST-5k, the untrained sigmoid LeNet (init "uniform"),
B = 1 and the `cpu-small` preset. Their numbers are printed (run with -s to see them).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from fedleak.attacks.learned.attack import LearningToInvert, LTIObservationError
from fedleak.attacks.learned.config import LTI_PRESETS, LTIConfig, lti_config
from fedleak.attacks.learned.hybrid import LTIThenIG
from fedleak.attacks.learned.inverter import (
    Inverter,
    InverterError,
    best_assignment,
    inversion_loss,
)
from fedleak.attacks.learned.pairs import Featuriser, PairSource, Unit, make_groups
from fedleak.attacks.learned.trainer import psnr_per_image
from fedleak.attacks.optimization.attacks import InvertingGradients
from fedleak.attacks.optimization.config import IGConfig
from fedleak.attacks.registry import build_attack
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation
from fedleak.data import auxiliary, build_federated_data
from fedleak.defenses import DefensePipeline, parse_defense_spec
from fedleak.models import ModelSpec, build_model
from fedleak.settings import ConfigError
from fedleak.training.update import LocalTraining, compute_update

LENET = ModelSpec("lenet", (1, 28, 28), 10, init="uniform", seed=0)
NO_LIMIT = Budget(max_iterations=1, max_seconds=1e9)


def observe(
    spec: ModelSpec,
    weights: dict[str, torch.Tensor],
    defense: str,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    round_: int = 1,
    training: LocalTraining | None = None,
    seed: int = 5,
) -> Observation:
    """What the server sees when a client with (x, y) trains on `weights`."""
    model = build_model(spec)
    model.load_state_dict(weights)
    training = training or LocalTraining("fedsgd", x.shape[0], share="per-sample")
    update = compute_update(
        model,
        x,
        y,
        spec.num_classes,
        parse_defense_spec(defense),
        training,
        torch.Generator().manual_seed(seed),
    )
    return Observation(
        round=round_,
        client_id=0,
        model=spec,
        weights=weights,
        update=update.update,
        update_kind="gradient" if training.mode == "fedsgd" else "delta",
        num_examples=x.shape[0],
        batch_size=training.batch_size,
        local_steps=training.local_steps,
        learning_rate=training.learning_rate,
        defense=defense,
        per_sample_updates=update.per_sample,
    )


def state(spec: ModelSpec) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in build_model(spec).state_dict().items()}


@pytest.fixture(scope="module")
def mnist() -> dict[str, torch.Tensor]:
    """4,000 aux images; the targets come from the clients' images (disjoint)."""
    fd = build_federated_data("mnist5k", None, 1, "iid", 0, aux_size=4000, test_fraction=0.1)
    aux_x, aux_y = auxiliary(fd)
    client = torch.tensor(fd.partitions[0])
    x, y = fd.dataset.train_x[client], fd.dataset.train_y[client]
    return {"aux_x": aux_x, "aux_y": aux_y, "x": x, "y": y}


def knowledge_of(mnist: dict[str, torch.Tensor], aux: int | None = None) -> AttackerKnowledge:
    count = aux or mnist["aux_x"].shape[0]
    return AttackerKnowledge(mnist["aux_x"][:count], mnist["aux_y"][:count], (1, 28, 28), 10)


def tiny(**overrides: object) -> LTIConfig:
    base = LTIConfig(
        hidden=(16,),
        learning_rate=1e-3,
        batch_size=32,
        epochs=2,
        lr_drop_epoch=None,
        finetune_epochs=1,
        hash_bins=256,
        aux_val_fraction=0.2,
        patience=None,
    )
    return dataclasses.replace(base, **overrides)


# --- configuration -------------------------------------------------------------------------


def test_paper_defaults_and_presets() -> None:
    paper = LTIConfig()
    assert (paper.hidden, paper.learning_rate, paper.batch_size, paper.epochs) == (
        (3000, 3000),
        1e-4,
        256,
        200,
    )
    assert paper.learning_rate_at(149, warm=False) == 1e-4
    assert paper.learning_rate_at(150, warm=False) == 1e-5
    assert paper.refresh == "finetune"
    assert set(LTI_PRESETS) == {"paper", "paper-tuned", "cpu", "cpu-batch", "cpu-small"}
    assert LTI_PRESETS["paper-tuned"] == paper
    # The paper as written: raw update, linear head, every aux image trained on, no stopping.
    exact = LTI_PRESETS["paper"]
    assert (exact.hash_bins, exact.head, exact.block_normalise) == (None, "linear", False)
    assert (exact.aux_val_fraction, exact.patience) == (0.0, None)
    assert exact.epochs == 200 and exact.learning_rate_at(150, warm=False) == 1e-5
    cfg = lti_config("cpu", **{"hash-bins": 0.1, "hidden": [64, 32], "cache-dir": "runs/x"})
    assert cfg.hash_bins == 0.1 and cfg.hidden == (64, 32) and cfg.cache_dir == Path("runs/x")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("refresh", "sometimes"),
        ("hidden", ()),
        ("activation", "swish"),
        ("epochs", 0),
        ("hash_bins", 0),
        ("hash_bins", 1.5),
        ("aux_val_fraction", 1.0),
        ("learning_rate", -1.0),
        ("patience", 0),
        ("head", "tanh"),
    ],
)
def test_bad_settings_are_refused_in_one_line(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field.replace("_", "-")) as info:
        LTIConfig(**{field: value})
    assert "\n" not in str(info.value)


def test_factories_read_run_parameters() -> None:
    params = {"preset": "cpu-small", "hidden": "64x32", "hash-bins": "none"}
    attack = build_attack("lti", params, seed=7)
    assert attack.name == "lti" and attack.seed == 7
    assert attack.config.hidden == (64, 32) and attack.config.hash_bins is None
    assert build_attack("lti").config == LTI_PRESETS["cpu"]
    assert build_attack("lti", {"hidden": 300}).config.hidden == (300,)
    params = {"epochs": 3, "ig-learning-rate": 0.05, "ig-restarts": 2}
    hybrid = build_attack("lti+ig", params, seed=1)
    assert hybrid.name == "lti+ig" and hybrid.lti.config.epochs == 3
    assert hybrid.ig.config.learning_rate == 0.05 and hybrid.ig.config.restarts == 2
    assert build_attack("lti+ig").ig.config.learning_rate == 0.01
    with pytest.raises(ConfigError, match=r"attack\.lti\.hidden='wide'"):
        build_attack("lti", {"hidden": "wide"})


def test_too_little_auxiliary_data_is_refused_with_the_size_needed() -> None:
    # B = 4 with a 0.2 hold-out: 5 images leave 4 to train on, 4 leave 3 (round(0.8) = 1).
    attack = build_attack("lti", {"preset": "cpu-small", "aux-val-fraction": 0.2})
    attack.check_feasible(4, 5)
    with pytest.raises(
        ValueError,
        match=r"^lti trains on groups of 4 auxiliary images and holds "
        r"out 0\.2 of them for validation, so it needs data\.aux-size >= 5, got 4$",
    ):
        attack.check_feasible(4, 4)


def test_unknown_preset_or_parameter() -> None:
    with pytest.raises(ConfigError, match=r"attack\.lti\.preset='gpu-huge': expected one of"):
        lti_config("gpu-huge")
    with pytest.raises(ConfigError, match=r"attack\.lti\.depth: unknown setting"):
        lti_config("cpu", depth=3)
    with pytest.raises(ConfigError, match=r"attack\.lti\.preset='gpu-huge': expected one of"):
        build_attack("lti", {"preset": "gpu-huge"})


# --- inverter and loss ---------------------------------------------------------------------


def test_inverter_shapes_range_and_bad_activation() -> None:
    inverter = Inverter(12, (8, 8), (1, 4, 4), 3, 5, activation="gelu", data_range=(-1.0, 1.0))
    images, logits = inverter(torch.randn(2, 12))
    assert images.shape == (2, 3, 1, 4, 4) and logits.shape == (2, 3, 5)
    assert images.min() >= -1 and images.max() <= 1
    with pytest.raises(InverterError, match="activation"):
        Inverter(12, (8,), (1, 4, 4), 1, 5, activation="swish")


def test_best_assignment_is_optimal_exhaustive_and_hungarian() -> None:
    gen = torch.Generator().manual_seed(0)
    for b in (2, 4, 5, 7):
        cost = torch.rand(6, b, b, generator=gen)
        perm = best_assignment(cost)
        for n in range(6):
            rows, cols = linear_sum_assignment(cost[n].numpy())
            best = cost[n][rows, cols].sum()
            assert torch.isclose(cost[n][torch.arange(b), perm[n]].sum(), best)
            assert sorted(perm[n].tolist()) == list(range(b))


def test_loss_is_permutation_invariant() -> None:
    gen = torch.Generator().manual_seed(1)
    targets = torch.rand(4, 3, 1, 5, 5, generator=gen)
    labels = torch.randint(0, 7, (4, 3), generator=gen)
    logits = torch.randn(4, 3, 7, generator=gen)
    images = torch.rand(4, 3, 1, 5, 5, generator=gen)
    loss = inversion_loss(images, logits, targets, labels)
    for perm in itertools.permutations(range(3)):
        shuffled = inversion_loss(images, logits, targets[:, list(perm)], labels[:, list(perm)])
        torch.testing.assert_close(shuffled, loss)
    # Outputs equal to permuted targets cost no image error at all.
    perfect = inversion_loss(targets[:, [2, 0, 1]], logits, targets, labels, label_weight=0.0)
    assert float(perfect) < 1e-12


def test_linear_head_is_unbounded_and_starts_at_the_given_image() -> None:
    inverter = Inverter(6, (4,), (1, 2, 2), 2, 3, head="linear", data_range=(0.0, 1.0))
    mean = torch.tensor([[[0.0, 0.5], [1.0, 0.25]]])
    with torch.no_grad():
        inverter.body[-1].weight.zero_()
        inverter.body[-1].bias[:8] = inverter.initial_pixels(mean).repeat(2)
    images, _ = inverter(torch.randn(3, 6))
    torch.testing.assert_close(images, mean.expand(3, 2, 1, 2, 2))
    sigmoid = Inverter(6, (4,), (1, 2, 2), 1, 3)
    assert float(torch.sigmoid(sigmoid.initial_pixels(torch.full((1, 2, 2), 0.25)))[0]) == (
        pytest.approx(0.25)
    )
    with pytest.raises(InverterError, match="head"):
        Inverter(6, (4,), (1, 2, 2), 1, 3, head="tanh")


# --- training pairs ------------------------------------------------------------------------


def _small_world(name: str) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    spec = ModelSpec(name, (1, 8, 8), 4, seed=1)
    gen = torch.Generator().manual_seed(2)
    return build_model(spec), torch.rand(24, 1, 8, 8, generator=gen), torch.arange(24) % 4


@pytest.mark.parametrize(
    ("name", "defense", "unit"),
    [
        ("lenet", "none", Unit("gradient", 1, 1, 1, 0.1)),
        ("lenet", "prune:0.5+sign", Unit("gradient", 3, 3, 1, 0.1)),
        ("lenet", "dpsgd:0.5:0", Unit("gradient", 3, 3, 1, 0.1)),
        ("convnet-bn", "prune:0.7", Unit("gradient", 2, 2, 1, 0.1)),
        ("convnet-bn", "none", Unit("gradient", 1, 1, 1, 0.1)),
        ("lenet", "prune:0.8:global", Unit("delta", 4, 2, 3, 0.05)),
        ("convnet-bn", "sign", Unit("delta", 4, 2, 2, 0.05)),
    ],
)
def test_pairs_equal_the_clients_own_updates(name: str, defense: str, unit: Unit) -> None:
    """The fast paths (vmap per sample, per BatchNorm group, unrolled FedAvg steps) equal
    `compute_update`."""
    model, x, y = _small_world(name)
    pipeline = parse_defense_spec(defense)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    featuriser = Featuriser(sizes, None, 0, False, block_normalise=False)
    groups = make_groups(24, unit.size, torch.Generator().manual_seed(3), torch.device("cpu"))
    source = PairSource(model, pipeline, unit, x, y, 4, groups, featuriser, 5, 1 << 30)
    assert source.fixed
    got = source.features(torch.Generator().manual_seed(0))
    for row in (0, groups.shape[0] - 1):
        update = compute_update(
            model,
            x[groups[row]],
            y[groups[row]],
            4,
            pipeline,
            unit.training(),
            torch.Generator().manual_seed(0),
        ).update
        expected = featuriser({k: v.unsqueeze(0) for k, v in update.items()})
        torch.testing.assert_close(got[row : row + 1], expected, rtol=1e-4, atol=1e-5)


def test_random_defenses_are_redrawn_each_epoch() -> None:
    model, x, y = _small_world("lenet")
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    featuriser = Featuriser(sizes, 64, 0, True, block_normalise=True)
    groups = make_groups(24, 1, torch.Generator(), torch.device("cpu"))
    unit = Unit("gradient", 1, 1, 1, 0.1)
    gen = torch.Generator().manual_seed(0)
    noisy = PairSource(
        model,
        parse_defense_spec("gauss:0.1+prune:0.5"),
        unit,
        x,
        y,
        4,
        groups,
        featuriser,
        7,
        1 << 30,
    )
    assert not noisy.fixed
    assert not torch.equal(noisy.features(gen), noisy.features(gen))
    plain = PairSource(model, parse_defense_spec("sign"), unit, x, y, 4, groups, featuriser, 7, 0)
    assert plain.features(gen) is plain.features(gen)
    # A plug-in's step may draw from its generator: it is drawn again too (it was drawn once).
    dropout = DefensePipeline((GradientDropout(),))
    plugin = PairSource(model, dropout, unit, x, y, 4, groups, featuriser, 7, 1 << 30)
    assert not plugin.fixed
    assert not torch.equal(plugin.features(gen), plugin.features(gen))


@pytest.mark.parametrize(
    ("defense", "size", "cache", "regroup", "kept"),
    [
        ("sign", 1, 1 << 30, False, "_features"),  # fixed pairs, kept once built
        ("gauss:0.1", 1, 0, False, None),  # hash-space noise, each chunk's bins in turn
        ("gauss:0.1", 1, 1 << 30, False, "_clean"),  # ... on every group's kept clean bins
        ("gauss:0.1+prune:0.5", 1, 1 << 30, False, "_raw"),  # every update before the release
        ("gauss:0.1+prune:0.5", 2, 1 << 30, True, "_per_sample"),  # regrouped: aux gradients
    ],
)
def test_pair_building_stops_at_its_deadline(
    defense: str,
    size: int,
    cache: int,
    regroup: bool,
    kept: str | None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Building an epoch's pairs stops between chunks once the deadline has passed, in every
    way pairs are built, and a later call with time left builds them whole (audit DV2)."""
    import fedleak.attacks.learned.pairs as pairs_module

    model, x, y = _small_world("lenet")
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    featuriser = Featuriser(sizes, 64, 0, True, block_normalise=True)
    groups = make_groups(24, size, torch.Generator().manual_seed(3), torch.device("cpu"))
    unit = Unit("gradient", size, size, 1, 0.1)
    pipeline = parse_defense_spec(defense)
    source = PairSource(model, pipeline, unit, x, y, 4, groups, featuriser, 5, cache, regroup)
    calls = []
    computed = pairs_module.per_sample_gradients
    monkeypatch.setattr(
        pairs_module,
        "per_sample_gradients",
        lambda *args: calls.append(1) or computed(*args),
    )
    gen = torch.Generator().manual_seed(0)
    assert source.features(gen, deadline=time.perf_counter() - 1.0) is None
    assert len(calls) == 1  # the first chunk, then no more
    if kept is not None:
        assert getattr(source, kept) is None  # no cache holds a part of what it keeps
    features = source.features(gen)
    assert features is not None and features.shape[0] == groups.shape[0]
    if kept is not None:
        assert getattr(source, kept) is not None
    assert torch.isfinite(features).all()


class GradientDropout:
    """A plug-in's random release step: each coordinate kept with probability 1/2."""

    kind = "test-dropout"
    stage = "release"
    rank = 3.0
    spec = "test-dropout"

    def release(self, grads, generator, *, batched, dp_batch_size):
        return {
            name: g * (torch.rand(g.shape, generator=generator, device=g.device) < 0.5)
            for name, g in grads.items()
        }


@pytest.mark.parametrize("defense", ["prune:0.5+sign", "dpsgd:0.5:0"])
def test_regrouped_pairs_are_fresh_batches_of_the_clients_updates(defense: str) -> None:
    """B > 1 with `regroup`: new groups on each call, and each group's release equals what a
    client holding that batch shares (DP-SGD: clipped per sample, then the mean)."""
    model, x, y = _small_world("lenet")
    pipeline = parse_defense_spec(defense)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    featuriser = Featuriser(sizes, None, 0, False, block_normalise=False)
    unit = Unit("gradient", 3, 3, 1, 0.1)
    gen = torch.Generator().manual_seed(3)
    groups = make_groups(24, 3, gen, torch.device("cpu"))
    source = PairSource(model, pipeline, unit, x, y, 4, groups, featuriser, 5, 1 << 30, True)
    assert source.regroups
    before = source.features(torch.Generator())
    source.regroup(gen)
    assert source.groups.shape == groups.shape and not torch.equal(source.groups, groups)
    got = source.features(torch.Generator())
    assert not torch.equal(got, before)
    for row in (0, source.num_pairs - 1):
        update = compute_update(
            model,
            x[source.groups[row]],
            y[source.groups[row]],
            4,
            pipeline,
            unit.training(),
            torch.Generator(),
        ).update
        expected = featuriser({k: v.unsqueeze(0) for k, v in update.items()})
        torch.testing.assert_close(got[row : row + 1], expected, rtol=1e-4, atol=1e-5)
    # Without room to keep every aux sample's gradient, regrouping went off without a word,
    # so `max-cache-bytes` changed what the inverter learned (audit FE2): the groups' updates
    # are computed again instead.
    small = PairSource(model, pipeline, unit, x, y, 4, groups, featuriser, 5, 1000, True)
    assert small.regroups and small._keep_per_sample is False
    small.regroup(torch.Generator().manual_seed(3))
    source.regroup(torch.Generator().manual_seed(3))
    assert torch.equal(small.groups, source.groups)
    got = small.features(torch.Generator())
    assert small._per_sample is None
    torch.testing.assert_close(got, source.features(torch.Generator()), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("defense", "unit"),
    [
        ("sign", Unit("gradient", 2, 2, 1, 0.1, contributors=2)),
        ("prune:0.5+sign", Unit("gradient", 6, 6, 1, 0.1, contributors=3)),
        ("dpsgd:0.5:0", Unit("gradient", 4, 4, 1, 0.1, contributors=2)),
    ],
)
def test_aggregate_pairs_average_one_release_per_contributor(defense: str, unit: Unit) -> None:
    """Behind secure aggregation the server sees the mean of the clients' released updates;
    a pair is built the same way (the mean of signs, not the sign of the mean)."""
    model, x, y = _small_world("lenet")
    pipeline = parse_defense_spec(defense)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    featuriser = Featuriser(sizes, None, 0, False, block_normalise=False)
    groups = make_groups(24, unit.size, torch.Generator().manual_seed(3), torch.device("cpu"))
    got = PairSource(model, pipeline, unit, x, y, 4, groups, featuriser, 5, 1 << 30).features(
        torch.Generator()
    )
    share = unit.size // unit.contributors
    for row in (0, groups.shape[0] - 1):
        releases = [
            compute_update(
                model,
                x[members],
                y[members],
                4,
                pipeline,
                unit.member().training(),
                torch.Generator(),
            ).update
            for members in groups[row].split(share)
        ]
        mean = {k: sum(r[k] for r in releases) / len(releases) for k in releases[0]}
        expected = featuriser({k: v.unsqueeze(0) for k, v in mean.items()})
        torch.testing.assert_close(got[row : row + 1], expected, rtol=1e-4, atol=1e-5)
        one_client = compute_update(
            model, x[groups[row]], y[groups[row]], 4, pipeline, unit.training(), torch.Generator()
        ).update
        if "sign" in defense:  # one client holding the union would have sent a sign
            alone = featuriser({k: v.unsqueeze(0) for k, v in one_client.items()})
            assert not torch.allclose(got[row : row + 1], alone)
    with pytest.raises(ValueError, match="shares differ"):
        Unit("gradient", 5, 5, 1, 0.1, contributors=2).member()


def test_groups_use_every_sample_once_per_shuffle() -> None:
    groups = make_groups(10, 3, torch.Generator().manual_seed(0), torch.device("cpu"))
    assert groups.shape == (9, 3)
    assert all(len(set(g.tolist())) == 3 for g in groups)  # a group is part of one shuffle
    assert torch.bincount(groups.flatten(), minlength=10).max() <= 3


# --- the attack: refresh, cache, budget, shapes ---------------------------------------------


def test_refresh_policies_across_rounds(mnist: dict[str, torch.Tensor], tmp_path: Path) -> None:
    know = knowledge_of(mnist, aux=150)
    x, y = mnist["x"][:3], mnist["y"][:3]
    w1 = state(LENET)
    w2 = {k: v + 0.01 for k, v in w1.items()}
    epochs = {}
    for policy in ("retrain", "finetune", "frozen"):
        attack = LearningToInvert(tiny(refresh=policy, cache_dir=tmp_path / policy), seed=0)
        runs = [
            attack.reconstruct(observe(LENET, w, "none", x, y, round_=r), know, NO_LIMIT)
            for r, w in ((1, w1), (1, w1), (2, w2))
        ]
        epochs[policy] = [r.diagnostics["train_epochs"] for r in runs]
        for run in runs:
            assert run.inputs.shape == (3, 1, 28, 28) and run.labels is not None
            assert {"train_seconds", "train_epochs", "val_psnr"} <= set(run.diagnostics)
            assert math.isfinite(run.diagnostics["val_psnr"])
        assert runs[2].diagnostics["warm_start"] == float(policy == "finetune")
        trained_in = 1 if policy == "frozen" else 2
        assert (tmp_path / policy / f"lti-inverter-r{trained_in:06d}.pt").exists()
    # Same weights twice: the second client of a round reuses the round's inverter.
    assert epochs == {"retrain": [2, 0, 2], "finetune": [2, 0, 1], "frozen": [2, 0, 0]}


def test_cache_resumes_a_fresh_instance(mnist: dict[str, torch.Tensor], tmp_path: Path) -> None:
    know = knowledge_of(mnist, aux=150)
    x, y = mnist["x"][:2], mnist["y"][:2]
    obs = observe(LENET, state(LENET), "sign", x, y)
    first = LearningToInvert(tiny(cache_dir=tmp_path), seed=0)
    a = first.reconstruct(obs, know, NO_LIMIT)
    saved = torch.load(tmp_path / "lti-inverter-r000001.pt", weights_only=True)
    assert saved["meta"]["round"] == 1 and "body.0.weight" in saved["state_dict"]
    # A resumed run attacking round 2 (same weights) goes on from round 1's inverter.
    resumed = LearningToInvert(tiny(cache_dir=tmp_path), seed=0)
    b = resumed.reconstruct(dataclasses.replace(obs, round=2), know, NO_LIMIT)
    assert b.diagnostics["train_epochs"] == 0  # trained at these weights already
    torch.testing.assert_close(a.inputs, b.inputs)
    # One attacking round 1 again (its round never recorded: an interrupt) trains anew, as
    # the uninterrupted run did, and gets what it got.
    again = LearningToInvert(tiny(cache_dir=tmp_path), seed=0).reconstruct(obs, know, NO_LIMIT)
    assert again.diagnostics["train_epochs"] == a.diagnostics["train_epochs"] > 0
    torch.testing.assert_close(a.inputs, again.inputs)
    # Another run's inverter (other auxiliary data) in the same folder is never adopted.
    other = knowledge_of(mnist, aux=120)
    foreign = LearningToInvert(tiny(cache_dir=tmp_path), seed=0)
    c = foreign.reconstruct(dataclasses.replace(obs, round=2), other, NO_LIMIT)
    assert c.diagnostics["train_epochs"] > 0 and c.diagnostics["warm_start"] == 0.0
    assert "lti-inverter-r000001.pt was trained for other settings (or saved by" in c.message
    # Other training settings too: 3 epochs asked got the 2-epoch inverter (audit CZ1);
    # settings of speed and place keep it.
    longer = LearningToInvert(tiny(cache_dir=tmp_path, epochs=3), seed=0)
    c = longer.reconstruct(dataclasses.replace(obs, round=2), know, NO_LIMIT)
    assert c.diagnostics["train_epochs"] == 3 and "not adopted" in c.message
    chunked = LearningToInvert(tiny(cache_dir=tmp_path, pair_chunk=7), seed=0)
    c = chunked.reconstruct(dataclasses.replace(obs, round=2), know, NO_LIMIT)
    assert c.diagnostics["train_epochs"] == 0 and "not adopted" not in c.message
    # Under noise the chunk decides how the noise is drawn, so what is learned (audit FE2).
    noisy = observe(LENET, state(LENET), "gauss:0.01", x, y)
    LearningToInvert(tiny(cache_dir=tmp_path / "noisy"), seed=0).reconstruct(noisy, know, NO_LIMIT)
    later = dataclasses.replace(noisy, round=2)
    for chunk, epochs in ((7, 2), (256, 0)):
        attack = LearningToInvert(tiny(cache_dir=tmp_path / "noisy", pair_chunk=chunk), seed=0)
        c = attack.reconstruct(later, know, NO_LIMIT)
        assert c.diagnostics["train_epochs"] == epochs
        assert ("not adopted" in c.message) == (epochs > 0)
    # A different defense is another inverter: the cached one is not used.
    other = LearningToInvert(tiny(cache_dir=tmp_path), seed=0)
    c = other.reconstruct(observe(LENET, state(LENET), "none", x, y), know, NO_LIMIT)
    assert c.diagnostics["train_epochs"] == 2


def test_time_budget_stops_training(mnist: dict[str, torch.Tensor]) -> None:
    know = knowledge_of(mnist, aux=400)
    obs = observe(LENET, state(LENET), "none", mnist["x"][:2], mnist["y"][:2])
    attack = LearningToInvert(tiny(epochs=1000), seed=0)
    # A process's first optimiser imports torch's compiler stack (seconds): not this test's
    # budget, which must leave time for steps whichever test ran first.
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])
    started = time.perf_counter()
    result = attack.reconstruct(obs, know, Budget(max_iterations=1, max_seconds=1.5))
    assert time.perf_counter() - started < 30
    # Running out of time is a diagnostic, not a failure: the reconstruction is kept.
    assert result.status == "ok" and "time budget ran out" in result.message
    assert result.diagnostics["stopped_by"] == "seconds"
    # Whole epochs only (none, on a loaded machine); the optimiser steps did happen.
    assert 0 <= result.diagnostics["train_epochs"] < 1000 and result.iterations > 0
    assert result.diagnostics["train_pairs"] >= result.iterations
    assert result.inputs.shape == (2, 1, 28, 28)


@pytest.mark.parametrize("defense", ["none", "gauss:0.1"])  # pairs kept once; drawn each epoch
def test_a_budget_spent_while_pairs_are_built_stops_their_building(
    mnist: dict[str, torch.Tensor], pair_chunks: list[int], defense: str
) -> None:
    """The attack hands its deadline to every pair building, the held-out pairs' and each
    epoch's: built whole, they overran a 2 s budget by 15 s (audit DV2, EV1). A clock that
    reads the budget as spent in pair building alone leaves one chunk of each built."""
    know = knowledge_of(mnist, aux=100)  # 80 training pairs and 20 held out, chunks of 10
    obs = observe(LENET, state(LENET), defense, mnist["x"][:1], mnist["y"][:1])
    attack = LearningToInvert(tiny(epochs=3, pair_chunk=10), seed=0)
    result = attack.reconstruct(obs, know, Budget(max_iterations=1, max_seconds=600))
    assert result.status == "ok" and result.diagnostics["stopped_by"] == "seconds"
    assert result.diagnostics["train_epochs"] == 0
    assert len(pair_chunks) == 2  # the held-out pairs' first chunk, then epoch 0's


def test_batches_and_fedavg_give_one_image_per_example(mnist: dict[str, torch.Tensor]) -> None:
    know = knowledge_of(mnist, aux=120)
    x, y = mnist["x"][:3], mnist["y"][:3]
    batch = observe(LENET, state(LENET), "prune:0.9", x, y, training=LocalTraining("fedsgd", 3))
    fedavg = observe(LENET, state(LENET), "none", x, y, training=LocalTraining("fedavg", 2, 2, 0.1))
    for obs in (batch, fedavg):
        result = LearningToInvert(tiny(epochs=1), seed=0).reconstruct(obs, know, NO_LIMIT)
        assert result.inputs.shape == (3, 1, 28, 28) and result.labels.shape == (3,)
        assert math.isfinite(result.diagnostics["val_psnr"])


def test_training_without_a_validation_set_says_so(mnist: dict[str, torch.Tensor]) -> None:
    """Too few auxiliary images to hold out one update's worth: no score, no early stopping,
    and the message says that instead of 'PSNR nan dB' (audit DD6)."""
    know = knowledge_of(mnist, aux=5)
    x, y = mnist["x"][:4], mnist["y"][:4]
    obs = observe(LENET, state(LENET), "none", x, y, training=LocalTraining("fedsgd", 4))
    result = LearningToInvert(tiny(epochs=1), seed=0).reconstruct(obs, know, NO_LIMIT)
    assert math.isnan(result.diagnostics["val_psnr"]) and "nan" not in result.message
    assert "validation none (too few auxiliary samples held out" in result.message
    # Nothing held out by choice (the paper preset): the message blamed too few samples
    # (audit FE4).
    chosen = LearningToInvert(tiny(epochs=1, aux_val_fraction=0.0), seed=0)
    result = chosen.reconstruct(obs, knowledge_of(mnist, aux=40), NO_LIMIT)
    assert "validation none (aux-val-fraction=0: nothing held out" in result.message
    assert "too few" not in result.message


def test_seeded_runs_are_identical(mnist: dict[str, torch.Tensor]) -> None:
    know = knowledge_of(mnist, aux=120)
    obs = observe(LENET, state(LENET), "gauss:0.1", mnist["x"][:2], mnist["y"][:2])
    runs = [LearningToInvert(tiny(), seed=3).reconstruct(obs, know, NO_LIMIT) for _ in range(2)]
    torch.testing.assert_close(runs[0].inputs, runs[1].inputs, rtol=0, atol=0)


def test_an_attack_reused_under_another_attackers_seed_trains_for_it(
    mnist: dict[str, torch.Tensor],
) -> None:
    """The attacker's seed draws the inverter's start and batches: an attack object reused
    with another one reused the first seed's inverter (audit DV4)."""
    obs = observe(LENET, state(LENET), "none", mnist["x"][:2], mnist["y"][:2])
    knowing = [dataclasses.replace(knowledge_of(mnist, aux=120), seed=s) for s in (0, 1)]
    reused = LearningToInvert(tiny(), seed=3)
    reused.reconstruct(obs, knowing[0], NO_LIMIT)
    again = reused.reconstruct(obs, knowing[1], NO_LIMIT)
    fresh = LearningToInvert(tiny(), seed=3).reconstruct(obs, knowing[1], NO_LIMIT)
    assert "reused the inverter" not in again.message
    torch.testing.assert_close(again.inputs, fresh.inputs, rtol=0, atol=0)


def test_needs_aux_data(mnist: dict[str, torch.Tensor]) -> None:
    empty = AttackerKnowledge(
        torch.zeros(0, 1, 28, 28), torch.zeros(0, dtype=torch.long), (1, 28, 28), 10
    )
    obs = observe(LENET, state(LENET), "none", mnist["x"][:1], mnist["y"][:1])
    with pytest.raises(LTIObservationError, match="aux"):
        LearningToInvert(tiny()).reconstruct(obs, empty, NO_LIMIT)


# --- quality bars (MNIST-5k, untrained sigmoid LeNet, B = 1) --------------------------------

DEFENSES = ("none", "sign", "prune:0.9", "gauss:0.1")
TARGETS = 32


@pytest.fixture(scope="module")
def quality(mnist: dict[str, torch.Tensor]) -> dict[str, object]:
    """One `cpu-small` inverter per defense on 4,000 aux images; PSNR on 32 client images."""
    know = knowledge_of(mnist)
    x, y = mnist["x"][:TARGETS], mnist["y"][:TARGETS]
    weights = state(LENET)
    aux_mean = know.aux_inputs.mean(0, keepdim=True).expand_as(x)
    out: dict[str, object] = {"aux_mean": float(psnr_per_image(aux_mean, x, 1.0).mean())}
    for defense in DEFENSES:
        attack = LearningToInvert(lti_config("cpu-small"), seed=0)
        obs = observe(LENET, weights, defense, x, y)
        result = attack.reconstruct(obs, know, NO_LIMIT)
        out[defense] = {
            "attack": attack,
            "psnr": psnr_per_image(result.inputs, x, 1.0),
            "labels": float((result.labels == y).float().mean()),
            "seconds": result.diagnostics["train_seconds"],
        }
    return out


@pytest.mark.slow
def test_beats_aux_mean_by_4db_under_each_defense(quality: dict[str, object]) -> None:
    baseline = quality["aux_mean"]
    for defense in DEFENSES:
        row = quality[defense]
        psnr = float(row["psnr"].mean())
        print(
            f"LTI {defense}: {psnr:.2f} dB (aux-mean {baseline:.2f}), labels "
            f"{row['labels']:.2f}, training {row['seconds']:.0f} s"
        )
        assert psnr >= baseline + 4.0, defense
        assert row["labels"] >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("defense", ["sign", "prune:0.9"])
def test_beats_adaptive_ig_under_compression(
    quality: dict[str, object], mnist: dict[str, torch.Tensor], defense: str
) -> None:
    """IG (adaptive loss on) at 2,000 iterations on 4 images, against LTI on the same 4.

    IG's mean over three seeds: one seed's run is chaotic (signed steps), e.g. under prune 0.9
    seed 0 gave 15.76 dB and 16.92 dB on two versions of the replay that agree to float32
    rounding, where seeds 1-3 stay at 15.2-15.7 dB; LTI is at 16.8 dB."""
    x, y = mnist["x"][:4], mnist["y"][:4]
    obs = observe(LENET, state(LENET), defense, x, y)
    runs = []
    for seed in range(3):
        ig = InvertingGradients(IGConfig(adaptive=True), seed=seed)
        result = ig.reconstruct(obs, knowledge_of(mnist), Budget(2000, 1e9))
        runs.append(float(psnr_per_image(result.inputs, x, 1.0).mean()))
    ig_psnr = sum(runs) / len(runs)
    lti_psnr = float(quality[defense]["psnr"][:4].mean())
    seeds = ", ".join(f"{r:.2f}" for r in runs)
    print(f"{defense}: LTI {lti_psnr:.2f} dB vs IG {ig_psnr:.2f} dB ({seeds}) on 4 images")
    assert lti_psnr > ig_psnr


@pytest.mark.slow
def test_hybrid_refines_lti_with_ig(
    quality: dict[str, object], mnist: dict[str, torch.Tensor]
) -> None:
    """Without a defense IG started from LTI's guess improves on the guess."""
    x, y = mnist["x"][:4], mnist["y"][:4]
    lti = quality["none"]["attack"]
    hybrid = LTIThenIG(lti, InvertingGradients(IGConfig(learning_rate=0.01), seed=0))
    result = hybrid.reconstruct(
        observe(LENET, state(LENET), "none", x, y), knowledge_of(mnist), Budget(500, 1e9)
    )
    assert result.diagnostics["train_epochs"] == 0  # the round's inverter is reused
    psnr = float(psnr_per_image(result.inputs, x, 1.0).mean())
    lti_psnr = float(quality["none"]["psnr"][:4].mean())
    print(f"lti+ig none: {psnr:.2f} dB vs LTI {lti_psnr:.2f} dB")
    assert psnr > lti_psnr + 1.0


@pytest.mark.slow
def test_finetune_tracks_retrain_across_training_rounds(mnist: dict[str, torch.Tensor]) -> None:
    """3 rounds; between rounds the LeNet takes 5 SGD steps on client data."""
    know = knowledge_of(mnist, aux=2000)
    x, y = mnist["x"][:TARGETS], mnist["y"][:TARGETS]
    cfg = lti_config("cpu-small", hash_bins=2048)
    model = build_model(LENET)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    train_x, train_y = mnist["x"][100:], mnist["y"][100:]
    attacks = {
        p: LearningToInvert(dataclasses.replace(cfg, refresh=p), seed=0)
        for p in ("retrain", "finetune")
    }
    psnr = {p: [] for p in attacks}
    seconds = {p: 0.0 for p in attacks}
    epochs = {p: 0.0 for p in attacks}
    gen = torch.Generator().manual_seed(0)
    for round_ in (1, 2, 3):
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        obs = observe(LENET, weights, "sign", x, y, round_=round_)
        for policy, attack in attacks.items():
            result = attack.reconstruct(obs, know, NO_LIMIT)
            psnr[policy].append(float(psnr_per_image(result.inputs, x, 1.0).mean()))
            if round_ > 1:
                seconds[policy] += result.diagnostics["train_seconds"]
                epochs[policy] += result.diagnostics["train_epochs"]
        for _ in range(5):
            batch = torch.randint(0, train_x.shape[0], (32,), generator=gen)
            loss = torch.nn.functional.cross_entropy(model(train_x[batch]), train_y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    print(
        f"retrain PSNR {np.round(psnr['retrain'], 2)}, rounds 2-3 {seconds['retrain']:.1f} s / "
        f"{epochs['retrain']:.0f} epochs; finetune {np.round(psnr['finetune'], 2)}, "
        f"{seconds['finetune']:.1f} s / {epochs['finetune']:.0f} epochs"
    )
    for r in (1, 2):
        assert psnr["finetune"][r] >= psnr["retrain"][r] - 1.0
    assert epochs["finetune"] <= 0.5 * epochs["retrain"]
    assert seconds["finetune"] < 0.6 * seconds["retrain"]


# --- B = 4 (batch gradients, permutation-invariant loss) -----------------------------------


@pytest.mark.slow
def test_lti_learns_at_batch_4(one_thread: None) -> None:
    """`cpu-batch` at CI size (one hidden layer of 500, 24 epochs, 1,500 aux images) on 128
    random MNIST-5k images in batches of 4. Measured: LTI 12.49 dB, aux-mean 11.75 dB,
    class-mean 12.80 dB (with the `cpu` preset's Adam 1e-3 LTI stays at the aux-mean level:
    11.68 dB, early stop at epoch 8). At this scale LTI learns about the labels but not yet
    what lies beyond them: it does not beat class-mean (docs/reproduction.md)."""
    from fedleak.attacks.baseline import ClassMeanBaseline
    from fedleak.metrics import assign

    fd = build_federated_data("mnist5k", None, 1, "iid", 0, aux_size=1500)
    aux_x, aux_y = auxiliary(fd)
    know = AttackerKnowledge(aux_x, aux_y, (1, 28, 28), 10)
    # MNIST-5k is stored sorted by class: the client's batches are a random draw.
    chosen = torch.tensor(np.random.default_rng(0).choice(fd.partitions[0], 128, replace=False))
    x, y = fd.dataset.train_x[chosen], fd.dataset.train_y[chosen]
    weights = state(LENET)
    observations = [
        observe(
            LENET,
            weights,
            "none",
            x[i : i + 4],
            y[i : i + 4],
            training=LocalTraining("fedsgd", 4),
        )
        for i in range(0, 128, 4)
    ]
    cfg = lti_config("cpu-batch", hidden=(500,), epochs=24, lr_drop_epoch=16, patience=24)

    def psnr(attack: object) -> float:
        values = []
        for i, obs in enumerate(observations):
            recon = attack.reconstruct(obs, know, NO_LIMIT).inputs
            truth = x[4 * i : 4 * i + 4]
            r, t = assign(recon, truth)
            values.append(psnr_per_image(recon[r], truth[t], 1.0))
        return float(torch.cat(values).mean())

    lti = LearningToInvert(cfg, seed=0)
    scores = {
        "lti": psnr(lti),
        "aux-mean": psnr(build_attack("aux-mean")),
        "class-mean": psnr(ClassMeanBaseline()),
    }
    print(f"B=4: {scores}, LTI trained {lti.keeper.score:.2f} dB on validation")
    assert scores["lti"] >= scores["aux-mean"] + 0.4
