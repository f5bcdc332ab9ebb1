"""A round's attack jobs as one batched problem: same results per job as one at a time.

Observations of several clients that share the model and w_t are stacked and optimised
together (`BatchedInversion.reconstruct_batch`, used by the runners). Each job keeps its own
seed, labels, starts, dropout draws, iteration budget and diagnostics, so for the first
iterations batched and one-at-a-time runs agree to float32 round-off (kernels differ between
batch sizes, and signed steps can amplify a flipped sign later on), and over a full run their
leakage rows agree in distribution. No GPU is lent to this project's tests: the CUDA chunk
size is checked with a fake memory meter, and the step's device, shape and dtype logic on
PyTorch's `meta` device.
"""

from __future__ import annotations

import dataclasses
import math
import time

import pytest
import torch

from fedleak.attacks.optimization import batching
from fedleak.attacks.optimization.attacks import ObservationError, start
from fedleak.attacks.optimization.batching import automatic_cap, plan, problems_that_fit
from fedleak.attacks.optimization.engine import BatchedAdam, BatchedLBFGS
from fedleak.attacks.optimization.losses import MatchingLoss, batchnorm_prior, total_variation
from fedleak.attacks.optimization.replay import ClientProtocol, Replay
from fedleak.attacks.registry import build_attack
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation
from fedleak.data import load_dataset
from fedleak.defenses import parse_defense_spec
from fedleak.models import ModelSpec, build_model
from fedleak.server.auditor import Auditor, GroundTruth
from fedleak.server.runner import AttackJob, InlineRunner
from fedleak.training.update import LocalTraining, compute_update

pytestmark = pytest.mark.usefixtures("one_thread")

CLASSES = 10


@pytest.fixture(scope="module")
def mnist():
    """Twelve private MNIST-5k images (one or two per client) and 200 auxiliary images."""
    data = load_dataset("mnist5k")
    order = torch.randperm(data.train_x.shape[0], generator=torch.Generator().manual_seed(5))
    private, aux = order[:12], order[12:212]
    return data.train_x[private], data.train_y[private], data.train_x[aux], data.train_y[aux]


def _round(
    mnist, clients: int, per_client: int, share: str = "per-sample", spec=None, steps: int = 0
):
    """One round's observations (one shared weights object, as the strategy builds them);
    `steps` > 0: FedAvg deltas of that many local steps of one sample each."""
    x, y, aux_x, aux_y = mnist
    spec = spec or ModelSpec("lenet", tuple(x.shape[1:]), CLASSES, init="uniform", seed=0)
    model = build_model(spec)
    weights = model.state_dict()
    observations, truths = [], []
    for client in range(clients):
        xs = x[client * per_client : (client + 1) * per_client]
        ys = y[client * per_client : (client + 1) * per_client]
        update = compute_update(
            model,
            xs,
            ys,
            CLASSES,
            parse_defense_spec("none"),
            LocalTraining("fedavg", 1, steps, 0.1)
            if steps
            else LocalTraining("fedsgd", per_client, share=share),
            torch.Generator().manual_seed(client),
        )
        observations.append(
            Observation(
                round=3,
                client_id=client,
                model=spec,
                weights=weights,
                update=update.update,
                update_kind="delta" if steps else "gradient",
                num_examples=per_client,
                batch_size=1 if steps else per_client,
                local_steps=steps or 1,
                learning_rate=0.1,
                defense="none",
                per_sample_updates=update.per_sample,
            )
        )
        truths.append(GroundTruth(client, xs, ys))
    knowledge = AttackerKnowledge(aux_x, aux_y, tuple(x.shape[1:]), CLASSES)
    return observations, truths, knowledge


@pytest.mark.parametrize(
    ("name", "params", "per_client", "share", "iterations", "steps"),
    [
        ("ig", {"restarts": 2}, 1, "per-sample", 6, 0),
        ("ig", {}, 2, "batch", 6, 0),
        # FedAvg's unrolled steps: vmap over the stacked problems, autograd for one alone.
        ("ig", {}, 2, "batch", 6, 2),
        ("stepwise", {"stages": 2, "bn_stage": 2}, 2, "per-sample", 6, 0),
    ],
)
def test_batched_across_clients_equals_one_at_a_time(
    mnist, name, params, per_client, share, iterations, steps
):
    observations, _, knowledge = _round(mnist, 3, per_client, share, steps=steps)
    attack = build_attack(name, params, seed=7)
    budget = Budget(iterations, 600.0)
    batched = attack.reconstruct_batch(observations, knowledge, budget)
    for observation, together in zip(observations, batched, strict=True):
        alone = attack.reconstruct(observation, knowledge, budget)
        assert together.status == alone.status == "ok"
        torch.testing.assert_close(together.inputs, alone.inputs, atol=1e-4, rtol=0)
        assert torch.equal(together.labels, alone.labels)
        assert together.label_method == alone.label_method
        assert together.iterations == alone.iterations == iterations
        assert together.diagnostics["batch_jobs"] == 3 and alone.diagnostics["batch_jobs"] == 1
        for key in ("matching_loss", "restarts", "diverged_targets"):
            assert together.diagnostics[key] == pytest.approx(alone.diagnostics[key], rel=1e-3)


def test_only_compatible_observations_are_stacked_and_the_cap_cuts_chunks(mnist):
    observations, _, knowledge = _round(mnist, 4, 1)
    other = _round(mnist, 1, 1, spec=ModelSpec("lenet", (1, 28, 28), CLASSES, seed=1))[0][0]
    attack = build_attack("ig", {"restarts": 2}, seed=0)
    mixed = [observations[0], other, *observations[1:]]
    results = attack.reconstruct_batch(mixed, knowledge, Budget(2, 600.0, max_batch=4))
    # Other weights: alone. Four compatible jobs of 2 problems each under a cap of 4: 2 + 2.
    assert [r.diagnostics["batch_jobs"] for r in results] == [2, 1, 2, 2, 2]
    assert [r.diagnostics["batch_problems"] for r in results] == [4, 2, 4, 4, 4]


def test_the_automatic_cap_on_a_cpu_chunks_a_round_by_its_updates_bytes(mnist, monkeypatch):
    """`max_batch` 0 on a CPU: the attack hands `automatic_cap` its problems' update size, so
    a budget of two and a half LeNet updates stacks two jobs at a time (2 + 2 + 1)."""
    observations, _, knowledge = _round(mnist, 5, 1)
    update_bytes = sum(u.numel() * 4 for u in observations[0].update.values())
    monkeypatch.setattr(batching, "CPU_STACK_BYTES", int(2.5 * update_bytes))
    results = build_attack("ig").reconstruct_batch(observations, knowledge, Budget(2, 600.0))
    assert [r.diagnostics["batch_jobs"] for r in results] == [2, 2, 2, 2, 1]


def test_an_observation_that_cannot_be_inverted_fails_alone(mnist):
    observations, _, knowledge = _round(mnist, 3, 1)
    broken = dataclasses.replace(observations[1], modality="tokens")
    results = build_attack("ig").reconstruct_batch(
        [observations[0], broken, observations[2]], knowledge, Budget(2, 600.0)
    )
    assert isinstance(results[1], ObservationError) and "modality" in str(results[1])
    assert [r.status for r in (results[0], results[2])] == ["ok", "ok"]
    assert results[0].diagnostics["batch_jobs"] == 2
    # An update of the wrong shape failed its whole stack in torch.cat (audit AW4).
    observations, _, knowledge = _round(mnist, 3, 1, "batch")
    update = dict(observations[1].update)
    name = next(iter(update))
    update[name] = torch.cat([update[name], update[name][:1]])
    misshapen = dataclasses.replace(observations[1], update=update)
    results = build_attack("ig").reconstruct_batch(
        [observations[0], misshapen, observations[2]], knowledge, Budget(2, 600.0)
    )
    assert isinstance(results[1], ObservationError) and "has shape" in str(results[1])
    assert [r.status for r in (results[0], results[2])] == ["ok", "ok"]


def test_a_batch_shares_the_seconds_its_jobs_would_have_had(mnist):
    observations, _, knowledge = _round(mnist, 3, 1)
    attack = build_attack("ig", {"check-every": 2}, seed=0)
    results = attack.reconstruct_batch(observations, knowledge, Budget(10**6, 0.3))
    assert all("stopped by seconds" in r.message for r in results)
    total = sum(r.seconds for r in results)
    assert 0.9 - 0.05 < total < 0.9 + 5.0  # 3 jobs x 0.3 s, plus at most one check interval
    # Each job: its own set-up (milliseconds) and a third of the stack's time.
    assert max(r.seconds for r in results) - min(r.seconds for r in results) < 0.1
    assert len({r.iterations for r in results}) == 1


def test_dlg_solves_each_client_alone_whatever_the_cap(mnist):
    """L-BFGS without a line search turned the stacked replay's round-off into results 3 and
    36 dB apart for one client (audit AW1): a client's row depended on its round's other
    clients and on attack.max-batch. Each observation is now its own problem, bit for bit."""
    observations, _, knowledge = _round(mnist, 3, 1, "batch")
    attack = build_attack("dlg", {"restarts": 2}, seed=7)
    budget = Budget(20, 600.0, max_batch=16)
    batched = attack.reconstruct_batch(observations, knowledge, budget)
    for observation, together in zip(observations, batched, strict=True):
        alone = attack.reconstruct(observation, knowledge, Budget(20, 600.0, max_batch=1))
        assert together.status == alone.status == "ok"
        assert torch.equal(together.inputs, alone.inputs)
        assert torch.equal(together.loss_final, alone.loss_final)
        assert together.diagnostics["batch_jobs"] == 1
        assert together.diagnostics["batch_problems"] == 2  # its restarts stay stacked


def test_a_job_lost_to_nan_reports_the_iterations_it_ran_alone(mnist):
    """A client whose every target diverged reported the stack's iteration count (20), not
    the 5 after which its run alone stops (audit AW2); the others are untouched."""
    observations, _, knowledge = _round(mnist, 3, 1, "batch")
    update = {k: v.clone() for k, v in observations[1].update.items()}
    next(iter(update.values())).view(-1)[0] = math.nan
    poisoned = [observations[0], dataclasses.replace(observations[1], update=update)]
    attack = build_attack("ig", {"check-every": 5}, seed=7)
    budget = Budget(20, 600.0)
    together = attack.reconstruct_batch([*poisoned, observations[2]], knowledge, budget)
    alone = attack.reconstruct(poisoned[1], knowledge, budget)
    assert together[1].diagnostics["stopped_by"] == alone.diagnostics["stopped_by"] == "nan"
    assert together[1].iterations == alone.iterations == 5
    # Every target lost: what is left is not a reconstruction to score (audit BQ1: it was
    # scored as one, often the random start, and the report read it as an attack that failed).
    from fedleak.attacks.outcome import checked

    assert torch.isnan(together[1].inputs).all() and torch.isnan(alone.inputs).all()
    assert checked(together[1], 1.0, 1).status == checked(alone, 1.0, 1).status == "nan"
    assert checked(together[0], 1.0, 1).status == checked(together[2], 1.0, 1).status == "ok"
    assert together[0].iterations == together[2].iterations == 20
    assert torch.equal(
        together[0].inputs, attack.reconstruct(observations[0], knowledge, budget).inputs
    )


def test_each_chunk_charges_its_own_time(mnist):
    """With one job per stack, the runner charged a job of 8 targets and one of 1 the mean of
    the round's whole call, overwriting what the attack measured (audit AW3): the two were
    equal. (Their ratio is no test: under CI's load 8 targets took 1.8 times 1 target's.)"""
    big = _round(mnist, 1, 8)[0][0]
    small, _, knowledge = _round(mnist, 1, 1)
    jobs = [AttackJob(0, "ig", big), AttackJob(1, "ig", dataclasses.replace(small[0], client_id=1))]
    runner = InlineRunner(
        {"ig": build_attack("ig", seed=0)}, knowledge, Budget(30, 600.0, max_batch=1)
    )
    began = time.perf_counter()
    runner.submit(jobs)
    results = [result.reconstruction for result in runner.ready()]
    wall = time.perf_counter() - began
    assert results[0].diagnostics["batch_jobs"] == results[1].diagnostics["batch_jobs"] == 1
    assert results[0].seconds != results[1].seconds
    assert 0 < results[0].seconds + results[1].seconds <= wall


@pytest.mark.slow
def test_a_round_batched_and_one_at_a_time_leak_alike(mnist):
    """Full runs: the auditor's rows of a batched round and of the same jobs run one at a
    time agree in distribution (PSNR within a dB on average; measured: equal to 0.01 dB)."""
    observations, truths, knowledge = _round(mnist, 6, 1)
    rows = {}
    for cap in (0, 1):
        runner = InlineRunner({"ig": build_attack("ig")}, knowledge, Budget(200, 600.0, False, cap))
        runner.submit([AttackJob(i, "ig", o) for i, o in enumerate(observations)])
        scored = []
        for result, truth in zip(runner.ready(), truths, strict=True):
            assert result.reconstruction.status == "ok"
            scored += Auditor(lpips_nets=()).score(
                result.job.observation, "ig", result.reconstruction, truth, {}
            )
        rows[cap] = torch.tensor([row["psnr"] for row in scored])
        assert len(scored) == 6
    batched, alone = rows[0], rows[1]
    print(batched.tolist(), alone.tolist())
    assert abs(float(batched.mean() - alone.mean())) < 1.0
    assert abs(float(batched.median() - alone.median())) < 1.5


def test_chunks_follow_first_appearance_and_never_split_a_member():
    members = [("a", 3), ("b", 1), ("a", 2), ("a", 4), ("b", 5), ("a", 1)]
    chunks = plan(
        members,
        key=lambda m: m[0],
        same=lambda x, y: True,
        problems=lambda m: m[1],
        cap=5,
    )
    assert [c.indices for c in chunks] == [(0, 2), (3, 5), (1,), (4,)]
    odd = plan(
        members,
        key=lambda m: m[0],
        same=lambda x, y: x[1] % 2 == y[1] % 2,
        problems=lambda m: m[1],
        cap=100,
    )
    assert [c.indices for c in odd] == [(0, 5), (1, 4), (2, 3)]


def test_the_cpu_cap_keeps_stacked_updates_within_the_budget():
    """On a CPU the cap comes from the size of a problem's update, never from a probe."""
    cpu = torch.device("cpu")
    assert automatic_cap(cpu, lambda: 1 / 0) == batching.CPU_CAP
    assert automatic_cap(cpu, lambda: 1 / 0, update_bytes=63_304) == batching.CPU_CAP  # LeNet
    # The MLP on CIFAR-10 (855,050 parameters) stacks 3 problems; a 64 MB update stands alone.
    assert automatic_cap(cpu, lambda: 1 / 0, update_bytes=855_050 * 4) == 3
    assert automatic_cap(cpu, lambda: 1 / 0, update_bytes=64 * 2**20) == 1


def test_the_cuda_cap_comes_from_free_memory(monkeypatch: pytest.MonkeyPatch):
    """The CUDA path on a CPU machine: a fake meter reports 300 MB peak for 2 problems."""
    assert problems_that_fit(10**9, 10**6, share=0.5) == 500
    assert problems_that_fit(10, 10**6) == 1
    allocated = iter([1_000, 300_001_000])
    cuda = torch.cuda
    monkeypatch.setattr(cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cuda, "reset_peak_memory_stats", lambda device=None: None)
    monkeypatch.setattr(cuda, "memory_allocated", lambda device=None: next(allocated))
    monkeypatch.setattr(cuda, "max_memory_allocated", lambda device=None: 300_001_000)
    monkeypatch.setattr(cuda, "mem_get_info", lambda device=None: (10 * 10**9, 80 * 10**9))
    cap = automatic_cap(torch.device("cuda"), lambda: 2)
    assert cap == int(batching.MEMORY_SHARE * 10 * 10**9 / 150_000_000)


def test_the_memory_probe_runs_the_batched_step_without_touching_the_seeds(mnist):
    observations, _, knowledge = _round(mnist, 1, 2)
    attack = build_attack("stepwise", {"restarts": 2})
    member = start(0, observations[0], knowledge, attack.config, "auto", None)
    state = member.generator.get_state()
    assert attack._probe(member, Budget(10, 60.0)) == 2 * member.problem.problems
    assert torch.equal(member.generator.get_state(), state)
    assert all(v.grad is None for v in member.variables)


def test_lti_then_ig_refines_a_round_of_learned_guesses_as_one_batch(mnist):
    """`lti+ig`: LTI's guesses one after another (it trains once, at the first), then IG from
    all of them together; each job equals its run alone."""
    observations, _, knowledge = _round(mnist, 3, 1)
    params = {"hidden": "64", "epochs": 2, "batch-size": 32}
    batched = build_attack("lti+ig", params, seed=0).reconstruct_batch(
        observations, knowledge, Budget(4, 600.0)
    )
    alone = build_attack("lti+ig", params, seed=0)
    for observation, together in zip(observations, batched, strict=True):
        single = alone.reconstruct(observation, knowledge, Budget(4, 600.0))
        assert together.status == single.status == "ok"
        torch.testing.assert_close(together.inputs, single.inputs, atol=1e-4, rtol=0)
        assert together.diagnostics["batch_jobs"] == 3
        assert together.message.startswith("lti: ") and "then ig: " in together.message
    assert [r.diagnostics["train_epochs"] for r in batched] == [2.0, 0.0, 0.0]


def test_a_dlg_step_runs_on_a_device_that_is_not_the_cpu():
    """DLG's step on the `meta` device: joint soft labels through the chain, the L2 matching
    and L-BFGS's device path (batched products, small solves) past a wrapped history keep
    every tensor on the device with the right shapes and dtypes."""
    model = build_model(ModelSpec("lenet", (3, 16, 16), CLASSES, seed=0))
    replay = Replay(model, ClientProtocol("gradient"), device="meta")
    assert replay._chain is not None
    x = torch.rand(3, 2, 3, 16, 16, device="meta").requires_grad_()
    labels = torch.randn(3, 2, CLASSES, device="meta").requires_grad_()
    lbfgs = BatchedLBFGS([x, labels], lr=1.0, history=2)
    for _ in range(4):
        x.grad, labels.grad = None, None
        out = replay(x, torch.softmax(labels, dim=-1))
        assert out.flat is not None and "Chain" in type(out.flat.grad_fn).__name__
        target = [torch.empty_like(u) for u in out.update]
        loss = MatchingLoss("l2")(out.update, target)
        torch.autograd.backward(loss.sum(), inputs=[x, labels])
        assert labels.grad is not None and labels.grad.device.type == "meta"
        lbfgs.step()
    assert x.shape == (3, 2, 3, 16, 16) and x.device.type == "meta"
    assert lbfgs.pairs is not None and lbfgs.pairs.device.type == "meta"
    assert lbfgs.pairs.shape == (3, 2, 2, 2 * 3 * 16 * 16 + 2 * CLASSES)  # slots, (s, y), n


@pytest.mark.parametrize("mode", ["infer", "proxy"])
def test_the_batchnorm_replay_runs_on_a_device_that_is_not_the_cpu(mode):
    """ResNet-20 with BatchNorm replayed through the chain on the `meta` device: updates and
    each layer's statistics keep the problem's device and shapes, and the matching loss,
    TV and the BatchNorm prior differentiate back to the inputs there."""
    model = build_model(ModelSpec("resnet20", (3, 16, 16), CLASSES, seed=0))
    for problems in (1, 4):
        replay = Replay(model, ClientProtocol("gradient"), mode, device="meta")
        assert replay._chain is not None
        x = torch.rand(problems, 2, 3, 16, 16, device="meta").requires_grad_()
        out = replay(x, torch.zeros(problems, 2, dtype=torch.long, device="meta"))
        assert len(out.statistics) == len(replay.batchnorm_names)
        for mean, var in out.statistics:
            assert mean.device.type == var.device.type == "meta"
            assert mean.shape == var.shape and mean.shape[0] == problems
        target = [torch.empty_like(u) for u in out.update]
        prior = batchnorm_prior(out.statistics, replay.running_statistics())
        loss = MatchingLoss("cosine")(out.update, target) + total_variation(x) + prior
        torch.autograd.backward(loss.sum(), inputs=[x])
        assert x.grad.shape == x.shape and x.grad.device.type == "meta"


@pytest.mark.parametrize("name", ["lenet", "resnet20-gn"])
def test_the_batched_step_runs_on_a_device_that_is_not_the_cpu(name):
    """No GPU here: the `meta` device (shapes and dtypes, no data) stands in for CUDA. Every
    path of one optimisation step (single problem, stacked layer-wise, per-sample, FedAvg
    unrolled through vmap; matching, TV, backward, Adam) keeps tensors on the problem's
    device with the right shapes and dtypes."""
    model = build_model(ModelSpec(name, (3, 16, 16), CLASSES, seed=0))
    cases = [
        (ClientProtocol("gradient"), 1, False),
        (ClientProtocol("gradient"), 4, False),
        (ClientProtocol("gradient"), 3, True),
        (ClientProtocol("delta", local_steps=2, batch_size=1), 3, False),
    ]
    for protocol, problems, per_sample in cases:
        replay = Replay(model, protocol, device="meta")
        x = torch.rand(problems, 2, 3, 16, 16, device="meta").requires_grad_()
        y = torch.zeros(problems, 2, dtype=torch.long, device="meta")
        out = replay(x, y, per_sample=per_sample)
        for update, (_, parameter) in zip(out.update, model.named_parameters(), strict=True):
            assert update.device.type == "meta" and update.dtype == torch.float32
            assert update.shape == (problems, *parameter.shape)
        if per_sample:
            assert out.per_sample[0].shape == (problems, 2, *out.update[0].shape[1:])
        target = [torch.empty_like(u) for u in out.update]
        loss = MatchingLoss("cosine")(out.update, target) + total_variation(x)
        assert loss.shape == (problems,) and loss.device.type == "meta"
        torch.autograd.backward(loss.sum(), inputs=[x])
        assert x.grad.shape == x.shape and x.grad.device.type == "meta"
        adam = BatchedAdam([x])
        adam.step(0.1)
        assert x.shape == (problems, 2, 3, 16, 16) and adam.first[0].device.type == "meta"
