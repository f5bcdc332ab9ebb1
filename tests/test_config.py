"""The configuration parser: presets parse, every invalid value fails with one clear line."""

from __future__ import annotations

import tomllib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedleak.config import (
    FLOAT32_NOISE_MAX,
    FLOAT32_TINY,
    ConfigError,
    RunConfig,
    attacked_rounds,
    known_keys,
    parse_flat,
    parse_toml,
)
from fedleak.server.validate import validate_components

INVALID = [
    ({"train.batch-size": -1}, "train.batch-size=-1: expected an integer >= 1"),
    ({"train.batch-size": 2.5}, "train.batch-size=2.5: expected an integer >= 1"),
    ({"train.mode": "fedprox"}, "train.mode='fedprox': expected one of 'fedsgd', 'fedavg'"),
    ({"data.partition": "random"}, "data.partition='random': expected one of"),
    ({"data.test-fraction": 1.0}, "data.test-fraction=1.0: expected a number in [0, 1)"),
    # Every client failing on purpose: a run that could only end FAILED.
    ({"sim.fail-rate": 1.0}, "sim.fail-rate=1.0: expected a number in [0, 1)"),
    ({"data.aux-beta": 1.5}, "data.aux-beta=1.5: expected a number in [0, 1]"),
    ({"data.dirichlet-alpha": 0}, "data.dirichlet-alpha=0: expected a finite number > 0"),
    ({"num-server-rounds": 0}, "num-server-rounds=0: expected an integer in [1, 1000000]"),
    ({"seed": True}, "seed=True: expected an integer in [0, 4294967295]"),
    # torch keeps a seed's low 32 bits: seed 2**32 drew seed 0's initial model.
    ({"seed": 2**32}, "seed=4294967296: expected an integer in [0, 4294967295]"),
    ({"attack.names": ""}, "attack.names='': expected at least one name"),
    # An empty TOML list is no more 'none' than an empty string (it turned attacks off).
    ({"attack.names": []}, "attack.names=[]: expected at least one name, or 'none'"),
    ({"metrics.lpips-nets": []}, "metrics.lpips-nets=[]: expected at least one name"),
    ({"attack.names": ["ig", " "]}, "attack.names=['ig', ' ']: a blank name"),
    ({"attack.max-seconds": float("nan")}, "attack.max-seconds=nan: expected a finite number > 0"),
    # inf is >= 0, so the line says why it is refused.
    (
        {"defense.central-noise": float("inf")},
        "defense.central-noise=inf: expected a finite number >= 0",
    ),
    ({"device": "tpu"}, "device='tpu': expected one of 'auto', 'cpu', 'cuda'"),
    ({"data.datset": "x"}, "data.datset: unknown setting; did you mean data.dataset"),
    ({"TRAIN.BATCH-SIZE": 4}, "TRAIN.BATCH-SIZE: unknown setting; did you mean train.batch-size"),
    ({"out-dir": "relative/dir"}, "out-dir='relative/dir': expected an absolute path"),
    ({"train.local-steps": 3}, "train.local-steps=3: fedsgd shares one gradient"),
    (
        {"threat.share": "per-sample", "train.mode": "fedavg"},
        "threat.share='per-sample': per-sample updates exist only in fedsgd",
    ),
    ({"attack.names": "ig,aux-mean,ig"}, "attack.names='ig,aux-mean,ig': names a value twice"),
    # It read "attack.names='none': unknown attack", leaving 'none' out of the allowed (FF2).
    ({"attack.names": "ig,none"}, "attack.names='ig,none': 'none' stands alone; give names"),
    ({"metrics.lpips-nets": ["none", "alex"]}, "metrics.lpips-nets=['none', 'alex']: 'none' st"),
    (
        {"threat.view": "aggregate", "train.mode": "fedavg"},
        "threat.view='aggregate' with train.mode='fedavg': the aggregate of FedAvg deltas",
    ),
    (
        {"attack.rounds": "1,4", "num-server-rounds": 3},
        "attack.rounds='1,4': expected 'all', 'every:K' with K >= 1, or comma-separated round "
        "numbers in 1..3",
    ),
    (
        {"attack.rounds": "0"},
        "attack.rounds='0': expected 'all', 'every:K' with K >= 1, or comma-separated round",
    ),
    (
        {"attack.rounds": "first"},
        "attack.rounds='first': expected 'all', 'every:K' with K >= 1, or comma-separated",
    ),
]


@pytest.mark.parametrize(("flat", "message"), INVALID)
def test_invalid_values_give_one_clear_line(flat: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_flat(flat)
    text = str(error.value)
    assert message in text
    assert "\n" not in text


def test_defaults_round_trip_through_toml_and_flat() -> None:
    config = parse_flat({"attack.names": "ig,aux-mean", "attack.ig.lr": 0.05, "seed": 3})
    assert parse_toml(config.to_toml()) == config
    assert parse_flat(config.to_flat()) == config
    assert config.attack.names == ("ig", "aux-mean")
    assert config.attack.params == {"ig": {"lr": 0.05}}


def test_an_attack_name_that_is_no_bare_toml_key_round_trips() -> None:
    """`[attack.lti+ig]` is not TOML: a run with an `attack.lti+ig.*` setting wrote a
    config.toml that it could not read back, and ended without a report."""
    config = parse_flat({"attack.names": "lti+ig", "attack.lti+ig.ig-tv-weight": 0.001})
    assert '[attack."lti+ig"]' in config.to_toml()
    assert parse_toml(config.to_toml()) == config


def test_attacked_rounds_name_numbers_and_the_last_round() -> None:
    assert attacked_rounds("all", 5) is None
    assert attacked_rounds("1, last", 5) == frozenset({1, 5})
    assert attacked_rounds("LAST,5", 5) == frozenset({5})
    assert parse_flat({"attack.rounds": "2,3", "num-server-rounds": 3}).attack.rounds == "2,3"
    # `--set attack.rounds=3` (or `rounds = 3` in a preset) reads as a TOML integer: one round.
    assert parse_flat({"attack.rounds": 3, "num-server-rounds": 3}).attack.rounds == "3"
    assert parse_flat({"name": 2024}).name == "2024"
    # `--set name=nan` and `--set name=true` read as a TOML float and bool: refused as
    # "expected letters, digits, ..." and shown as True (audit CH5). Their words stand.
    assert parse_flat({"name": float("nan")}).name == "nan"
    assert parse_flat({"name": True}).name == "true"
    assert parse_flat({"name": 0.5}).name == "0.5"
    assert parse_flat({"name": __import__("datetime").date(2024, 1, 1)}).name == "2024-01-01"
    with pytest.raises(ConfigError, match=r"attack\.rounds='4': expected 'all'"):
        parse_flat({"attack.rounds": 4, "num-server-rounds": 3})


def test_a_text_setting_on_the_command_line_keeps_what_was_typed() -> None:
    """`--set name=1e3` ran as "1000.0" and `out-dir=0x1F` in the folder "31": read as TOML
    numbers first (audit DO5). Number settings still read numbers; quotes still unquote."""
    from fedleak.simulations.cli import _override

    assert _override("name=1e3") == ("name", "1e3")
    assert _override("out_dir=0x1F") == ("out_dir", "0x1F")
    assert _override("name=1_000") == ("name", "1_000")
    assert _override("name=2024-01-01T10:00:00") == ("name", "2024-01-01T10:00:00")
    assert _override('name="1e3"') == ("name", "1e3")
    assert _override("train.lr=1e3") == ("train.lr", 1000.0)
    assert _override("attack.lti.hidden=1000") == ("attack.lti.hidden", 1000)
    # Names, an attack's text parameters and its preset too (audit DP7); an unknown attack's
    # parameter reads as TOML, and validating the run names the attack.
    assert _override("attack.names=1e3") == ("attack.names", "1e3")
    assert _override("attack.ig.bn_mode=1e3") == ("attack.ig.bn_mode", "1e3")
    assert _override("attack.lti.preset=1e3") == ("attack.lti.preset", "1e3")
    assert _override("attack.lti.cache-dir=0x1F") == ("attack.lti.cache-dir", "0x1F")
    assert _override("attack.no-such.x=1e3") == ("attack.no-such.x", 1000.0)
    assert _override('attack.names=["ig", "dlg"]') == ("attack.names", ["ig", "dlg"])
    assert parse_flat(dict([_override('attack.names=["ig", "dlg"]')])).attack.names == ("ig", "dlg")


def test_nested_toml_and_flat_keys_name_the_same_settings() -> None:
    nested = parse_toml('[train]\nbatch-size = 4\nmode = "fedavg"\nlocal-steps = 3\n')
    flat = parse_flat({"train.batch-size": 4, "train.mode": "fedavg", "train.local-steps": 3})
    assert nested == flat
    assert nested.train.examples_per_round == 4


def test_fedsgd_uses_exactly_one_batch() -> None:
    config = parse_flat({"train.batch-size": 8})
    assert config.train.examples_per_round == 8
    fedavg = {"train.mode": "fedavg", "train.examples": 32, "train.local-steps": 4}
    assert parse_flat({**fedavg, "train.batch-size": 8}).train.examples_per_round == 32
    # Examples past the local steps' K * B would be declared and scored, never trained on.
    with pytest.raises(ConfigError, match=r"train\.examples=32: fedavg's 4 local step\(s\)"):
        parse_flat({**fedavg, "train.batch-size": 4})


def test_every_known_key_is_accepted_with_its_default() -> None:
    flat = RunConfig().to_flat()
    assert set(flat) == set(known_keys())
    assert parse_flat(flat) == RunConfig()


def test_bad_toml_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_toml("[train\nbatch-size = ")


def test_one_key_written_as_a_dotted_key_and_in_a_table_is_refused() -> None:
    """TOML allows both; the later one won without a word (audit EI1)."""
    with pytest.raises(ConfigError, match=r"^train\.lr=0\.2 and train\.lr=0\.5: one key"):
        parse_toml('"train.lr" = 0.5\n[train]\nlr = 0.2\n')
    # The same value twice says the same thing: accepted.
    assert parse_toml('"train.lr" = 0.2\n[train]\nlr = 0.2\n').train.lr == 0.2


values = st.one_of(
    st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.booleans(), st.text(max_size=12)
)
keys = st.one_of(st.sampled_from(known_keys()), st.text(max_size=20))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(keys, values, max_size=6))
def test_no_input_crashes_the_parser(flat: dict) -> None:
    try:
        config = parse_flat(flat)
    except ConfigError as error:
        assert "\n" not in str(error)
    else:
        assert isinstance(config, RunConfig)


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=200))
def test_no_toml_text_crashes_the_parser(text: str) -> None:
    try:
        parse_toml(text)
    except ConfigError as error:
        assert "\n" not in str(error)


def test_flower_app_defaults_equal_the_quickstart_preset() -> None:
    from pathlib import Path

    from fedleak.config import flatten_toml
    from fedleak.simulations.presets import load_preset

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    app_config = flatten_toml(pyproject["tool"]["flwr"]["app"]["config"])
    assert parse_flat(app_config) == load_preset("quickstart")
    # Flower takes only listed keys; the resume hints tell flwr users to pass this one.
    assert app_config["sim.resume"] is False


def test_config_keys_prints_type_default_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    from fedleak.simulations.cli import main

    assert main(["config-keys"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0]: line for line in lines[1:]}
    assert set(known_keys()) <= set(rows)
    batch = rows["train.batch-size"]
    assert "int >= 1" in batch and "samples per client batch" in batch
    tv = rows["attack.ig.tv-weight"]
    assert "float >= 0 | none" in tv and "total variation" in tv
    assert "paper|paper-tuned|cpu|cpu-batch|cpu-small" in rows["attack.lti.preset"]
    assert " 0.01 " in rows["attack.lti+ig.ig-learning-rate"]  # the hybrid's own default


def test_every_setting_has_a_line_of_help() -> None:
    from fedleak.attacks.registry import ATTACKS
    from fedleak.config import key_help

    lines = key_help() + [line for _, entry in ATTACKS.items() for line in entry.help()]
    undocumented = [line.key for line in lines if not line.doc]
    assert not undocumented


@pytest.mark.parametrize(
    ("flat", "message"),
    [
        (
            {"threat.view": "aggregate", "model.name": "convnet-bn"},
            "threat.view='aggregate' with model.name='convnet-bn': each client normalises",
        ),
        (
            {"attack.names": "ig", "attack.ig.init": "aux-mean", "data.aux-size": 0},
            "attack.ig.init='aux-mean': starts from the mean auxiliary image",
        ),
        (
            {"model.name": "transformer3"},
            "model.name='transformer3' reads tokens but data.dataset='mnist5k' holds images; "
            "expected one of lenet,",
        ),
    ],
)
def test_components_refuse_what_cannot_be_measured(flat: dict, message: str) -> None:
    with pytest.raises(ConfigError) as error:
        validate_components(parse_flat(flat))
    assert message in str(error.value) and "\n" not in str(error.value)


def test_parameters_of_unused_attacks_are_checked_and_unknown_attacks_refused() -> None:
    from fedleak.server.validate import validate_components
    from fedleak.simulations.presets import load_preset

    # A preset's attack parameters survive overriding attack.names (the quickstart sets ig's
    # and lti's), checked but unused.
    dropped = parse_flat({"attack.names": "aux-mean,ig"}, load_preset("quickstart"))
    validate_components(dropped)
    assert dropped.attack.params["lti"] == {"preset": "cpu-small"}
    with pytest.raises(ConfigError, match=r"attack\.igg\.\*: parameters for an unknown attack"):
        validate_components(parse_flat({"attack.igg.lr": 0.05}))
    with pytest.raises(ConfigError, match=r"attack\.ig\.restarts=0: "):
        validate_components(parse_flat({"attack.names": "aux-mean", "attack.ig.restarts": 0}))
    # An unused attack's aux-mean start needs no aux data: it was warned of as having no
    # effect, then refused (audit DO6).
    unused = {"attack.names": "none", "attack.ig.init": "aux-mean", "data.aux-size": 0}
    validate_components(parse_flat(unused))


def test_the_demo_is_the_quickstart_without_and_with_sign_compression() -> None:
    import dataclasses

    from fedleak.simulations.presets import load_preset
    from fedleak.simulations.sweep import load_sweep

    quickstart = load_preset("quickstart")
    plan = load_sweep("demo")
    assert [cell.config.defense.spec for cell in plan.cells] == ["none", "sign"]
    for cell in plan.cells:
        same = dataclasses.replace(cell.config, name=quickstart.name, defense=quickstart.defense)
        assert same == quickstart, cell.id


def test_a_set_for_an_attack_that_does_not_run_is_named_in_a_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--set attack.dlg.restarts=2` beside the quickstart's attacks was accepted without a word
    (audit BV2): a typo of the attack's name went unseen."""
    from fedleak.simulations.cli import main

    assert main(["check", "quickstart", "--set", "attack.dlg.restarts=2"]) == 0
    assert capsys.readouterr().err.splitlines() == [
        "fedleak: warning: --set attack.dlg.restarts has no effect: attack.names runs "
        "aux-mean, ig, lti"
    ]
    assert main(["check", "quickstart", "--set", "attack.ig.restarts=2"]) == 0
    assert capsys.readouterr().err == ""
    assert (
        main(["check", "quickstart", "--set", "attack.names=none", "--set", "attack.ig.restarts=2"])
        == 0
    )
    assert capsys.readouterr().err.endswith("attack.names runs no attack\n")


def test_the_resume_form_tells_apart_floats_that_differ_past_six_digits() -> None:
    """It compared rendered values ("0.1" for 0.1000001): a sweep refused the second cell as
    the same configuration, and a rerun reused lr=0.1's results for lr=0.1000001 (audit BX1)."""
    from fedleak.server.validate import resume_form

    def form(**params: object) -> dict:
        flat = {"attack.names": "ig", **{f"attack.ig.{k}": v for k, v in params.items()}}
        return resume_form(parse_flat(flat)).to_flat()

    assert form(**{"learning-rate": 0.1}) != form(**{"learning-rate": 0.1000001})
    assert form(restarts=1) == form()  # a default is no change
    assert form(adaptive="True") == form(adaptive=True)  # nor a spelling
    # The milestones' order means nothing to the schedule (audit BZ D2).
    assert form(milestones="0.625,0.375,0.875") == form()


def test_check_warns_that_dpsgd_under_an_encoding_reports_no_epsilon(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`run` warned that DP-SGD with MixUp reports no ε; `check`, which promises the same
    checks, said nothing (audit CG2)."""
    from fedleak.simulations.cli import main

    spec = "defense.spec=dpsgd:1:1+mixup:2"
    assert main(["check", "quickstart", "--num-clients", "3", "--set", spec]) == 0
    err = capsys.readouterr().err
    assert "fedleak: warning: defense.spec: DP-SGD runs, but no ε is reported: dpsgd clips" in err
    assert (
        main(["check", "quickstart", "--num-clients", "3", "--set", "defense.spec=dpsgd:1:1"]) == 0
    )
    assert capsys.readouterr().err == ""


def test_a_batchnorm_prior_with_no_batchnorm_to_match_is_named_in_a_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """gradinversion on LeNet ran as IG with another TV weight, its rows recording the prior
    it never applied, without a word (audit CX3)."""
    from fedleak.simulations.cli import main

    names = "attack.names=aux-mean,gradinversion,ig,stepwise"
    assert main(["check", "quickstart", "--num-clients", "3", "--set", names]) == 0
    assert (
        "fedleak: warning: gradinversion and stepwise run without a BatchNorm prior: "
        "model.name='lenet' has no BatchNorm layer, so the prior is left out (the rows record "
        "bn_weight 0)"
    ) in capsys.readouterr().err
    bn = ("--set", "model.name=convnet-bn", "--set", "threat.share=batch")
    assert main(["check", "quickstart", "--num-clients", "3", "--set", names, *bn]) == 0
    assert "BatchNorm prior" not in capsys.readouterr().err


def test_a_public_pool_no_encoding_mixes_from_is_named_in_a_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The pool shrank every client's data though no encoding mixed from it (audit EF3)."""
    from fedleak.simulations.cli import main

    pool = ("--num-clients", "3", "--set", "data.public-size=100")
    assert main(["check", "quickstart", *pool, "--set", "defense.spec=instahide:4"]) == 0
    assert (
        "fedleak: warning: data.public-size=100: only instahide:K:inter mixes public images, "
        "yet the pool is held out of the clients' data, so each client holds fewer examples; "
        "set data.public-size=0"
    ) in capsys.readouterr().err
    assert main(["check", "quickstart", *pool, "--set", "defense.spec=instahide:4:inter"]) == 0
    assert "data.public-size" not in capsys.readouterr().err


def test_settings_a_run_never_reads_are_named_in_a_warning() -> None:
    """Batch statistics on a model without BatchNorm, a δ without DP and a tokenizer on image
    data were accepted without a word (audit DO6)."""
    from fedleak.runtime import federated_data
    from fedleak.server.validate import ineffective_settings

    def warning(flat: dict[str, object]) -> str | None:
        config = parse_flat({"data.aux-size": 50, **flat})
        return ineffective_settings(config, federated_data(config, num_partitions=1))

    assert warning({}) is None
    assert warning({"threat.bn-stats": "shared"}) == (
        "threat.bn-stats='shared' (model.name='lenet' has no BatchNorm layer): no effect in "
        "this run"
    )
    assert warning({"threat.bn-stats": "shared", "model.name": "convnet-bn"}) is None
    assert warning({"defense.dp-delta": 0.5}).startswith("defense.dp-delta=0.5 (neither DP-SGD")
    assert warning({"defense.dp-delta": 1e-6, "defense.spec": "dpsgd:1:1"}) is None
    assert warning({"data.tokenizer": "foo"}) == (
        "data.tokenizer='foo' (text settings; mnist5k holds images): no effect in this run"
    )
    assert warning({"data.seq-len": 64}) == (
        "data.seq-len=64 (text settings; mnist5k holds images): no effect in this run"
    )
    # A non-iid study asked for by its concentration alone ran iid (audit EA2).
    assert warning({"data.dirichlet-alpha": 0.1}) == (
        "data.dirichlet-alpha=0.1 (data.partition='iid'; it shapes the dirichlet partitions): "
        "no effect in this run"
    )
    assert warning({"data.dirichlet-alpha": 0.1, "data.partition": "dirichlet-clients"}) is None
    assert warning({"data.shards-per-client": 5, "data.partition": "dirichlet"}).startswith(
        "data.shards-per-client=5 (data.partition='dirichlet'; it shapes the shards partition)"
    )
    assert warning({"data.shards-per-client": 5, "data.partition": "shards"}) is None
    # LPIPS backbones on text: scored on images only (audit EK2); the data's tokenizer is all
    # the check reads of it.
    from types import SimpleNamespace

    text = SimpleNamespace(dataset=SimpleNamespace(tokenizer=object()))
    on_text = parse_flat({"data.dataset": "wikipedia", "metrics.lpips-nets": "alex,vgg"})
    assert ineffective_settings(on_text, text) == (  # type: ignore[arg-type]
        "metrics.lpips-nets='alex,vgg' (image metrics; wikipedia holds text): no effect in this run"
    )
    assert ineffective_settings(parse_flat({"data.dataset": "wikipedia"}), text) is None  # type: ignore[arg-type]
    # A tokenizer that brings its vocabulary leaves data.vocab-size unread (audit FD1).
    gpt2 = parse_flat(
        {"data.dataset": "wikipedia", "data.tokenizer": "gpt2", "data.vocab-size": 512}
    )
    assert ineffective_settings(gpt2, text) == (  # type: ignore[arg-type]
        "data.vocab-size=512 (data.tokenizer='gpt2' brings its own vocabulary; it sizes the BPE "
        "trained on the auxiliary text): no effect in this run"
    )
    bpe = parse_flat({"data.dataset": "wikipedia", "data.vocab-size": 512})
    assert ineffective_settings(bpe, text) is None  # type: ignore[arg-type]
    own = parse_flat(
        {"data.dataset": "wikipedia", "data.tokenizer": "file:/t.json", "data.vocab-size": 512}
    )
    assert ineffective_settings(own, text).startswith(  # type: ignore[arg-type, union-attr]
        "data.vocab-size=512 (data.tokenizer='file:/t.json' brings its own vocabulary"
    )
    # On images both are text settings, named once as such (audit FH2).
    assert warning({"data.tokenizer": "gpt2", "data.vocab-size": 512}) == (
        "data.tokenizer='gpt2', data.vocab-size=512 (text settings; mnist5k holds images): no "
        "effect in this run"
    )


def test_learned_attack_settings_other_settings_leave_unread_are_named() -> None:
    """Fine-tuning epochs under refresh=retrain, patience with nothing held out, signed hashing
    without hashing: the rows came out the same, without a word (audit FE3)."""
    from fedleak.runtime import federated_data
    from fedleak.server.validate import ineffective_settings

    def warning(flat: dict[str, object]) -> str | None:
        config = parse_flat({"data.aux-size": 50, "attack.names": "lti,ig", **flat})
        return ineffective_settings(config, federated_data(config, num_partitions=1))

    assert warning({"attack.lti.finetune-epochs": 7}) is None
    assert warning({"attack.lti.refresh": "retrain", "attack.lti.finetune-epochs": 7}) == (
        "attack.lti.finetune-epochs=7 (refresh='retrain': it trains anew): no effect in this run"
    )
    assert warning({"attack.lti.refresh": "frozen", "attack.lti.finetune_learning_rate": 0.01}) == (
        "attack.lti.finetune-learning-rate=0.01 (refresh='frozen': it never refreshes): no "
        "effect in this run"
    )
    assert warning({"attack.lti.aux-val-fraction": 0, "attack.lti.patience": 3}) == (
        "attack.lti.patience=3 (aux-val-fraction=0: nothing held out to stop on): no effect "
        "in this run"
    )
    # The preset decides too: `paper` holds nothing out and retrains.
    paper = {"attack.lti.preset": "paper", "attack.lti.patience": 3}
    assert warning(paper).startswith("attack.lti.patience=3 (aux-val-fraction=0")
    assert warning({**paper, "attack.lti.aux-val-fraction": 0.1}) is None
    assert warning({"attack.lti.hash-bins": "none", "attack.lti.hash-signed": True}) == (
        "attack.lti.hash-signed=True (hash-bins=none: the update is not hashed): no effect in "
        "this run"
    )
    assert warning({"attack.lti.lr-drop-epoch": "none", "attack.lti.lr-drop-to": 1e-3}).startswith(
        "attack.lti.lr-drop-to=0.001 (lr-drop-epoch=none: the rate never drops)"
    )
    # A drop epoch the training never reaches (audit FH3).
    assert warning({"attack.lti.epochs": 20, "attack.lti.lr-drop-to": 1e-5}) == (
        "attack.lti.lr-drop-to=1e-05 (lr-drop-epoch=20 >= epochs=20: no drop comes): no effect "
        "in this run"
    )
    assert warning({"attack.lti.epochs": 21, "attack.lti.lr-drop-to": 1e-5}) is None
    # lti+ig's learned stage, under its own keys (audit FH1).
    hybrid = {"attack.names": "lti+ig", "attack.lti+ig.refresh": "retrain"}
    assert warning({**hybrid, "attack.lti+ig.finetune-epochs": 3}) == (
        "attack.lti+ig.finetune-epochs=3 (refresh='retrain': it trains anew): no effect in this run"
    )
    assert warning({**hybrid, "attack.lti+ig.ig-tv-weight": 0.1}) is None
    # The attack workers' share without workers (audit FF1).
    assert warning({"attack.worker-gpus": 0.5}) == (
        "attack.worker-gpus=0.5 (attack.workers=0: the attacks run inline): no effect in this run"
    )
    assert warning({"attack.worker-cpus": 2, "attack.workers": 1}) is None
    # At drop epoch 0 the learning rate still sets a refresh's, unless that has its own.
    assert warning({"attack.lti.lr-drop-epoch": 0, "attack.lti.learning-rate": 0.01}) is None
    assert warning(
        {
            "attack.lti.lr-drop-epoch": 0,
            "attack.lti.learning-rate": 0.01,
            "attack.lti.finetune-learning-rate": 0.001,
        }
    ).startswith("attack.lti.learning-rate=0.01 (lr-drop-epoch=0: every training runs at")


def test_one_setting_is_given_once_whatever_its_spelling() -> None:
    """`tv_weight` and `tv-weight` with other values both ran, the last written winning, and
    config.toml recorded both (audit EA1): one source gives one value; a later source's
    spelling replaces the base's."""
    for flat in (
        {"attack.ig.tv_weight": 0.1, "attack.ig.tv-weight": 0.5},
        {"train.batch_size": 4, "train.batch-size": 8},
    ):
        with pytest.raises(ConfigError, match=r"two spellings of .* with different values; give"):
            parse_flat(flat)
    same = parse_flat({"attack.ig.tv_weight": 0.5, "attack.ig.tv-weight": 0.5})
    assert same.attack.params["ig"] == {"tv-weight": 0.5}
    base = parse_flat({"attack.ig.tv_weight": 0.2})
    assert parse_flat({"attack.ig.tv-weight": 0.7}, base).attack.params["ig"] == {"tv-weight": 0.7}


def test_batchnorm_statistics_left_to_the_attacks_unused_are_named_in_a_warning(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Each client's running statistics reach the server, from which its batch statistics
    follow; under threat.bn-stats = hidden the run says that its attacker leaves them unused
    (audit EF1)."""
    from fedleak.simulations.cli import main

    bn = ("--num-clients", "3", "--set", "model.name=convnet-bn", "--set", "threat.share=batch")
    assert main(["check", "quickstart", *bn]) == 0
    assert (
        "fedleak: warning: threat.bn-stats='hidden': the attacks are not given the clients' "
        "BatchNorm batch statistics, yet each client's running statistics reach the server"
    ) in capsys.readouterr().err
    assert main(["check", "quickstart", *bn, "--set", "threat.bn-stats=shared"]) == 0
    assert "threat.bn-stats" not in capsys.readouterr().err
    assert main(["check", "quickstart", "--num-clients", "3"]) == 0  # LeNet: no BatchNorm
    assert "threat.bn-stats" not in capsys.readouterr().err


def test_central_dp_labels_keep_every_digit() -> None:
    """Two sweep cells whose clip norms differ past the sixth digit were one setting in the
    report, and the second cell's rows were dropped as duplicates (audit EI3)."""

    def label(clip: float, noise: float) -> str:
        flat = {"defense.central-clip": clip, "defense.central-noise": noise}
        return parse_flat(flat).defense.label

    assert label(0.1234561, 0.5) == "central-dp:0.1234561:0.5"
    assert label(0.1234561, 0.5) != label(0.1234564, 0.5)
    assert label(1.0, 1.1) == "central-dp:1:1.1"  # as before for the usual values


def test_central_dp_is_held_to_the_clients_float32_bounds() -> None:
    """A central clip of 1e-45 zeroed every update while the run reported a central ε, and
    noise of 1e38 failed round 1 (audit EH3): refused as the clients' dpsgd and gauss are."""
    from fedleak.defenses import noise

    assert (FLOAT32_TINY, FLOAT32_NOISE_MAX) == (noise.SMALLEST_CLIP, noise.LARGEST_SCALE)
    with pytest.raises(
        ConfigError, match=r"^defense\.central-clip=1e-45: expected 0 \(no central DP\) or a finite"
    ):
        parse_flat({"defense.central-clip": 1e-45, "defense.central-noise": 1.0})
    with pytest.raises(ConfigError, match=r"z x C = 1e\+38 must be at most 2\.127e\+37"):
        parse_flat({"defense.central-clip": 1.0, "defense.central-noise": 1e38})
    assert parse_flat({"defense.central-clip": 2.0**-126, "defense.central-noise": 1.0})
    # A run that recorded such a clip still reads as it ran, for its report (audit EJ3).
    tiny = {"defense.central-clip": 1e-40, "defense.central-noise": 1.0}
    assert parse_flat(tiny, recorded=True).defense.central_clip == 1e-40
    # So does one that recorded such noise, and the largest allowed noise is allowed (audit
    # EN4, EN5).
    loud = {"defense.central-clip": 1.0, "defense.central-noise": 1e38}
    assert parse_flat(loud, recorded=True).defense.central_noise == 1e38
    largest = {"defense.central-clip": 1.0, "defense.central-noise": FLOAT32_NOISE_MAX}
    assert parse_flat(largest).defense.central_noise == FLOAT32_NOISE_MAX
