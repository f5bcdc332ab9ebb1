"""BatchNorm state travels and is aggregated: clients return their running statistics, the
server averages them with FedAvg's weights, evaluation uses them, and GradAttack's `infer` and
`proxy` threat models read exactly those statistics.

One real Flower simulation (convnet-bn, FedAvg, 3 clients, 2 rounds) is compared with the
same federation computed by hand.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from fedleak.attacks.optimization.attacks import prepare
from fedleak.attacks.optimization.config import GradInversionConfig
from fedleak.attacks.types import AttackerKnowledge, Observation
from fedleak.config import RunConfig, parse_flat
from fedleak.data import client_batch
from fedleak.defenses import parse_defense_spec
from fedleak.models import build_model
from fedleak.runtime import federated_data, local_training, model_spec
from fedleak.simulations.cli import main
from fedleak.training.update import compute_update

pytestmark = pytest.mark.usefixtures("one_thread")

STUDY = {
    "model.name": "convnet-bn",
    "train.mode": "fedavg",
    "threat.share": "batch",
    "train.batch-size": 2,
    "train.examples": 4,
    "train.local-steps": 2,
    "train.lr": 0.1,
    "num-server-rounds": 2,
    "attack.names": "none",
    "data.aux-size": 100,
}
CLIENTS = 3


# A model of the user's own (tests/plugin_models.py): InstanceNorm's running statistics and a
# counter buffer, which local training changes like BatchNorm's.
PLUGIN = {**STUDY, "model.name": "plugin_models:instance_norm_net"}


def _config(out: Path, study: dict[str, object] = STUDY) -> RunConfig:
    from fedleak.simulations.presets import load_preset

    return parse_flat({**study, "out-dir": str(out)}, load_preset("quickstart"))


def _run(out: Path, study: dict[str, object]) -> Path:
    args = ["run", "quickstart", "--out", str(out), "--num-clients", str(CLIENTS)]
    for key, value in study.items():
        args += ["--set", f"{key}={value}"]
    with pytest.MonkeyPatch.context() as patch:  # the clients' processes import the model
        here = str(Path(__file__).parent)
        patch.setenv(
            "PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
        )
        patch.syspath_prepend(here)
        assert main(args) == 0
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory.mktemp("bn") / "run", STUDY)


@pytest.fixture(scope="module")
def plugin_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _run(tmp_path_factory.mktemp("plugin") / "run", PLUGIN)


def _checkpoint(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / "global.pt", weights_only=True)["state_dict"]


@torch.no_grad()
def _evaluate(state: dict[str, torch.Tensor], config: RunConfig) -> tuple[float, float]:
    """Test loss and accuracy of `state` in eval mode (BatchNorm uses its running statistics)."""
    fd = federated_data(config, 1)
    model = build_model(model_spec(config, fd))
    model.load_state_dict(state)
    model.eval()
    logits = model(fd.dataset.test_x)
    loss = float(F.cross_entropy(logits, fd.dataset.test_y))
    return loss, int((logits.argmax(1) == fd.dataset.test_y).sum()) / len(logits)


def _by_hand(config: RunConfig) -> list[dict[str, torch.Tensor]]:
    """The federation without Flower: each round every client trains from w_t, and the new
    state is the example-weighted mean of the clients' parameters and buffers."""
    fd = federated_data(config, CLIENTS)
    model = build_model(model_spec(config, fd))
    states = []
    for server_round in (1, 2):
        clients = []
        for partition in range(CLIENTS):
            x, y = client_batch(
                fd, partition, server_round, config.train.examples_per_round, config.seed
            )
            update = compute_update(
                model,
                x,
                y,
                fd.dataset.num_classes,
                parse_defense_spec("none"),
                local_training(config),
                torch.Generator().manual_seed(0),
            )
            state = {n: p.detach() + update.update[n] for n, p in model.named_parameters()}
            # FedAvg of whole states: a buffer the client did not send is the one it got.
            clients.append(({**model.state_dict(), **state, **update.buffers}, x.shape[0]))
        total = sum(n for _, n in clients)
        averaged = {}
        for name, value in model.state_dict().items():
            mean = sum(s[name].double() * (n / total) for s, n in clients)
            averaged[name] = mean.round().long() if not value.is_floating_point() else mean.float()
        model.load_state_dict(averaged)
        states.append(averaged)
    return states


def _assert_the_federation_by_hand(run: Path, config: RunConfig) -> None:
    """The run's global state is the federation computed by hand, every buffer included, and
    what the server evaluated each round is that averaged state."""
    state = _checkpoint(run)
    expected = _by_hand(config)
    assert expected[-1].keys() == state.keys()
    for name, value in expected[-1].items():
        torch.testing.assert_close(state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    utility = pd.read_csv(run / "utility.csv").set_index("round")
    for server_round, by_hand in zip((1, 2), expected, strict=True):
        loss, accuracy = _evaluate(by_hand, config)
        assert utility.loc[server_round, "test_loss"] == pytest.approx(loss, rel=1e-5)
        assert utility.loc[server_round, "test_accuracy"] == accuracy


def test_buffers_outside_batchnorm_are_aggregated_and_evaluated(plugin_run: Path) -> None:
    # Only BatchNorm's buffers travelled: InstanceNorm's statistics and the counter stayed at
    # their initial values in the global model, which the server evaluated with them.
    config = _config(plugin_run, PLUGIN)
    state = _checkpoint(plugin_run)
    assert state["1.running_mean"].abs().max() > 1e-3
    assert (state["1.running_var"] - 1).abs().max() > 1e-3
    assert float(state["3.seen"]) == 4.0  # 2 local steps in each of the 2 rounds
    _assert_the_federation_by_hand(plugin_run, config)


def test_running_statistics_are_aggregated_and_evaluated(run: Path) -> None:
    config = _config(run)
    state = _checkpoint(run)
    # Non-trivial running statistics: every layer moved off N(0, 1), and each of the 2 rounds
    # counted its 2 local steps.
    for name, value in state.items():
        if name.endswith("running_mean"):
            assert value.abs().max() > 1e-3, name
        if name.endswith("running_var"):
            assert (value - 1).abs().max() > 1e-3, name
        if name.endswith("num_batches_tracked"):
            assert int(value) == 4, name
    _assert_the_federation_by_hand(run, config)
    # ...and the statistics matter: with the initial ones the same weights score otherwise.
    initial = build_model(model_spec(config, federated_data(config, 1))).state_dict()
    stale = {n: initial[n] if "running" in n or "batches" in n else v for n, v in state.items()}
    utility = pd.read_csv(run / "utility.csv").set_index("round")
    assert abs(_evaluate(stale, config)[0] - utility.loc[2, "test_loss"]) > 1e-3


@pytest.mark.parametrize("mode", ["infer", "proxy"])
def test_infer_and_proxy_read_the_aggregated_running_statistics(run: Path, mode: str) -> None:
    config = _config(run)
    fd = federated_data(config, CLIENTS)
    spec = model_spec(config, fd)
    state = _checkpoint(run)
    model = build_model(spec)
    model.load_state_dict(state)
    x, y = client_batch(fd, 0, 3, 2, config.seed)
    update = compute_update(
        model,
        x,
        y,
        spec.num_classes,
        parse_defense_spec("none"),
        local_training(parse_flat({"train.batch-size": 2})),
        torch.Generator().manual_seed(0),
    )
    observation = Observation(
        round=3,
        client_id=0,
        model=spec,
        weights=state,
        update=update.update,
        update_kind="gradient",
        num_examples=2,
        batch_size=2,
        local_steps=1,
        learning_rate=config.train.lr,
        defense="none",
    )
    aux = fd.dataset.train_x[:20], fd.dataset.train_y[:20]
    knowledge = AttackerKnowledge(*aux, spec.input_shape, spec.num_classes)
    problem = prepare(observation, knowledge, GradInversionConfig(labels="rows"), mode, 0)
    layers = [n.removesuffix(".running_mean") for n in state if n.endswith(".running_mean")]
    assert len(problem.bn_reference) == len(layers) > 0
    for (mean, var), layer in zip(problem.bn_reference, layers, strict=True):
        assert torch.equal(mean, state[f"{layer}.running_mean"])
        assert torch.equal(var, state[f"{layer}.running_var"])
    if mode == "proxy":
        # Normalising with the running statistics is the global model's own eval-mode forward.
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(problem.replay.model(x), model(x), rtol=1e-4, atol=1e-5)


def test_a_model_with_nan_weights_has_no_accuracy() -> None:
    """NaN logits' argmax is class 0: a NaN global model read "accuracy 0.100" in a report."""
    from fedleak.server.build import evaluate

    config = parse_flat({"attack.names": "aux-mean"})
    fd = federated_data(config, 1)
    model = build_model(model_spec(config, fd))
    loss, accuracy = evaluate(model, fd, torch.device("cpu"))
    assert 0 < accuracy <= 1 and loss > 0
    with torch.no_grad():
        next(model.parameters()).fill_(float("nan"))
    loss, accuracy = evaluate(model, fd, torch.device("cpu"))
    assert loss != loss and accuracy != accuracy  # both NaN
