"""Central DP: Flower's server-side fixed-clipping wrapper applied to update replies.

The released aggregate is the mean of each client's update clipped to C plus N(0, (z·C/m)²)
noise drawn from the run's seed; the attacks still see every raw update; ε is client-level.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
from dp_accounting.rdp import RdpAccountant
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedleak.config import ConfigError, parse_flat
from fedleak.models.spec import ModelSpec
from fedleak.report.rundir import UTILITY_COLUMNS, read_utility_csv
from fedleak.server.auditor import Auditor
from fedleak.server.central_dp import CentralDP, CentralNoiseOverflow
from fedleak.server.privacy import central_epsilon
from fedleak.server.runner import AttackJob
from fedleak.server.strategy import CuriousStrategy, PublicSetting
from fedleak.simulations.cli import main

DELTA = 1e-5


class Grid:
    """Just enough of Flower's Grid for FedAvg to sample nodes."""

    def __init__(self, nodes: int) -> None:
        self.nodes = list(range(1, nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.nodes


class Recorder:
    """An attack runner that keeps what it was given and never finishes anything."""

    def __init__(self) -> None:
        self.jobs: list[AttackJob] = []

    def submit(self, jobs: list[AttackJob]) -> None:
        self.jobs.extend(jobs)

    def ready(self, wait: bool = False) -> list:
        return []


@pytest.fixture(autouse=True)
def _message_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(6, 5, generator=g), "b": torch.randn(6, generator=g)}


def _reply(update: dict[str, torch.Tensor], client: int, audit: bool = False) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: v.contiguous() for k, v in update.items()}),
            "metrics": MetricRecord({"num-examples": 4, "partition-id": client}),
        }
    )
    if audit:
        content["audit"] = ArrayRecord({"inputs": torch.rand(4, 1, 2, 2), "labels": torch.zeros(4)})
    return Message(content=content, dst_node_id=client + 1, message_type="train")


def _central(
    clip: float, noise: float, kind: str = "delta", lr: float = 0.1, defense: str = "none"
) -> CentralDP:
    inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    return CentralDP(
        inner,
        clip=clip,
        noise=noise,
        update_kind=kind,
        learning_rate=lr,
        seed=7,
        defense=defense,
        delta=DELTA,
    )


def _round(
    strategy, weights: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]], r: int = 1
) -> dict[str, torch.Tensor]:
    messages = list(strategy.configure_train(r, ArrayRecord(weights), ConfigRecord(), Grid(3)))
    assert len(messages) == len(updates)
    replies = [
        _reply(u, c, audit=isinstance(strategy, CuriousStrategy)) for c, u in enumerate(updates)
    ]
    aggregate, _ = strategy.aggregate_train(r, replies)
    return dict(aggregate.to_torch_state_dict())


def _norm(update: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((v.double() ** 2).sum() for v in update.values())))


def _updates(scales: tuple[float, ...]) -> list[dict[str, torch.Tensor]]:
    return [{k: v * s for k, v in _weights(10 + i).items()} for i, s in enumerate(scales)]


@pytest.mark.parametrize("kind", ["delta", "gradient"])
def test_the_aggregate_is_the_mean_of_updates_clipped_to_c(kind: str) -> None:
    clip, lr = 1.0, 0.1
    updates = _updates((0.05, 0.5, 3.0))  # norms around 0.3, 3 and 18
    # C bounds the change each client proposes: Δ in FedAvg, η·g in FedSGD.
    step = 1.0 if kind == "delta" else lr
    assert min(_norm(u) * step for u in updates) < clip < max(_norm(u) * step for u in updates)
    # A buffer that was sent but is not part of any update (BatchNorm statistics) adds nothing.
    weights = {**_weights(), "running_mean": torch.full((4,), 3.0)}
    got = _round(_central(clip, 0.0, kind, lr), weights, updates)
    assert got.keys() == updates[0].keys()
    expected = {
        k: sum(u[k] * min(1.0, clip / (_norm(u) * step)) for u in updates) / len(updates)
        for k in updates[0]
    }
    for k in expected:
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7)


def test_fedavg_signs_are_clipped_as_the_step_the_server_takes_for_them() -> None:
    # The server steps lr per coordinate on FedAvg's signs, so C bounds lr * ||sign(Δ)||.
    clip, lr = 1.0, 0.5
    updates = [{k: torch.sign(v) for k, v in u.items()} for u in _updates((0.05, 0.5, 3.0))]
    norms = [_norm(u) for u in updates]
    assert min(norms) * lr > clip  # every client's step is clipped
    got = _round(_central(clip, 0.0, "delta", lr, "sign"), _weights(), updates)
    for k in updates[0]:
        expected = sum(u[k] * clip / (n * lr) for u, n in zip(updates, norms, strict=True)) / 3
        torch.testing.assert_close(got[k], expected, rtol=1e-6, atol=1e-7)


def test_zero_updates_count_in_the_mean_without_breaking_flowers_clipping() -> None:
    clip = 1.0
    updates = _updates((0.5, 3.0))
    zero = {k: torch.zeros_like(v) for k, v in updates[0].items()}
    got = _round(_central(clip, 0.0), _weights(), [*updates, zero])
    expected = {k: sum(u[k] * min(1.0, clip / _norm(u)) for u in updates) / 3 for k in updates[0]}
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-6, atol=1e-7)
    # All zero: the release is the noise alone, std z*C/m.
    big = {"w": torch.zeros(200, 200)}
    noise = _round(_central(clip, 1.5), {"w": torch.ones(200, 200)}, [big, big, big])["w"]
    assert float(noise.double().std()) == pytest.approx(1.5 * clip / 3, rel=0.02)


def test_the_noise_has_std_z_c_over_m_and_comes_from_the_seed() -> None:
    clip, noise, m = 2.0, 1.5, 3
    weights = {"w": torch.randn(200, 200, generator=torch.Generator().manual_seed(1))}
    # Tiny updates, well inside C: the aggregate minus their mean is the noise alone.
    updates = [{"w": torch.full((200, 200), 1e-4 * (i + 1))} for i in range(m)]
    mean = sum(u["w"] for u in updates) / m
    np.random.seed(123)
    before = np.random.get_state()
    first = _round(_central(clip, noise), weights, updates)["w"]
    # Flower draws from NumPy's global generator; the caller's state is handed back untouched.
    after = np.random.get_state()
    assert all(np.array_equal(a, b) for a, b in zip(before[1:3], after[1:3], strict=True))
    residual = (first - mean).double()
    std = float(residual.std())
    assert std == pytest.approx(noise * clip / m, rel=0.02)  # 40k draws: 2% is ~4.5 sigma
    assert abs(float(residual.mean())) < 4 * std / math.sqrt(residual.numel())
    again = _round(_central(clip, noise), weights, updates)["w"]
    assert torch.equal(first, again)
    other_round = _round(_central(clip, noise), weights, updates, r=2)["w"]
    assert not torch.equal(first, other_round)


def test_noise_that_overflows_the_models_precision_stops_the_run_in_one_line() -> None:
    """Noise of std 5e39 made a float32 global model NaN and the run went on to exit 0,
    accuracy "–" from round 1 (audit BQ3)."""
    with pytest.raises(CentralNoiseOverflow) as error:
        _round(_central(1.0, 1e40), _weights(), _updates((0.5, 1.0, 2.0)))
    message = str(error.value)
    assert message.startswith("defense.central-noise=1e+40 with defense.central-clip=1: round 1")
    assert "noise std 3.33e+39" in message and "\n" not in message
    finite = _round(_central(1.0, 1e30), _weights(), _updates((0.5, 1.0, 2.0)))
    assert all(torch.isfinite(v).all() for v in finite.values())  # large, still a number


def test_attacks_see_raw_updates_and_the_model_gets_the_clipped_noised_aggregate() -> None:
    weights, updates = _weights(), _updates((0.5, 1.0, 2.0))
    public = PublicSetting(
        model=ModelSpec("mlp", (1, 2, 2), 3),
        update_kind="delta",
        learning_rate=0.1,
        server_lr=1.0,
        defense="none",
        share_bn_statistics=False,
    )
    results = {}
    for name, inner in (("plain", FedAvg(fraction_evaluate=0.0)), ("central", _central(1.0, 1.0))):
        runner = Recorder()
        strategy = CuriousStrategy(
            inner, public, runner, Auditor(), attacks=("aux-mean",), clients_per_round=0, seed=7
        )
        results[name] = (_round(strategy, weights, updates), runner.jobs)
        for job in runner.jobs:
            raw = updates[job.observation.client_id]
            assert job.observation.update.keys() == raw.keys()
            assert all(torch.equal(job.observation.update[k], raw[k]) for k in raw)
        assert sorted(job.observation.client_id for job in runner.jobs) == [0, 1, 2]
    plain, central = results["plain"][0], results["central"][0]
    mean = {k: sum(u[k] for u in updates) / 3 for k in weights}
    torch.testing.assert_close(plain["w"], weights["w"] + mean["w"])
    # The model moves by exactly what the wrapper releases (same seed, same round).
    released = _round(_central(1.0, 1.0), weights, updates)
    for k in weights:
        torch.testing.assert_close(central[k], weights[k] + released[k])
    assert not torch.allclose(central["w"], plain["w"], atol=1e-3)
    assert strategy.central_epsilon() > 0
    honest = CuriousStrategy(
        FedAvg(), public, None, Auditor(), attacks=(), clients_per_round=0, seed=0
    )
    assert math.isnan(honest.central_epsilon())


@pytest.mark.parametrize(
    ("flat", "start"),
    [
        (
            {"defense.central-clip": -1.0},
            "defense.central-clip=-1.0: expected a finite number >= 0",
        ),
        (
            {"defense.central-noise": "lots"},
            "defense.central-noise='lots': expected a finite number >= 0",
        ),
        (
            {"defense.central-noise": 1.0},
            "defense.central-noise=1: central DP noise is calibrated to the clipping norm",
        ),
    ],
)
def test_bad_values_give_one_line_errors(flat: dict[str, object], start: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_flat(flat)
    assert str(error.value).startswith(start) and "\n" not in str(error.value)


def test_config_keys_parse_and_print_back() -> None:
    config = parse_flat({"defense.central-clip": 0.5, "defense.central-noise": 1.2})
    assert (config.defense.central_clip, config.defense.central_noise) == (0.5, 1.2)
    assert parse_flat(config.to_flat()) == config
    assert parse_flat({}).defense.central_clip == 0.0  # off by default


def test_reports_name_central_dp_beside_the_clients_defense() -> None:
    central = {"defense.central-clip": 0.5, "defense.central-noise": 1.2}
    assert parse_flat(central).defense.label == "central-dp:0.5:1.2"
    both = parse_flat({**central, "defense.spec": "prune:0.9"})
    assert both.defense.label == "prune:0.9+central-dp:0.5:1.2"
    assert parse_flat({"defense.spec": "sign"}).defense.label == "sign"
    poisson = {"defense.spec": "dpsgd:1:1", "defense.dp-sampling": "poisson"}
    assert parse_flat(poisson).defense.label == "dpsgd:1:1 (poisson)"


def _reference(rate: float, noise: float, releases: int) -> float:
    accountant = RdpAccountant()
    event = PoissonSampledDpEvent(rate, GaussianDpEvent(noise))
    accountant.compose(SelfComposedDpEvent(event, releases))
    return accountant.get_epsilon(DELTA)


def test_central_epsilon_equals_the_accountant_and_grows_with_rounds() -> None:
    # 3 of 10 clients a round, z = 1.1: sampled Gaussian releases at rate 0.3; one client's
    # data replaced moves the clipped sum by 2C (the multiplier halved).
    curve = [central_epsilon(1.1, 10, {3: rounds}, DELTA) for rounds in (0, 1, 2, 5, 20)]
    assert curve[0] == 0.0
    assert all(a < b for a, b in itertools.pairwise(curve))
    assert curve[3] == pytest.approx(_reference(0.3, 0.55, 5))
    assert curve[4] == pytest.approx(_reference(0.3, 0.55, 20))
    assert central_epsilon(0.0, 10, {3: 1}, DELTA) == math.inf
    # Every client sampled: no sampling, and still the halved multiplier (it was z).
    assert central_epsilon(1.1, 3, {3: 4}, DELTA) == pytest.approx(_reference(1.0, 0.55, 4))
    # The wrapper counts its releases with the m it sampled out of the grid's N.
    strategy = _central(1.0, 1.1)
    for r in (1, 2):
        _round(strategy, _weights(), _updates((1.0, 1.0, 1.0)), r)
    assert strategy.releases == {3: 2}
    assert strategy.epsilon() == pytest.approx(_reference(1.0, 0.55, 2))


def test_the_released_noise_reveals_the_federations_size_so_adjacency_keeps_it() -> None:
    # Every client's update zero (a valid pair of federations): the released mean is noise of
    # std z·C/m alone, m = N. Add/remove-one-client neighbours (N = 3 against 4) then differ
    # in scale over every coordinate, which no finite ε covers at this size; the accounting
    # therefore holds N fixed and replaces one client's data.
    spreads = []
    weights = {"w": torch.zeros(20_000)}
    for clients in (3, 4):
        strategy = _central(1.0, 1.0)
        messages = strategy.configure_train(1, ArrayRecord(weights), ConfigRecord(), Grid(clients))
        assert len(list(messages)) == clients
        replies = [_reply({"w": torch.zeros(20_000)}, c) for c in range(clients)]
        released, _ = strategy.aggregate_train(1, replies)
        spreads.append(float(released.to_torch_state_dict()["w"].std()))
    # std z·C/m: 1/3 against 1/4, each measured over 20,000 coordinates (to about 1%).
    assert spreads == pytest.approx([1 / 3, 1 / 4], rel=0.03)
    # So ε is the replace-one figure, which an add/remove accounting at z undercuts.
    assert central_epsilon(1.0, 3, {3: 1}, DELTA) == pytest.approx(_reference(1.0, 0.5, 1))
    assert central_epsilon(1.0, 3, {3: 1}, DELTA) > 2 * _reference(1.0, 1.0, 1)


def test_run_directories_written_before_central_dp_still_read(tmp_path: Path) -> None:
    old = tmp_path / "utility.csv"
    old.write_text(
        "round,test_loss,test_accuracy,epsilon,num_replies,num_failures,"
        "round_seconds,attack_seconds,payload_mb\n1,2.0,0.1,nan,3,0,1.0,0.5,0.1\n"
    )
    utility = read_utility_csv(old)
    assert list(utility.columns) == list(UTILITY_COLUMNS)
    assert utility["central_epsilon"].isna().all() and utility["num_replies"].tolist() == [3]


def test_a_run_records_central_epsilon_in_utility_csv(tmp_path: Path) -> None:
    args = ["run", "quickstart", "--out", str(tmp_path / "run"), "--num-clients", "3"]
    settings = {
        "num-server-rounds": "2",
        "train.mode": "fedavg",
        "threat.share": "batch",
        "train.local-steps": "2",
        "data.aux-size": "50",
        "attack.names": "aux-mean",
        "attack.images-per-client": "0",
        "defense.central-clip": "0.5",
        "defense.central-noise": "1.0",
    }
    for key, value in settings.items():
        args += ["--set", f"{key}={value}"]
    assert main(args) == 0
    utility = pd.read_csv(tmp_path / "run" / "utility.csv")
    expected = [central_epsilon(1.0, 3, {3: r}, DELTA) for r in (0, 1, 2)]  # round 0: w_0
    assert utility["central_epsilon"].tolist() == pytest.approx(expected)
    assert utility["epsilon"].isna().all()  # no DP-SGD: no example-level guarantee
    # The rows name the run's defense as its report does: not 'none', the clients' spec.
    leakage = pd.read_parquet(tmp_path / "run" / "leakage.parquet")
    assert len(leakage) and set(leakage["defense"]) == {"central-dp:0.5:1"}
    for shown in ("summary.md", "report.md"):
        assert "central ε" in (tmp_path / "run" / shown).read_text()


@pytest.mark.parametrize(
    ("clients", "flat"),
    [
        # Half the clients each round: the worst client trained in 2 of 3 rounds, not 3.
        (
            4,
            {
                "train.fraction-train": "0.5",
                "train.min-clients": "2",
                "defense.spec": "dpsgd:1:1",
                "train.batch-size": "4",
            },
        ),
        # Failed replies: their rounds are not released, and cost no central ε.
        (
            3,
            {
                "seed": "3",
                "sim.fail-rate": "0.3",
                "defense.central-clip": "0.5",
                "defense.central-noise": "1.0",
            },
        ),
    ],
    ids=["dpsgd-sampled-clients", "central-dp-failed-rounds"],
)
def test_a_resumed_run_reports_the_epsilon_of_an_uninterrupted_one(
    clients: int, flat: dict[str, str], tmp_path: Path
) -> None:
    """A resume counted every client in every earlier round and every earlier round as a
    central release: ε 4.21 for 4.07, and central ε 4.73 after round 2 where none was
    released yet. The checkpoint now carries the accounting."""
    settings = {
        "train.mode": "fedsgd",
        "threat.share": "batch",
        "data.aux-size": "50",
        "attack.names": "aux-mean",
        "attack.images-per-client": "0",
        "metrics.lpips-nets": "none",
        **flat,
    }

    def run(out: Path, rounds: int, hash_seed: str, *extra: str) -> pd.DataFrame:
        # Each run in a process of its own: nothing held in memory carries over a resume.
        args = [sys.executable, "-m", "fedleak.simulations.cli", "run", "quickstart"]
        args += ["--out", str(out), "--num-clients", str(clients)]
        for key, value in {**settings, "num-server-rounds": str(rounds)}.items():
            args += ["--set", f"{key}={value}"]
        for item in extra:
            args += ["--set", item]
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        return pd.read_csv(out / "utility.csv")

    straight = run(tmp_path / "straight", 3, "1")
    run(tmp_path / "resumed", 1, "2")
    resumed = run(tmp_path / "resumed", 3, "3", "sim.resume=true")
    for column in ("epsilon", "central_epsilon", "num_failures"):
        pd.testing.assert_series_equal(resumed[column], straight[column])
    if "defense.central-clip" in flat:
        assert (straight["num_failures"].iloc[1:3] > 0).all()  # the case the test is about
        assert straight["central_epsilon"].iloc[2] == 0.0
