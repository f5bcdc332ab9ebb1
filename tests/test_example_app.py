"""The example Flower app (`examples/audited-flower-app`): a plain Flower PyTorch app audited by
fedleak's client mod, `declare(...)` and `fedleak.audit(...)`.

Its leakage rows agree with fedleak's own client (`compute_update` + `reply_content`) on the
same model, weights, batch and seed; a client that declares nothing is still attacked, its
reconstructions saved, its metrics marked unavailable. The end-to-end test runs the app with
`flwr run` as its README says.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg
from flwr.supercore.task_identity import TaskIdentity

from fedleak.config import parse_flat
from fedleak.defenses import parse_defense_spec
from fedleak.messages import AUDIT, Declaration, add_declaration, reply_content, tensors_of
from fedleak.models import build_model
from fedleak.report.rundir import RunDirectory
from fedleak.runtime import federated_data, model_spec
from fedleak.server.build import build_strategy
from fedleak.server.privacy import PrivacyLedger
from fedleak.server.rounds import RoundHistory, RoundSink
from fedleak.server.strategy import CuriousStrategy
from fedleak.simulations.recording import RunRecorder
from fedleak.training.update import LocalTraining, compute_update

BIN = Path(sys.executable).parent
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "audited-flower-app"
COMPARED = ["mse", "psnr", "ssim", "lpips_alex", "label_acc", "loss_final"]
EXACT = [
    "round",
    "client_id",
    "attack",
    "sample",
    "target_index",
    "true_label",
    "pred_label",
    "mode",  # what the client declared, whatever the audit settings say
]


@pytest.fixture(scope="module")
def app() -> Iterator[object]:
    """The example's own modules (model, data, training), imported as its ServerApp does."""
    sys.path.insert(0, str(EXAMPLE))
    import audited_app.server_app as server_app
    import audited_app.task as task

    yield task, server_app
    sys.path.remove(str(EXAMPLE))
    for name in [m for m in sys.modules if m.startswith("audited_app")]:
        del sys.modules[name]


@pytest.fixture(autouse=True)
def _message_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


def _settings(server_app, **overrides: object) -> dict[str, object]:
    """The example's fedleak settings for its pyproject.toml run config plus `overrides`."""
    cfg = {
        "seed": 0,
        "num-server-rounds": 1,
        "lr": 0.1,
        "attacks": "aux-mean,ig",
        "attack-iterations": 5,
        "out-dir": "",
        **overrides,
    }
    return server_app.audit_settings(cfg)


def _strategy(
    settings: dict[str, object], sink: RoundSink | None = None, **own: object
) -> CuriousStrategy:
    """The curious server of `fedleak.audit`, wrapping FedAvg and reporting to `sink` (a
    `RoundHistory` by default); `own` settings describe fedleak's own clients' protocol (what
    their replies declare in their metrics)."""
    config = parse_flat({**settings, **{f"train.{k}": v for k, v in own.items()}})
    fd = federated_data(config, 1)
    inner = FedAvg(fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1)
    spec = model_spec(config, fd)
    return build_strategy(config, spec, fd, torch.device("cpu"), 0, inner, sink=sink)


def test_the_server_neither_tests_on_nor_hands_the_attacker_a_clients_digit(app) -> None:
    """The example named mnist5k, whose every digit its clients also trained on: its test
    accuracy was on training digits and 80 of 400 private samples were in the attacker's
    auxiliary set (audit BC1)."""
    task, server_app = app
    fd = federated_data(parse_flat(_settings(server_app)), 1)
    clients = torch.cat([task.load_partition(p, 2)[0] for p in range(2)]).flatten(1)
    seen = {row.numpy().tobytes() for row in clients}
    auxiliary = fd.dataset.train_x[fd.aux.tolist()]
    for name, images in (("test", fd.dataset.test_x), ("auxiliary", auxiliary)):
        assert len(images) >= 500, name
        shared = sum(row.numpy().tobytes() in seen for row in images.flatten(1))
        assert shared == 0, f"{shared} {name} digits are a client's"


def test_a_model_name_that_does_not_take_the_apps_weights_is_refused_first(
    app, tmp_path: Path
) -> None:
    """torch's multi-line load_state_dict error came after the run folder was made (BC6)."""
    import fedleak
    from fedleak.settings import ConfigError

    task, server_app = app
    settings = {**_settings(server_app), "model.name": "lenet", "out-dir": str(tmp_path / "r")}
    initial = ArrayRecord(task.Net().state_dict())
    with pytest.raises(ConfigError, match=r"^model\.name='lenet': does not take the app's in"):
        fedleak.audit(None, FedAvg(), settings, initial_arrays=initial)  # type: ignore[arg-type]
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("data.dataset", "folder:imgs"),
        ("data.data-dir", "data"),
        ("data.tokenizer", "file:tok.json"),
        ("attack.lti.cache-dir", "cache"),
    ],
)
def test_a_relative_path_is_refused_where_flower_starts_the_server_app(
    key: str, value: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under `flwr run` the ServerApp runs in the SuperLink's working directory: a relative
    `folder:` silently read a folder of the same name there (audit EQ1). Refused in one line,
    as `out-dir` is, before any folder is made; `fedleak run` reads them where the user is."""
    import fedleak
    from fedleak.server.validate import check_absolute_paths
    from fedleak.settings import ConfigError
    from fedleak.simulations.apps import make_server_app

    monkeypatch.chdir(tmp_path)  # where a same-named folder would be taken for the user's
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    settings = {"out-dir": str(tmp_path / "r"), "attack.names": "lti", key: value}
    expected = rf"^{key}='{value}': expected an absolute path \(the ServerApp runs in the Super"
    with pytest.raises(ConfigError, match=expected):
        fedleak.audit(None, FedAvg(), settings)  # type: ignore[arg-type]

    class Context:  # what Flower hands the ServerApp's main under `flwr run`
        run_config = settings

    main = make_server_app()._main
    assert main is not None
    with pytest.raises(ConfigError, match=expected):
        main(None, Context())
    assert not (tmp_path / "r").exists()
    prefix, _, path = value.rpartition(":")
    absolute = f"{prefix}:{tmp_path / path}" if prefix else str(tmp_path / path)
    check_absolute_paths(parse_flat({**settings, key: absolute}))  # accepted
    home = f"{prefix}:~/{path}" if prefix else f"~/{path}"
    check_absolute_paths(parse_flat({**settings, key: home}))  # every loader expands ~


def test_a_resumed_stateful_strategy_is_said_to_start_afresh() -> None:
    """FedAdam's moments are in no checkpoint: its resumed rounds differed silently (BC2)."""
    from flwr.serverapp.strategy import FedAdam, FedProx

    from fedleak.simulations.study import ForeignServer, _restarted_state

    class Renamed(FedAvg):  # aggregates as FedAvg does (audit AY D3)
        pass

    assert _restarted_state(ForeignServer(FedAvg())) is None
    assert _restarted_state(ForeignServer(FedProx())) is None
    assert _restarted_state(ForeignServer(Renamed())) is None
    warning = _restarted_state(ForeignServer(FedAdam()))
    assert warning is not None and warning.startswith("the app's FedAdam starts its own state")

    class Scheduled(FedProx):  # aggregates as FedProx, but counts its rounds (audit EO4)
        def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
            self.calls = getattr(self, "calls", 0) + 1
            return super().configure_train(server_round, arrays, config, grid)

    warning = _restarted_state(ForeignServer(Scheduled()))
    assert warning is not None
    assert warning.startswith("the app's Scheduled overrides FedProx's configure_train, which")
    for hook in ("configure_evaluate", "aggregate_evaluate"):  # a best-accuracy history, say
        kind = type("KeepsBest", (FedAvg,), {hook: getattr(FedAvg, hook)})
        kind_with_own = type("KeepsBest", (FedAvg,), {hook: lambda self, *args: None})
        assert _restarted_state(ForeignServer(kind())) is None  # the base's own hook
        warning = _restarted_state(ForeignServer(kind_with_own()))
        assert warning is not None and f"overrides FedAvg's {hook}, which may keep" in warning


def _client_batch(task, partition: int, server_round: int, seed: int = 0, examples: int = 4):
    """The batch the example's ClientApp trains on (its own data loading and sampling)."""
    x, y = task.load_partition(partition, 2)
    return task.local_batch(x, y, examples, seed * 1_000_003 + server_round * 1_009 + partition)


def _own_reply(strategy: CuriousStrategy, x, y, partition: int, training: LocalTraining):
    """fedleak's own client on the same weights and batch."""
    model = build_model(strategy.public.model)
    model.load_state_dict(strategy.global_weights)
    generator = torch.Generator().manual_seed(0)
    update = compute_update(model, x, y, 10, parse_defense_spec("none"), training, generator)
    config = parse_flat(
        {
            "train.mode": training.mode,
            "train.batch-size": training.batch_size,
            "train.local-steps": training.local_steps,
            "train.lr": training.learning_rate,
        }
    )
    content = reply_content(update, x, y, partition, config)
    return Message(content=content, dst_node_id=partition + 1, message_type="train")


def _foreign_reply(task, weights, x, y, partition: int, training: LocalTraining, declare: bool):
    """The example's ClientApp on the same weights and batch: its own training loop, its
    weights as the reply, and what fedleak's client mod adds."""
    model = task.Net()
    model.load_state_dict(weights)
    task.train(model, x, y, training.learning_rate, training.local_steps, training.batch_size)
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: v.detach() for k, v in model.state_dict().items()}),
            "metrics": MetricRecord({"num-examples": len(x)}),
        }
    )
    declared = None
    if declare:
        declared = Declaration.of(
            x, y, training.mode, training.learning_rate, training.local_steps, training.batch_size
        )
    add_declaration(content, partition, declared)
    return Message(content=content, dst_node_id=partition + 1, message_type="train")


def test_a_foreign_reply_is_read_under_its_strategys_keys_or_refused_in_one_line(app) -> None:
    """FedAvg(arrayrecord_key=..., weighted_by_key=...) aggregates replies under its own keys,
    but the curious server read "arrays" and "metrics" (KeyError; an undeclared client then
    counted 0 examples and crashed the image grid); a ClientApp without fedleak's mod raised
    KeyError 'audit' (audit BC3-BC5). Each is read, or refused as the run's one line."""
    from fedleak.server.selection import FederationError

    task, server_app = app
    settings = _settings(server_app)
    config = parse_flat(settings)
    fd = federated_data(config, 1)
    inner = FedAvg(
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
        arrayrecord_key="weights",
        weighted_by_key="n",
    )
    strategy = build_strategy(config, model_spec(config, fd), fd, torch.device("cpu"), 0, inner)
    strategy.global_weights = dict(task.Net().state_dict())
    x, y = _client_batch(task, 0, 1)
    training = LocalTraining("fedavg", 2, 2, 0.1)

    def reply(metrics: dict, declare: bool = False, mod: bool = True) -> Message:
        sent = _foreign_reply(task, strategy.global_weights, x, y, 0, training, declare)
        content = RecordDict(
            {"weights": sent.content["arrays"], "train_metrics": MetricRecord(metrics)}
        )
        if mod:
            add_declaration(content, 0, None)
        return Message(content=content, dst_node_id=1, message_type="train")

    observation = strategy.split(1, reply({"n": 4})).observation
    assert observation.num_examples == 4 and observation.client_id == 0
    # Flower's DP wrappers hold the wrapped strategy, and its keys, as `.strategy` (AY D1).
    wrapped = DifferentialPrivacyServerSideFixedClipping(
        inner, noise_multiplier=0.1, clipping_norm=1.0, num_sampled_clients=1
    )
    private = build_strategy(config, model_spec(config, fd), fd, torch.device("cpu"), 0, wrapped)
    private.global_weights = strategy.global_weights
    assert private.split(1, reply({"n": 4})).observation.num_examples == 4
    with pytest.raises(FederationError, match=r"^round 1, client 0: the reply declares no batch"):
        strategy.split(1, reply({"num-examples": 4}))
    with pytest.raises(FederationError, match=r"^round 1: a reply carries no fedleak declaration"):
        strategy.split(1, reply({"n": 4}, mod=False))
    # Declared labels the model cannot score were scored with a label accuracy of 0 (BC7).
    wrong = _foreign_reply(task, strategy.global_weights, x, y, 0, training, True)
    wrong.content["weights"] = wrong.content["arrays"]
    wrong.content[AUDIT] = ArrayRecord({"inputs": x, "labels": y + 10})
    with pytest.raises(FederationError, match=r"^round 1, client 0: declared labels up to 1\d,"):
        strategy.split(1, wrong)


def _rows(strategy: CuriousStrategy, replies: list[Message], server_round: int = 1):
    strategy.aggregate_train(server_round, replies)
    strategy.collect(wait=True)
    assert isinstance(strategy.sink, RoundHistory)  # the strategy's default sink
    return pd.DataFrame(strategy.sink.rows()).sort_values(
        ["client_id", "attack", "sample"], ignore_index=True
    )


def _assert_rows_agree(audited: pd.DataFrame, own: pd.DataFrame) -> None:
    assert len(audited) == len(own) > 0
    assert set(audited["status"]) == set(own["status"]) == {"ok"}
    pd.testing.assert_frame_equal(audited[EXACT], own[EXACT], check_dtype=False)
    np.testing.assert_allclose(
        audited[COMPARED].to_numpy(float), own[COMPARED].to_numpy(float), rtol=1e-3, atol=1e-5
    )


@pytest.mark.parametrize(
    "training",
    [LocalTraining("fedavg", 2, 2, 0.1), LocalTraining("fedsgd", 4, 1, 0.1)],
    ids=["fedavg", "fedsgd"],
)
def test_the_audited_app_leaks_what_fedleaks_own_client_leaks(
    app, training: LocalTraining, one_thread: None
) -> None:
    task, server_app = app
    settings = _settings(server_app)
    own_strategy = _strategy(
        settings,
        mode=training.mode,
        **{"batch-size": training.batch_size, "local-steps": training.local_steps},
    )
    audited_strategy = _strategy(settings)
    torch.manual_seed(0)
    weights = task.Net().state_dict()
    for strategy in (own_strategy, audited_strategy):
        strategy.global_weights = {k: v.clone() for k, v in weights.items()}
    batches = [_client_batch(task, p, 1) for p in (0, 1)]
    own = [_own_reply(own_strategy, x, y, p, training) for p, (x, y) in enumerate(batches)]
    audited = [
        _foreign_reply(task, weights, x, y, p, training, declare=True)
        for p, (x, y) in enumerate(batches)
    ]
    # The attacker's view: the same update up to float rounding (weights in, weights out).
    for mine, theirs in zip(own, audited, strict=True):
        seen = audited_strategy.split(1, theirs).observation
        expected = own_strategy.split(1, mine).observation
        assert (seen.update_kind, seen.num_examples, seen.batch_size, seen.local_steps) == (
            expected.update_kind,
            expected.num_examples,
            expected.batch_size,
            expected.local_steps,
        )
        for name, value in expected.update.items():
            torch.testing.assert_close(seen.update[name], value, rtol=1e-4, atol=1e-6)
    _assert_rows_agree(_rows(audited_strategy, audited), _rows(own_strategy, own))


def test_without_a_declaration_attacks_run_and_reconstructions_are_saved(
    app, tmp_path: Path, one_thread: None
) -> None:
    task, server_app = app
    settings = _settings(server_app, **{"out-dir": str(tmp_path / "run")})
    config = parse_flat(settings)
    fd = federated_data(config, 1)
    run_dir = RunDirectory.create(tmp_path / "run", config, {"seed": 0})
    ledger = PrivacyLedger.from_config(config, fd)
    recorder = RunRecorder(run_dir, fd, config.attack.images_per_client, ledger)
    strategy = _strategy(settings, sink=recorder)
    torch.manual_seed(0)
    weights = task.Net().state_dict()
    strategy.global_weights = dict(weights)
    training = LocalTraining("fedavg", 2, 2, 0.1)
    replies = [
        _foreign_reply(task, weights, *_client_batch(task, p, 1), p, training, declare=False)
        for p in (0, 1)
    ]
    aggregate, _ = strategy.aggregate_train(1, replies)
    strategy.collect(wait=True)
    strategy.end_round(1, aggregate, None)  # the round's records go to the run directory
    rows = RunDirectory.open(run_dir.path).leakage()
    # Undeclared: one step on the examples the metrics report, at the run's learning rate.
    assert set(rows["attack"]) == {"aux-mean", "ig"} and set(rows["status"]) == {"ok"}
    assert set(rows["scored_against"]) == {"unavailable"}
    assert rows[["mse", "psnr", "ssim", "lpips_alex", "label_acc"]].isna().all().all()
    assert (rows.loc[rows["attack"] == "ig", "iterations"] == 5).all()
    assert sorted(set(rows["client_id"])) == [0, 1] and (rows["batch_size"] == 4).all()
    saved = sorted(path.name for path in run_dir.images())
    assert saved == [f"r001_c00{c}_{a}.png" for c in (0, 1) for a in ("aux-mean", "ig")]
    # The app's own FedAvg aggregated the clients' weights as they are.
    expected = {
        k: (
            tensors_of(replies[0].content["arrays"])[k]
            + tensors_of(replies[1].content["arrays"])[k]
        )
        / 2
        for k in weights
    }
    for name, value in aggregate.to_torch_state_dict().items():
        torch.testing.assert_close(value, expected[name])
    # The summary and the report say what the attacks assumed, not a protocol "declared"
    # (audit EQ5).
    from fedleak.report.build import build_report

    summary = run_dir.write_summary().read_text()
    assert "protocol not declared, attacked as one step over the 4 examples each reported" in (
        summary
    )
    build_report(run_dir.path)
    report = (run_dir.path / "report.md").read_text()
    assert "declared another protocol" not in report
    assert "clients that declared no batch (`declare` not called) were attacked as one" in report


@pytest.mark.slow
def test_flwr_run_audits_the_example_app(
    app, flwr_home: Path, tmp_path: Path, one_thread: None
) -> None:
    """`flwr run examples/audited-flower-app`, as its README says: the run directory holds
    leakage rows equal to those of fedleak's own client on the same weights and batches."""
    task, server_app = app
    out = tmp_path / "run"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_HOME": str(flwr_home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    result = subprocess.run(
        [
            str(BIN / "flwr"),
            "run",
            str(EXAMPLE),
            "--stream",
            "--run-config",
            f"out-dir='{out}' num-server-rounds=1 attack-iterations=5",
            "--federation-config",
            "num-supernodes=2 client-resources-num-cpus=1",
        ],
        cwd=tmp_path,  # not the app folder: Flower then imports one copy of the code
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0 and (out / "DONE").exists(), log[-3000:]
    # A resume checks that it goes on with this strategy (audits EO4, EO5).
    environment = json.loads((out / "environment.json").read_text())
    assert environment["audited_strategy"] == "flwr.serverapp.strategy.fedavg.FedAvg"
    # The client mod answers the server's partition query (the app has no query handler).
    assert "No query function registered" not in log and "Traceback" not in log, log[-3000:]
    recorded = pd.read_parquet(out / "leakage.parquet")
    recorded = recorded.sort_values(["client_id", "attack", "sample"], ignore_index=True)
    assert len(run_dir_images := sorted((out / "images").glob("r001_*.png"))) == 4, run_dir_images

    settings = _settings(server_app)
    training = LocalTraining("fedavg", 2, 2, 0.1)
    strategy = _strategy(settings, **{"batch-size": 2, "local-steps": 2})
    torch.manual_seed(0)
    strategy.global_weights = dict(task.Net().state_dict())
    own = [_own_reply(strategy, *_client_batch(task, p, 1), p, training) for p in (0, 1)]
    _assert_rows_agree(recorded, _rows(strategy, own))


def test_an_audited_apps_own_errors_reach_flowers_log_as_one_line() -> None:
    """Under `flwr run` an audited app's ServerApp error reaches the user only through
    Flower's logger, which would print its traceback: `audit` installs the one-line filter
    before it reads the settings, which are the first thing it may refuse."""
    import logging

    from flwr.common.logger import FLOWER_LOGGER

    import fedleak
    from fedleak.registry import UnknownNameError
    from fedleak.simulations.study import OneLineErrors

    kept = list(FLOWER_LOGGER.filters)
    for existing in kept:
        FLOWER_LOGGER.removeFilter(existing)
    try:
        with pytest.raises(UnknownNameError) as raised:
            fedleak.audit(None, FedAvg(), {"attack.names": "nope"})  # type: ignore[arg-type]
        filters = [f for f in FLOWER_LOGGER.filters if isinstance(f, OneLineErrors)]
        assert len(filters) == 1
        record = logging.LogRecord(
            "flwr",
            logging.ERROR,
            __file__,
            1,
            "Simulation raised an exception",
            None,
            (UnknownNameError, raised.value, raised.value.__traceback__),
        )
        assert filters[0].filter(record) and record.exc_info is None
        assert record.getMessage().startswith(
            "Simulation raised an exception: UnknownNameError: attack.names='nope'"
        )
        assert "\n" not in logging.Formatter().format(record)
    finally:
        for added in list(FLOWER_LOGGER.filters):
            FLOWER_LOGGER.removeFilter(added)
        for existing in kept:
            FLOWER_LOGGER.addFilter(existing)


def test_a_long_error_under_flwr_run_keeps_its_remedy() -> None:
    """The stream's line was cut at 300 characters, `fedleak run`'s at 2,000: a client's
    failure lost "resume with sim.resume=true" under `flwr run` (audit CA5)."""
    import logging

    from fedleak.simulations.study import OneLineErrors, RunFailed

    error = RunFailed(f"/runs/x: round 2: a client failed ({'why ' * 80}); resume with it")
    record = logging.LogRecord(
        "flwr", logging.ERROR, __file__, 1, "failed", None, (RunFailed, error, None)
    )
    assert OneLineErrors().filter(record)
    assert record.getMessage().endswith("; resume with it")


def test_a_failed_run_gets_its_report_from_the_server(tmp_path: Path) -> None:
    """`flwr run` and an audited app have no `fedleak run` to build the report of a failed
    run afterwards: the server writes it beside FAILED, then raises."""
    from fedleak.simulations.study import RunFailed, _finish

    config = parse_flat({"num-server-rounds": 1, "out-dir": str(tmp_path / "run")})
    run_dir = RunDirectory.create(tmp_path / "run", config, {})
    run_dir.append_round(0, [], {"test_loss": 2.3, "test_accuracy": 0.1})
    failed = {"test_loss": 2.3, "test_accuracy": 0.1, "num_replies": 0, "num_failures": 2}
    run_dir.append_round(1, [], failed)
    with pytest.raises(RunFailed, match="every client failed"):
        _finish(run_dir, "ValueError: boom")
    assert (tmp_path / "run" / "FAILED").exists() and not (tmp_path / "run" / "DONE").exists()
    assert (tmp_path / "run" / "report.html").stat().st_size > 1_000


@pytest.mark.parametrize(
    ("hook", "central", "when"),
    [
        ("configure_train", False, "round 1: "),
        # Under central DP fedleak's wrapper holds the app's strategy: the app's is named (CU2).
        ("configure_train", True, "round 1: "),
        ("summary", False, ""),  # Flower calls it before the first round (audit CU1)
    ],
)
def test_an_audited_strategy_that_raises_ends_the_run_as_failed_in_one_line(
    app, tmp_path: Path, hook: str, central: bool, when: str
) -> None:
    """The app's own strategy raised through fedleak as a traceback and left its folder with
    neither DONE nor FAILED, which a new start then refused (audit CS4)."""
    import fedleak
    from fedleak.simulations.study import RunFailed

    task, server_app = app

    def fail(*args: object, **kwargs: object) -> None:
        raise ValueError("no clients today\nsecond line")

    Broken = type("Broken", (FedAvg,), {hook: fail})

    class TwoNodes:
        """A grid whose two nodes are connected; no message is ever sent to them."""

        def get_node_ids(self) -> list[int]:
            return [1, 2]

    run = tmp_path / "run"
    settings = {**_settings(server_app), "out-dir": str(run)}
    if central:
        settings |= {"defense.central-clip": 1.0, "defense.central-noise": 0.1}
    initial = ArrayRecord(task.Net().state_dict())
    with pytest.raises(RunFailed) as failed:
        fedleak.audit(TwoNodes(), Broken(), settings, initial_arrays=initial)  # type: ignore[arg-type]
    line = f"{when}the app's Broken.{hook} raised ValueError: no clients today"
    assert str(failed.value) == f"{run}: {line} second line"
    assert json.loads((run / "FAILED").read_text()) == {"reason": f"{line} second line"}
    assert not (run / "DONE").exists() and (run / "report.html").is_file()


def test_fedleaks_own_errors_inside_an_audited_strategy_are_not_blamed_on_the_app(app) -> None:
    """Central DP's noise overflow, raised by fedleak's wrapper around the app's strategy,
    read as "the app's CentralDP.aggregate_train raised ..." (audit CU2)."""
    from fedleak.server.central_dp import CentralNoiseOverflow
    from fedleak.server.strategy import AppStrategyFailed

    _, server_app = app
    strategy = _strategy(_settings(server_app))
    overflow = CentralNoiseOverflow("defense.central-noise=1e300: the noise overflows")
    with pytest.raises(CentralNoiseOverflow) as raised, strategy._app_code("aggregate_train", 1):
        raise overflow
    assert raised.value is overflow
    failed = pytest.raises(AppStrategyFailed, match=r"^round 1: the app's FedAvg\.aggregate_train ")
    with failed, strategy._app_code("aggregate_train", 1):
        raise KeyError("arrays")
