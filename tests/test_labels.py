"""Label recovery on the untrained sigmoid LeNet (DLG's uniform initialisation), MNIST-5k.

Measured on this set-up: iDLG 100% on single samples (also under sign compression, 90%
pruning and FedAvg deltas); batch rows with auxiliary statistics 100% on batches of 8
distinct labels (the plain negative-row rule: 4%, because this model puts ~0.7 of its softmax
mass on one class); counts: the exact multiset on 40 of 40 batches of 8 with repeated labels.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from fedleak.attacks import labels as L
from fedleak.attacks.optimization.attacks import prepare
from fedleak.attacks.optimization.config import IGConfig
from fedleak.attacks.registry import build_attack
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation
from fedleak.data import load_dataset
from fedleak.defenses import parse_defense_spec
from fedleak.models import ModelSpec, build_model
from fedleak.training.gradients import per_sample_gradients
from fedleak.training.update import LocalTraining, compute_update

NUM_CLASSES = 10


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mnist() -> tuple[torch.Tensor, torch.Tensor]:
    data = load_dataset("mnist5k")
    return data.train_x, data.train_y


@pytest.fixture(scope="module")
def split(mnist: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint index sets: auxiliary data (500 random images) and a pool for private batches."""
    order = torch.randperm(mnist[0].shape[0], generator=torch.Generator().manual_seed(11))
    return order[:500], order[500:]


@pytest.fixture(scope="module")
def spec(mnist: tuple[torch.Tensor, torch.Tensor]) -> ModelSpec:
    return ModelSpec("lenet", tuple(mnist[0].shape[1:]), NUM_CLASSES, init="uniform", seed=0)


def _update(spec, x, y, defense="none", mode="fedsgd", share="batch", batch_size=None):
    training = LocalTraining(
        mode, batch_size or x.shape[0], 2 if mode == "fedavg" else 1, 0.1, share
    )
    model = build_model(spec)
    return model, compute_update(
        model,
        x,
        y,
        NUM_CLASSES,
        parse_defense_spec(defense),
        training,
        torch.Generator().manual_seed(0),
    )


def _batches(mnist, pool, count, distinct, seed):
    """`count` batches of 8 from the pool: distinct labels, or drawn from 2-5 classes."""
    return [(mnist[0][i], mnist[1][i]) for i in _batch_indices(mnist, pool, count, distinct, seed)]


def _batch_indices(mnist, pool, count, distinct, seed):
    y = mnist[1]
    g = torch.Generator().manual_seed(seed)
    pool_labels = y[pool]
    out = []
    for _ in range(count):
        if distinct:
            labels = torch.randperm(NUM_CLASSES, generator=g)[:8]
        else:
            classes = torch.randperm(NUM_CLASSES, generator=g)[
                : int(torch.randint(2, 6, (1,), generator=g))
            ]
            labels = classes[torch.randint(0, classes.numel(), (8,), generator=g)]
        index = []
        for label in labels.tolist():
            candidates = pool[pool_labels == label]
            index.append(candidates[torch.randint(0, candidates.numel(), (1,), generator=g)])
        out.append(torch.cat(index))
    return out


def _batch_gradients(spec, mnist, batches):
    """FedSGD gradients of many batches from one vectorised per-sample call (no BatchNorm:
    a batch's mean gradient is the mean of its samples' gradients)."""
    index = torch.cat(batches)
    per_sample = per_sample_gradients(build_model(spec), mnist[0][index], mnist[1][index])
    return [
        {name: g[k * 8 : (k + 1) * 8].mean(dim=0) for name, g in per_sample.items()}
        for k in range(len(batches))
    ]


@pytest.mark.parametrize(
    ("defense", "mode"),
    [("none", "fedsgd"), ("sign", "fedsgd"), ("prune:0.9", "fedsgd"), ("none", "fedavg")],
)
def test_idlg_recovers_every_single_sample_label(mnist, split, spec, defense, mode):
    x, y = mnist
    index = split[1][:40]
    model = build_model(spec)
    layer = L.find_last_layer(model, NUM_CLASSES)
    if mode == "fedsgd":
        _, update = _update(spec, x[index], y[index], defense, share="per-sample")
        weight = update.per_sample[layer.weight]
    else:  # one FedAvg delta per sample: -delta is a positive multiple of summed gradients
        weight = torch.stack(
            [
                -_update(spec, x[i : i + 1], y[i : i + 1], defense, mode="fedavg")[1].update[
                    layer.weight
                ]
                for i in index.tolist()
            ]
        )
    assert torch.equal(L.idlg(weight), y[index])


@pytest.mark.parametrize(
    ("defense", "aux"),
    [("prune:0.9", False), ("prune:0.99", False), ("gauss:0.01", False), ("gauss:0.01", True)],
)
def test_idlg_through_the_attack_reads_every_single_sample_label(mnist, split, spec, defense, aux):
    """What the attack makes of the rows: the rule it uses where the rows' odd one out is not
    told (a pruned sample; any noisy one) and the features' sign from the auxiliary data's
    mass under noise (audit DY: reading every row sum as settled, or the mass's sign flipped,
    left every test green and got 0.28 and 0.0 of these right)."""
    x, y = mnist
    index = split[1][:32]
    model, update = _update(spec, x[index], y[index], defense, share="per-sample")
    observation = dataclasses.replace(_observation(spec, model, update, defense, 32), batch_size=1)
    given = split[0] if aux else split[0][:0]
    knowledge = AttackerKnowledge(x[given], y[given], tuple(x.shape[1:]), NUM_CLASSES)
    result = build_attack("ig", {"labels": "idlg"}).reconstruct(
        observation, knowledge, Budget(1, 60.0)
    )
    assert result.label_method == "idlg"
    assert torch.equal(result.labels.flatten(), y[index])


def test_batch_rows_recover_distinct_labels(mnist, split, spec):
    model = build_model(spec)
    layer = L.find_last_layer(model, NUM_CLASSES)
    aux = split[0]
    stats = L.auxiliary_statistics(model, layer, mnist[0][aux], mnist[1][aux], NUM_CLASSES)
    hits, plain_hits = 0, 0
    batches = _batch_indices(mnist, split[1], 25, distinct=True, seed=1)
    for index, update in zip(batches, _batch_gradients(spec, mnist, batches), strict=True):
        yb = mnist[1][index]
        weight = update[layer.weight].unsqueeze(0)
        hits += torch.equal(L.batch_rows(weight, 8, stats)[0], yb.sort().values)
        plain_hits += torch.equal(L.batch_rows(weight, 8)[0], yb.sort().values)
    assert hits == len(batches)
    # Why the statistics matter on this model: the plain negative-row rule mostly fails.
    assert plain_hits < len(batches) // 2


def test_counts_recover_label_multisets_with_repeats(mnist, split, spec):
    model = build_model(spec)
    layer = L.find_last_layer(model, NUM_CLASSES)
    aux = split[0]
    stats = L.auxiliary_statistics(model, layer, mnist[0][aux], mnist[1][aux], NUM_CLASSES)
    assert stats.mass_cv < 0.05  # the premise of the method: feature mass barely varies
    batches = _batch_indices(mnist, split[1], 40, distinct=False, seed=2)
    generator = torch.Generator().manual_seed(0)
    exact = 0
    for index, update in zip(batches, _batch_gradients(spec, mnist, batches), strict=True):
        yb = mnist[1][index]
        counts = L.label_counts(update[layer.weight], update[layer.bias], 8, stats, generator)
        assert int(counts.sum()) == 8 and bool((counts >= 0).all())
        exact += torch.equal(L.counts_to_labels(counts), yb.sort().values)
    assert exact / len(batches) >= 0.9  # measured 40/40


def test_counts_are_deterministic_under_the_seed(mnist, split, spec):
    model = build_model(spec)
    layer = L.find_last_layer(model, NUM_CLASSES)
    aux = split[0]
    stats = L.auxiliary_statistics(model, layer, mnist[0][aux], mnist[1][aux], NUM_CLASSES)
    ((xb, yb),) = _batches(mnist, split[1], 1, distinct=False, seed=3)
    update = _update(spec, xb, yb)[1].update
    # A deliberately bad start (all mass on one class) makes the search do the work.
    runs = [
        L.label_counts(
            update[layer.weight],
            update[layer.bias],
            8,
            stats,
            torch.Generator().manual_seed(7),
            population=16,
            generations=40,
        )
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def test_distinct_count_rows_are_torchs_unique_rows():
    """The search's fast de-duplication keeps torch's `unique(dim=0)`: the same rows in the
    same (lexicographic) order, so the survivors and their ties are unchanged."""
    g = torch.Generator().manual_seed(0)
    for classes, batch in ((10, 8), (3, 64), (100, 32)):  # the last too wide for one integer
        rows = torch.randint(0, 3, (128, classes), generator=g).clamp(max=batch)
        rows = torch.cat([rows, rows[:40]])
        assert torch.equal(L._distinct_rows(rows, batch), rows.unique(dim=0))


def test_the_count_search_draws_only_from_its_generator():
    """A short search on a large batch stops before it converges, so its result depends on
    its draws: the same generator seed gives the same counts whatever the global RNG holds,
    and other seeds give others (audit DJ5: a draw off the generator passed the test above)."""
    g = torch.Generator().manual_seed(0)
    weight, bias = 0.05 * torch.randn(10, 20, generator=g), 0.05 * torch.randn(10, generator=g)
    stats = L.AuxiliaryStatistics(1.0, 0.1, torch.softmax(torch.randn(10, 10, generator=g), 1))

    def counts(seed: int, global_seed: int) -> tuple[int, ...]:
        torch.manual_seed(global_seed)
        drawn = torch.Generator().manual_seed(seed)
        return tuple(L.label_counts(weight, bias, 64, stats, drawn, 16, 10).tolist())

    assert len({counts(7, global_seed) for global_seed in range(4)}) == 1
    assert len({counts(seed, 0) for seed in range(4)}) > 1


def test_counts_to_labels_and_last_layer():
    assert L.counts_to_labels(torch.tensor([2, 0, 1])).tolist() == [0, 0, 2]
    model = build_model(ModelSpec("mlp", (1, 4, 4), 3))
    layer = L.find_last_layer(model, 3)
    assert layer.weight == "layers.4.weight" and layer.bias == "layers.4.bias"
    with pytest.raises(L.LabelRecoveryError, match="7 rows"):
        L.find_last_layer(model, 7)


class _HeadDeclaredFirst(torch.nn.Module):
    """A classifier whose head is registered before a hidden layer exactly as wide."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.head = torch.nn.Linear(classes, classes)
        self.hidden = torch.nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.sigmoid(self.hidden(x.flatten(1))))


def test_the_last_layer_is_the_one_that_runs_last_not_the_last_registered(mnist):
    x, y = mnist[0][:20], mnist[1][:20]
    model = _HeadDeclaredFirst(x[0].numel(), NUM_CLASSES)
    layer = L.find_last_layer(model, NUM_CLASSES, tuple(x.shape[1:]))
    assert layer == L.LastLayer("head.weight", "head.bias")
    assert L.find_last_layer(model, NUM_CLASSES).weight == "hidden.weight"  # no shape to run
    rows = []
    for sample, label in zip(x, y, strict=True):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(sample[None]), label[None]).backward()
        rows.append(model.get_parameter(layer.weight).grad.clone())
    assert torch.equal(L.idlg(torch.stack(rows)), y)


def _observation(spec, model, update, defense, batch):
    return Observation(
        round=1,
        client_id=0,
        model=spec,
        weights=model.state_dict(),
        update=update.update,
        update_kind="gradient",
        num_examples=batch,
        batch_size=batch,
        local_steps=1,
        learning_rate=0.1,
        defense=defense,
        per_sample_updates=update.per_sample,
    )


@pytest.mark.parametrize(
    ("attack", "defense", "share", "method"),
    [
        ("ig", "none", "per-sample", "idlg"),
        ("ig", "none", "batch", "counts"),
        ("ig", "sign", "batch", "counts"),
        ("ig", "gauss:0.01+sign", "batch", "rows"),
        ("ig", "prune:0.9+sign", "batch", "rows"),
        ("dlg", "none", "batch", "joint"),
        ("ig", "mixup:2", "batch", "joint"),
    ],
)
def test_attacks_name_the_label_method_they_used(
    mnist, split, spec, attack, defense, share, method
):
    ((xb, yb),) = _batches(mnist, split[1], 1, distinct=True, seed=4)
    xb, yb = xb[:4], yb[:4]
    model, update = _update(spec, xb, yb, defense, share=share)
    aux = split[0]
    knowledge = AttackerKnowledge(mnist[0][aux], mnist[1][aux], tuple(xb.shape[1:]), NUM_CLASSES)
    result = build_attack(attack).reconstruct(
        _observation(spec, model, update, defense, 4), knowledge, Budget(2, 60.0)
    )
    assert result.label_method == method
    assert result.labels is not None and result.labels.shape == (4,)
    assert result.inputs.shape == xb.shape
    if method in ("idlg", "counts"):
        assert sorted(result.labels.tolist()) == sorted(yb.tolist())


@pytest.fixture(scope="module")
def trained(mnist, split, spec) -> torch.nn.Module:
    """The LeNet after 1,000 SGD steps (lr 0.15, batches of 32) on the private pool: a model
    whose softmax no longer spreads over the classes (0.911 test accuracy in the audit that
    measured the failure below)."""
    model = build_model(spec)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.15)
    generator = torch.Generator().manual_seed(9)
    pool = split[1]
    for _ in range(1000):
        index = pool[torch.randint(0, pool.numel(), (32,), generator=generator)]
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(mnist[0][index]), mnist[1][index]).backward()
        optimiser.step()
    return model


def _multiset_accuracy(found: torch.Tensor, truth: torch.Tensor) -> float:
    return sum(min(int((found == k).sum()), int((truth == k).sum())) for k in range(10)) / 8


@pytest.mark.parametrize("distinct", [True, False])
def test_counts_keep_the_classes_only_a_present_label_explains_on_a_trained_model(
    mnist, split, trained, distinct
):
    """A class whose row sums below zero is in the batch (an absent class's row is a sum of
    p_ic h_i >= 0); the counts' estimate missed such classes once the model had trained."""
    layer = L.find_last_layer(trained, NUM_CLASSES)
    aux = split[0]
    stats = L.auxiliary_statistics(trained, layer, mnist[0][aux], mnist[1][aux], NUM_CLASSES)
    batches = _batch_indices(mnist, split[1], 40, distinct=distinct, seed=4)
    accuracy = {False: 0.0, True: 0.0}
    for k, index in enumerate(batches):
        model = copy.deepcopy(trained)
        update = compute_update(
            model,
            mnist[0][index],
            mnist[1][index],
            NUM_CLASSES,
            parse_defense_spec("none"),
            LocalTraining("fedsgd", 8),
            torch.Generator().manual_seed(k),
        ).update
        for constrained in (False, True):
            counts = L.label_counts(
                update[layer.weight],
                update[layer.bias],
                8,
                stats,
                torch.Generator().manual_seed(k),
                present_if_negative=constrained,
            )
            found = L.counts_to_labels(counts)
            accuracy[constrained] += _multiset_accuracy(found, mnist[1][index]) / len(batches)
    # Measured: distinct labels 0.544 -> 0.647, repeated 0.622 -> 0.644 (the plain
    # negative-row rule gets 0.816 on the distinct batches of this model: the counts'
    # softmax model is what a trained model strains, see `labels.py`).
    assert accuracy[True] >= accuracy[False] + (0.08 if distinct else 0.0)


@pytest.mark.parametrize("distinct", [True, False])
def test_sign_counts_read_repeated_labels_the_negative_rows_miss(mnist, split, spec, distinct):
    """Under sign compression every absent class's row sums to +d, so the negative-row rule
    pads a batch of few classes with arbitrary ones; counts calibrated on simulated auxiliary
    batches read how many samples each class holds from the share of negative signs."""
    layer = L.find_last_layer(build_model(spec), NUM_CLASSES)
    aux = split[0]
    forward = L.auxiliary_forward(build_model(spec), layer, mnist[0][aux], mnist[1][aux])
    calibration = L.sign_calibration(forward, NUM_CLASSES, 8, torch.Generator().manual_seed(1))
    batches = _batch_indices(mnist, split[1], 40, distinct=distinct, seed=4)
    rows = counts = 0.0
    for index in batches:
        _, update = _update(spec, mnist[0][index], mnist[1][index], "sign")
        signs = update.update[layer.weight]
        assert set(signs.unique().tolist()) <= {-1.0, 0.0, 1.0}
        found = L.counts_to_labels(L.sign_counts(signs, 8, calibration, True))
        assert found.numel() == 8
        rows += _multiset_accuracy(L.batch_rows(signs[None], 8)[0], mnist[1][index]) / 40
        counts += _multiset_accuracy(found, mnist[1][index]) / 40
    # Measured: distinct labels 0.944 -> 1.000, repeated 0.406 -> 0.753 (rows -> counts).
    assert counts >= rows + (0.04 if distinct else 0.25)


def test_sign_calibration_follows_its_seed(mnist, split, spec):
    model = build_model(spec)
    layer = L.find_last_layer(model, NUM_CLASSES)
    x, y = mnist[0][split[0]], mnist[1][split[0]]

    forward = L.auxiliary_forward(model, layer, x, y)

    def calibrate(seed: int) -> L.SignCalibration:
        generator = torch.Generator().manual_seed(seed)
        return L.sign_calibration(forward, NUM_CLASSES, 8, generator, batches=64)

    first, again, other = calibrate(3), calibrate(3), calibrate(4)
    assert torch.equal(first.negative, again.negative) and torch.equal(first.counts, again.counts)
    assert not torch.equal(first.counts, other.counts)
    assert first.counts.sum(dim=1).eq(8).all() and first.negative.shape == (64, NUM_CLASSES)
    assert ((first.negative >= 0) & (first.negative <= 1)).all()


def test_a_sum_of_sign_releases_keeps_the_negative_rows(mnist, split, spec):
    """The aggregate of two clients' signs holds -2, 0 and 2, which no simulated release of
    one batch does: counts calibrated on single releases got 0.49 of the labels there, the
    rows 0.73 (audit DF1), so auto keeps the rows."""
    ((xb, yb),) = _batches(mnist, split[1], 1, distinct=True, seed=4)
    halves = [_update(spec, xb[i : i + 2], yb[i : i + 2], "sign")[1].update for i in (0, 2)]
    summed = {name: halves[0][name] + halves[1][name] for name in halves[0]}
    observation = Observation(
        round=1,
        client_id=-1,
        model=spec,
        weights=build_model(spec).state_dict(),
        update=summed,
        update_kind="gradient",
        num_examples=4,
        batch_size=2,
        local_steps=1,
        learning_rate=0.1,
        defense="sign",
        contributors=2,
    )
    aux = split[0]
    knowledge = AttackerKnowledge(mnist[0][aux], mnist[1][aux], tuple(xb.shape[1:]), NUM_CLASSES)
    assert prepare(observation, knowledge, IGConfig(), "auto", 0).label_method == "rows"
    one = dataclasses.replace(observation, update=halves[0], num_examples=2, contributors=1)
    assert prepare(one, knowledge, IGConfig(), "auto", 0).label_method == "counts"


def _prepared(spec, model, xb, yb, aux, mnist, seed):
    """The shipped label path: `prepare` with labels=auto on one FedSGD batch."""
    update = compute_update(
        copy.deepcopy(model),
        xb,
        yb,
        NUM_CLASSES,
        parse_defense_spec("none"),
        LocalTraining("fedsgd", xb.shape[0]),
        torch.Generator().manual_seed(seed),
    )
    observation = dataclasses.replace(
        _observation(spec, model, update, "none", xb.shape[0]), weights=model.state_dict()
    )
    knowledge = AttackerKnowledge(mnist[0][aux], mnist[1][aux], tuple(xb.shape[1:]), NUM_CLASSES)
    return prepare(observation, knowledge, IGConfig(), "auto", seed), update


def test_counts_take_the_rule_that_reads_simulated_batches_best(mnist, split, spec, trained):
    """The count equations were exact on the untrained LeNet but got 0.65-0.81 of the labels
    once it had trained, where the sign calibration got 0.79-0.98: simulated batches of the
    auxiliary data choose between them for the model at hand."""
    aux = split[0]
    batches = _batch_indices(mnist, split[1], 8, distinct=True, seed=4)
    layer = L.find_last_layer(trained, NUM_CLASSES)
    stats = L.auxiliary_statistics(trained, layer, mnist[0][aux], mnist[1][aux], NUM_CLASSES)
    shipped = equations = 0.0
    for k, index in enumerate(batches):
        xb, yb = mnist[0][index], mnist[1][index]
        problem, update = _prepared(spec, trained, xb, yb, aux, mnist, k)
        scores = problem.diagnostics
        assert problem.label_method == "counts"
        assert scores["label_rule_signs"] > scores["label_rule_equations"]
        shipped += _multiset_accuracy(problem.labels[0], yb) / len(batches)
        alone = L.label_counts(
            update.update[layer.weight],
            update.update[layer.bias],
            8,
            stats,
            torch.Generator().manual_seed(k),
            present_if_negative=True,
        )
        equations += _multiset_accuracy(L.counts_to_labels(alone), yb) / len(batches)
    # Measured: the equations alone 0.625, the chosen rule 0.922.
    assert shipped >= equations + 0.15
    untrained = build_model(spec)
    for k, index in enumerate(batches[:2]):
        problem, _ = _prepared(spec, untrained, mnist[0][index], mnist[1][index], aux, mnist, k)
        scores = problem.diagnostics
        assert scores["label_rule_equations"] >= scores["label_rule_signs"]
        assert sorted(problem.labels[0].tolist()) == sorted(mnist[1][index].tolist())


def _tanh_net() -> torch.nn.Module:
    """A custom classifier whose last layer reads tanh features: their mass is negative on
    MNIST here, so every row of the last layer's gradient has the sign the rules expect
    flipped (audit DS1: iDLG got 0 of 10 labels)."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 12, 5, padding=2, stride=2),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(12 * 14 * 14, NUM_CLASSES),
    )


@pytest.mark.parametrize("bias", [True, False])
def test_labels_are_read_whichever_sign_the_last_layers_features_have(mnist, split, bias):
    import fedleak

    x, y = mnist
    model = _tanh_net()
    if not bias:
        model[-1].bias = None
    first = [int((y == c).nonzero()[0]) for c in range(NUM_CLASSES)]
    mass = model[:-1](x[first]).sum(dim=1)
    assert (mass < 0).all()  # the case the rules once read upside down
    aux = split[0]
    found = []
    for i in first:
        grads = torch.autograd.grad(
            torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]),
            model.parameters(),
        )
        observation = fedleak.observe(model, grads, input_shape=(1, 28, 28), num_examples=1)
        # Without auxiliary data iDLG reads the sign off the bias; without a bias, off the
        # auxiliary data's features.
        knowledge = {} if bias else {"aux_inputs": x[aux], "aux_labels": y[aux]}
        result = fedleak.reconstruct(build_attack("ig"), observation, max_iterations=1, **knowledge)
        assert result.label_method == "idlg"
        found.append(int(result.labels[0]))
    assert found == list(range(NUM_CLASSES))
    # Distinct labels in one batch, without auxiliary data: the most negative rows, so oriented.
    if bias:
        batch = first[1:8:2]
        grads = torch.autograd.grad(
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]), model.parameters()
        )
        observation = fedleak.observe(model, grads, input_shape=(1, 28, 28), num_examples=4)
        result = fedleak.reconstruct(build_attack("ig"), observation, max_iterations=1)
        assert result.label_method == "rows"
        assert sorted(result.labels.tolist()) == [1, 3, 5, 7]


def test_noise_leaves_the_sign_of_the_built_in_models_features_alone(mnist, split, spec):
    """Under DP-SGD's noise the bias no longer tells the features' sign (about one unit of
    noise per coordinate flips it): without auxiliary data the rows read as for ReLU and
    sigmoid features, as before the sign was read at all."""
    x, y = mnist
    index = split[1][:24]
    model, update = _update(spec, x[index], y[index], "dpsgd:1:0.5", share="per-sample")
    layer = L.find_last_layer(model, NUM_CLASSES)
    observation = dataclasses.replace(
        _observation(spec, model, update, "dpsgd:1:0.5", 24), num_examples=24, batch_size=1
    )
    no_aux = AttackerKnowledge(x[:0], y[:0], tuple(x.shape[1:]), NUM_CLASSES)
    result = build_attack("ig", {"labels": "idlg"}).reconstruct(
        observation, no_aux, Budget(1, 60.0)
    )
    assert result.label_method == "idlg"
    assert torch.equal(result.labels, L.idlg(update.per_sample[layer.weight]))


@pytest.mark.parametrize(("defense", "bar"), [("sign", 36), ("none", 48)])
def test_sign_counts_of_tanh_features_do_not_force_every_class_present(mnist, split, defense, bar):
    """A coordinate of tanh features is negative for absent classes too: read as "present",
    every class was forced to hold a sample of a batch of 16 from 3 classes (27 of 48 labels
    right, against 48 without the defense; audit DU1). Without it the rows are read with the
    features' sign (40 of 48 when it was left out, audit DY)."""
    import fedleak

    x, y = mnist
    model = _tanh_net()
    g = torch.Generator().manual_seed(3)
    aux = torch.randperm(x.shape[0], generator=g)[:300]
    right = 0
    for _ in range(3):
        classes = torch.randperm(NUM_CLASSES, generator=g)[:3]
        index = []
        for c in classes[torch.randint(0, 3, (16,), generator=g)].tolist():
            pool = (y == c).nonzero().flatten()
            index.append(int(pool[torch.randint(0, pool.numel(), (1,), generator=g)]))
        batch = torch.tensor(index)
        grads = torch.autograd.grad(
            torch.nn.functional.cross_entropy(model(x[batch]), y[batch]), model.parameters()
        )
        observation = fedleak.observe(
            model,
            [t.sign() for t in grads] if defense == "sign" else grads,
            input_shape=(1, 28, 28),
            num_examples=16,
            defense=defense,
        )
        result = fedleak.reconstruct(
            build_attack("ig", {"labels": "counts"}), observation, x[aux], y[aux], max_iterations=1
        )
        truth = torch.bincount(y[batch], minlength=NUM_CLASSES)
        found = torch.bincount(result.labels.flatten(), minlength=NUM_CLASSES)
        assert int((found > 0).sum()) < NUM_CLASSES
        right += int(torch.minimum(truth, found).sum())
    print(f"tanh features under {defense}: {right} of 48 labels right")
    assert right >= bar


@pytest.fixture(scope="module")
def mixed_signs(mnist, split) -> tuple[torch.nn.Module, torch.Tensor, dict[str, torch.Tensor]]:
    """A tanh classifier without bias whose samples' feature masses differ in sign, 32
    private samples and each one's gradient [32, ...] by parameter name."""
    x, y = mnist
    torch.manual_seed(1)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 12, 5, padding=2, stride=2),
        torch.nn.Tanh(),
        torch.nn.Conv2d(12, 12, 5, padding=2, stride=2),
        torch.nn.Tanh(),
        torch.nn.Flatten(),
        torch.nn.Linear(12 * 7 * 7, NUM_CLASSES, bias=False),
    )
    for parameter in model.parameters():
        torch.nn.init.uniform_(parameter, -0.5, 0.5)
    index = split[1][:32]
    masses = model[:-1](x[index]).sum(dim=1)
    assert (masses < 0).any() and (masses > 0).any()  # the case one sign cannot read
    per_sample: dict[str, list[torch.Tensor]] = {}
    for i in index.tolist():
        grads = torch.autograd.grad(
            torch.nn.functional.cross_entropy(model(x[i : i + 1]), y[i : i + 1]),
            model.parameters(),
        )
        for (name, _), grad in zip(model.named_parameters(), grads, strict=True):
            per_sample.setdefault(name, []).append(grad)
    return model, index, {n: torch.stack(g) for n, g in per_sample.items()}


def _idlg_labels(mnist, split, model, per_sample, defense) -> torch.Tensor:
    import fedleak

    x, y = mnist
    # The batch update as a client releases it beside its samples' (a sign of the mean, not
    # the mean of signs: observe refuses what the defense cannot have released).
    mean = {n: g.mean(0) for n, g in per_sample.items()}
    observation = fedleak.observe(
        model,
        parse_defense_spec(defense).share(mean, 32, torch.Generator()),
        input_shape=(1, 28, 28),
        num_examples=32,
        per_sample_updates=per_sample,
        defense=defense,
    )
    aux = split[0]
    result = fedleak.reconstruct(
        build_attack("idlg"), observation, x[aux], y[aux], max_iterations=1
    )
    assert result.label_method == "idlg"
    return result.labels.flatten()


@pytest.mark.parametrize(
    "defense", ["none", "sign", "prune:0.5", "prune:0.8", "prune:0.9", "prune:0.99"]
)
def test_single_sample_labels_follow_each_samples_own_feature_sign(
    mnist, split, mixed_signs, defense
):
    """Without a bias, the tanh features of some samples sum negative and of others positive:
    one sign for all (the aux data's) got those samples wrong (0.53 in a run; audit DT1). The
    rows of one sample's update tell its own sign: every label is right, under sign too, and
    under pruning, which may leave the true row and one other (0.59 right at prune:0.85
    before the larger norm settled such a tie; audit DY1)."""
    model, index, per_sample = mixed_signs
    released = parse_defense_spec(defense).share_each(per_sample, torch.Generator())
    assert torch.equal(_idlg_labels(mnist, split, model, released, defense), mnist[1][index])


def test_rows_that_tell_nothing_leave_the_others_told(mnist, split, mixed_signs):
    """A sample whose rows are one vector and its negative (a tie of counts and of norms) is
    read by the row sums with the auxiliary data's sign; the others keep what their own rows
    told (the sums for all got 0.59 of them right in audit DY)."""
    model, index, per_sample = mixed_signs
    tied = {n: g.clone() for n, g in per_sample.items()}
    last = tied["5.weight"]
    with torch.no_grad():
        mass = float(model[:-1](mnist[0][split[0]]).sum(dim=1).mean())
    sign = 1.0 if mass >= 0 else -1.0
    row = last[1, 0] if float(last[1, 0].sum()) * sign < 0 else -last[1, 0]
    last[0] = 0.0
    last[0, 3], last[0, 7] = row, -row  # the signed sums choose class 3
    labels = _idlg_labels(mnist, split, model, tied, "none")
    assert torch.equal(labels[1:], mnist[1][index][1:])
    assert int(labels[0]) == 3


def test_the_odd_row_out_is_told_by_counts_then_by_norms():
    v = torch.tensor([1.0, 2.0, 0.5])
    two_left = torch.stack([-3 * v, 2 * v, torch.zeros(3)])  # pruning left the true row and one
    one_left = torch.stack([torch.zeros(3), torch.zeros(3), v])
    even = torch.stack([-v, v, torch.zeros(3)])  # two classes: no norm tells them apart
    signs = torch.stack([-v.sign(), v.sign(), v.sign()])  # sign compression: counts tell
    labels, told = L.odd_row_out(torch.stack([two_left, one_left, even, signs, 0 * even]))
    assert told.tolist() == [True, True, False, True, False]
    assert labels[:2].tolist() == [0, 2] and int(labels[3]) == 0


def _ln_head() -> torch.nn.Module:
    """A LayerNorm right before the classifier (as in vision transformers): its features sum
    to about zero, so the auxiliary mean mass stands for no sample's."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 5, padding=2, stride=2),
        torch.nn.Sigmoid(),
        torch.nn.Flatten(),
        torch.nn.Linear(8 * 14 * 14, 32),
        torch.nn.LayerNorm(32),
        torch.nn.Linear(32, NUM_CLASSES),
    )


def test_counts_rest_on_the_bias_where_the_feature_masses_vary_too_much(mnist, split):
    """Divided by a mean mass of about 0.02, the rows' equations swamped the bias's, which is
    exact alone: 0.75 of the labels right on batches of 8 (audit DT2)."""
    import fedleak

    x, y = mnist
    aux = split[0][:300]
    right = 0
    for trial in range(5):
        index = split[1][8 * trial : 8 * trial + 8]
        torch.manual_seed(trial)
        model = _ln_head().train()
        grads = torch.autograd.grad(
            torch.nn.functional.cross_entropy(model(x[index]), y[index]), model.parameters()
        )
        observation = fedleak.observe(model, grads, input_shape=(1, 28, 28), num_examples=8)
        result = fedleak.reconstruct(
            build_attack("idlg"), observation, x[aux], y[aux], max_iterations=1
        )
        assert result.label_method == "counts"
        assert result.diagnostics["aux_feature_mass_cv"] > L.MASS_CV_LIMIT
        truth = torch.bincount(y[index], minlength=NUM_CLASSES)
        found = torch.bincount(result.labels.flatten(), minlength=NUM_CLASSES)
        right += int(torch.minimum(truth, found).sum())
    assert right == 40


def test_a_classifier_whose_weight_is_read_directly_is_refused_in_one_line():
    """A cosine classifier reads its head's weight without running the head: every attack
    that reads labels off it failed with torch.cat's 'expected a non-empty list' (DT3)."""

    class CosineHead(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 8, 5, padding=2, stride=2)
            self.head = torch.nn.Linear(8 * 14 * 14, NUM_CLASSES, bias=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            z = torch.nn.functional.normalize(torch.sigmoid(self.conv(x)).flatten(1), dim=1)
            return 10 * z @ torch.nn.functional.normalize(self.head.weight, dim=1).T

    with pytest.raises(L.LabelRecoveryError, match=r"^no linear classifier whose forward runs"):
        L.find_last_layer(CosineHead(), NUM_CLASSES, (1, 28, 28))
