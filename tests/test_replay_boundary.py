"""The replay boundary: an attack's replay of the client's computation, fed the client's own
private batch, reproduces the update the client sent, where the protocol holds no randomness.
Where it does not, the true batch is not the optimum of the attack's objective and leakage is
underestimated (audit CM1: FedAvg under DP-SGD replayed without its per-step clipping)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fedleak.attacks.optimization.losses import fedavg_step_clip
from fedleak.attacks.optimization.replay import ClientProtocol, Replay
from fedleak.defenses import parse_defense_spec
from fedleak.training.update import LocalTraining, compute_update


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 4))


def _cosine_distance(a: list[torch.Tensor], b: dict[str, torch.Tensor], names: list[str]) -> float:
    left = torch.cat([t.flatten() for t in a])
    right = torch.cat([b[n].flatten() for n in names])
    return float(1 - F.cosine_similarity(left, right, dim=0))


@pytest.mark.parametrize(("steps", "batch", "clip"), [(2, 1, 1.0), (2, 2, 1.0), (3, 4, 0.1)])
def test_the_true_batch_replays_a_fedavg_delta_under_dpsgd(
    steps: int, batch: int, clip: float
) -> None:
    model = _model()
    generator = torch.Generator().manual_seed(1)
    examples = steps * batch
    x = torch.rand(examples, 1, 4, 4, generator=generator)
    y = torch.randint(0, 4, (examples,), generator=generator)
    spec = f"dpsgd:{clip:g}:0"  # no noise: the delta is a function of the batch
    pipeline = parse_defense_spec(spec)
    training = LocalTraining("fedavg", batch, local_steps=steps, learning_rate=0.1)
    sent = compute_update(model, x, y, 4, pipeline, training, generator).update
    names = [name for name, _ in model.named_parameters()]
    protocol = ClientProtocol("delta", steps, batch, 0.1)
    step_clip = fedavg_step_clip(pipeline, "delta", adaptive=True)
    assert step_clip == clip
    replayed = Replay(model, protocol, step_clip=step_clip)(x[None], y[None]).update
    assert _cosine_distance([u[0] for u in replayed], sent, names) < 1e-6
    for name, u in zip(names, replayed, strict=True):
        torch.testing.assert_close(u[0], sent[name], rtol=1e-4, atol=1e-6)
    # Without the clip (an attack blind to the defense), the true batch is far from it.
    blind = torch.cat([u[0].flatten() for u in Replay(model, protocol)(x[None], y[None]).update])
    truth = torch.cat([sent[n].flatten() for n in names])
    assert float((blind - truth).norm() / truth.norm()) > 0.1


def test_the_step_clip_is_replayed_only_where_fedavg_clips() -> None:
    dpsgd, gauss = parse_defense_spec("dpsgd:2:1"), parse_defense_spec("gauss:0.1")
    assert fedavg_step_clip(dpsgd, "delta", adaptive=True) == 2.0
    assert fedavg_step_clip(dpsgd, "gradient", adaptive=True) == 0.0  # the loss clips FedSGD
    assert fedavg_step_clip(dpsgd, "delta", adaptive=False) == 0.0
    assert fedavg_step_clip(gauss, "delta", adaptive=True) == 0.0
