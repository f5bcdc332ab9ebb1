"""Reference baselines: aux-mean ignores the update, class-mean reads only the labels from it.

Both are drawn as floors (`reference = True`) and never ranked; class-mean must equal the aux
class means of the labels it recovers, and recover them as the optimisation attacks do.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedleak.attacks.baseline import ClassMeanBaseline, class_means
from fedleak.attacks.registry import build_attack
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation
from fedleak.data import auxiliary, build_federated_data
from fedleak.defenses import parse_defense_spec
from fedleak.metrics import assign
from fedleak.models import ModelSpec, build_model
from fedleak.training.update import LocalTraining, compute_update

SPEC = ModelSpec("lenet", (1, 28, 28), 10, init="uniform", seed=0)
BUDGET = Budget(1, 60.0)


@pytest.fixture(scope="module")
def mnist() -> dict[str, torch.Tensor]:
    fd = build_federated_data("mnist5k", None, 1, "iid", 0, aux_size=1000)
    aux_x, aux_y = auxiliary(fd)
    # MNIST-5k is stored sorted by class: draw the client's images at random.
    chosen = np.random.default_rng(0).choice(fd.partitions[0], 32, replace=False)
    client = torch.tensor(chosen)
    return {
        "aux_x": aux_x,
        "aux_y": aux_y,
        "x": fd.dataset.train_x[client],
        "y": fd.dataset.train_y[client],
    }


def _knowledge(mnist: dict[str, torch.Tensor]) -> AttackerKnowledge:
    return AttackerKnowledge(mnist["aux_x"], mnist["aux_y"], (1, 28, 28), 10)


def _observe(x: torch.Tensor, y: torch.Tensor, defense: str, share: str) -> Observation:
    model = build_model(SPEC)
    weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    update = compute_update(
        model,
        x,
        y,
        10,
        parse_defense_spec(defense),
        LocalTraining("fedsgd", x.shape[0], share=share),
        torch.Generator().manual_seed(0),
    )
    return Observation(
        round=1,
        client_id=0,
        model=SPEC,
        weights=weights,
        update=update.update,
        update_kind="gradient",
        num_examples=x.shape[0],
        batch_size=x.shape[0],
        local_steps=1,
        learning_rate=0.1,
        defense=defense,
        per_sample_updates=update.per_sample,
    )


def _psnr(recon: torch.Tensor, truth: torch.Tensor) -> float:
    r, t = assign(recon, truth, metric="mse")
    mse = (recon[r] - truth[t]).flatten(1).pow(2).mean(1)
    return float((10 * torch.log10(1 / mse)).mean())


def test_references_are_registered_and_take_no_parameters() -> None:
    attack = build_attack("class-mean", seed=3)
    assert isinstance(attack, ClassMeanBaseline) and attack.reference is True
    with pytest.raises(ValueError, match="'class-mean' takes no parameters"):
        build_attack("class-mean", {"x": 1})


def test_class_means_are_the_aux_means_of_each_class(mnist: dict[str, torch.Tensor]) -> None:
    know = _knowledge(mnist)
    means = class_means(know)
    for k in (0, 7):
        torch.testing.assert_close(means[k], mnist["aux_x"][mnist["aux_y"] == k].mean(0))
    missing = AttackerKnowledge(
        know.aux_inputs[:5], torch.zeros(5, dtype=torch.long), (1, 28, 28), 3
    )
    torch.testing.assert_close(class_means(missing)[2], know.aux_inputs[:5].mean(0))


@pytest.mark.parametrize(("share", "batch"), [("per-sample", 8), ("batch", 4)])
def test_class_mean_pastes_the_class_of_each_recovered_label(
    mnist: dict[str, torch.Tensor], share: str, batch: int
) -> None:
    """Per-sample updates: iDLG per sample; a batch: the label counts, matched by the auditor."""
    x, y = mnist["x"][:batch], mnist["y"][:batch]
    result = ClassMeanBaseline().reconstruct(
        _observe(x, y, "none", share), _knowledge(mnist), BUDGET
    )
    assert result.label_method == ("idlg" if share == "per-sample" else "counts")
    if share == "per-sample":
        assert torch.equal(result.labels, y)
    else:
        assert torch.equal(result.labels.sort().values, y.sort().values)
    torch.testing.assert_close(result.inputs, class_means(_knowledge(mnist))[result.labels])


def test_class_mean_beats_aux_mean_when_labels_leak(mnist: dict[str, torch.Tensor]) -> None:
    """32 MNIST images, per-sample updates: measured 12.7 dB against aux-mean's 11.6 dB."""
    x, y = mnist["x"], mnist["y"]
    observation = _observe(x, y, "none", "per-sample")
    know = _knowledge(mnist)
    floor = _psnr(build_attack("aux-mean").reconstruct(observation, know, BUDGET).inputs, x)
    labels = _psnr(ClassMeanBaseline().reconstruct(observation, know, BUDGET).inputs, x)
    print(f"class-mean {labels:.2f} dB, aux-mean {floor:.2f} dB")
    assert labels > floor + 1.0


@pytest.mark.parametrize("defense", ["sign", "mixup:2", "instahide:2"])
def test_class_mean_reads_labels_under_any_defense(
    mnist: dict[str, torch.Tensor], defense: str
) -> None:
    x, y = mnist["x"][:4], mnist["y"][:4]
    result = ClassMeanBaseline().reconstruct(
        _observe(x, y, defense, "batch"), _knowledge(mnist), BUDGET
    )
    assert result.inputs.shape == x.shape and result.labels.shape == y.shape
    # Signs alone keep the counts' calibration; encoded labels are mixtures: the rows name them.
    assert result.label_method == ("counts" if defense == "sign" else "rows")
