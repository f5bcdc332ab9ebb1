"""A model a study cannot measure is refused before the run, in one line (audit AQ1-AQ5):
each of these ran before and gave results no client had."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord
from torch import Tensor, nn

from fedleak.config import ConfigError, parse_flat
from fedleak.models import ModelSpec, build_model
from fedleak.models.fitness import unfit_reason
from fedleak.runtime import federated_data, model_spec
from fedleak.server.build import EvaluationFailed, GlobalEvaluation
from fedleak.server.validate import validate_components
from fedleak.simulations.cli import main

SPEC = ModelSpec("mine", (1, 4, 4), 3)


def _linear() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


class _Tied(nn.Module):
    """One layer under two attribute names, as `decoder.weight = encoder.weight` makes."""

    def __init__(self) -> None:
        super().__init__()
        self.first, self.head = nn.Linear(16, 16), nn.Linear(16, 3)
        self.again = self.first

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.again(torch.relu(self.first(x.flatten(1)))))


class _BatchCentred(nn.Module):
    """Subtracts the batch mean: a sample's output depends on the others."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _linear()

    def forward(self, x: Tensor) -> Tensor:
        out = self.body(x)
        return out - out.mean(0, keepdim=True)


def test_a_model_every_rule_accepts_passes_for_batch_and_per_sample() -> None:
    for per_sample in (False, True):
        assert unfit_reason(_linear(), SPEC, per_sample) is None


def test_a_frozen_parameter_is_refused() -> None:
    model = _linear()
    model[1].requires_grad_(False)
    assert unfit_reason(model, SPEC, False).startswith("parameter '1.weight' is frozen")


class _FailsInTraining(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = _linear()

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            raise RuntimeError("expected an eval-mode batch")
        return self.body(x)


def test_a_training_forward_that_fails_is_the_models_reason_not_an_internal_error() -> None:
    """The per-sample probe called the user's forward unguarded (audit DM4)."""
    reason = unfit_reason(_FailsInTraining(), SPEC, True)
    assert reason == (
        "fails in a training-mode forward on random inputs (RuntimeError: expected an "
        "eval-mode batch)"
    )
    # BatchNorm1d's training forward fails on one sample, after its running statistics
    # changed: the buffers' reason and its remedy come first (audit DP8).
    normed = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    assert unfit_reason(normed, SPEC, True).startswith("buffer '2.running_mean' changes")


def test_a_tied_parameter_is_refused_under_its_second_name() -> None:
    assert unfit_reason(_Tied(), SPEC, False).startswith("parameter 'again.weight' is another")


@pytest.mark.parametrize(
    "layer", [nn.Dropout(0.1), nn.Dropout2d(0.5), nn.MultiheadAttention(16, 2, dropout=0.1)]
)
def test_train_mode_randomness_is_refused(layer: nn.Module) -> None:
    model = nn.Sequential(_linear(), layer)
    assert "draws random masks in training from an unseeded generator" in unfit_reason(
        model, SPEC, False
    )
    off = nn.Sequential(_linear(), nn.Dropout(0.0))
    assert unfit_reason(off, SPEC, False) is None


def test_per_sample_sharing_refuses_coupled_samples_and_changing_buffers() -> None:
    assert unfit_reason(_BatchCentred(), SPEC, False) is None  # a batch update is defined
    assert "depends on the other samples of its batch" in unfit_reason(_BatchCentred(), SPEC, True)
    tracked = nn.Sequential(
        nn.Conv2d(1, 2, 3, padding=1),
        nn.InstanceNorm2d(2, track_running_stats=True),
        nn.Flatten(),
        nn.Linear(32, 3),
    )
    assert unfit_reason(tracked, SPEC, False) is None
    assert unfit_reason(tracked, SPEC, True).startswith("buffer '1.running_mean' changes")


def test_the_run_refuses_it_naming_the_model_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    config = parse_flat({"model.name": "plugin_models:frozen_head_net", "attack.names": "ig"})
    with pytest.raises(ConfigError, match=r"^model.name='plugin_models:frozen_head_net': param"):
        validate_components(config)


def test_a_refusal_caused_by_dpsgd_advises_the_defense_not_the_threat_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Under batch sharing with DP-SGD (which clips each sample), the refusal advised
    threat.share='batch', which the run already had (audit CG1)."""
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    flat = {"model.name": "plugin_models:instance_norm_net", "attack.names": "aux-mean"}
    dpsgd = parse_flat({**flat, "defense.spec": "dpsgd:1:1", "threat.share": "batch"})
    with pytest.raises(ConfigError, match="changes in the forward") as caught:
        validate_components(dpsgd)
    assert "threat.share" not in str(caught.value)
    assert "use a defense.spec without per-sample clipping (not 'dpsgd:1:1')" in str(caught.value)
    shared = parse_flat({**flat, "threat.share": "per-sample"})
    with pytest.raises(ConfigError, match=r"use threat\.share='batch' or a model without such"):
        validate_components(shared)
    # Both ask for per-sample gradients: the advice names both (audit CO4).
    both = parse_flat({**flat, "threat.share": "per-sample", "defense.spec": "dpsgd:1:1"})
    with pytest.raises(ConfigError, match=r"use threat\.share='batch' and a defense\.spec with"):
        validate_components(both)


@pytest.mark.parametrize("share", ["per-sample", "batch"])
@pytest.mark.parametrize(
    ("factory", "got"),
    [
        ("tuple_net", "tuple"),
        ("eleven_class_net", r"\(1, 11\)"),
        # Right for one input, not for a batch: an internal error, or a run that failed late
        # (audit DM4).
        ("one_row_net", None),
        ("pooled_batch_net", r"\(1, 10\) for a batch of 2 inputs of shape \(2, 1, 28, 28\);"),
    ],
)
def test_a_model_without_one_score_per_class_is_refused_before_any_other_probe(
    monkeypatch: pytest.MonkeyPatch, share: str, factory: str, got: str
) -> None:
    """The per-sample probe assumed a tensor and a tuple-returning model was an internal error
    (audit CS3); `fedleak.audit`, which checks no federation, ran such models into a raw
    traceback or a failed round (CS1, CS2): the components' check now says it for every path."""
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    config = parse_flat(
        {"model.name": f"plugin_models:{factory}", "attack.names": "ig", "threat.share": share}
    )
    expected = rf"outputs {got} " if got else r"fails on a batch of 2 inputs of shape \(2, "
    with pytest.raises(ConfigError, match=rf"^model.name='plugin_models:{factory}': {expected}"):
        validate_components(config)


def test_a_model_in_float64_is_named_as_such_before_a_forward_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The check said torch's "Input type (float) and bias type (double) should be the
    same"; the Python API's observe says what to do (audit DT4)."""
    monkeypatch.syspath_prepend(str(__import__("pathlib").Path(__file__).parent))
    config = parse_flat({"model.name": "plugin_models:double_net", "attack.names": "ig"})
    with pytest.raises(
        ConfigError,
        match=r"^model.name='plugin_models:double_net': parameter '1.weight' is torch.float64; "
        r".* \(return model.float\(\) from the factory\)$",
    ):
        validate_components(config)


@pytest.mark.parametrize("share", ["per-sample", "batch"])
def test_a_model_with_scores_that_are_not_finite_is_refused_for_that(
    monkeypatch: pytest.MonkeyPatch, share: str
) -> None:
    """A NaN model was refused as one that mixes its batch's samples (NaN equals nothing), and
    under batch sharing it ran to DONE with NaN loss and accuracy in every round (audit EX4);
    a model NaN in training only, under batch sharing, too, blaming the learning rate (EY2)."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    flat = {"attack.names": "ig", "threat.share": share, "train.batch-size": 4}
    for model, given in (("nan_net", "one input"), ("one_infinite_net", "one input")):
        with pytest.raises(
            ConfigError,
            match=rf"^model.name='plugin_models:{model}': outputs NaN or infinite scores for "
            rf"{given} of shape \(1, 1, 28, 28\); expected finite scores$",
        ):
            validate_components(parse_flat({**flat, "model.name": f"plugin_models:{model}"}))
    # Finite in evaluation, NaN or inf in training: the training probe says so, whatever is
    # shared.
    for model in ("nan_in_training_net", "inf_in_training_net"):
        with pytest.raises(
            ConfigError,
            match=rf"^model.name='plugin_models:{model}': outputs NaN or infinite scores in a "
            r"training-mode forward on a batch of 4 random inputs \(train.batch-size=4\)",
        ):
            validate_components(parse_flat({**flat, "model.name": f"plugin_models:{model}"}))
    # The probe takes at most 16 samples: a forward that refuses more is fine for the check.
    small = {**flat, "model.name": "plugin_models:small_batch_net", "train.batch-size": 64}
    validate_components(parse_flat(small))
    # NaN on a batch of one only: refused at the clients' batch of one, accepted at two.
    standardised = {**flat, "model.name": "plugin_models:batch_std_net"}
    if share == "batch":
        with pytest.raises(
            ConfigError, match=r"on a batch of 1 random inputs \(train.batch-size=1"
        ):
            validate_components(parse_flat({**standardised, "train.batch-size": 1}))
        validate_components(parse_flat({**standardised, "train.batch-size": 2}))


def test_an_audited_apps_model_is_not_probed_at_a_batch_size_its_clients_do_not_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An audited app's clients train on batches of their own: a BatchNorm1d model, whose
    training forward fails on one sample, is refused at fedleak's train.batch-size=1 only
    where fedleak's clients train."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    flat = {"model.name": "plugin_models:batchnorm1d_net", "threat.share": "batch"}
    config = parse_flat({**flat, "attack.names": "aux-mean", "train.batch-size": 1})
    with pytest.raises(ConfigError, match=r"fails in a training-mode forward on random inputs"):
        validate_components(config)
    validate_components(config, own_clients=False)
    validate_components(parse_flat({**flat, "attack.names": "aux-mean", "train.batch-size": 2}))


def test_an_evaluation_that_exits_names_the_model_and_the_round() -> None:
    """A forward calling sys.exit() in the evaluation ends no run unexplained."""
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(Path(__file__).parent))
        config = parse_flat({"model.name": "plugin_models:exiting_net"})
        fd = federated_data(config, 1)
        spec = model_spec(config, fd)
        evaluation = GlobalEvaluation(spec, fd, torch.device("cpu"))
        with pytest.raises(
            EvaluationFailed,
            match=r"^model.name='plugin_models:exiting_net': evaluating round 4's global model "
            r"on the held-out split failed \(SystemExit: batch too big, bye\)$",
        ):
            evaluation(4, ArrayRecord(build_model(spec).state_dict()))


def test_a_forward_that_fails_in_the_servers_evaluation_is_named_as_the_models(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The start-up probes take one and two inputs, the evaluation 256: the failure read as
    "Flower's simulation engine stopped (RuntimeError: ...)" (audit EX5). Here in a resumed
    run, whose round is counted from the run's first (it read "round 0", audit EY3)."""
    here = str(Path(__file__).parent)
    out = tmp_path / "run"
    args = ["run", "quickstart", "--out", str(out), "--num-clients", "2"]
    for key, value in {
        "model.name": "plugin_models:small_batch_net",
        "threat.share": "batch",
        "train.batch-size": 2,
        "attack.names": "none",
    }.items():
        args += ["--set", f"{key}={value}"]
    with pytest.MonkeyPatch.context() as patch:  # the clients' processes import the model
        patch.setenv(
            "PYTHONPATH", os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")]))
        )
        patch.syspath_prepend(here)
        patch.setenv("FEDLEAK_TEST_SMALL_BATCHES", "0")  # the first round evaluates
        assert main([*args, "--set", "num-server-rounds=1"]) == 0
        patch.delenv("FEDLEAK_TEST_SMALL_BATCHES")
        resume = ["--set", "num-server-rounds=2", "--set", "sim.resume=true"]
        assert main([*args, *resume]) == 1
    expected = (
        "model.name='plugin_models:small_batch_net': evaluating round 1's global model on the "
        "held-out split failed (RuntimeError: batch too big for my buffer)"
    )
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"fedleak: run failed: {out}: {expected}"
    )
    assert json.loads((out / "FAILED").read_text())["reason"] == expected
    assert not (out / "DONE").exists()
    assert pd.read_csv(out / "utility.csv")["round"].tolist() == [0, 1]  # kept
