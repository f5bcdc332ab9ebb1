"""An attack call leaves what it was given as it found it, and draws the same numbers from the
process's global generators on every run of one seed (audit EX1-EX3)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import fedleak
from fedleak.attacks.baseline import AuxMeanBaseline
from fedleak.attacks.isolation import ObservationChanged
from fedleak.attacks.types import AttackerKnowledge, Budget, Observation, Reconstruction
from fedleak.models.spec import ModelSpec
from fedleak.server.runner import AttackJob, InlineRunner, run_job

ROOT = Path(__file__).resolve().parents[1]


def _observation(client: int = 3) -> Observation:
    weights = {"0.weight": torch.ones(2, 16), "0.bias": torch.zeros(2)}
    return Observation(
        round=1,
        client_id=client,
        model=ModelSpec("mlp", (1, 4, 4), 2),
        weights=weights,
        update={name: torch.full_like(w, 0.5) for name, w in weights.items()},
        update_kind="gradient",
        num_examples=2,
        batch_size=2,
        local_steps=1,
        learning_rate=0.1,
        defense="none",
        per_sample_updates={name: torch.full((2, *w.shape), 0.5) for name, w in weights.items()},
    )


def _knowledge() -> AttackerKnowledge:
    aux = torch.rand(10, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    return AttackerKnowledge(aux, torch.tensor([0] * 7 + [1] * 3), (1, 4, 4), 2, seed=11)


class _Writes:
    """Writes into what it was given (`write(observation, knowledge)`), then returns or
    raises."""

    def __init__(self, name: str, write, raises: bool = False) -> None:
        self.name, self.write, self.raises = name, write, raises

    def reconstruct(self, observation, knowledge, budget) -> Reconstruction:
        self.write(observation, knowledge)
        if self.raises:
            raise RuntimeError("failed after writing")
        return Reconstruction(inputs=torch.zeros(2, 1, 4, 4), labels=None)


class _WritesInBatch(_Writes):
    def reconstruct_batch(self, observations, knowledge, budget) -> list[Reconstruction]:
        return [self.reconstruct(observation, knowledge, budget) for observation in observations]


def _run(attack, observations: list[Observation], knowledge=None) -> list[Reconstruction]:
    runner = InlineRunner({attack.name: attack}, knowledge or _knowledge(), Budget(4, 5.0))
    runner.submit([AttackJob(i, attack.name, o) for i, o in enumerate(observations)])
    return [result.reconstruction for result in runner.ready()]


def _reinterpret(tensors: dict[str, torch.Tensor]) -> None:
    tensors["0.bias"].data = tensors["0.bias"].view(torch.int32)  # the same bytes


@pytest.mark.parametrize(
    ("write", "written"),
    [
        (lambda o, k: o.weights["0.weight"].add_(1.0), r"observation\.weights\['0\.weight'\]"),
        (lambda o, k: o.update["0.bias"].div_(2.0), r"observation\.update\['0\.bias'\]"),
        (
            lambda o, k: o.per_sample_updates["0.weight"][1].zero_(),
            r"observation\.per_sample_updates\['0\.weight'\]",
        ),
        # A replaced entry is the strategy's dict changed all the same.
        (
            lambda o, k: o.weights.update({"0.bias": torch.ones(2)}),
            r"observation\.weights\['0\.bias'\]",
        ),
        (lambda o, k: o.update.pop("0.bias"), r"observation\.update\['0\.bias'\]"),
        # An equal copy in its place is another tensor in the strategy's dict all the same.
        (
            lambda o, k: o.weights.update({"0.bias": o.weights["0.bias"].clone()}),
            r"observation\.weights\['0\.bias'\]",
        ),
        (lambda o, k: _reinterpret(o.update), r"observation\.update\['0\.bias'\]"),
        # The auxiliary data: every later attack's, the floors' included (audit EY1).
        (lambda o, k: k.aux_inputs.mul_(0.0), r"knowledge\.aux_inputs"),
        (lambda o, k: k.aux_labels.fill_(1), r"knowledge\.aux_labels"),
    ],
)
def test_an_attack_that_writes_into_what_it_reads_stops_the_run_naming_the_tensor(
    write, written: str
) -> None:
    """The inline runner hands attacks the strategy's global weights and every attack of a
    round the same observation: a write changed the global model (test loss 14.6 against
    14.2 after round 2) or the next attack's input, and the run went on to DONE (audit EX1)."""
    for attack, clients, whose in [
        (_Writes("writer", write), [3], ""),
        (_Writes("writer", write, raises=True), [3], ""),  # no excuse
        (_WritesInBatch("writer", write), [1, 2], "( .round 1.*)?"),
        (_WritesInBatch("writer", write, raises=True), [1, 2], "( .round 1.*)?"),
    ]:
        with pytest.raises(
            ObservationChanged, match=rf"^attack 'writer' wrote into {written}{whose}, "
        ):
            _run(attack, [_observation(client) for client in clients])
    # One job run alone, and the Python API, check their call the same way.
    alone = AttackJob(0, "writer", _observation())
    with pytest.raises(ObservationChanged, match=rf"^attack 'writer' wrote into {written}, "):
        run_job(alone, _Writes("writer", write), _knowledge(), Budget(4, 5.0))
    with pytest.raises(ObservationChanged, match=rf"^attack 'writer' wrote into {written}, "):
        fedleak.reconstruct(_Writes("writer", write), _observation(), attacker=_knowledge())
    # Reading it, an in-place write of the same bits, or a copy changed are fine.
    harmless = [
        lambda o, k: o.weights["0.weight"].mul_(1.0),
        lambda o, k: o.update["0.bias"].clone().add_(1.0),
        lambda o, k: k.aux_inputs.mean(),
    ]
    for write in harmless:
        assert [r.status for r in _run(_Writes("reader", write), [_observation()])] == ["ok"]
    assert [r.status for r in _run(AuxMeanBaseline(), [_observation(), _observation(4)])] == [
        "ok",
        "ok",
    ]


def test_a_write_into_an_earlier_call_s_observation_is_caught_too() -> None:
    """An attack that kept the last call's update wrote into it on its next call: client 1's
    update went from 0.5 to 50 for every later attack of the round (audit EY4)."""

    class Stash:
        name = "stash"
        previous: dict[str, torch.Tensor] | None = None

        def reconstruct(self, observation, knowledge, budget) -> Reconstruction:
            if self.previous is not None:
                self.previous["0.bias"].mul_(100.0)
            self.previous = observation.update
            return Reconstruction(inputs=torch.zeros(2, 1, 4, 4), labels=None)

    with pytest.raises(
        ObservationChanged,
        match=r"^attack 'stash' wrote into observation\.update\['0\.bias'\] \(round 1, "
        r"client 1\), ",
    ):
        _run(Stash(), [_observation(1), _observation(2)])


def test_a_round_reads_its_tensors_once_before_and_once_after_each_attack(monkeypatch) -> None:
    """Checked after every call, a round of N clients read every observation N times over per
    attack (1.5 GB a pass for ten ResNet-18 clients' per-sample updates, audit EY5)."""
    import fedleak.attacks.isolation as isolation

    reads: list[int] = []
    checksum = isolation._checksum
    monkeypatch.setattr(isolation, "_checksum", lambda t: reads.append(1) or checksum(t))
    observations = [_observation(client) for client in (1, 2, 3)]
    isolation.ReadOnly(observations, _knowledge())
    one_pass, reads[:] = len(reads), []
    attacks = {"a": AuxMeanBaseline(), "b": AuxMeanBaseline()}
    runner = InlineRunner(attacks, _knowledge(), Budget(4, 5.0))
    runner.submit([AttackJob(0, name, o) for name in attacks for o in observations])
    assert [r.reconstruction.status for r in runner.ready()] == 6 * ["ok"]
    assert len(reads) == (1 + len(attacks)) * one_pass


def test_an_attack_that_calls_sys_exit_fails_alone() -> None:
    """`reconstruct` calling sys.exit() ended the whole run with "stopped after 0 of 2 rounds"
    and lost the round's other rows (audit EX3); so does a batch's call for its jobs."""

    class Exits:
        name = "exits"

        def reconstruct(self, observation, knowledge, budget):
            sys.exit("gave up")

    class ExitsInBatch(Exits):
        name = "exits-in-batch"

        def reconstruct_batch(self, observations, knowledge, budget):
            sys.exit("gave up on all")

    attacks = {"exits": Exits(), "exits-in-batch": ExitsInBatch(), "aux-mean": AuxMeanBaseline()}
    runner = InlineRunner(attacks, _knowledge(), Budget(4, 5.0))
    observations = [_observation(1), _observation(2)]
    runner.submit(
        [
            AttackJob(len(attacks) * i + j, name, observation)
            for i, observation in enumerate(observations)
            for j, name in enumerate(attacks)
        ]
    )
    results = [
        (r.job.attack, r.reconstruction.status, r.reconstruction.message) for r in runner.ready()
    ]
    assert results == 2 * [
        ("exits", "failed", "SystemExit: gave up"),
        ("exits-in-batch", "failed", "SystemExit: gave up on all"),
        ("aux-mean", "ok", ""),
    ]


class _Draws:
    """A plug-in that draws from every global generator."""

    name = "draws"

    def reconstruct(self, observation, knowledge, budget) -> Reconstruction:
        row = [*torch.rand(2).tolist(), *np.random.rand(2).tolist(), random.random()]
        return Reconstruction(
            inputs=torch.zeros(2, 1, 4, 4),
            labels=None,
            diagnostics={str(i): value for i, value in enumerate(row)},
        )


def test_a_call_s_draws_follow_the_attacker_seed_the_attack_the_round_and_the_client() -> None:
    """Each part of the seed moves the draws; the Python API draws what a study's runner does
    for the same attack and observation (audit EY6)."""

    def draws(observation: Observation, knowledge: AttackerKnowledge | None = None) -> list:
        (result,) = _run(_Draws(), [observation], knowledge)
        return list(result.diagnostics.values())

    base = draws(_observation())
    assert draws(_observation()) == base
    other_round = _observation()
    object.__setattr__(other_round, "round", 2)
    other_seed = dataclasses.replace(_knowledge(), seed=12)
    renamed = _Draws()
    renamed.name = "draws-2"
    (result,) = _run(renamed, [_observation()])
    moved = [
        draws(_observation(4)),
        draws(other_round),
        draws(_observation(), other_seed),
        list(result.diagnostics.values()),
    ]
    assert all(row != base and len(set(row) & set(base)) == 0 for row in moved)
    api = fedleak.reconstruct(_Draws(), _observation(), attacker=_knowledge())
    assert list(api.diagnostics.values()) == base
    # Seeded by the attack's own name, which the API knows too, not the one it was set by.
    runner = InlineRunner({"set-by": _Draws()}, _knowledge(), Budget(4, 5.0))
    runner.submit([AttackJob(0, "set-by", _observation())])
    assert list(runner.ready()[0].reconstruction.diagnostics.values()) == base


_DRAWS = """
import random, sys
import numpy as np, torch
sys.path.insert(0, {tests!r})
from test_isolation import _knowledge, _observation
from fedleak.attacks.types import Budget, Reconstruction
from fedleak.server.runner import AttackJob, InlineRunner

class Draws:
    name = "draws"
    def reconstruct(self, observation, knowledge, budget):
        layer = torch.nn.Linear(16, 1)  # its initialisation draws from torch's generator
        row = [*torch.rand(3).tolist(), *np.random.rand(3).tolist(), random.random(),
               float(layer.weight[0, 0])]
        return Reconstruction(inputs=torch.zeros(2, 1, 4, 4), labels=None, diagnostics=dict(
            (str(i), value) for i, value in enumerate(row)))

# Whatever the process drew before (another attack, a data loader) changes nothing.
torch.rand(int(sys.argv[1])); np.random.rand(int(sys.argv[1])); random.random()
after = torch.Generator().set_state(torch.get_rng_state())
after_numpy, after_python = np.random.RandomState(), random.Random()
after_numpy.set_state(np.random.get_state())
after_python.setstate(random.getstate())
runner = InlineRunner({{"draws": Draws()}}, _knowledge(), Budget(4, 5.0))
runner.submit([AttackJob(i, "draws", _observation(client)) for i, client in enumerate((3, 4))])
rows = [r.reconstruction.diagnostics for r in runner.ready()]
# ... and the process's own draws go on as if the attack had not run.
assert torch.equal(torch.rand(4), torch.rand(4, generator=after))
assert np.random.rand(4).tolist() == after_numpy.rand(4).tolist()
assert random.random() == after_python.random()
print(json.dumps(rows))
"""


def test_a_plug_in_drawing_from_global_generators_draws_the_same_on_every_run() -> None:
    """A plug-in attack calling torch.rand, or building an nn.Module, gave other rows on each
    run of one seed: nothing seeded the global generators around an attack (audit EX2).
    Separate processes, other hash seeds and other draws before the attack."""
    script = "import json\n" + _DRAWS.format(tests=str(ROOT / "tests"))
    outputs = []
    for hash_seed, drawn in (("1", "5"), ("2", "17")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": str(ROOT)}
        done = subprocess.run(
            [sys.executable, "-c", script, drawn], env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, done.stderr[-2000:]
        outputs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    assert outputs[0] == outputs[1]
    first, second = outputs[0]
    assert first != second  # each client's call has draws of its own


_WRITER = '''
import torch
from fedleak.attacks.types import Reconstruction


class TouchWeights:
    """Adds 1 to the first tensor of the global weights it was shown."""

    stateful = False

    def __init__(self, config, seed):
        self.name = "touch-weights"

    def reconstruct(self, observation, knowledge, budget):
        next(iter(observation.weights.values())).add_(1.0)
        count = observation.num_targets
        shape = observation.model.input_shape
        return Reconstruction(inputs=torch.zeros(count, *shape), labels=None)
'''


def test_a_run_whose_attack_wrote_into_its_observation_fails_in_one_line(tmp_path: Path) -> None:
    """Through the command, the attack on an attack worker (the pool re-raises the worker's
    error): exit 1, FAILED with the reason, no DONE."""
    (tmp_path / "fedleak_writer.py").write_text(textwrap.dedent(_WRITER))
    info = tmp_path / "fedleak_writer-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fedleak-writer\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        "[fedleak.attacks]\ntouch-weights = fedleak_writer:TouchWeights\n"
    )
    settings = {
        "num-server-rounds": 2,
        "train.batch-size": 2,
        "threat.share": "batch",
        "attack.names": "aux-mean,touch-weights",
        "attack.clients-per-round": 1,
        "attack.workers": 1,
        "attack.images-per-client": 0,
        "data.aux-size": 200,
    }
    out = tmp_path / "run"
    command = [sys.executable, "-m", "fedleak.simulations.cli", "run", "quickstart"]
    for key, value in settings.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    command += ["--num-clients", "2", "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    expected = "attack 'touch-weights' wrote into observation.weights['features.0.weight'], "
    assert last.startswith(f"fedleak: run failed: {out}: {expected}"), last
    assert "Traceback" not in done.stderr
    assert json.loads((out / "FAILED").read_text())["reason"].startswith(expected)
    assert not (out / "DONE").exists()
    # The run stopped in the round it happened, not later with the attack's rows as failed.
    assert (out / "leakage.csv").read_text().count("\n") == 1


@pytest.mark.parametrize("batched", [False, True])
def test_a_run_state_error_stops_the_round_alone_or_batched(batched: bool) -> None:
    """A saved inverter that does not fit, raised from a call alone, from a batched call or
    from lti+ig's learned stage inside one, stops the run rather than failing the row and
    every later round's (audits FE1, FH4)."""
    from fedleak.attacks.learned.hybrid import LTIThenIG
    from fedleak.attacks.learned.store import InverterStoreError

    class Misfit:
        name = "misfit"

        def reconstruct(self, observation, knowledge, budget):
            raise InverterStoreError("lti-inverter-r000001.pt: does not fit")

    class MisfitInBatch(Misfit):
        def reconstruct_batch(self, observations, knowledge, budget):
            raise InverterStoreError("lti-inverter-r000001.pt: does not fit")

    hybrid = LTIThenIG(Misfit(), fedleak.build_attack("ig"), name="misfit")  # type: ignore[arg-type]
    attacks = [MisfitInBatch(), hybrid] if batched else [Misfit()]
    for attack in attacks:
        with pytest.raises(InverterStoreError, match="does not fit"):
            _run(attack, [_observation(1), _observation(2)])
