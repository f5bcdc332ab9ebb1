"""Every bad input is refused through the real entry point before any work starts: one line on
stderr naming the setting, a non-zero exit, no traceback, nothing written but what should be.

Each case runs `fedleak.simulations.cli.main` in-process with Ray's start replaced by a failure,
so a case that got as far as starting a simulation fails the test.
"""

from __future__ import annotations

import errno
import json
import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedleak.config import parse_flat
from fedleak.models import ModelSpec, build_model
from fedleak.report import rundir
from fedleak.report.rundir import RunDirectory
from fedleak.simulations import launch
from fedleak.simulations.cli import _resume_hint, main, parser

Setup = Callable[[Path], None]


def _nothing(_: Path) -> None:
    pass


@dataclass(frozen=True)
class Case:
    """argv (with `{tmp}` for the case's folder), the line's expected text, the exit status."""

    id: str
    argv: tuple[str, ...]
    says: str
    status: int = 2
    setup: Setup = _nothing
    # Paths (relative to tmp) that setup made and the refusal must leave exactly as they were.
    keeps: tuple[str, ...] = field(default_factory=tuple)


def _write(relative: str, data: bytes) -> Setup:
    def setup(tmp: Path) -> None:
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    return setup


def _writes(*files: tuple[str, bytes]) -> Setup:
    def setup(tmp: Path) -> None:
        for relative, data in files:
            _write(relative, data)(tmp)

    return setup


def _remove(relative: str) -> Setup:
    def setup(tmp: Path) -> None:
        (tmp / relative).unlink()

    return setup


def _cut(relative: str, count: int) -> Setup:
    """The file less its last `count` bytes."""

    def setup(tmp: Path) -> None:
        path = tmp / relative
        path.write_bytes(path.read_bytes()[:-count])

    return setup


def _finished_run(
    tmp: Path,
    environment: dict[str, object] | None = None,
    attacks: dict[str, object] | None = None,
) -> None:
    """A one-round run as a run leaves it: its round recorded, then its checkpoint saved.
    `attacks`: settings of the attacks' table (attack.names and their parameters)."""
    config = parse_flat({"num-server-rounds": 1, "out-dir": str(tmp / "done"), **(attacks or {})})
    run = RunDirectory.create(tmp / "done", config, environment or {})
    rows = [
        {"attack": name, "diagnostics": json.dumps({"train_seconds": 1.0})}
        for name in config.attack.names
    ]
    run.append_round(1, rows, {"test_loss": 1.0, "test_accuracy": 0.5, "num_replies": 2})
    lenet = build_model(ModelSpec("lenet", (1, 28, 28), 10))
    run.save_global_model(1, lenet.state_dict())


def _finished_run_on(fingerprint: str) -> Setup:
    """A finished run whose environment.json says it began on data of `fingerprint`."""

    data = {"source": "a folder since edited", "fingerprint": fingerprint}
    return lambda tmp: _finished_run(tmp, {"data": data})


def _run_with_checkpoint(state: object) -> Setup:
    def setup(tmp: Path) -> None:
        _finished_run(tmp)
        torch.save(state, tmp / "done" / "checkpoints" / "global.pt")

    return setup


def _image_folder(sizes: tuple[int, ...], dtype: str = "uint8") -> Setup:
    def setup(tmp: Path) -> None:
        for label, size in enumerate(sizes):
            folder = tmp / "images" / f"class{label}"
            folder.mkdir(parents=True)
            pixels = np.full((size, size), 100, dtype=dtype)
            suffix = "tif" if dtype == "float32" else "png"
            Image.fromarray(pixels).save(folder / f"{label}.{suffix}")

    return setup


BAD_CSV = b"round,test_loss\nabc,def\n"
SWEEP_NAN_CPUS = b"[sweep]\nclient-cpus = nan\n[sweep.grid]\nseed = [1, 2]\n"
# A two-cell sweep of the quickstart's small-batch form; cases append keys to its [base].
SWEEP_SMALL = (
    b'[sweep]\npreset = "quickstart"\nnum-clients = 10\n[sweep.grid]\nseed = [1, 2]\n'
    b'[base]\n"train.batch-size" = 2\n"threat.share" = "batch"\n'
)
# The quickstart with the small batches these cases were measured on (a batch of 2, shared as
# one update): the refusals below name those numbers.
SMALL = ("--set", "train.batch-size=2", "--set", "threat.share=batch")
RUN = ("run", "quickstart", *SMALL)
CHECK = ("check", "quickstart", *SMALL)
CENTRAL_DP = ("--set", "defense.central-clip=1", "--set", "defense.central-noise=1")
POISSON = ("--set", "defense.spec=dpsgd:1:1", "--set", "defense.dp-sampling=poisson")
SHARDS = ("--set", "data.partition=shards")
CONVNET_BN_GRADINVERSION = ("--set", "model.name=convnet-bn", "--set", "attack.names=gradinversion")
RESUME = ("run", "{tmp}/done/config.toml", "--out", "{tmp}/done", "--set", "sim.resume=true")
# The text quickstart on a small tokenizer (its BPE trains in a second).
TEXT = ("run", "text-quickstart", "--set", "data.aux-size=400", "--set", "data.vocab-size=300")

CASES = [
    # Client counts and resources (Flower divided by zero or hung on these).
    Case("clients-0", (*RUN, "--num-clients", "0"), "num-clients=0: expected an integer >= 1"),
    Case("clients-neg", (*RUN, "--num-clients", "-1"), "num-clients=-1: expected an integer"),
    Case(
        "clients-below-min",
        (*RUN, "--num-clients", "2", "--set", "train.min-clients=3"),
        "num-clients=2: expected at least train.min-clients (3)",
    ),
    Case(
        "attacked-above-trained",
        (*RUN, "--num-clients", "2", "--set", "attack.clients-per-round=5"),
        "attack.clients-per-round=5: a round trains 2 of the 2 clients",
    ),
    Case(
        "attacked-above-sampled",
        (*RUN, "--set", "train.fraction-train=0.3", "--set", "attack.clients-per-round=4"),
        "expected 0 (every client) to 3",
    ),
    Case("cpus-0", (*RUN, "--client-cpus", "0"), "client-cpus=0.0: expected a finite number > 0"),
    Case(
        "cpus-nan", (*RUN, "--client-cpus", "nan"), "client-cpus=nan: expected a finite number > 0"
    ),
    Case(
        "cpus-inf", (*RUN, "--client-cpus", "inf"), "client-cpus=inf: expected a finite number > 0"
    ),
    Case("cpus-huge", (*RUN, "--client-cpus", "100000"), "Ray could never start a client"),
    Case("cpus-tiny", (*RUN, "--client-cpus", "1e-9"), "client-cpus=1e-09: Flower would start"),
    # The attack writes its state after its first training, rounds into the run.
    Case(
        "cache-dir-under-a-file",
        (*CHECK, "--set", "attack.names=lti", "--set", "attack.lti.cache-dir=/dev/null/lti"),
        "attack.lti.cache-dir='/dev/null/lti': /dev/null is not a folder",
    ),
    # Another run's inverters there: the new run would go on from them (audit AM1).
    Case(
        "cache-dir-of-another-run",
        (*RUN, "--set", "attack.names=lti", "--set", "attack.lti.cache-dir={tmp}/shared"),
        "/shared' holds inverters another run saved (the latest lti-inverter-r000003.pt), "
        "which this new run would start from",
        setup=_write("shared/lti-inverter-r000003.pt", b"saved"),
        keeps=("shared/lti-inverter-r000003.pt",),
    ),
    # Inside a running run's folder, before it saved there: both runs wrote one folder, and
    # that run's resume went on from this one's inverter (audit ED1).
    Case(
        "cache-dir-in-another-runs-folder",
        (*RUN, "--set", "attack.names=lti", "--set", "attack.lti.cache-dir={tmp}/other/state/lti"),
        "/other/state/lti' lies in ",
        setup=_writes(
            ("other/config.toml", b'name = "other"\n'), ("other/environment.json", b"{}")
        ),
        keeps=("other/config.toml", "other/environment.json"),
    ),
    # ... or one that has only locked its folder yet: it wrote nothing else before Ray started,
    # and then failed on the "not a fedleak run directory" this run made of it (audit EH2).
    Case(
        "cache-dir-in-a-starting-runs-folder",
        (*RUN, "--set", "attack.names=lti", "--set", "attack.lti.cache-dir={tmp}/other/state/lti"),
        "/other/state/lti' lies in ",
        setup=_write("other/.fedleak.lock", b""),
        keeps=("other/.fedleak.lock",),
    ),
    # The folder itself: a run's, or a sweep's that holds only its lock, was taken as a cache
    # (the inverters then lay in the sweep's folder, audit EN1).
    Case(
        "cache-dir-is-another-runs-folder",
        (*RUN, "--set", "attack.names=lti", "--set", "attack.lti.cache-dir={tmp}/other"),
        "/other' is ",
        setup=_writes(
            ("other/config.toml", b'name = "other"\n'), ("other/environment.json", b"{}")
        ),
        keeps=("other/config.toml", "other/environment.json"),
    ),
    Case(
        "cache-dir-is-a-sweeps-folder",
        (*RUN, "--set", "attack.names=lti", "--set", "attack.lti.cache-dir={tmp}/sweep"),
        "/sweep' is ",
        setup=_write("sweep/.fedleak.lock", b""),
        keeps=("sweep/.fedleak.lock",),
    ),
    Case(
        "gpus-nan", (*RUN, "--client-gpus", "nan"), "client-gpus=nan: expected a finite number >= 0"
    ),
    Case("clients-text", (*RUN, "--num-clients", "many"), "invalid int value: 'many'"),
    # Settings out of range or unsafe.
    Case(
        "seed-65-bits",
        (*CHECK, "--set", "seed=18446744073709551616"),
        "seed=18446744073709551616: expected an integer in [0, 4294967295]",
    ),
    # Blank list items were dropped: `=` alone turned IG's step decay off (audit DO4).
    Case(
        "blank-name-between-commas",
        (*CHECK, "--set", "attack.names=ig,,aux-mean"),
        "attack.names='ig,,aux-mean': a blank name; expected names",
    ),
    Case(
        "blank-number-between-commas",
        (*CHECK, "--set", "attack.lti.hidden=1000,,10"),
        "attack.lti.hidden='1000,,10': expected a non-empty list of whole numbers in [1, ",
    ),
    Case(
        "blank-list",
        (*CHECK, "--set", "attack.ig.milestones="),
        "attack.ig.milestones='': expected a list of numbers in (0, 1)",
    ),
    # Passed, then failed round 1 allocating 1.6 PB of weights (audit DO8).
    Case(
        "inverter-absurdly-wide",
        (*CHECK, "--set", "attack.names=aux-mean,lti", "--set", "attack.lti.hidden=99999999999"),
        "attack.lti.hidden=99999999999: expected a non-empty list of whole numbers in [1, 100000]",
    ),
    # Each width in range, 40 GB of weights between the two (audit DU).
    Case(
        "inverter-layers-wide-together",
        (*CHECK, "--set", "attack.names=aux-mean,lti", "--set", "attack.lti.hidden=100000,100000"),
        "attack.lti.hidden='100000,100000': expected a non-empty list of whole numbers in "
        "[1, 100000], neighbours' product at most 409,600,000",
    ),
    # One width in range, but 6.7 GB of weights to the 16 targets' images (audit EH4).
    Case(
        "inverter-too-wide-for-its-outputs",
        (
            *CHECK,
            "--set",
            "attack.names=aux-mean,lti",
            "--set",
            "threat.share=batch",
            "--set",
            "train.batch-size=16",
            "--set",
            "attack.lti.hidden=100000",
        ),
        "attack.lti.hidden=100000: the inverter would hold ",
    ),
    # A text inverter's outputs are every position's token logits (audit EN2).
    Case(
        "text-inverter-too-wide-for-its-outputs",
        (
            "check",
            "text-quickstart",
            "--set",
            "train.batch-size=16",
            "--set",
            "attack.lti-text.hidden=10000",
        ),
        "attack.lti-text.hidden=10000: the inverter would hold ",
    ),
    Case(
        "text-inverter-layers-wide-together",
        ("check", "text-quickstart", "--set", "attack.lti-text.hidden=30000,30000"),
        "attack.lti-text.hidden='30000,30000': expected a non-empty list of whole numbers",
    ),
    # The attacked rounds are a set: 1e12 rounds ran validation out of memory (audit DO3).
    Case(
        "rounds-huge",
        (*CHECK, "--set", "num-server-rounds=1000000000000"),
        "num-server-rounds=1000000000000: expected an integer in [1, 1000000]",
    ),
    Case("seed-huge", (*CHECK, "--set", "seed=" + "9" * 5000), "(5002 characters): expected an"),
    # A δ of 1/n or more makes the reported ε meaningless (n: a client's examples for DP-SGD,
    # the clients for central DP).
    Case(
        "delta-dpsgd",
        (*CHECK, "--set", "defense.spec=dpsgd:1:1", "--set", "defense.dp-delta=0.01"),
        "defense.dp-delta=0.01: at least 1/n = ",
    ),
    Case(
        "delta-central",
        (*CHECK, "--num-clients", "4", "--set", "defense.dp-delta=0.3", *CENTRAL_DP),
        "defense.dp-delta=0.3: at least 1/n = 0.25 (central DP over 4 clients)",
    ),
    # Poisson sampling is DP-SGD's draw of a FedSGD batch whose size stays private.
    Case(
        "poisson-without-dpsgd",
        (*CHECK, "--set", "defense.dp-sampling=poisson"),
        "defense.dp-sampling='poisson': samples DP-SGD's batch, but defense.spec='none' has no",
    ),
    Case(
        "shards-name-the-clients",
        (*CHECK, "--num-clients", "3", *SHARDS, "--set", "data.shards-per-client=5000"),
        "num-clients=3 x data.shards-per-client=5000 = 15000 shards exceed the 3000 images",
    ),
    Case(
        "bn-exact-without-statistics",
        (*CHECK, *CONVNET_BN_GRADINVERSION, "--set", "attack.gradinversion.bn-mode=exact"),
        "attack.gradinversion.bn-mode='exact' matches the clients' BatchNorm batch statistics, "
        "but threat.bn-stats='hidden'; set threat.bn-stats='shared' or bn-mode to auto",
    ),
    Case(
        "bn-prior-without-batchnorm",
        (*CHECK, "--set", "attack.ig.bn-weight=0.01"),
        "attack.ig.bn-weight=0.01: model.name='lenet' has no BatchNorm layer, so the BatchNorm "
        "prior has nothing to match",
    ),
    # Keys written with underscores, and lti+ig's refinement's, passed and failed the run in
    # its first round (audit DO1).
    Case(
        "bn-exact-written-with-an-underscore",
        (*CHECK, *CONVNET_BN_GRADINVERSION, "--set", "attack.gradinversion.bn_mode=exact"),
        "attack.gradinversion.bn-mode='exact' matches the clients' BatchNorm batch statistics",
    ),
    Case(
        "bn-exact-of-the-hybrids-refinement",
        (
            *CHECK,
            "--set",
            "model.name=convnet-bn",
            "--set",
            "attack.names=lti+ig",
            "--set",
            "attack.lti+ig.ig-bn-mode=exact",
        ),
        "attack.lti+ig.ig-bn-mode='exact' matches the clients' BatchNorm batch statistics",
    ),
    Case(
        "bn-prior-without-batchnorm-written-with-an-underscore",
        (*CHECK, "--set", "attack.ig.bn_weight=0.01"),
        "attack.ig.bn-weight=0.01: model.name='lenet' has no BatchNorm layer",
    ),
    Case(
        "fedavg-examples-never-used",
        (*CHECK, "--set", "train.mode=fedavg", "--set", "train.examples=8"),
        "train.examples=8: fedavg's 1 local step(s) of train.batch-size=2 use 2 examples, so "
        "the others would never enter the update; expected 0 or at most 2",
    ),
    Case(
        "fedavg-examples-under-one-batch",
        (
            *CHECK,
            "--set",
            "train.mode=fedavg",
            "--set",
            "train.batch-size=8",
            "--set",
            "train.local-steps=3",
            "--set",
            "train.examples=4",
        ),
        "train.examples=4: fedavg's batches of train.batch-size=8 are drawn from the round's "
        "examples, so expected 0 or at least 8",
    ),
    Case(
        "poisson-fedavg-examples",
        (*CHECK, *POISSON, "--set", "train.mode=fedavg", "--set", "train.examples=8"),
        "defense.dp-sampling='poisson': each local step draws its own batch from the whole "
        "partition, so train.examples=8 has no use; expected train.examples=0, or "
        "defense.dp-sampling='fixed'",
    ),
    Case(
        "poisson-per-sample",
        (*CHECK, *POISSON, "--set", "threat.share=per-sample"),
        "hides the batch size, which threat.share='per-sample' shows",
    ),
    Case(
        "poisson-encoded",
        (
            "check",
            "quickstart",
            "--set",
            "threat.share=batch",
            "--set",
            "train.batch-size=1",
            "--set",
            "defense.spec=instahide:2+dpsgd:1:1",
            "--set",
            "defense.dp-sampling=poisson",
        ),
        "defense.dp-sampling='poisson': instahide:2 encodes a fixed batch of images",
    ),
    Case(
        "poisson-typo",
        (*CHECK, *POISSON[:2], "--set", "defense.dp-sampling=poison"),
        "defense.dp-sampling='poison': expected one of 'fixed', 'poisson'",
    ),
    Case("nul-out-dir", (*RUN, "--set", "out-dir=/tmp/a\x00b"), "without NUL characters"),
    Case("nul-out", (*RUN, "--out", "a\x00b"), "--out='a\\x00b': expected a folder path"),
    Case("nul-preset", ("run", "pre\x00set"), "expected a preset name or a path"),
    Case(
        "name-escapes",
        (*RUN, "--set", "name=x/../../../escaped"),
        "name='x/../../../escaped': expected letters, digits",
    ),
    Case(
        "name-escapes-in-preset",
        ("run", "{tmp}/p.toml"),
        "name='../../outside': expected letters, digits",
        setup=_write("p.toml", b'name = "../../outside"\n'),
        keeps=("p.toml",),
    ),
    Case(
        "tv-weight-text",
        (*CHECK, "--set", "attack.names=ig", "--set", "attack.ig.tv-weight=abc"),
        "tv-weight='abc': expected none or a finite number >= 0",
    ),
    Case(
        "mixup-huge",
        (*CHECK, "--set", "defense.spec=mixup:1000000000"),
        "K='1000000000' is too large; expected a whole number below 10^9",
    ),
    Case("set-no-equals", (*RUN, "--set", "seed"), "--set 'seed': expected key=value"),
    Case("unknown-key", (*RUN, "--set", "trian.lr=1"), "trian.lr: unknown setting"),
    # The subcommand's help lists its options; the top level's does not (audit AL7).
    Case(
        "unknown-option",
        (*RUN, "--bogus"),
        "unrecognized arguments: --bogus (see `fedleak run --help`)",
    ),
    Case(
        "config-keys-unknown-attack",
        ("config-keys", "--attack", "nope"),
        "--attack='nope': unknown attack; expected one of aux-mean,",
    ),
    Case("unknown-command", ("fly",), "invalid choice: 'fly'"),
    # Runs in which every client, or every attack, would fail in every round.
    Case(
        "batch-over-partition",
        (*RUN, "--set", "train.batch-size=500"),
        "train.batch-size=500: client 0 holds only 300 images",
    ),
    Case(
        "clients-over-data",
        (*RUN, "--num-clients", "6", "--set", "data.aux-size=3990"),
        "train.batch-size=2: client 4 holds only 1 image ",
    ),
    Case(
        "batch-over-text-partition",
        (*TEXT, "--set", "train.batch-size=100000"),
        "sequences (document split of ",
    ),
    Case(
        "seq-len-over-positions",
        (*TEXT, "--set", "data.seq-len=1025"),
        "data.seq-len=1025: expected an integer in [2, 1024]",
    ),
    Case(
        "tokenizer-file-not-a-tokenizer",
        (*TEXT, "--set", "data.tokenizer=file:{tmp}/tok.json"),
        "is not a Hugging Face tokenizer.json",
        status=1,  # as for a missing file: the data cannot be built
        setup=_write("tok.json", b'{"not": "a tokenizer"}'),
        keeps=("tok.json",),
    ),
    Case(
        "clients-over-images",
        (*RUN, "--num-clients", "20", "--set", "data.aux-size=3990"),
        "num-clients=20: the clients share 10 images for training",
    ),
    Case(
        "aux-over-data",
        (*RUN, "--set", "data.aux-size=4000"),
        "data.aux-size=4000 leaves none of the 4000 training images for the clients",
    ),
    Case(
        "aux-beyond-out-of-distribution",
        (*RUN, "--set", "data.aux-beta=0", "--set", "data.test-fraction=0.999"),
        "data.aux-size=1000 with data.aux-beta=0.0 needs 1000 out-of-distribution images but "
        "only 3 exist; lower data.aux-size or raise data.aux-beta",
    ),
    Case(
        "instahide-inter-no-pool",
        (*RUN, "--set", "defense.spec=instahide:4:inter", "--set", "train.batch-size=4"),
        "set data.public-size >= 3",
    ),
    Case(
        "mixup-over-client-data",
        (
            *RUN,
            "--num-clients",
            "6",
            "--set",
            "data.aux-size=3990",
            "--set",
            "train.batch-size=1",
            "--set",
            "defense.spec=mixup:4",
        ),
        "mixup:4 mixes each image with 3 others of its client's data, but client 4 holds only "
        "1 image",
    ),
    Case(
        "aux-0-aux-mean",
        (*RUN, "--set", "data.aux-size=0"),
        "aux-mean needs auxiliary data, but data.aux-size=0",
    ),
    Case(
        "aux-0-label-counts",
        (
            *RUN,
            "--set",
            "data.aux-size=0",
            "--set",
            "attack.names=ig",
            "--set",
            "attack.ig.labels=counts",
        ),
        "attack.ig.labels='counts' needs auxiliary data",
    ),
    Case(
        "aux-too-small-for-lti",
        (*RUN, "--set", "data.aux-size=1", "--set", "attack.names=lti"),
        "lti trains on groups of 2 auxiliary images",
    ),
    Case(  # accepted and ignored: stages' losses do not rank iterates (audit CX4)
        "stepwise-keep-best",
        (*CHECK, "--set", "attack.names=stepwise", "--set", "attack.stepwise.keep-best=true"),
        "attack.stepwise.keep-best=true: the stages match different layers, with gradient",
    ),
    Case(  # a warm start of no epochs read as a refresh, with no score (audit CZ3)
        "lti-finetune-of-no-epochs",
        (*CHECK, "--set", "attack.names=lti", "--set", "attack.lti.finetune-epochs=0"),
        "attack.lti.finetune-epochs=0: expected an integer >= 1 (for no refresh: refresh=frozen)",
    ),
    Case(
        "idlg-on-batches",
        (*RUN, "--set", "attack.names=ig", "--set", "attack.ig.labels=idlg"),
        "attack.ig.labels='idlg' reads one label per update, but each update holds 2",
    ),
    Case(  # the aggregate of per-sample updates holds every sample of the round (audit CX1)
        "idlg-on-an-aggregate-of-samples",
        (
            *CHECK,
            "--num-clients",
            "2",
            "--set",
            "threat.share=per-sample",
            "--set",
            "threat.view=aggregate",
            "--set",
            "attack.names=ig",
            "--set",
            "attack.ig.labels=idlg",
        ),
        "attack.ig.labels='idlg' reads one label per update, but each update holds 4",
    ),
    Case(
        "payload-budget",
        (*RUN, "--set", "sim.payload-budget-mb=0.3"),
        "sim.payload-budget-mb=0.3: a round would move 1.",
    ),
    Case(
        "payload-budget-check",
        (*CHECK, "--set", "sim.payload-budget-mb=0.3"),
        "sim.payload-budget-mb=0.3: a round would move 1.",
    ),
    # Data: missing, empty path, unreadable images.
    Case("folder-empty", (*RUN, "--set", "data.dataset=folder:"), "expected folder:<path"),
    Case(
        "folder-missing",
        (*RUN, "--set", "data.dataset=folder:{tmp}/nowhere"),
        "looked for the folder",
        status=1,
    ),
    Case(
        "folder-mixed-sizes",
        (*RUN, "--set", "data.dataset=folder:{tmp}/images"),
        "images differ in size",
        status=1,
        setup=_image_folder((8, 9)),
    ),
    Case(
        "folder-float-pixels",
        (*RUN, "--set", "data.dataset=folder:{tmp}/images"),
        "floating-point pixels",
        status=1,
        setup=_image_folder((8, 8), "float32"),
    ),
    # Preset and sweep files.
    Case("preset-dev-null", ("run", "/dev/null"), "/dev/null: not a regular file"),
    Case("preset-folder", ("run", "{tmp}"), "a folder; expected a preset (.toml) file"),
    Case("preset-missing", ("run", "{tmp}/none.toml"), "none.toml: no such preset file"),
    Case(
        "preset-latin1",
        ("run", "{tmp}/p.toml"),
        "p.toml: not UTF-8 text (byte 11)",
        setup=_write("p.toml", b'name = "caf\xe9"\n'),
        keeps=("p.toml",),
    ),
    # Audit BF4: `check` without --out passed where the run is refused.
    Case(
        "check-cache-holds-inverters",
        ("check", "quickstart", "--set", "attack.lti.cache-dir={tmp}/y"),
        "y' holds inverters another run saved (the latest lti-inverter-r000001.pt)",
        setup=_write("y/lti-inverter-r000001.pt", b"saved"),
    ),
    # Audit BG7: nesting thousands deep was an internal RecursionError.
    Case(
        "preset-deep-arrays",
        ("check", "{tmp}/p.toml"),
        "p.toml: not valid TOML: maximum recursion depth exceeded",
        setup=_write("p.toml", b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n"),
    ),
    Case(
        "preset-deep-tables",
        ("check", "{tmp}/p.toml"),
        "p.toml: a.a.a.a",
        setup=_write("p.toml", b"[" + b".".join([b"a"] * 3000) + b"]\nb = 1\n"),
    ),
    Case(
        "sweep-deep-tables",
        ("sweep", "{tmp}/p.toml", "--check"),
        "configuration error: cell 0 (a.a.a.a",
        setup=_write("p.toml", b"[sweep.grid." + b".".join([b"a"] * 3000) + b"]\nb = [1]\n"),
    ),
    Case(
        "preset-long-number",
        ("run", "{tmp}/p.toml"),
        "not valid TOML",
        setup=_write("p.toml", b"seed = " + b"1" * 5000 + b"\n"),
        keeps=("p.toml",),
    ),
    Case(
        "sweep-latin1",
        ("sweep", "{tmp}/s.toml", "--out", "{tmp}/out"),
        "s.toml: not UTF-8 text",
        setup=_write("s.toml", b"# \xff\n[sweep]\n"),
        keeps=("s.toml",),
    ),
    Case(
        "sweep-nan-cpus",
        ("sweep", "{tmp}/s.toml", "--out", "{tmp}/out"),
        "sweep.client-cpus=nan: expected a finite number > 0",
        setup=_write("s.toml", SWEEP_NAN_CPUS),
        keeps=("s.toml",),
    ),
    Case(  # inf is a number: the line says why it is refused (audit ER11)
        "sweep-inf-cpus",
        ("sweep", "{tmp}/s.toml", "--out", "{tmp}/out"),
        "sweep.client-cpus=inf: expected a finite number > 0",
        setup=_write("s.toml", SWEEP_NAN_CPUS.replace(b"nan", b"inf")),
        keeps=("s.toml",),
    ),
    Case(
        "sweep-payload-budget",
        ("sweep", "{tmp}/s.toml", "--out", "{tmp}/out"),
        "cell-000-seed1: sim.payload-budget-mb=0.3: a round would move 1.",
        setup=_write("s.toml", SWEEP_SMALL + b'"sim.payload-budget-mb" = 0.3\n'),
        keeps=("s.toml",),
    ),
    Case(
        "sweep-cuda-without-gpu-share",
        ("sweep", "{tmp}/s.toml", "--out", "{tmp}/out"),
        # Without a GPU "device='cuda': no CUDA GPU is visible", with one "client-gpus=0 with
        # device='cuda': Ray hides GPUs from clients without a GPU share".
        "device='cuda': ",
        setup=_write("s.toml", SWEEP_SMALL + b'device = "cuda"\n'),
        keeps=("s.toml",),
    ),
    # Folders that are not fedleak's, or not to be written again.
    Case(
        "out-foreign-folder",
        (*RUN, "--out", "{tmp}/mine"),
        "not empty and not a fedleak run directory (it holds 'a' and 1 more)",
        status=1,
        setup=lambda tmp: (_write("mine/config.toml", b"mine")(tmp), _write("mine/a", b"")(tmp)),
        keeps=("mine/config.toml", "mine/a"),
    ),
    Case(
        "out-is-a-file",
        (*RUN, "--out", "{tmp}/file"),
        "exists and is not a folder",
        status=1,
        setup=_write("file", b"x"),
        keeps=("file",),
    ),
    Case(
        "out-holds-a-run",
        (*RUN, "--out", "{tmp}/done", "--set", "num-server-rounds=1"),
        "already holds a run (utility.csv); resume it with sim.resume=true (--set with fedleak "
        "run, --run-config with flwr run, in the settings passed to fedleak.audit)",
        status=1,
        setup=_finished_run,
    ),
    Case(
        "resume-other-settings",
        (*RUN, "--out", "{tmp}/done", "--set", "sim.resume=true"),
        "differing: name='quickstart' (the run has 'run')",
        status=1,
        setup=_finished_run,
    ),
    # The same data.dataset loading other samples (a folder edited in place, a relative path
    # read from another directory): the resumed rounds mixed two data sets (audit AP1).
    # A run from before runs recorded their federation and data passed every check a resume
    # makes by having nothing to compare: resumed on 3 clients it mixed two federations (BM1).
    Case(
        "resume-older-run",
        (*RESUME, "--set", "num-server-rounds=2"),
        "done: was made by an older fedleak (its environment.json records no run format); this "
        "one writes format 1 and cannot check that the resumed rounds would continue it: "
        "`fedleak report` still reads it; run the study again in a new out-dir",
        status=1,
        setup=lambda tmp: (
            _finished_run(tmp),
            _write("done/environment.json", b'{"fedleak": "0.1.0", "num_clients": 2}')(tmp),
        ),
    ),
    Case(
        "resume-other-data",
        (*RESUME, "--set", "num-server-rounds=2"),
        f"began on data of fingerprint {'0' * 32} (environment.json, from a folder since "
        "edited); data.dataset='mnist5k' now loads ",
        status=1,
        setup=_finished_run_on("0" * 32),
    ),
    Case(
        "resume-fewer-rounds",
        (*RESUME, "--set", "num-server-rounds=1"),
        "num-server-rounds=1 is fewer than the 2 rounds ",
        status=1,
        setup=lambda tmp: (_finished_run(tmp), _more_rounds(tmp)),
    ),
    Case(
        "resume-unsafe-checkpoint",
        RESUME,
        "global.pt: unreadable (UnpicklingError",
        status=1,
        setup=_run_with_checkpoint({"round": 1, "state_dict": {}, "x": Path("/")}),
    ),
    Case(
        "resume-misshaped-checkpoint",
        RESUME,
        "global.pt: does not fit model lenet",
        status=1,
        setup=_run_with_checkpoint({"round": 1, "state_dict": {"w": torch.zeros(2)}}),
    ),
    # A checkpoint past the recorded rounds (utility.csv restored from an older copy): the
    # resume would start after rounds it never recorded, and write DONE.
    Case(
        "resume-checkpoint-past-the-records",
        RESUME,
        "global.pt: is from round 3, but utility.csv does not record round(s) 2-3",
        status=1,
        setup=_run_with_checkpoint({"round": 3, "state_dict": {}}),
    ),
    # Removed: the resume started every round again, without a word (audit DW3).
    Case(
        "resume-checkpoint-removed",
        RESUME,
        "global.pt: missing, though utility.csv records rounds up to 1; a resume would start",
        status=1,
        setup=lambda tmp: (_finished_run(tmp), _remove("done/checkpoints/global.pt")(tmp)),
    ),
    # Removed: LTI trained anew in the resumed rounds, and its rows differed (audit DW2).
    Case(
        "resume-inverter-removed",
        (*RESUME, "--set", "attack.names=lti", "--set", "data.aux-size=500"),
        "lti-inverter-r000001.pt: missing, though the records show lti trained in round 1;",
        status=1,
        setup=lambda tmp: _finished_run(
            tmp, attacks={"attack.names": ["lti"], "data.aux-size": 500}
        ),
    ),
    Case(
        "resume-cut-utility",
        RESUME,
        "utility.csv: unreadable (ValueError: its last row is cut short)",
        status=1,
        setup=lambda tmp: (_finished_run(tmp), _cut("done/utility.csv", 4)(tmp)),
    ),
    Case(
        "resume-not-a-checkpoint",
        RESUME,
        "global.pt: not a fedleak checkpoint",
        status=1,
        setup=_run_with_checkpoint([1, 2, 3]),
    ),
    Case(
        "report-missing",
        ("report", "{tmp}/nowhere"),
        "neither a fedleak run directory",
        status=1,
    ),
    Case(
        "report-corrupt",
        ("report", "{tmp}/done"),
        "utility.csv: unreadable",
        status=1,
        setup=lambda tmp: (_finished_run(tmp), _write("done/utility.csv", BAD_CSV)(tmp)),
    ),
    Case(
        "resume-other-clients",
        (*RESUME, "--num-clients", "4"),
        "done: was run with 2 clients, not 4; the data's partitions depend on it",
        status=1,
        setup=lambda tmp: _two_clients(tmp),
    ),
    Case(
        "resume-other-client-threads",
        (*RESUME, "--num-clients", "2", "--client-cpus", "2"),
        "resume with --client-cpus 1 (client-cpus in a sweep, client-resources-num-cpus=1 in "
        "flwr run's --federation-config)",  # flwr run has no --client-cpus (audit EQ4)
        status=1,
        setup=lambda tmp: _two_clients(tmp, threads=1),
    ),
    Case(
        "resume-damaged-leakage",
        RESUME,
        "leakage.parquet: unreadable",
        status=1,
        setup=lambda tmp: (_finished_run(tmp), _write("done/leakage.parquet", b"PAR1 no")(tmp)),
    ),
    # leakage.parquet lost while utility.csv lists rounds: reading no rows would rewrite
    # leakage.csv (the resume) or report that nothing leaked.
    Case(
        "resume-missing-leakage",
        RESUME,
        "leakage.parquet: missing, though utility.csv records 1 round(s), up to round 1",
        status=1,
        setup=lambda tmp: (_finished_run(tmp), _remove("done/leakage.parquet")(tmp)),
        keeps=("done/leakage.csv", "done/utility.csv"),
    ),
    Case(
        "report-missing-leakage",
        ("report", "{tmp}/done"),
        "leakage.parquet: missing, though utility.csv records 1 round(s)",
        status=1,
        setup=lambda tmp: (_finished_run(tmp), _remove("done/leakage.parquet")(tmp)),
    ),
    Case(
        "resume-damaged-config",
        ("run", "{tmp}/p.toml", "--out", "{tmp}/done", "--set", "sim.resume=true"),
        "done/config.toml is not valid TOML",
        status=1,
        setup=lambda tmp: (
            _finished_run(tmp),
            (tmp / "p.toml").write_bytes((tmp / "done" / "config.toml").read_bytes()),
            _write("done/config.toml", b"[data\n")(tmp),
        ),
    ),
    Case(
        "check-resume-other-clients",
        ("check", *RESUME[1:], "--num-clients", "4"),
        "done: was run with 2 clients, not 4",
        status=1,
        setup=lambda tmp: _two_clients(tmp),
    ),
    # A sweep refuses its folders as `run` refuses its out-dir, with the same status; and the
    # reason for a path under a file is the file, not a folder that is not writable (AL1, AL2).
    Case(
        "sweep-out-is-a-file",
        ("sweep", "{tmp}/s.toml", "--out", "{tmp}/file"),
        "file/s/cell-000-seed1: cannot be created (",  # then "<tmp>/file is a file)"
        status=1,
        setup=lambda tmp: (_write("s.toml", SWEEP_SMALL)(tmp), _write("file", b"x")(tmp)),
        keeps=("s.toml", "file"),
    ),
    Case(
        "out-under-a-file",
        (*CHECK, "--out", "{tmp}/file/run"),
        "file/run: cannot be created (",
        status=1,
        setup=_write("file", b"x"),
        keeps=("file",),
    ),
    Case(
        "out-twice",
        (*CHECK, "--out", "{tmp}/a", "--set", "out-dir={tmp}/b"),
        "/a' and --set out-dir=",
        setup=_nothing,
    ),
    Case(
        "check-out-holds-a-run",
        ("check", "{tmp}/done/config.toml", "--out", "{tmp}/done"),
        "already holds a run (utility.csv)",
        status=1,
        setup=_finished_run,
    ),
    Case(
        "report-over-a-user-file",
        ("report", "{tmp}/runs"),
        "runs/report.md: exists and was not written by fedleak",
        status=1,
        setup=lambda tmp: (_finished_run(tmp / "runs"), _write("runs/report.md", b"notes")(tmp)),
        keeps=("runs/report.md",),
    ),
    Case(
        "report-corrupt-environment",
        ("report", "{tmp}/done"),
        "environment.json: unreadable (JSONDecodeError",
        status=1,
        setup=lambda tmp: (_finished_run(tmp), _write("done/environment.json", b"{")(tmp)),
    ),
    Case(
        "report-manifest-not-an-object",
        ("report", "{tmp}"),
        "sweep.json: not a sweep manifest",
        status=1,
        setup=lambda tmp: (_finished_run(tmp), _write("sweep.json", b"[1, 2]")(tmp)),
    ),
    # Audit BG3: cell ids are folder names; '../x' or '/x' read and wrote runs elsewhere, and
    # a cell that is not an object was an internal error.
    Case(
        "report-manifest-cell-outside",
        ("report", "{tmp}/sweep"),
        "sweep.json: cell id '../done' is not a run name",
        status=1,
        setup=lambda tmp: (
            _finished_run(tmp),
            _write("sweep/sweep.json", b'{"cells": [{"id": "../done"}]}')(tmp),
        ),
    ),
    Case(
        "report-manifest-cell-not-an-object",
        ("report", "{tmp}/sweep"),
        "sweep.json: cell id None is not a run name",
        status=1,
        setup=_write("sweep/sweep.json", b'{"cells": [5]}'),
    ),
    Case("sweep-empty-cells", ("sweep", "demo", "--cells", ""), "--cells: an empty pattern"),
    # Settings take out_dir for out-dir: that spelling went past both refusals (audit CW6).
    Case(
        "out-and-out_dir",
        (*CHECK, "--out", "{tmp}/a", "--set", "out_dir={tmp}/b"),
        "--set out_dir='",
    ),
    Case(
        "sweep-out_dir",
        ("sweep", "demo", "--check", "--set", "out_dir={tmp}/b"),
        "--set.out_dir: set by the sweep for each cell; remove it",
    ),
    Case("abbreviated-option", ("check", "quickstart", "--verb"), "arguments: --verb"),
    Case(
        "aux-0-class-mean",
        (*RUN, "--set", "data.aux-size=0", "--set", "attack.names=class-mean"),
        "class-mean needs auxiliary data, but data.aux-size=0",
    ),
    Case(
        "model-without-class-scores",
        (*RUN, "--set", "model.name=torch.nn:Identity"),
        "model.name='torch.nn:Identity': outputs (1, 1, 28, 28) for one input of shape "
        "(1, 1, 28, 28); expected (1, 10)",
    ),
    Case(
        "set-value-with-a-comment",
        (*RUN, "--set", "train.batch-size=2#x"),
        "train.batch-size='2#x': expected an integer >= 1",
    ),
    Case("weights-net", ("weights", "--nets", "squeeze"), "--nets='squeeze': expected names"),
]


def _two_clients(tmp: Path, threads: int | None = None) -> None:
    _finished_run(tmp)
    RunDirectory.open(tmp / "done").record_clients(2, threads)


def _more_rounds(tmp: Path) -> None:
    run = RunDirectory.open(tmp / "done")
    run.append_round(2, [], {"test_loss": 1.0, "test_accuracy": 0.5, "num_replies": 2})


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() if p.is_file() else b"<dir>"
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object, **__: object) -> None:
        raise AssertionError("a simulation started: the input was not refused before Ray")

    monkeypatch.setattr(launch, "simulate", refuse)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_refused_with_one_line(
    case: Case,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_ray: None,
) -> None:
    monkeypatch.chdir(tmp_path)
    case.setup(tmp_path)
    capsys.readouterr()
    before = _files(tmp_path)
    status = main([arg.replace("{tmp}", str(tmp_path)) for arg in case.argv])
    out, err = capsys.readouterr()
    assert status == case.status, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fedleak: ")
    assert case.says in lines[0]
    assert "Traceback" not in err and out == ""
    assert _files(tmp_path) == before, "a refused input wrote or deleted files"
    for kept in case.keeps:
        assert (tmp_path / kept).read_bytes() == before[kept]


def test_every_error_of_fedleak_is_one_line_and_verbose_shows_the_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], no_ray: None
) -> None:
    args = ["run", "--set", f"data.dataset=folder:{tmp_path}/nowhere"]
    assert main(args) == 1
    assert len(capsys.readouterr().err.splitlines()) == 1
    assert main([*args, "--verbose"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.splitlines()[-1].startswith("fedleak: error: data set")


def test_a_cache_dir_beside_a_projects_own_config_toml_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A study file named config.toml in the project folder made every cache-dir below it
    "another run's folder" (audit EH1): a run folder holds its environment.json too."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.toml").write_text('name = "mine"\n')
    cache = ("--set", "attack.names=aux-mean,lti", "--set", "attack.lti.cache-dir=cache")
    assert main(["check", "config.toml", *SMALL, *cache]) == 0


@pytest.mark.parametrize(
    "hidden",
    [
        "100000",  # fits under the default 4,096 hash bins of the update (audit EN3)
        "4096,100000",  # neighbours' product exactly at its bound (audit EN5)
    ],
)
def test_an_inverter_at_its_bounds_is_accepted(hidden: str) -> None:
    assert (
        main(
            [
                "check",
                "quickstart",
                "--set",
                "attack.names=aux-mean,lti",
                "--set",
                f"attack.lti.hidden={hidden}",
            ]
        )
        == 0
    )


@pytest.mark.parametrize("lock", [".fedleak-cache.lock", ".fedleak.lock"])
def test_a_cache_dir_below_a_cache_folder_a_run_used_is_accepted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lock: str
) -> None:
    """A run's lock on its cache folder made every cache-dir below it "another fedleak run's
    folder" (audit EJ1); caches are locked under a name of their own, and one locked by an
    earlier fedleak is told by the inverters it holds."""
    monkeypatch.chdir(tmp_path)
    used = tmp_path / "cacheA"
    used.mkdir()
    (used / lock).write_text("")
    (used / "lti-inverter-r000001.pt").write_bytes(b"saved")
    cache = ("--set", "attack.names=aux-mean,lti", "--set", f"attack.lti.cache-dir={used}/exp2")
    assert main(["check", "quickstart", *SMALL, *cache]) == 0


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == "fedleak 0.1.0"


def test_a_report_rebuild_deletes_only_its_own_files(tmp_path: Path) -> None:
    from fedleak.report.build import FILES_DIR, build_report

    _finished_run(tmp_path)
    run = tmp_path / "done"
    build_report(run)
    ours = sorted(p.name for p in (run / FILES_DIR).iterdir())
    (run / FILES_DIR / "my-notes.txt").write_text("mine")
    (run / FILES_DIR / ".fedleak-files").write_text(json.dumps([*ours, "old-figure.png"]))
    (run / FILES_DIR / "old-figure.png").write_bytes(b"an earlier build's figure")
    build_report(run)
    assert (run / FILES_DIR / "my-notes.txt").read_text() == "mine"
    assert not (run / FILES_DIR / "old-figure.png").exists()


def test_a_restarted_sweep_cell_keeps_files_fedleak_did_not_write(tmp_path: Path) -> None:
    _finished_run(tmp_path)
    run = RunDirectory.open(tmp_path / "done")
    (run.path / "notes.md").write_text("mine")
    (run.path / "images").mkdir()
    (run.path / "images" / "r001_c000_ig.png").write_bytes(b"png")
    # Writes a kill cut short, before their rename.
    (run.path / ".leakage.parquet.k3j_x.tmp").write_bytes(b"")
    (run.path / "checkpoints" / ".global.pt.a1b2.tmp").write_bytes(b"")
    (run.path / "state" / "lti").mkdir(parents=True)
    (run.path / "state" / "lti" / "lti-inverter-r000002.tmp").write_bytes(b"")
    run.clear()
    assert sorted(os.listdir(run.path)) == ["notes.md"]


def test_a_full_disk_names_the_file_and_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(_: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(rundir.os, "fsync", full)
    with pytest.raises(OSError) as error:
        rundir.atomic_write(tmp_path / "utility.csv", b"round\n")
    assert error.value.errno == errno.ENOSPC
    assert error.value.filename == str(tmp_path / "utility.csv")
    assert os.listdir(tmp_path) == []


def test_an_out_dir_that_cannot_be_written_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As a read-only mount answers (root passes permission bits, not a read-only file system).
    monkeypatch.setattr(rundir.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(rundir.RunDirectoryError, match="not writable"):
        RunDirectory.check_target(tmp_path)
    with pytest.raises(rundir.RunDirectoryError, match=f"{tmp_path} is not writable"):
        RunDirectory.check_target(tmp_path / "new" / "run")


def test_the_resume_hint_says_each_setting_once() -> None:
    argv = "run quickstart --set seed=3 --set sim.resume=true --set out-dir=/x --client-cpus 2"
    args = parser().parse_args(argv.split())
    hint = shlex.split(_resume_hint(args, Path("/runs/x")))
    assert hint == [
        "fedleak", "run", "quickstart", "--set", "seed=3", "--client-cpus", "2.0",
        "--out", "/runs/x", "--set", "sim.resume=true",
    ]  # fmt: skip


def test_a_report_that_cannot_be_built_leaves_no_stale_one_and_the_run_exits_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A resumed run whose report fails (a damaged figure, say) printed the earlier report's
    path and exited 0: the user read the rounds before the resume as the run's result."""
    from fedleak.report import build
    from fedleak.simulations import study

    _finished_run(tmp_path)
    done = tmp_path / "done"
    html, markdown = build.build_report(done)

    def broken(_: Path) -> tuple[Path, Path]:
        raise ValueError("a figure is damaged")

    monkeypatch.setattr(build, "build_report", broken)
    study.write_report(done)  # as the ServerApp does at the run's end
    assert not html.exists() and not markdown.exists()
    assert "fedleak: report not built (ValueError: a figure is damaged)" in capsys.readouterr().out
    monkeypatch.setattr(launch, "run_study", lambda *_, **__: done)
    status = main(["run", str(done / "config.toml"), "--out", str(done)])
    out, err = capsys.readouterr()
    assert status == 1 and out == ""
    assert err.splitlines() == [
        "fedleak: the run finished, but its report could not be built (ValueError: a figure "
        f"is damaged); rebuild it with `fedleak report {done}`"
    ]
    (tmp_path / "mine").mkdir()
    own = tmp_path / "mine" / "report.html"
    own.write_text("my notes")
    build.discard_report(own.parent)  # a user's own report.html is never removed
    assert own.read_text() == "my notes"
