"""Same seed, same bits: replies are read in a canonical order and clients are drawn by a
seeded selection over partition ids, so neither arrival order nor node ids reach the results.

The cross-process check (two separate processes, different PYTHONHASHSEED) is at the end.
"""

from __future__ import annotations

import itertools
import os
import random
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.app import Error as MessageError
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedleak.config import parse_flat
from fedleak.messages import INJECTED_FAILURE, partition_answer, partition_id_of
from fedleak.models.spec import ModelSpec
from fedleak.runtime import federated_data, model_spec
from fedleak.server.auditor import Auditor
from fedleak.server.build import build_strategy
from fedleak.server.central_dp import CentralDP
from fedleak.server.selection import (
    ClientSelection,
    FederationError,
    SelectedNodes,
    canonical_order,
    check_distinct_partitions,
    declared_federation,
)
from fedleak.server.strategy import ClientCrashed, CuriousStrategy, PublicSetting, error_line


@pytest.fixture(autouse=True)
def _message_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


class FakeGrid:
    """Nodes with random ids that answer the partition query like fedleak's ClientApp."""

    def __init__(
        self,
        partitions: int,
        seed: int,
        silent: tuple[int, ...] = (),
        declared: int | dict[int, int] | None = None,
        ids: tuple[int, ...] | None = None,
    ) -> None:
        rng = random.Random(seed)
        ids = tuple(range(partitions)) if ids is None else ids
        self.partition_of = {rng.getrandbits(63): p for p in ids}
        self.silent = silent
        # The num-partitions every node (or each partition's node) answers with, if any.
        self.declared = declared
        self.queries = 0

    def get_node_ids(self) -> list[int]:
        nodes = list(self.partition_of)
        random.Random(len(nodes)).shuffle(nodes)
        return nodes

    def send_and_receive(self, messages: list[Message], *, timeout: float | None = None) -> list:
        replies = []
        for msg in messages:
            assert msg.metadata.message_type == MessageType.QUERY
            self.queries += 1
            partition = self.partition_of[msg.metadata.dst_node_id]
            if partition in self.silent:
                reply = Message(MessageError(code=0, reason="no query handler"), reply_to=msg)
            else:
                size = self.declared
                answer = partition_answer(
                    partition, size.get(partition) if isinstance(size, dict) else size, threads=3
                )
                reply = Message(content=answer, reply_to=msg)
            replies.append(reply)
        return replies


def _selected(selection: ClientSelection, grid: FakeGrid, server_round: int) -> list[int]:
    view = selection.grid_for(server_round, grid)
    assert isinstance(view, SelectedNodes) and view.population == len(grid.partition_of)
    return [grid.partition_of[node] for node in view.get_node_ids()]


def test_selection_is_a_function_of_seed_round_and_partition_ids() -> None:
    # Two runs: the same ten partitions behind different random node ids.
    first, second = FakeGrid(10, seed=1), FakeGrid(10, seed=2)
    assert set(first.partition_of).isdisjoint(second.partition_of)
    a = ClientSelection(0.3, 1, seed=7)
    b = ClientSelection(0.3, 1, seed=7)
    draws = [_selected(a, first, r) for r in range(1, 6)]
    assert draws == [_selected(b, second, r) for r in range(1, 6)]
    assert all(len(d) == 3 and d == sorted(d) for d in draws)
    assert len({tuple(d) for d in draws}) > 1  # the round changes the draw
    other = ClientSelection(0.3, 1, seed=8)
    assert [_selected(other, FakeGrid(10, seed=1), r) for r in range(1, 6)] != draws
    # Each node is asked once, in the first round only.
    assert first.queries == 10 and a.partitions == first.partition_of


def test_selection_honours_min_clients_and_keeps_silent_nodes_selectable() -> None:
    grid = FakeGrid(4, seed=3, silent=(2,))
    selection = ClientSelection(0.25, 3, seed=0)
    chosen = _selected(selection, grid, 1)
    assert len(chosen) == 3  # max(int(4 * 0.25), min_clients)
    assert len(selection.partitions) == 3  # partition 2 never said who it is
    # Every node trains when the fraction is 1: the grid goes through untouched, no query.
    everyone = FakeGrid(4, seed=4)
    assert ClientSelection(1.0, 1, seed=0).grid_for(1, everyone) is everyone
    assert everyone.queries == 0


def test_central_dp_counts_the_whole_federation_behind_a_selection() -> None:
    grid = FakeGrid(10, seed=5)
    view = ClientSelection(0.3, 1, seed=0).grid_for(1, grid)
    inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    dp = CentralDP(
        inner, clip=1.0, noise=1.0, update_kind="gradient", learning_rate=0.1, seed=0, delta=1e-5
    )
    weights = ArrayRecord({"w": torch.zeros(3)})
    messages = list(dp.configure_train(1, weights, ConfigRecord({}), view))
    assert len(messages) == 3 and dp.population == 10


def _reply(partition: int, update: torch.Tensor, examples: int, audit: bool = True) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({"w": update.contiguous()}),
            "metrics": MetricRecord({"num-examples": examples, "partition-id": partition}),
        }
    )
    if audit:
        inputs, labels = torch.rand(examples, 1, 2, 2), torch.zeros(examples)
        content["audit"] = ArrayRecord({"inputs": inputs, "labels": labels})
    query = Message(content=RecordDict(), dst_node_id=1000 + partition, message_type="train")
    return Message(content=content, reply_to=query)


def _failed(node: int) -> Message:
    query = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    return Message(MessageError(code=0, reason="client failed"), reply_to=query)


def _strategy() -> CuriousStrategy:
    public = PublicSetting(ModelSpec("mlp", (1, 2, 2), 2), "gradient", 0.1, 1.0, "none", False)
    inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    strategy = CuriousStrategy(
        inner, public, None, Auditor(lpips_nets=()), attacks=(), clients_per_round=0, seed=0
    )
    strategy.global_weights = {"w": torch.zeros(257)}
    return strategy


def test_permuting_a_rounds_replies_does_not_change_the_aggregate() -> None:
    # Float32 sums depend on their order: magnitudes spread over many decades make sure that
    # at least one order of these replies rounds differently from the arrival order.
    g = torch.Generator().manual_seed(0)
    updates = [torch.randn(257, generator=g) * 10.0 ** (3 * i - 6) for i in range(5)]
    examples = [3, 1, 4, 1, 5]
    aggregates = set()
    plain = set()
    for order in itertools.islice(itertools.permutations(range(5)), 0, None, 7):
        replies = [_reply(i, updates[i], examples[i]) for i in order]
        replies.insert(2, _failed(99))
        arrays, _ = _strategy().aggregate_train(1, replies)
        aggregates.add(arrays["w"].numpy().tobytes())
        # What FedAvg alone makes of the same replies in arrival order.
        valid = [_reply(i, updates[i], examples[i], audit=False) for i in order]
        plain.add(FedAvg().aggregate_train(1, valid)[0]["w"].numpy().tobytes())
    assert len(plain) > 1, "the test needs replies whose sum depends on their order"
    assert len(aggregates) == 1


def test_the_federation_size_is_what_the_nodes_declare() -> None:
    """Behind a SuperLink the server counted the nodes connected at the start: a node that
    joined later was a partition the privacy ledger did not know (the ServerApp crashed in
    round 3, and rounds 1-2 reported ε 6.29 for a partition assumed twice its size, 7.04)."""
    declared = declared_federation(FakeGrid(1, 0, declared=2), None)
    assert declared is not None and declared.num_partitions == 2
    assert declared.client_threads == 3  # what the nodes compute with (FakeGrid's answer)
    assert declared_federation(FakeGrid(3, 0), None) is None  # nodes that do not say
    with pytest.raises(FederationError, match=r"^2 nodes declare partition-id=0 at the start"):
        declared_federation(FakeGrid(2, 0, declared=2, ids=(0, 0)), None)
    with pytest.raises(FederationError, match=r"^the nodes declare num-partitions 2, 3; "):
        declared_federation(FakeGrid(2, 0, declared={0: 2, 1: 3}), None)
    with pytest.raises(FederationError, match=r"^2 nodes declare partition-id=1 in round 3; "):
        check_distinct_partitions([0, 1, 1], "in round 3")
    check_distinct_partitions([0, 1, None, None], "in round 3")  # foreign nodes say nothing


def test_a_rounds_first_error_does_not_depend_on_the_node_ids_drawn() -> None:
    """Flower draws node ids afresh in every run; failed replies were read in node-id order,
    so FAILED and the summary named client 3 in one run and client 1 in the next (audit CC1)."""

    def first_error(reason_on_node: dict[int, str]) -> str | None:
        replies = [_reply(0, torch.ones(257), 2)]
        for node, reason in reason_on_node.items():
            query = Message(content=RecordDict(), dst_node_id=node, message_type="train")
            replies.append(Message(MessageError(code=0, reason=reason), reply_to=query))
        strategy = _strategy()
        strategy.aggregate_train(1, replies)
        return strategy._round.first_error

    three, ten = "client 3 failed on purpose", "client 10 failed on purpose"
    # By number: not "client 10", which sorts first as text.
    assert first_error({7: ten, 8: three}) == first_error({7: three, 8: ten}) == three
    # Texts whose numbers read alike ("1.5", "1.05") still differ (audit CF2).
    wide, narrow = "loss 1.5 is not finite", "loss 1.05 is not finite"
    assert first_error({7: wide, 8: narrow}) == first_error({7: narrow, 8: wide})


def test_canonical_order_sorts_by_partition_and_puts_errors_last() -> None:
    replies = [_reply(p, torch.zeros(2), 1) for p in (3, 0, 2)]
    replies.insert(1, _failed(5))
    ordered = canonical_order(replies)
    assert [partition_id_of(m.content) for m in ordered[:3]] == [0, 2, 3]
    assert ordered[3].has_error()


# -- across processes ------------------------------------------------------------------------
# A small study that exercises every random choice: a seeded half of 4 clients per round,
# inter-InstaHide (partners from the public pool), attacks, B = 1.
STUDY = {
    "num-server-rounds": "2",
    "train.fraction-train": "0.5",
    "train.batch-size": "1",
    "threat.share": "batch",
    "defense.spec": "instahide:2:inter",
    "data.public-size": "50",
    "data.aux-size": "100",
    "attack.names": "aux-mean,ig",
    "attack.max-iterations": "20",
    "attack.clients-per-round": "0",
    "attack.images-per-client": "1",
}
TIMINGS = {"seconds", "round_seconds", "attack_seconds"}


def _study(out: Path, hash_seed: str, spec: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "fedleak.simulations.cli", "run", "quickstart"]
    args += ["--out", str(out), "--num-clients", "4"]
    for key, value in {**STUDY, "defense.spec": spec}.items():
        args += ["--set", f"{key}={value}"]
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


@pytest.fixture(scope="module")
def twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("twins")
    runs = (root / "first", root / "second")
    # The second writes the same defense otherwise: one pipeline, one setting.
    specs = (STUDY["defense.spec"], " InstaHide:2:INTER ")
    for out, hash_seed, spec in zip(runs, ("1", "2"), specs, strict=True):
        process = _study(out, hash_seed, spec)
        output, _ = process.communicate(timeout=600)
        assert process.returncode == 0, output.decode(errors="replace")[-3000:]
    return runs


def test_a_defense_written_otherwise_is_recorded_as_one_setting(
    twins: tuple[Path, Path],
) -> None:
    """The report named a pipeline as written: `prune:0.9+mixup:4` and `mixup:4+prune:0.9`
    (one pipeline, the same bits) were two settings, and ` NONE ` was not the baseline."""
    for run in twins:
        assert 'spec = "instahide:2:inter"' in (run / "config.toml").read_text()
        assert set(pd.read_parquet(run / "leakage.parquet").defense) == {"instahide:2:inter"}


def test_the_same_study_in_two_processes_gives_the_same_bits(twins: tuple[Path, Path]) -> None:
    models = [torch.load(run / "checkpoints" / "global.pt", weights_only=True) for run in twins]
    assert models[0]["round"] == models[1]["round"] == 2
    weights = [m["state_dict"] for m in models]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    utility = [pd.read_csv(run / "utility.csv") for run in twins]
    kept = [c for c in utility[0].columns if c not in TIMINGS]
    pd.testing.assert_frame_equal(utility[0][kept], utility[1][kept], check_exact=True)
    leakage = [pd.read_parquet(run / "leakage.parquet") for run in twins]
    kept = [c for c in leakage[0].columns if c not in TIMINGS]
    assert len(leakage[0]) > 0
    pd.testing.assert_frame_equal(leakage[0][kept], leakage[1][kept], check_exact=True)
    # The seeded selection took half of the clients, and not the same half every round.
    assert list(utility[0].num_replies) == [0, 2, 2]
    attacked = leakage[0].groupby("round").client_id.apply(lambda c: tuple(sorted(set(c))))
    assert all(len(c) == 2 for c in attacked)


def test_inter_instahide_runs_and_is_scored_against_private_images_only(
    twins: tuple[Path, Path],
) -> None:
    leakage = pd.read_parquet(twins[0] / "leakage.parquet")
    assert (leakage.status == "ok").all(), leakage.message.tolist()
    original = leakage[leakage.scored_against == "original"]
    encoded = leakage[leakage.scored_against == "encoded"]
    # B = 1: each encoding mixes the client's one image with a public one; only the private
    # image (index 0 of the batch) is ever a target, never a public partner.
    assert len(original) == len(encoded) > 0
    assert set(original.target_index) == {0}
    assert original.psnr.notna().all() and original.converged.notna().any()


def test_a_simulation_stops_on_a_client_it_did_not_mean_to_lose() -> None:
    """Flower never replaces a dead client actor: a run that went on would lose clients in
    every later round. Only seeded failures (and an audited app's own exceptions) are part of
    a simulated study; a deployment's nodes may leave."""
    raised, dead = ErrorCode.CLIENT_APP_RAISED_EXCEPTION, ErrorCode.UNKNOWN
    injected = f"client 1 {INJECTED_FAILURE} in round 2 (sim.fail-rate=0.5)"
    own = _strategy()
    own.simulated = True
    own.check_failures(2, [raised], [injected])
    for code, reason in ((raised, "ValueError: a bug"), (dead, "The actor is dead")):
        with pytest.raises(ClientCrashed, match=r"^round 2: a client failed \("):
            own.check_failures(2, [code], [reason])
    foreign = _strategy()
    foreign.simulated, foreign.own_clients = True, False
    foreign.check_failures(2, [raised], ["ValueError: the app's own"])
    with pytest.raises(ClientCrashed):
        foreign.check_failures(2, [dead], ["The actor is dead"])
    # The server as `fedleak run` and `fedleak.audit` build it: fedleak's own clients, and an
    # audited app's behind its own strategy.
    config = parse_flat({"attack.names": "aux-mean"})
    fd = federated_data(config, 2)
    built = build_strategy(config, model_spec(config, fd), fd, torch.device("cpu"), 0)
    built.simulated = True
    with pytest.raises(ClientCrashed):
        built.check_failures(2, [raised], ["ValueError: a bug in a plug-in model"])
    app = FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    audited = build_strategy(config, model_spec(config, fd), fd, torch.device("cpu"), 0, app)
    audited.simulated = True
    audited.check_failures(2, [raised], ["ValueError: the app's own"])
    deployed = _strategy()
    deployed.check_failures(2, [dead, raised], ["node gone", "ValueError: a bug"])
    # Ray's reason runs on for sentences: the line keeps whole ones.
    ray = "The actor is dead because its worker process has died. " + "Worker exit type: x. " * 20
    line = error_line(ray)
    assert len(line) <= 300 and line.endswith(".") and ray.startswith(line + " ")
    # In a round: the failed reply stops it before anything is aggregated or recorded.
    own.global_weights = {"w": torch.zeros(257)}
    with pytest.raises(ClientCrashed):
        own.aggregate_train(1, [_reply(0, torch.ones(257), 1), _failed(99)])
    # A client whose reply never came (Flower hands over what arrived within the timeout) was
    # neither a failure nor a reply: `utility.csv` read "client failures 0 of 0" (audit BO1).
    own._asked, own._timeout = 2, 0.01
    with pytest.raises(
        ClientCrashed, match=r"a client failed \(no reply within sim.timeout=0.01 s\)"
    ):
        own.aggregate_train(1, [_reply(0, torch.ones(257), 1)])
    deployed.global_weights, deployed._asked, deployed._timeout = {"w": torch.zeros(257)}, 2, 5.0
    deployed.aggregate_train(1, [_reply(0, torch.ones(257), 1)])
    tally = deployed._round
    assert (tally.replies, tally.failures) == (1, 1)
    assert tally.first_error == "no reply within sim.timeout=5 s"


_KERNELS = """
import os, torch
from fedleak.runtime import deterministic_kernels
deterministic_kernels(torch.device("cpu"), True)
deterministic_kernels(torch.device("cuda"), False)
print(torch.are_deterministic_algorithms_enabled(), "CUBLAS_WORKSPACE_CONFIG" in os.environ)
deterministic_kernels(torch.device("cuda"), True)
print(
    torch.are_deterministic_algorithms_enabled(),
    torch.is_deterministic_algorithms_warn_only_enabled(),
    torch.backends.cudnn.deterministic,
    torch.backends.cudnn.benchmark,
    os.environ["CUBLAS_WORKSPACE_CONFIG"],
)
"""


def test_cuda_runs_keep_to_deterministic_kernels_and_the_cpu_is_left_alone() -> None:
    """cuDNN's timed algorithm choice and CUDA's atomic sums made two runs of one seed differ
    on a GPU, with no setting to stop it. On the CPU torch's switch would only cost time (it
    fills new tensors with NaN), so it stays off there and with `deterministic = false`.
    A fresh process: the switches are process-wide."""
    env = {k: v for k, v in os.environ.items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-c", _KERNELS], env=env, capture_output=True, text=True, check=True
    )
    assert done.stdout.split("\n")[:2] == ["False False", "True True True False :4096:8"]


def test_the_server_applies_the_runs_kernel_setting_before_it_computes(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The server attacks, scores and evaluates on its device: it keeps to deterministic
    kernels as the run says before any of that (checked by stopping at the call)."""
    from fedleak.simulations import study

    class Reached(Exception):
        pass

    calls = []

    def record(*args: object) -> None:
        calls.append(args)
        raise Reached

    monkeypatch.setattr(study, "deterministic_kernels", record)
    config = parse_flat({"deterministic": False, "out-dir": str(tmp_path / "run")})
    with pytest.raises(Reached):
        study.serve(None, config)  # type: ignore[arg-type]
    assert calls == [(torch.device("cpu"), False)] and not (tmp_path / "run").exists()
