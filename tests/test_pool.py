"""The Ray attack-worker pool (same results as inline, dead workers cost one job, placement) and
round payload budgets.

The unit tests start a small local Ray of their own (as Flower would) and stop it; the end to
end tests run real simulations through `run_study` with `attack.workers`.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.simulation.run_simulation import _replace_keys
from flwr.supercore.task_identity import TaskIdentity

from fedleak.attacks import registry as attack_registry
from fedleak.attacks.registry import attack_entry, build_attack, register_attack
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation
from fedleak.client.app import train_reply
from fedleak.config import RunConfig, parse_flat
from fedleak.data import auxiliary, client_batch
from fedleak.defenses import parse_defense_spec
from fedleak.interrupt import request_stop
from fedleak.models import build_model
from fedleak.runtime import federated_data, local_training, model_spec
from fedleak.server.payload import (
    PayloadBudgetError,
    check_payload,
    clients_per_round,
    estimate_payload,
    reply_bytes,
)
from fedleak.server.pool import (
    ATTACK_RESOURCE,
    KILL_ENV,
    Fault,
    PoolError,
    RayAttackPool,
    ResourceRequestError,
    check_gpu_request,
    ray_init_args,
)
from fedleak.server.rounds import RoundLog
from fedleak.server.runner import AttackJob, InlineRunner
from fedleak.simulations.launch import StudyInterrupted, run_study
from fedleak.simulations.recording import RunRecorder
from fedleak.training.update import compute_update

ATTACKS = ("aux-mean", "ig")


def _config(**flat: object) -> RunConfig:
    base = {
        "data.aux-size": 50,
        "train.batch-size": 2,
        "attack.names": ",".join(ATTACKS),
        "attack.workers": 2,
    }
    return parse_flat({**base, **flat})


def _jobs(config: RunConfig, rounds: int = 2, clients: int = 3) -> tuple[list, AttackerKnowledge]:
    """Real FedSGD observations of a LeNet on the embedded data, every attack on every one."""
    fd = federated_data(config, clients)
    spec = model_spec(config, fd)
    model = build_model(spec)
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    jobs = []
    for server_round in range(1, rounds + 1):
        for client in range(clients):
            x, y = client_batch(fd, client, server_round, 2, config.seed)
            update = compute_update(
                model,
                x,
                y,
                spec.num_classes,
                parse_defense_spec("none"),
                local_training(config),
                torch.Generator().manual_seed(client),
            )
            observation = Observation(
                round=server_round,
                client_id=client,
                model=spec,
                weights=weights,
                update=update.update,
                update_kind="gradient",
                num_examples=2,
                batch_size=2,
                local_steps=1,
                learning_rate=config.train.lr,
                defense="none",
            )
            for name in ATTACKS:
                jobs.append(AttackJob(len(jobs), name, observation))
    aux_x, aux_y = auxiliary(fd)
    knowledge = AttackerKnowledge(
        aux_x, aux_y, fd.dataset.input_shape, fd.dataset.num_classes, seed=config.seed
    )
    return jobs, knowledge


def test_the_pool_refuses_to_run_without_flowers_ray() -> None:
    if ray.is_initialized():
        pytest.skip("a Ray runtime is already up in this process")
    config = _config()
    jobs, knowledge = _jobs(config, rounds=1, clients=1)
    pool = RayAttackPool(config, knowledge, Budget(5, 10.0))
    with pytest.raises(PoolError, match="Ray is not initialised"):
        pool.submit(jobs)


def test_known_attacks_are_spread_and_others_pinned() -> None:
    assert not attack_entry("aux-mean").stateful
    assert not attack_entry("ig").stateful
    assert attack_entry("lti").stateful

    class Learner:
        name = "learner"

    class Declared:
        name = "declared"
        stateful = False

    try:
        register_attack("test-learner", Learner)
        register_attack("test-declared", Declared)
        assert attack_entry("test-learner").stateful
        assert not attack_entry("test-declared").stateful
    finally:
        attack_registry.ATTACKS.remove("test-learner")
        attack_registry.ATTACKS.remove("test-declared")


def test_fault_spec_parses_and_rejects_garbage() -> None:
    assert Fault.parse("") is None
    assert Fault.parse("aux-mean@2:1") == Fault("aux-mean", 2, 1)
    assert Fault.parse("aux-mean@2:1:once") == Fault("aux-mean", 2, 1, once=True)
    with pytest.raises(ValueError, match=KILL_ENV):
        Fault.parse("aux-mean-2-1")


def test_gpu_requests_fail_before_ray_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    inline = _config(**{"attack.workers": 0})
    with pytest.raises(ResourceRequestError, match=r"client-gpus=0.5: no CUDA GPU"):
        check_gpu_request(0.5, inline, gpus=0)
    with pytest.raises(ResourceRequestError, match=r"attack.worker-gpus=1: no CUDA GPU"):
        check_gpu_request(0.0, _config(**{"attack.worker-gpus": 1.0}), gpus=0)
    with pytest.raises(ResourceRequestError, match="device='cuda'"):
        check_gpu_request(0.0, _config(**{"device": "cuda", "attack.workers": 0}), gpus=1)
    with pytest.raises(ResourceRequestError, match="no client would fit"):
        check_gpu_request(0.5, _config(**{"attack.worker-gpus": 0.5}), gpus=1)
    check_gpu_request(0.25, _config(**{"attack.worker-gpus": 0.25}), gpus=1)
    check_gpu_request(0.0, inline, gpus=0)
    # No GPU at all: said first, not advice to ask for a share no GPU could give (audit DB2).
    cuda = _config(**{"device": "cuda", "attack.workers": 0})
    with pytest.raises(ResourceRequestError, match=r"^device='cuda': no CUDA GPU is visible"):
        check_gpu_request(0.0, cuda, gpus=0)
    # Workers alone can ask for more than there is: Ray would wait for them forever.
    four_whole = _config(**{"attack.workers": 4, "attack.worker-gpus": 1.0})
    with pytest.raises(ResourceRequestError, match=r"the 2 GPUs here hold at most 2 such"):
        check_gpu_request(0.0, four_whole, gpus=2)
    three_fractions = _config(**{"attack.workers": 3, "attack.worker-gpus": 0.6})
    with pytest.raises(ResourceRequestError, match=r"hold at most 2 such workers"):
        check_gpu_request(0.0, three_fractions, gpus=2)  # 1.8 GPUs, but one 0.6 per GPU
    check_gpu_request(0.0, _config(**{"attack.workers": 4, "attack.worker-gpus": 0.5}), gpus=2)
    check_gpu_request(0.0, _config(**{"attack.workers": 1, "attack.worker-gpus": 2.0}), gpus=2)


def test_init_args_take_the_workers_share_from_the_clients(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_init_args(_config(**{"attack.workers": 0}), 1.0, 0.0, cpus=2, gpus=0) == {}
    one = _config(**{"attack.workers": 1})
    assert ray_init_args(one, 1.0, 0.0, cpus=2, gpus=0) == {
        "num_cpus": 1,
        "resources": {ATTACK_RESOURCE: 1},
    }
    # 16 cores, one GPU: clients at 0.25 GPU beside a 0.5-GPU worker -> at most 2 clients.
    gpu = _config(**{"attack.workers": 1, "attack.worker-gpus": 0.5})
    assert ray_init_args(gpu, 1.0, 0.25, cpus=16, gpus=1)["num_cpus"] == 2
    with pytest.raises(ResourceRequestError, match="fewer than one client needs"):
        ray_init_args(_config(), 1.0, 0.0, cpus=2, gpus=0)
    # run_simulation rewrites '-' to '_' in every backend key: the resource must survive it.
    backend = {"init_args": ray_init_args(one, 1.0, 0.0, cpus=2, gpus=0)}
    assert _replace_keys(backend, match="-", target="_") == backend
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert ray_init_args(one, 1.0, 0.0, cpus=2, gpus=0) == {}


def test_a_cluster_address_nothing_answers_at_is_refused_before_ray(monkeypatch) -> None:
    """`ray.init` retried an unreachable RAY_ADDRESS without end, and SIGTERM waited for a
    safe point that never came (audit DB1)."""
    import socket

    from ray._private import services

    from fedleak.server.validate import check_resources

    config = parse_flat({})
    with socket.socket() as closed:  # a port bound here and never listened on: refused
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")
        with pytest.raises(ResourceRequestError, match=rf"^RAY_ADDRESS='127\.0\.0\.1:{port}': no"):
            check_resources(config, 2, 1.0, 0.0)
    monkeypatch.setenv("RAY_ADDRESS", "head-without-port")
    with pytest.raises(ResourceRequestError, match="expected HOST:PORT of a running cluster"):
        check_resources(config, 2, 1.0, 0.0)
    with socket.create_server(("127.0.0.1", 0)) as head:  # something answers: Ray's to join
        monkeypatch.setenv("RAY_ADDRESS", f"ray://127.0.0.1:{head.getsockname()[1]}")
        check_resources(config, 2, 1.0, 0.0)

    def no_cluster(address: str) -> str:
        raise ConnectionError("Could not find any running Ray instance.")

    monkeypatch.setattr(services, "canonicalize_bootstrap_address", no_cluster)
    monkeypatch.setenv("RAY_ADDRESS", "auto")
    with pytest.raises(ResourceRequestError, match=r"^RAY_ADDRESS='auto': no Ray cluster was"):
        check_resources(config, 2, 1.0, 0.0)


@pytest.fixture(scope="class")
def local_ray():
    """A small Ray of this process's own, with the attack resource a study would reserve."""
    if ray.is_initialized():
        pytest.skip("a Ray runtime is already up in this process")
    ray.init(
        address="local",
        num_cpus=1,
        resources={ATTACK_RESOURCE: 2},
        include_dashboard=False,
        logging_level="ERROR",
        log_to_driver=False,
    )
    try:
        yield
    finally:
        ray.shutdown()


def _by_job(results) -> dict[int, object]:
    return {r.job.job_id: r.reconstruction for r in results}


@pytest.mark.usefixtures("local_ray")
class TestPool:
    budget = Budget(max_iterations=8, max_seconds=30.0)

    def test_same_reconstructions_as_inline_with_stateful_attacks_pinned(self) -> None:
        config = _config()
        jobs, knowledge = _jobs(config, rounds=1)
        attacks = {n: build_attack(n, {}, seed=config.seed) for n in ATTACKS}
        inline = InlineRunner(attacks, knowledge, self.budget)
        inline.submit(jobs)
        expected = _by_job(inline.ready())
        pool = RayAttackPool(config, knowledge, self.budget)
        pool.stateful = {"aux-mean"}  # as if it kept state across rounds
        try:
            pool.submit(jobs)
            queued = pool.queued
            assert sum(map(len, queued)) == len(jobs)  # all queued, none harvested yet
            holders = [
                i for i, held in enumerate(queued) if any(j.attack == "aux-mean" for j in held)
            ]
            assert len(holders) == 1
            pinned = [j.job_id for j in queued[holders[0]] if j.attack == "aux-mean"]
            assert pinned == sorted(pinned) and len(pinned) == len(jobs) // 2
            # The other attack balances the load around the pinned one.
            assert abs(len(queued[0]) - len(queued[1])) <= 1
            got = _by_job(pool.ready(wait=True))
            assert pool.outstanding == 0 and pool.ready() == []
        finally:
            pool.close()
        assert got.keys() == expected.keys()
        for job_id, reconstruction in expected.items():
            assert reconstruction.status == got[job_id].status == "ok"
            torch.testing.assert_close(got[job_id].inputs, reconstruction.inputs)
            assert torch.equal(got[job_id].labels, reconstruction.labels)

    def test_a_dead_worker_costs_only_its_job(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv(KILL_ENV, "aux-mean@1:1")
        config = _config(**{"attack.workers": 1})
        jobs, knowledge = _jobs(config, rounds=2, clients=2)
        pool = RayAttackPool(config, knowledge, self.budget)
        try:
            pool.submit(jobs[:4])  # round 1; the killed job has two jobs queued behind it
            pool.submit(jobs[4:])
            results = pool.ready(wait=True)
            assert pool.replaced == 2  # the killed job was retried once on a fresh worker
            pool.submit(jobs[:1])  # the replacement keeps working
            results += pool.ready(wait=True)
        finally:
            pool.close()
        assert sorted(r.job.job_id for r in results) == sorted([*range(len(jobs)), 0])
        failed = [r for r in results if r.reconstruction.status != "ok"]
        assert [(r.job.attack, r.job.observation.client_id) for r in failed] == [("aux-mean", 1)]
        assert failed[0].reconstruction.status == "failed"
        assert failed[0].reconstruction.message.startswith("worker died")

    def test_a_job_whose_worker_died_once_is_retried(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A dying worker can lose the reply of the job it had just finished, which then reads
        as dead too: one death alone does not fail a job."""
        monkeypatch.setenv(KILL_ENV, "aux-mean@1:1:once")
        config = _config(**{"attack.workers": 1})
        jobs, knowledge = _jobs(config, rounds=1, clients=2)
        pool = RayAttackPool(config, knowledge, self.budget)
        try:
            pool.submit(jobs)
            results = pool.ready(wait=True)
            assert pool.replaced == 1
        finally:
            pool.close()
        assert sorted(r.job.job_id for r in results) == list(range(len(jobs)))
        assert {r.reconstruction.status for r in results} == {"ok"}

    def test_workers_that_cannot_be_placed_fail_the_round_clearly(self) -> None:
        config = _config(**{"attack.workers": 3})  # 3 units asked, 2 reserved
        jobs, knowledge = _jobs(config, rounds=1, clients=1)
        pool = RayAttackPool(config, knowledge, self.budget, placement_timeout=5.0)
        with pytest.raises(
            PoolError, match=f"need 3 units of the Ray resource '{ATTACK_RESOURCE}'"
        ):
            pool.submit(jobs)
        gpu = _config(**{"attack.workers": 1, "attack.worker-gpus": 0.5})
        with pytest.raises(PoolError, match=r"worker-gpus=0\.5: the Ray cluster has 0 GPUs"):
            RayAttackPool(gpu, knowledge, self.budget).submit(jobs)


# -- payload budgets -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "flat",
    [
        {"train.batch-size": 4},
        {"train.batch-size": 4, "threat.share": "per-sample", "defense.spec": "mixup:2"},
        {"model.name": "resnet20", "threat.bn-stats": "shared", "train.batch-size": 2},
        {"train.batch-size": 1, "defense.spec": "instahide:3"},
        {"train.batch-size": 2, "defense.spec": "instahide:3:inter", "data.public-size": 20},
    ],
)
def test_the_estimate_is_what_a_client_sends(flat: dict[str, object]) -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    config = parse_flat(flat)
    spec = model_spec(config, federated_data(config, 3))
    sent = Message(
        content=RecordDict(
            {
                "arrays": ArrayRecord(build_model(spec).state_dict()),
                "config": ConfigRecord({"server-round": 1}),
            }
        ),
        dst_node_id=1,
        message_type=MessageType.TRAIN,
    )
    node = {"partition-id": 0, "num-partitions": 3}
    reply = train_reply(sent, Context(1, 1, node, RecordDict(), {}), config)
    payload = estimate_payload(config, spec, num_clients=3)
    # Encodings: the estimate counts k - 1 partners per sample from outside the batch; those
    # that were drawn from the batch itself are not sent again.
    unsent = 0
    encoder = parse_defense_spec(config.defense.spec).encoder
    if encoder is not None and not getattr(encoder, "inter", False):
        audit = reply.content["audit"]
        examples, image = audit["inputs"].shape[0], math.prod(spec.input_shape) * 4
        unsent = (examples * (encoder.k - 1) - audit["partners"].shape[0]) * (image + 8)
    assert payload.reply - unsent == reply_bytes(reply)
    assert payload.total == 3 * (payload.weights + payload.reply)


def test_a_round_over_budget_is_refused_in_one_line() -> None:
    flat = {"train.batch-size": 64, "threat.share": "per-sample"}
    unlimited = parse_flat(flat)
    spec = model_spec(unlimited, federated_data(unlimited, 1))
    one = estimate_payload(unlimited, spec, 1)
    parameters = sum(p.numel() for p in build_model(spec).parameters())
    assert one.per_sample > 64 * parameters * 4  # per-sample sharing dominates a reply
    assert check_payload(unlimited, spec, num_clients=10_000).clients == 10_000
    budget = round(25 * one.total / 1e6, 3)  # room for 25 clients
    config = parse_flat({**flat, "sim.payload-budget-mb": budget})
    assert check_payload(config, spec, num_clients=20).total_mb <= budget
    with pytest.raises(PayloadBudgetError) as refused:
        check_payload(config, spec, num_clients=30)
    message = str(refused.value)
    assert message.startswith(f"sim.payload-budget-mb={budget:g}: a round would move ")
    assert "30 clients" in message and "\n" not in message
    assert message.endswith("or use fewer clients, a smaller batch or threat.share='batch'")
    # Batch sharing: neither the batch nor the sharing would shrink the weights and the
    # update; only what would is advised (audit DB3).
    shared = parse_flat({"threat.share": "batch", "sim.payload-budget-mb": 0.01})
    with pytest.raises(PayloadBudgetError) as refused:
        check_payload(shared, spec, num_clients=30)
    assert str(refused.value).endswith("; raise the budget, or use fewer clients")
    sampled = parse_flat({"train.fraction-train": 0.1, "train.min-clients": 3})
    assert clients_per_round(sampled, 100) == 10 and clients_per_round(sampled, 10) == 3


# -- end to end: real simulations ------------------------------------------------------------
def _study(out: Path, **flat: object) -> pd.DataFrame:
    settings = {
        "name": "pool",
        "num-server-rounds": 2,
        "out-dir": str(out),
        "train.batch-size": 2,
        "data.aux-size": 100,
        "attack.names": "aux-mean,ig",
        "attack.max-iterations": 10,
        "attack.clients-per-round": 2,
        "attack.images-per-client": 0,
        **flat,
    }
    run_study(parse_flat(settings), num_clients=3)
    leakage = pd.read_parquet(out / "leakage.parquet")
    keys = ["round", "client_id", "attack", "scored_against", "sample"]
    return leakage.sort_values(keys).reset_index(drop=True)


SCORES = ["round", "client_id", "attack", "sample", "target_index", "status", "pred_label"]
METRICS = ["mse", "psnr", "ssim", "label_acc"]


@pytest.fixture(scope="module")
def inline_rows(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    return _study(tmp_path_factory.mktemp("inline") / "run")


def test_the_pool_records_inline_rows_and_a_killed_worker_only_its_own(
    inline_rows: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim = inline_rows[(inline_rows["round"] == 2) & (inline_rows.attack == "ig")]
    client = int(victim.client_id.iloc[0])
    monkeypatch.setenv(KILL_ENV, f"ig@2:{client}")
    rows = _study(tmp_path / "run", **{"attack.workers": 1})
    killed = (rows["round"] == 2) & (rows.attack == "ig") & (rows.client_id == client)
    assert rows[killed].status.tolist() == ["failed"]
    assert rows[killed].message.str.startswith("worker died").all()
    kept = inline_rows[
        ~((inline_rows["round"] == 2) & (inline_rows.attack == "ig"))
        | (inline_rows.client_id != client)
    ].reset_index(drop=True)
    # Every other row is what inline execution recorded, under the same round.
    survivors = rows[~killed].reset_index(drop=True)
    assert len(survivors) == 14  # 2 rounds x 2 clients x 2 attacks x 2 samples, minus one job
    pd.testing.assert_frame_equal(survivors[SCORES], kept[SCORES])
    pd.testing.assert_frame_equal(survivors[METRICS], kept[METRICS], rtol=1e-4)
    utility = pd.read_csv(tmp_path / "run" / "utility.csv")
    assert list(utility["round"]) == [0, 1, 2]
    assert (tmp_path / "run" / "DONE").exists()


def test_a_round_whose_attacks_a_stop_cut_short_is_done_again_on_resume(
    inline_rows: pd.DataFrame, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool attacks round 1 while round 2 trains: a stop then must not record round 1
    without its rows, and the resumed run must hold what an uninterrupted one holds."""
    out = tmp_path / "run"
    ended = RunRecorder.round_finished

    def stop_once_round_one_ends(self: RunRecorder, log: RoundLog, arrays: ArrayRecord) -> None:
        ended(self, log, arrays)
        if log.round == 1:
            assert log.attack_jobs == 4 and self.unrecorded == (1,)  # its jobs are still out
            request_stop()

    monkeypatch.setattr(RunRecorder, "round_finished", stop_once_round_one_ends)
    with pytest.raises(StudyInterrupted, match="stopped after 0 of 2 rounds"):
        _study(out, **{"attack.workers": 1})
    assert list(pd.read_csv(out / "utility.csv")["round"]) == [0]
    assert torch.load(out / "checkpoints" / "global.pt", weights_only=True)["round"] == 0
    monkeypatch.setattr(RunRecorder, "round_finished", ended)

    rows = _study(out, **{"attack.workers": 1, "sim.resume": True})
    pd.testing.assert_frame_equal(rows[SCORES], inline_rows[SCORES])
    pd.testing.assert_frame_equal(rows[METRICS], inline_rows[METRICS], rtol=1e-4)
    assert list(pd.read_csv(out / "utility.csv")["round"]) == [0, 1, 2]
    assert (out / "DONE").exists()


@pytest.mark.parametrize("deterministic", [True, False])
def test_an_attack_worker_applies_the_runs_kernel_setting_on_its_device(
    deterministic: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An attack worker is a process of its own: it keeps to deterministic kernels as the run
    says, on the device it found."""
    import fedleak.server.pool as pool

    config = _config(deterministic=deterministic)
    _, knowledge = _jobs(config, rounds=1, clients=1)
    calls = []
    monkeypatch.setattr(pool, "deterministic_kernels", lambda *args: calls.append(args))
    threads = torch.get_num_threads()
    try:
        pool.AttackWorker(
            {"aux-mean": {}}, 0, knowledge, Budget(1, 1.0), "auto", threads, None, deterministic
        )
    finally:
        torch.set_num_threads(threads)
    assert calls == [(torch.device("cpu"), deterministic)]
