"""The language task end to end, through the README's entry point: a real Flower simulation of
the causal transformer on the news corpus, its leakage rows, texts, report and resume."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedleak.config import ConfigError, parse_flat
from fedleak.report.rundir import RunDirectory, RunDirectoryError
from fedleak.server.validate import validate_components
from fedleak.simulations.presets import load_preset
from fedleak.simulations.study import check_resumable

TINY = [
    "--num-clients",
    "3",
    "--set",
    "data.dataset=lee-news",
    "--set",
    "data.aux-size=300",
    "--set",
    "data.vocab-size=300",
    "--set",
    "data.seq-len=8",
    "--set",
    "attack.max-iterations=5",
    "--set",
    "attack.clients-per-round=2",
    "--set",
    "train.batch-size=2",
]
LEARNED = [
    "attack.lti-p.epochs=1",
    "attack.lti-p.pseudo-size=20",
    "attack.lti-p.hash-bins=256",
    "attack.lti-p.hidden=32",
]


TIMINGS = {"seconds", "round_seconds", "attack_seconds"}


def _start(out: Path, hash_seed: str, *overrides: str, omp: str = "1") -> subprocess.Popen:
    """The README's `fedleak run`, in a process of its own with the given hash seed and
    OMP_NUM_THREADS (which must not reach the clients: their threads follow --client-cpus)."""
    args = [sys.executable, "-m", "fedleak.simulations.cli", "run", "text-quickstart"]
    args += ["--out", str(out), *TINY]
    for item in ("attack.names=aux-frequency,tag,lti-p", *LEARNED, *overrides):
        args += ["--set", item]
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "OMP_NUM_THREADS": omp}
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _finish(process: subprocess.Popen) -> None:
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output.decode(errors="replace")[-3000:]


@pytest.fixture(scope="module")
def text_twins(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One study twice: a round, then a resume in a third process; and both rounds straight."""
    root = tmp_path_factory.mktemp("text")
    resumed, straight = root / "resumed", root / "straight"
    first = [
        _start(resumed, "1", "num-server-rounds=1"),
        _start(straight, "2", "num-server-rounds=2", omp="2"),
    ]
    for process in first:
        _finish(process)
    _finish(_start(resumed, "3", "num-server-rounds=2", "sim.resume=true"))
    return resumed, straight


@pytest.fixture(scope="module")
def text_run(text_twins: tuple[Path, Path]) -> Path:
    return text_twins[0]


def _without_timings(leakage: pd.DataFrame) -> pd.DataFrame:
    # The learned attacks' diagnostics carry their training time next to the seeded numbers.
    kept = leakage[[c for c in leakage.columns if c not in TIMINGS]].copy()
    kept["diagnostics"] = [
        {k: v for k, v in json.loads(text).items() if not k.endswith("_seconds")}
        for text in kept.diagnostics
    ]
    return kept


def test_resumed_and_straight_text_runs_in_other_processes_give_the_same_bits(
    text_twins: tuple[Path, Path],
) -> None:
    weights = [
        torch.load(run / "checkpoints" / "global.pt", weights_only=True)["state_dict"]
        for run in text_twins
    ]
    assert weights[0].keys() == weights[1].keys()
    for name in weights[0]:
        assert torch.equal(weights[0][name], weights[1][name]), name
    utility = [pd.read_csv(run / "utility.csv") for run in text_twins]
    kept = [c for c in utility[0].columns if c not in TIMINGS]
    pd.testing.assert_frame_equal(utility[0][kept], utility[1][kept], check_exact=True)
    leakage = [_without_timings(pd.read_parquet(run / "leakage.parquet")) for run in text_twins]
    assert len(leakage[0]) == 24
    pd.testing.assert_frame_equal(leakage[0], leakage[1], check_exact=True)
    texts = [sorted(p.name for p in (run / "texts").glob("*.json")) for run in text_twins]
    assert texts[0] == texts[1]
    for name in texts[0]:
        pieces = [json.loads((run / "texts" / name).read_text()) for run in text_twins]
        assert pieces[0] == pieces[1], name


def test_text_rows_carry_text_metrics_only(text_run: Path) -> None:
    leakage = pd.read_parquet(text_run / "leakage.parquet")
    # 2 rounds (the second after a resume) x 2 attacked clients x 3 attacks x batch of 2
    assert len(leakage) == 24 and sorted(leakage["round"].unique()) == [1, 2]
    assert set(leakage.attack) == {"aux-frequency", "tag", "lti-p"}
    assert (leakage.status == "ok").all() and (leakage.modality == "tokens").all()
    assert leakage.token_acc.between(0, 1).all() and leakage.rougeL.notna().any()
    assert leakage[["psnr", "ssim", "mse", "label_acc"]].isna().all().all()
    # No LPIPS on text: its columns held NaN only (audit EK2).
    written = [*pd.read_csv(text_run / "leakage.csv").columns, *leakage.columns]
    assert not [column for column in written if column.startswith("lpips")]
    utility = pd.read_csv(text_run / "utility.csv")
    assert list(utility["round"]) == [0, 1, 2]
    # Next-token accuracy of the global model on held-out text.
    assert utility.test_accuracy.between(0, 1).all() and (utility.test_loss > 0).all()


def test_texts_environment_and_report(text_run: Path) -> None:
    texts = sorted((text_run / "texts").glob("*.json"))
    assert len(texts) == 2 * 2 * 3
    pairs = json.loads(texts[0].read_text())["pairs"]
    assert len(pairs[0]["truth"]) == 8 and len(pairs[0]["reconstruction_pieces"]) == 8
    environment = json.loads((text_run / "environment.json").read_text())
    tokenizer = environment["data"]["tokenizer"]
    assert tokenizer["kind"] == "bpe" and tokenizer["vocab_size"] == 300
    assert "auxiliary text only" in tokenizer["description"]
    report = (text_run / "report.md").read_text(encoding="utf-8")
    for heading in ("### token accuracy", "### ROUGE-1", "### ROUGE-2", "### ROUGE-L"):
        assert heading in report
    assert "## Reconstructed text" in report and "| truth |" in report
    assert "PSNR" not in report.split("## Reconstructed text")[0].split("## Leakage per round")[0]
    summary = (text_run / "summary.md").read_text(encoding="utf-8")
    assert "tag token acc" in summary
    # The utility table gives a language model's perplexity: e to its final test loss.
    header = next(line for line in report.splitlines() if "final perplexity" in line)
    column = [c.strip() for c in header.split("|")].index("final perplexity")
    row = report.splitlines()[report.splitlines().index(header) + 2]
    final_loss = pd.read_csv(text_run / "utility.csv")["test_loss"].iloc[-1]
    assert [c.strip() for c in row.split("|")][column] == f"{math.exp(final_loss):.1f}"


def test_a_resume_with_another_tokenizer_is_refused(text_run: Path, tmp_path: Path) -> None:
    """The same settings can give another tokenizer (a `file:` one edited in place): resumed
    rounds would train and score on other token ids, so the fingerprint must match."""
    run = tmp_path / "run"
    shutil.copytree(text_run, run)
    config = parse_flat({**RunDirectory.open(run).config.to_flat(), "sim.resume": True})
    check_resumable(config, run)  # the run's own tokenizer passes
    environment = json.loads((run / "environment.json").read_text())
    environment["data"]["tokenizer"]["fingerprint"] = "0123456789abcdef"
    (run / "environment.json").write_text(json.dumps(environment))
    with pytest.raises(RunDirectoryError, match="tokenizer of fingerprint 0123456789abcdef") as e:
        check_resumable(config, run)
    assert "data.tokenizer='bpe' now gives " in str(e.value) and "\n" not in str(e.value)


def test_the_global_model_trains_on_text(text_run: Path) -> None:
    saved = torch.load(text_run / "checkpoints" / "global.pt", weights_only=True)
    from fedleak.models import ModelSpec, build_model

    start = build_model(ModelSpec("transformer3", (8,), 300))
    state = saved["state_dict"]
    assert torch.equal(state["token_embedding"], start.token_embedding)  # frozen
    assert not torch.equal(state["output.bias"], start.output.bias)
    assert not torch.equal(
        state["blocks.0.feed_forward.0.weight"], start.blocks[0].feed_forward[0].weight
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"model.name": "lenet"}, "model.name='lenet' reads images but data.dataset='wikipedia'"),
        ({"attack.names": "ig"}, "'ig' reconstructs images, not the tokens"),
        ({"defense.spec": "mixup:2"}, "input encodings .* do not apply to token sequences"),
        ({"data.partition": "dirichlet"}, "data.partition='dirichlet'.*expected 'iid'"),
        ({"data.tokenizer": "words"}, "data.tokenizer='words': expected one of bpe, gpt2"),
    ],
)
def test_text_settings_are_checked_before_any_work(
    overrides: dict[str, object], match: str
) -> None:
    config = parse_flat(overrides, load_preset("text-quickstart"))
    with pytest.raises(ConfigError, match=match) as caught:
        validate_components(config)
    assert "\n" not in str(caught.value)


def test_a_tokenizer_that_leaves_much_text_unknown_is_named_in_the_warnings_and_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from fedleak.data.registry import load_corpus

    # A word-level vocabulary of the corpus' 400 most frequent words leaves a third of its
    # tokens unknown: the floor then "recovers" them by guessing the unknown token.
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(vocab_size=400, special_tokens=["[UNK]"])
    words.train_from_iterator([d.text for d in load_corpus("lee-news").documents], trainer)
    words.save(str(tmp_path / "words.json"))
    # `fedleak check` runs the same checks as the run, so it gives the same warning.
    from fedleak.simulations.cli import main

    settings = [*TINY, "--set", f"data.tokenizer=file:{tmp_path / 'words.json'}"]
    assert main(["check", "text-quickstart", *settings, "--set", "data.aux-size=100"]) == 0
    checked = capsys.readouterr().err
    assert "fedleak: warning: data.tokenizer: " in checked
    out = tmp_path / "run"
    process = _start(
        out,
        "0",
        f"data.tokenizer=file:{tmp_path / 'words.json'}",
        "data.aux-size=100",
        "num-server-rounds=1",
        "attack.names=aux-frequency",
    )
    output, _ = process.communicate(timeout=600)
    text = output.decode(errors="replace")
    assert process.returncode == 0, text[-3000:]
    warning = next(line for line in text.splitlines() if "unknown token" in line)
    assert warning.startswith("fedleak: warning: data.tokenizer: ")
    assert "% of the training tokens are the unknown token '[UNK]'" in warning
    assert warning.removeprefix("fedleak: warning: ") in (out / "report.md").read_text()
    assert warning in checked
