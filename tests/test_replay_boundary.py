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
from fedleak.attacks.optimization.replay import ClientProtocol, Replay, ReplayError
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


class _Drifting(nn.Module):
    """A forward that updates plain buffers in place, as a user's model may (audit EO1): a
    step counter and a running mean of its inputs, which the next step's output depends on."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 4)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("centre", torch.zeros(16))
        self.register_buffer("scale", torch.ones(()))  # read, never changed
        self.register_buffer("gain", torch.ones(16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        if self.training:
            self.calls += 1
            self.centre.mul_(0.5).add_(0.5 * x.detach().mean(dim=0))
            self.gain.mul_(0.9).add_(0.1 * x.detach().std(dim=0))
        # A product keeps `gain` for its backward: the next step's update must not change it.
        shifted = (x - self.centre) * self.gain
        return self.fc(shifted * self.scale * (1.0 + 0.1 * self.calls))


@pytest.mark.parametrize("problems", [1, 3])
@pytest.mark.parametrize(("kind", "steps"), [("delta", 3), ("gradient", 1)])
def test_a_forward_that_updates_buffers_replays_the_clients_update(
    problems: int, kind: str, steps: int
) -> None:
    torch.manual_seed(0)
    model = _Drifting()
    generator = torch.Generator().manual_seed(1)
    batch = 2
    x = torch.rand(problems, batch * steps, 1, 4, 4, generator=generator)
    y = torch.randint(0, 4, (problems, batch * steps), generator=generator)
    mode = "fedavg" if kind == "delta" else "fedsgd"
    training = LocalTraining(mode, batch * steps if kind == "gradient" else batch, steps, 0.1)
    pipeline = parse_defense_spec("none")
    names = [name for name, _ in model.named_parameters()]
    protocol = ClientProtocol(kind, steps, batch, 0.1)  # type: ignore[arg-type]
    replay = Replay(model, protocol)
    for _ in range(2):  # a second call (the attack's next iteration) starts from the same state
        replayed = replay(x, y).update
        for t in range(problems):
            sent = compute_update(model, x[t], y[t], 4, pipeline, training, generator).update
            for name, u in zip(names, replayed, strict=True):
                torch.testing.assert_close(u[t], sent[name], rtol=1e-4, atol=1e-6)
    # What an attack does with the update: differentiate it with respect to the dummy data.
    dummy = x.clone().requires_grad_(True)
    sum(u.square().sum() for u in replay(dummy, y).update).backward()
    assert dummy.grad is not None and torch.isfinite(dummy.grad).all() and dummy.grad.any()
    assert int(model.calls) == 0 and not model.centre.any()  # the client's copy: untouched
    assert int(replay.model.calls) == 0 and not replay.model.centre.any()
    if kind == "gradient":  # no sample's gradient stands alone where a buffer couples them
        with pytest.raises(ReplayError, match="buffers that its forward changes"):
            replay(x, y, per_sample=True)
