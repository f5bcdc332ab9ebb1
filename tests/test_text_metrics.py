"""Text leakage metrics and their place in the auditor, the run directory and the report."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from fedleak.attacks.types import Observation, Reconstruction
from fedleak.metrics import assign, pairwise_token_mismatch, rouge, token_accuracy
from fedleak.models import ModelSpec
from fedleak.report.rundir import LEAKAGE_COLUMNS, read_leakage_parquet
from fedleak.report.texts import load_token_pairs, save_token_pairs, text_files
from fedleak.server.auditor import Auditor, GroundTruth


def test_token_accuracy_is_position_wise() -> None:
    truth = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    recon = torch.tensor([[1, 2, 0, 4], [6, 5, 8, 7]])
    assert token_accuracy(recon, truth).tolist() == [0.75, 0.0]
    assert pairwise_token_mismatch(recon, truth).tolist() == [[0.25, 1.0], [1.0, 1.0]]


def test_assignment_matches_sequences_by_tokens() -> None:
    truth = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    recon = truth[[2, 0, 1]].clone()
    recon[0, 0] = 0
    recon_idx, truth_idx = assign(recon, truth, metric="tokens")
    assert truth_idx.tolist() == [0, 1, 2] and recon_idx.tolist() == [1, 2, 0]


def test_rouge_is_the_reference_port() -> None:
    scores = rouge(
        ["the cat sat on the mat", "a dog", "anything"],
        ["the cat sat on the mat", "the cat sat", "!!"],
    )
    assert scores["rouge1"][0] == scores["rouge2"][0] == scores["rougeL"][0] == 1.0
    assert scores["rouge1"][1] == 0.0 and scores["rougeL"][1] == 0.0
    assert all(math.isnan(scores[name][2]) for name in scores)
    # One word has no word pair: ROUGE-2 is undefined there, not 0 for an exact reconstruction.
    single = rouge(["land", "sea"], ["land", "land"])
    assert single["rouge1"] == single["rougeL"] == [1.0, 0.0]
    assert all(math.isnan(value) for value in single["rouge2"])
    partial = rouge(["the cat on a mat"], ["the cat sat on the mat"])
    # 4 of 6 reference unigrams, 4 of 5 predicted: F = 2 * 0.8 * 0.667 / 1.467
    assert partial["rouge1"][0] == pytest.approx(2 * (4 / 5) * (4 / 6) / (4 / 5 + 4 / 6))


def _observation() -> Observation:
    spec = ModelSpec("transformer3", (4,), 300)
    return Observation(
        round=2,
        client_id=1,
        model=spec,
        weights={},
        update={},
        update_kind="gradient",
        num_examples=2,
        batch_size=2,
        local_steps=1,
        learning_rate=0.1,
        defense="sign",
        modality="tokens",
    )


def test_auditor_scores_token_rows_with_text_metrics_only() -> None:
    truth = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    recon = torch.tensor([[20, 21, 0, 23], [10, 11, 12, 13]])
    words = {i: f" w{i}" for i in range(300)}
    auditor = Auditor(decode=lambda ids: "".join(words[i] for i in ids))
    rows = auditor.score(
        _observation(),
        "tag",
        Reconstruction(inputs=recon, labels=None),
        GroundTruth(1, truth, truth),
        {"defense": "sign"},
    )
    by_target = {row["target_index"]: row for row in rows}
    assert by_target[0]["sample"] == 1 and by_target[0]["token_acc"] == 1.0
    assert by_target[1]["sample"] == 0 and by_target[1]["token_acc"] == 0.75
    assert by_target[1]["rouge1"] == pytest.approx(0.75)
    assert all(row["modality"] == "tokens" and "psnr" not in row for row in rows)
    frame = pd.DataFrame(rows)
    assert set(frame.columns) <= set(LEAKAGE_COLUMNS)
    failed = auditor.score(
        _observation(),
        "tag",
        Reconstruction(inputs=torch.empty(0), labels=None, status="failed"),
        GroundTruth(1, truth, truth),
        {},
    )
    assert failed[0]["status"] == "failed" and failed[0]["modality"] == "tokens"


def test_sequences_shared_alone_are_scored_against_their_own_truth() -> None:
    # Per-sample updates: reconstruction i inverts sequence i's own update, so matching it to
    # a better-fitting neighbour would credit the attack with a leak it did not make.
    truth = torch.tensor([[0, 1, 2, 3], [4, 5, 6, 7]])
    recon = torch.tensor([[4, 5, 6, 0], [0, 1, 2, 7]])
    words = {i: f" w{i}" for i in range(300)}
    auditor = Auditor(decode=lambda ids: "".join(words[i] for i in ids))
    shared_alone = dataclasses.replace(_observation(), per_sample_updates={"w": torch.zeros(2, 1)})
    rows = auditor.score(
        shared_alone,
        "tag",
        Reconstruction(inputs=recon, labels=None),
        GroundTruth(1, truth, truth),
        {},
    )
    assert [(row["sample"], row["target_index"]) for row in rows] == [(0, 0), (1, 1)]
    assert [row["token_acc"] for row in rows] == [0.0, 0.25]
    # One update of the whole batch: the reconstructions come in no order, so they are matched.
    batch = auditor.score(
        _observation(),
        "tag",
        Reconstruction(inputs=recon, labels=None),
        GroundTruth(1, truth, truth),
        {},
    )
    assert sorted(row["token_acc"] for row in batch) == [0.75, 0.75]


def test_old_runs_read_as_image_rows(tmp_path: Path) -> None:
    old = pd.DataFrame({"round": [1], "attack": ["ig"], "psnr": [20.0], "status": ["ok"]})
    old.to_parquet(tmp_path / "leakage.parquet")
    frame = read_leakage_parquet(tmp_path / "leakage.parquet")
    assert frame["modality"].tolist() == ["image"]
    assert frame[["token_acc", "rouge1", "rouge2", "rougeL"]].isna().all().all()


def test_token_pairs_round_trip(tmp_path: Path) -> None:
    truth = torch.tensor([[1, 2, 3], [4, 5, 6]])
    recon = torch.tensor([[1, 0, 3], [4, 5, 6]])
    path = save_token_pairs(
        tmp_path, 3, 2, "lti-p", truth, recon, lambda ids: [f"<{i}>" for i in ids], [1, 0]
    )
    assert text_files(tmp_path) == [path] and path.name == "r003_c002_lti-p.json"
    saved = load_token_pairs(path)
    assert (saved.round, saved.client, saved.attack) == (3, 2, "lti-p")
    first = saved.pairs[0]
    assert first.target_index == 1 and first.recovered == (True, False, True)
    assert first.truth_pieces == ("<1>", "<2>", "<3>")
    assert json.loads(path.read_text())["pairs"][1]["reconstruction"] == [4, 5, 6]


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"round": 1, "client": 0, "attack": "tag", "pairs": [', "JSONDecodeError"),
        ("[]", "not an object with a list of pairs"),
        ('{"round": 1, "client": 0, "attack": "tag", "pairs": [{"truth": [1]}]}', "KeyError"),
        ('{"round": "1", "client": 0, "attack": "tag", "pairs": []}', "of the wrong type"),
        (
            '{"round": 1, "client": 0, "attack": "tag", "pairs": [{"target_index": 0, '
            '"truth": [1, 2], "reconstruction": [1], "truth_pieces": ["a", "b"], '
            '"reconstruction_pieces": ["a"]}]}',
            "differ in length",
        ),
        # Each check that was left untested (audit ER2): ids, pieces, header types, bools.
        (
            '{"round": 1, "client": 0, "attack": "tag", "pairs": [{"target_index": 0, '
            '"truth": ["x"], "reconstruction": ["y"], "truth_pieces": ["a"], '
            '"reconstruction_pieces": ["a"]}]}',
            "token ids are not integers",
        ),
        (
            '{"round": 1, "client": 0, "attack": "tag", "pairs": [{"target_index": 0, '
            '"truth": [1], "reconstruction": [1], "truth_pieces": [1], '
            '"reconstruction_pieces": [1]}]}',
            "pieces are not strings",
        ),
        ('{"round": 1, "client": "0", "attack": "tag", "pairs": []}', "of the wrong type"),
        ('{"round": 1, "client": 0, "attack": 7, "pairs": []}', "of the wrong type"),
        ('{"round": true, "client": 0, "attack": "tag", "pairs": []}', "of the wrong type"),
        (
            '{"round": 1, "client": 0, "attack": "tag", "pairs": [{"target_index": false, '
            '"truth": [1], "reconstruction": [1], "truth_pieces": ["a"], '
            '"reconstruction_pieces": ["a"]}]}',
            "token ids are not integers",
        ),
    ],
)
def test_a_damaged_pair_file_is_one_line_naming_it(tmp_path: Path, text: str, why: str) -> None:
    """A damaged texts/*.json failed `fedleak report` with "internal error" (audit EK4)."""
    from fedleak.report.rundir import RunDirectoryError

    path = tmp_path / "r001_c000_tag.json"
    path.write_text(text)
    with pytest.raises(RunDirectoryError, match=rf"^{path}: unreadable token pairs \(.*{why}"):
        load_token_pairs(path)
