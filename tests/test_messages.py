"""Both ends of the wire: what a client packs (`fedleak.messages`) is what the server unpacks,
record by record, for every defense and for a BatchNorm model.

The client side is the real ClientApp function; its `ClientUpdate` is captured on its way into
the reply. The reply crosses Flower's protobuf serialisation (the deployment wire) before the
curious strategy splits it.
"""

from __future__ import annotations

import math

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.common.serde import message_from_proto, message_to_proto
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

import fedleak.client.app as client_app
from fedleak.config import parse_flat
from fedleak.data import client_batch, partition_rows
from fedleak.messages import (
    ARRAYS,
    AUDIT,
    BN_STATS,
    BUFFERS,
    EXTRA_RECORDS,
    METRICS,
    PER_SAMPLE,
    Declaration,
    num_partitions_of,
    partition_answer,
    partition_id_of,
    partition_query,
)
from fedleak.models import build_model
from fedleak.runtime import federated_data, model_spec
from fedleak.server.auditor import Auditor
from fedleak.server.strategy import CuriousStrategy, PublicSetting, average_buffers

BASE = {"train.batch-size": 2, "data.aux-size": 100}
CASES = {
    "none": {},
    "prune": {"defense.spec": "prune:0.9"},
    "sign": {"defense.spec": "sign"},
    "gauss": {"defense.spec": "gauss:0.01"},
    "dpsgd": {"defense.spec": "dpsgd:1.0:1.0"},
    "per-sample": {"threat.share": "per-sample", "defense.spec": "prune:0.5"},
    "mixup-b1": {"defense.spec": "mixup:3", "train.batch-size": 1},
    "instahide": {"defense.spec": "instahide:2"},
    "instahide-inter": {"defense.spec": "instahide:3:inter", "data.public-size": 30},
    "fedavg": {"train.mode": "fedavg", "train.examples": 4, "train.local-steps": 2},
    "batchnorm-fedsgd": {"model.name": "convnet-bn", "threat.bn-stats": "shared"},
    "batchnorm-fedavg": {
        "model.name": "convnet-bn",
        "train.mode": "fedavg",
        "train.examples": 4,
        "train.local-steps": 2,
    },
}


@pytest.fixture(autouse=True)
def _message_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _context(partition: int) -> Context:
    node = {"partition-id": partition, "num-partitions": 3}
    return Context(
        run_id=1, node_id=partition + 1, node_config=node, state=RecordDict(), run_config={}
    )


def _train_message(weights: dict[str, torch.Tensor], server_round: int) -> Message:
    """The server's train message to node 2 with the global weights."""
    return Message(
        content=RecordDict(
            {"arrays": ArrayRecord(weights), "config": ConfigRecord({"server-round": server_round})}
        ),
        dst_node_id=2,
        message_type=MessageType.TRAIN,
    )


@pytest.mark.parametrize("case", list(CASES))
def test_what_a_client_packs_is_what_the_server_unpacks(case: str, monkeypatch) -> None:
    config = parse_flat({**BASE, **CASES[case]})
    fd = federated_data(config, 3)
    spec = model_spec(config, fd)
    weights = build_model(spec).state_dict()
    sent = _train_message(weights, 2)
    captured = []

    def capture(*args, **kwargs):
        captured.append(compute_update(*args, **kwargs))
        return captured[-1]

    compute_update = client_app.compute_update
    monkeypatch.setattr(client_app, "compute_update", capture)
    reply = client_app.train_reply(sent, _context(1), config)
    (update,) = captured
    wire = message_from_proto(message_to_proto(reply))

    # Records: exactly the ones this configuration produces.
    expected = {ARRAYS, METRICS, AUDIT}
    expected |= {PER_SAMPLE} if update.per_sample is not None else set()
    expected |= {BN_STATS} if update.bn_statistics is not None else set()
    expected |= {BUFFERS} if update.buffers else set()
    assert set(wire.content.keys()) == expected and expected <= {ARRAYS, METRICS, *EXTRA_RECORDS}

    public = PublicSetting(
        spec,
        "gradient" if config.train.mode == "fedsgd" else "delta",
        config.train.lr,
        config.train.server_lr,
        config.defense.spec,
        config.threat.bn_stats == "shared",
    )
    strategy = CuriousStrategy(
        FedAvg(), public, None, Auditor(lpips_nets=()), attacks=(), clients_per_round=0, seed=0
    )
    strategy.global_weights = dict(weights)
    reply_split = strategy.split(2, wire)
    observation, truth = reply_split.observation, reply_split.truth

    # arrays + metrics -> the attacker's observation.
    assert observation.update.keys() == update.update.keys()
    assert all(torch.equal(observation.update[k], update.update[k]) for k in update.update)
    assert observation.client_id == 1 == partition_id_of(wire.content)
    assert observation.num_examples == config.train.examples_per_round
    assert observation.batch_size == config.train.batch_size
    assert observation.local_steps == config.train.local_steps
    assert observation.learning_rate == config.train.lr
    assert observation.defense == config.defense.spec
    # The private batch's loss crosses the wire only where no DP guarantee is claimed.
    sent_loss = float(wire.content[METRICS]["train-loss"])
    if case == "dpsgd":
        assert math.isnan(sent_loss) and math.isfinite(float(update.loss))
    else:
        assert sent_loss == pytest.approx(float(update.loss), rel=1e-6)
    if update.per_sample is None:
        assert observation.per_sample_updates is None
    else:
        assert all(
            torch.equal(observation.per_sample_updates[k], v) for k, v in update.per_sample.items()
        )
    if update.bn_statistics is None:
        assert observation.bn_statistics is None
    else:
        assert all(
            torch.equal(observation.bn_statistics[k], v) for k, v in update.bn_statistics.items()
        )

    # audit -> the auditor's ground truth.
    x, y = client_batch(fd, 1, 2, config.train.examples_per_round, config.seed)
    assert torch.equal(truth.inputs, x) and torch.equal(truth.labels, y)
    encoded = update.encoded
    if encoded is None:
        assert truth.encoded is None and truth.sources is None and truth.soft_labels is None
    else:
        assert torch.equal(truth.encoded, encoded.inputs)
        assert torch.equal(truth.sources, torch.where(encoded.from_public, -1, encoded.sources))
        assert torch.equal(truth.partners, encoded.partners)
        assert torch.equal(truth.partner_labels, encoded.partner_labels)
        assert torch.equal(truth.soft_labels, encoded.soft_labels)
        # Every private source resolves to an image of the client's partition.
        rows = fd.dataset.train_x[partition_rows(fd, 1)]
        for source in truth.sources[truth.sources >= 0].tolist():
            assert (rows == truth.private[source]).flatten(1).all(1).any()

    # buffers -> the server's average (one client: its own buffers, dtypes kept).
    averaged = average_buffers([wire], weights)
    assert averaged.keys() == update.buffers.keys()
    for name, value in update.buffers.items():
        assert averaged[name].dtype == value.dtype and torch.equal(averaged[name], value)
    if spec.name == "convnet-bn":
        steps = config.train.local_steps if config.train.mode == "fedavg" else 1
        counts = [v for k, v in averaged.items() if k.endswith("num_batches_tracked")]
        assert counts and all(int(c) == steps for c in counts)
        means = [v for k, v in averaged.items() if k.endswith("running_mean")]
        assert all(not torch.equal(m, torch.zeros_like(m)) for m in means)


def test_a_node_answers_the_partition_query() -> None:
    app = client_app.make_client_app(parse_flat(BASE))
    query = Message(content=partition_query(), dst_node_id=3, message_type=MessageType.QUERY)
    reply = app(query, _context(2))
    assert partition_id_of(message_from_proto(message_to_proto(reply)).content) == 2


@pytest.mark.parametrize(
    ("inputs", "labels", "problem"),
    [
        (
            (torch.linspace(0, 1, 32).reshape(2, 1, 4, 4) - 0.1307) / 0.3081,
            [0, 1],
            r"found values from -0\.4242 to 2\.821",
        ),
        (torch.full((2, 1, 4, 4), float("nan")), [0, 1], "expected finite float images"),
        (torch.rand(2, 1, 4, 4), torch.tensor([0.0, 1.0]), "expected integer class indices"),
        (torch.rand(2, 1, 4, 4), [-1, 1], "expected integer class indices >= 0"),
    ],
)
def test_a_declared_batch_outside_the_images_attacks_score_is_refused(inputs, labels, problem):
    labels = torch.as_tensor(labels)
    with pytest.raises(ValueError, match=problem) as caught:
        Declaration.of(inputs, labels, "fedsgd", 0.1, 1, None)
    assert str(caught.value).startswith("declare(") and "\n" not in str(caught.value)


def test_a_declared_batch_size_above_the_declared_inputs_is_refused() -> None:
    """batch_size=400 with 4 inputs was accepted and reported as the batch size (audit BC7)."""
    inputs, labels = torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 3])
    with pytest.raises(ValueError, match=r"^declare\(batch_size=400\): larger than the 4 decl"):
        Declaration.of(inputs, labels, "fedavg", 0.1, 2, 400)
    assert Declaration.of(inputs, labels, "fedavg", 0.1, 2, 2).batch_size == 2


def test_a_node_without_its_partition_says_how_to_start_it() -> None:
    """A SuperNode started without --node-config failed every round with a bare KeyError; the
    query answer carries the federation's size the server asks for at the start."""
    bare = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    with pytest.raises(client_app.NodeConfigError, match=r'--node-config "partition-id=I num'):
        client_app.node_partition(bare)
    assert client_app.node_partition(_context(2)) == (2, 3)
    answer = partition_answer(*client_app.node_partition(_context(2)))
    assert (partition_id_of(answer), num_partitions_of(answer)) == (2, 3)


def test_a_buffer_one_client_left_unchanged_counts_at_the_value_it_was_sent() -> None:
    # Clients send only the buffers their computation changed (plus BatchNorm's): FedAvg of
    # whole states counts the others at w_t's value, weighted like the rest.
    sent = {"counter": torch.tensor(2.0), "bn.num_batches_tracked": torch.tensor(4)}

    def reply(buffers: dict[str, torch.Tensor], examples: int) -> Message:
        content = RecordDict(
            {
                BUFFERS: ArrayRecord(buffers),
                METRICS: MetricRecord({"num-examples": examples}),
            }
        )
        return Message(content=content, dst_node_id=1, message_type=MessageType.TRAIN)

    with_counter = reply(
        {"counter": torch.tensor(5.0), "bn.num_batches_tracked": torch.tensor(5)}, 1
    )
    without = reply({"bn.num_batches_tracked": torch.tensor(5)}, 3)
    averaged = average_buffers([with_counter, without], sent)
    assert float(averaged["counter"]) == pytest.approx((5.0 * 1 + 2.0 * 3) / 4)
    assert averaged["bn.num_batches_tracked"].dtype == torch.int64
    assert int(averaged["bn.num_batches_tracked"]) == 5
    # Integer counts that disagree round to the nearest, not down (audit DJ7): (4*3 + 7)/4.
    fewer = reply({"bn.num_batches_tracked": torch.tensor(4)}, 3)
    more = reply({"bn.num_batches_tracked": torch.tensor(7)}, 1)
    assert int(average_buffers([fewer, more], sent)["bn.num_batches_tracked"]) == 5


@pytest.mark.parametrize("deterministic", [True, False])
def test_the_client_applies_the_runs_kernel_setting_on_its_device(
    deterministic: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each client process keeps to deterministic kernels as the run says, on its device."""
    config = parse_flat({**BASE, "deterministic": deterministic})
    weights = build_model(model_spec(config, federated_data(config, 3))).state_dict()
    sent = _train_message(weights, 1)
    calls = []
    monkeypatch.setattr(client_app, "deterministic_kernels", lambda *args: calls.append(args))
    client_app.train_reply(sent, _context(1), config)
    assert calls == [(torch.device("cpu"), deterministic)]


def test_a_clients_defense_draws_are_new_each_round_and_its_own() -> None:
    """The noise a client adds (its update with `gauss` less the same update without) is
    drawn afresh each round and apart from other clients: noise repeated across rounds would
    cancel in the difference of two rounds' updates (audit DJ4)."""
    plain, noisy = (parse_flat({**BASE, "defense.spec": spec}) for spec in ("none", "gauss:0.1"))
    fd = federated_data(plain, 3)
    weights = build_model(model_spec(plain, fd)).state_dict()

    def noise(server_round: int, partition: int) -> torch.Tensor:
        sent = _train_message(weights, server_round)
        flat = []
        for config in (noisy, plain):
            reply = client_app.train_reply(sent, _context(partition), config)
            update = reply.content[ARRAYS].to_torch_state_dict()
            flat.append(torch.cat([value.flatten() for value in update.values()]))
        return flat[0] - flat[1]

    first, second, other = noise(1, 1), noise(2, 1), noise(1, 2)
    assert 0.09 < float(first.std()) < 0.11
    for draws in (second, other):
        assert abs(float(torch.corrcoef(torch.stack([first, draws]))[0, 1])) < 0.05


def test_fedleaks_own_client_errors_are_one_line_error_replies(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Under `flwr run` a refused `declare` reached the log as a Ray traceback per client
    (audit EQ2): fedleak's own errors become error replies with their one line, which the
    server reports; any other exception (a bug, the app's own code) keeps its traceback."""
    from flwr.app import Error
    from flwr.clientapp import ClientApp
    from flwr.common.constant import ErrorCode

    from fedleak.client.audit import declare, fedleak_mod

    app = ClientApp(mods=[fedleak_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if msg.content["config"]["server-round"] == 1:
            declare(
                torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 2, 3]), learning_rate=0.1, batch_size=0
            )
        raise KeyError("the app's own bug")

    sent = _train_message({"w": torch.zeros(2)}, 1)
    reply = app(sent, _context(1))
    assert reply.has_error() and isinstance(reply.error, Error)
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert (
        reply.error.reason.startswith("ValueError: declare(batch_size=0, ")
        and "\n" not in reply.error.reason
    )
    with pytest.raises(KeyError, match="the app's own bug"):
        app(_train_message({"w": torch.zeros(2)}, 2), _context(1))
    # fedleak's own ClientApp: a node without its partition, in a round and when queried.
    bare = Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})
    own = client_app.make_client_app(parse_flat(BASE))
    for message in (sent, Message(RecordDict(), dst_node_id=2, message_type=MessageType.QUERY)):
        reply = own(message, bare)
        assert reply.has_error() and '--node-config "partition-id=I num' in reply.error.reason
    # Another type than fedleak's says which (a bare "'config'" did not, audit EU2), and
    # `fedleak --verbose` prints its traceback, where Ray sends it to the driver.
    unconfigured = Message(RecordDict(), dst_node_id=2, message_type=MessageType.TRAIN)
    capsys.readouterr()
    reply = own(unconfigured, _context(1))
    assert reply.error.reason.startswith("KeyError: ")
    assert "Traceback" not in capsys.readouterr().err
    verbose = client_app.make_client_app(parse_flat(BASE), verbose=True)
    assert verbose(unconfigured, _context(1)).error.reason == reply.error.reason
    assert "Traceback (most recent call last)" in capsys.readouterr().err
