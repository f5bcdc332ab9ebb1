"""The language task's data: real offline text, markup stripping, the attacker-trained tokenizer,
document-level splits (auxiliary text disjoint from every client's) and their errors."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedleak.config import ConfigError, parse_flat
from fedleak.data import (
    DatasetUnavailable,
    DataSplitError,
    auxiliary,
    build_federated_data,
    client_batch,
    load_corpus,
)
from fedleak.data.text import (
    MAX_TEST_SEQUENCES,
    TextCorpus,
    TokenizerError,
    load_tokenizer,
    split_text,
    train_bpe,
)
from fedleak.data.text.corpus import Document, load_wikitext, wikitext_articles
from fedleak.data.text.markup import plain_paragraphs
from fedleak.models.transformer import MAX_POSITIONS
from fedleak.report.text_section import _shown

WIKITEXT = "\n".join(
    [
        "'''Albedo''' ({{IPA|ælˈbiːdoʊ}}; from Latin ''albedo'') is the [[diffuse reflection|"
        "diffuse reflectivity]] or reflecting power of a surface, measured on a scale from zero "
        "to one.<ref>{{cite book|title=A Book}}</ref>",
        "[[File:Albedo-e hg.svg|thumb|Percentage of diffusely reflected sunlight in relation to "
        "various surface conditions of the Earth]]",
        "{{Infobox thing|name=Albedo}}",
        "== Terrestrial albedo ==",
        '{| class="wikitable"',
        "|+ Sample albedos",
        "|-",
        "! Surface !! Typical albedo",
        "|-",
        "| Fresh asphalt || 0.04",
        "|}",
        "* A list item that is long enough to count as a line of prose otherwise.",
        "Albedos of typical materials in visible light range from up to 0.9 for fresh snow to "
        "about 0.04.",
        "Short line.",
        "<!-- a comment that is long enough to be mistaken for a sentence of prose -->",
        "A line with [[File:broken.png|thumb|a caption [[with a nested link that the parser "
        "keeps as text]] since it is malformed",
        "[[Category:Radiometry]]",
        "[[de:Albedo]]",
    ]
)


def test_markup_is_stripped_by_the_parser_keeping_prose_only() -> None:
    paragraphs = plain_paragraphs(WIKITEXT)
    assert paragraphs == [
        "Albedo (from Latin albedo) is the diffuse reflectivity or reflecting power of a "
        "surface, measured on a scale from zero to one.",
        "Albedos of typical materials in visible light range from up to 0.9 for fresh snow to "
        "about 0.04.",
    ]


def test_wikitext_lines_become_articles() -> None:
    lines = [
        " = Valkyria Chronicles III = \n",
        " \n",
        " Senjō no Valkyria 3 is a tactical role @-@ playing video game . \n",
        " = = Gameplay = = \n",
        " As with previous games , the player controls a squad . \n",
        " = Tower Building = \n",
        " The Tower Building is a building in Little Rock . \n",
    ]
    articles = wikitext_articles(lines)
    assert [a.title for a in articles] == ["Valkyria Chronicles III", "Tower Building"]
    assert articles[0].text.splitlines() == [
        "Senjō no Valkyria 3 is a tactical role @-@ playing video game .",
        "As with previous games , the player controls a squad .",
    ]


def test_lee_news_is_the_real_corpus() -> None:
    corpus = load_corpus("lee-news")
    assert len(corpus.documents) == 293  # of 300 lines, 7 copies of others dropped
    assert len({d.text for d in corpus.documents}) == 293
    assert 55_000 < sum(d.words for d in corpus.documents) < 65_000
    assert corpus.documents[0].text.startswith("Hundreds of people have been forced to vacate")
    assert corpus.source.endswith("lee_background.cor")


def test_wikipedia_is_real_prose_without_markup() -> None:
    corpus = load_corpus("wikipedia")
    titles = {d.title for d in corpus.documents}
    assert {"Anarchism", "Albedo", "Achilles", "Abraham Lincoln"} <= titles
    assert len(corpus.documents) > 90
    assert 370_000 < sum(d.words for d in corpus.documents) < 410_000
    text = "\n".join(d.text for d in corpus.documents)
    for remnant in ("[[", "]]", "{{", "}}", "<ref", "'''", "thumb|", "Category:"):
        assert remnant not in text, remnant


def _corpus(count: int = 40, words: int = 120) -> TextCorpus:
    rng = np.random.default_rng(0)
    vocabulary = [f"word{i}" for i in range(300)]
    documents = tuple(
        Document(f"doc-{d}", " ".join(rng.choice(vocabulary, words))) for d in range(count)
    )
    return TextCorpus("synthetic", documents, (), "generated in the test")


def _split(corpus: TextCorpus, partitions: int = 4, **overrides: object):
    options = {
        "aux_size": 100,
        "test_fraction": 0.1,
        "seq_len": 8,
        "vocab_size": 400,
        "tokenizer_kind": "bpe",
    }
    options.update(overrides)
    return split_text(corpus, partitions, 3, **options)  # type: ignore[arg-type]


def test_auxiliary_text_held_by_clients_asks_for_longer_sequences_not_shorter() -> None:
    """Sequences of two tokens from three words recur in every document: the refusal advised
    lowering seq-len, already at its minimum (audit CB2); longer sequences pass."""
    rng = np.random.default_rng(0)
    documents = tuple(
        Document(f"d{d}", " ".join(rng.choice(["a", "b", "c"], 200))) for d in range(40)
    )
    corpus = TextCorpus("synthetic", documents, (), "generated in the test")
    with pytest.raises(DataSplitError) as refused:
        _split(corpus, seq_len=2, vocab_size=260)
    advice = str(refused.value).split("; ", 1)[1]
    assert "raise data.seq-len" in advice and "lower" not in advice
    assert len(_split(corpus, seq_len=8, vocab_size=260).aux) == 100


def test_documents_are_split_whole_and_the_aux_text_is_disjoint() -> None:
    corpus = _corpus()
    split = _split(corpus)
    dataset = split.dataset
    aux_docs = set(dataset.documents[split.aux].tolist())
    client_docs = [set(dataset.documents[p].tolist()) for p in split.partitions]
    assert len(split.aux) == 100
    assert aux_docs.isdisjoint(set().union(*client_docs))
    for a in range(len(client_docs)):
        for b in range(a + 1, len(client_docs)):
            assert client_docs[a].isdisjoint(client_docs[b])
    everything = np.sort(np.concatenate([split.aux, *split.partitions]))
    assert np.array_equal(everything, np.arange(len(dataset.train_x)))
    sizes = [len(p) for p in split.partitions]
    assert max(sizes) - min(sizes) <= 14  # balanced up to one document's sequences
    assert dataset.input_shape == (8,) and dataset.train_y is dataset.train_x
    assert dataset.num_classes == 400 and dataset.train_x.dtype == torch.int64


def test_tokenizer_is_trained_on_the_aux_documents_only() -> None:
    corpus = _corpus()
    split = _split(corpus)
    aux_docs = sorted(set(split.dataset.documents[split.aux].tolist()))
    # The aux documents are those the split takes, so retraining on exactly them (in the split's
    # order) gives the same vocabulary; any client text would change it.
    order = [
        int(i) for i in np.random.default_rng([3, 0x54455854]).permutation(len(corpus.documents))
    ]
    taken = [i for i in order if i in aux_docs]
    again = train_bpe([corpus.documents[i].text for i in taken], 400)
    assert again.fingerprint == split.dataset.tokenizer.fingerprint
    leaked = train_bpe([corpus.documents[i].text for i in order[: len(taken) + 1]], 400)
    assert leaked.fingerprint != split.dataset.tokenizer.fingerprint


def test_pieces_show_each_tokens_own_bytes() -> None:
    # A vocabulary of single bytes splits every non-ASCII character across tokens.
    tokenizer = train_bpe(["plain words"], 257)
    text = "café — “x”\x18"
    ids = tokenizer.encode_batch([text])[0]
    pieces = tokenizer.pieces(ids)
    assert pieces == [
        *"caf", "\\xc3", "\\xa9", " ", "\\xe2", "\\x80", "\\x94", " ",
        "\\xe2", "\\x80", "\\x9c", "x", "\\xe2", "\\x80", "\\x9d", "\x18",
    ]  # fmt: skip
    assert tokenizer.decode(ids) == text
    # Whole characters read as themselves, with their leading space.
    rich = train_bpe(["un café, deux café"] * 50, 300)
    assert rich.pieces(rich.encode_batch([" café"])[0]) == [" café"]
    assert _shown("\x18") == "\\x18" and _shown(" x\n") == "·x⏎" and _shown("") == "∅"


@pytest.mark.parametrize("kind", ["word-level", "wordpiece"])
def test_pieces_of_a_tokenizer_that_is_not_byte_level_join_into_its_text(kind: str) -> None:
    """Word-level and WordPiece tokenizers put the spaces in their decoders: each token
    decoded alone ran the report's captions together (audit FD2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from fedleak.data.text.tokenizer import TextTokenizer

    texts = ["the fire was out on Monday, the government said"] * 20
    if kind == "word-level":
        inner = Tokenizer(models.WordLevel(unk_token="[UNK]"))
        trainer = trainers.WordLevelTrainer(vocab_size=100, special_tokens=["[UNK]"])
    else:
        inner = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        inner.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=40, special_tokens=["[UNK]"])
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.train_from_iterator(texts, trainer=trainer)
    tokenizer = TextTokenizer("file", inner, "a test tokenizer")
    ids = tokenizer.encode_batch(["The government said the fire was out."])[0]
    pieces = tokenizer.pieces(ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tokenizer.decode(ids)
    assert tokenizer.decode(ids).startswith("[UNK] government said the")


def test_sequences_are_the_documents_text() -> None:
    corpus = _corpus(count=12)
    split = _split(corpus, partitions=2, aux_size=20)
    dataset = split.dataset
    tokenizer = dataset.tokenizer
    for index in (0, len(dataset.train_x) - 1, int(split.partitions[1][3])):
        text = tokenizer.decode(dataset.train_x[index].tolist())
        assert text.strip() in corpus.documents[int(dataset.documents[index])].text


def test_aux_and_test_splits_do_not_depend_on_the_number_of_clients() -> None:
    corpus = _corpus()
    one, four = _split(corpus, partitions=1), _split(corpus, partitions=4)
    assert one.dataset.tokenizer.fingerprint == four.dataset.tokenizer.fingerprint
    assert torch.equal(one.dataset.train_x[one.aux], four.dataset.train_x[four.aux])
    assert torch.equal(one.dataset.test_x, four.dataset.test_x)


@pytest.mark.parametrize(
    ("overrides", "partitions", "match"),
    [
        ({"aux_size": 10_000}, 4, "data.aux-size=10000"),
        ({}, 60, "num_partitions=60"),
        ({"aux_size": 0}, 4, "data.aux-size=0: the BPE tokenizer"),
        ({"seq_len": 1}, 4, "data.seq-len=1"),
        ({"vocab_size": 100}, 4, "data.vocab-size=100"),
        ({"vocab_size": 10**11}, 4, r"data.vocab-size=100000000000: .* to 262144"),
    ],
)
def test_impossible_splits_say_which_setting(
    overrides: dict[str, object], partitions: int, match: str
) -> None:
    with pytest.raises((DataSplitError, TokenizerError), match=match) as caught:
        _split(_corpus(), partitions=partitions, **overrides)
    assert "\n" not in str(caught.value)


def test_a_vocabulary_the_text_cannot_fill_is_named_in_a_warning() -> None:
    texts = ["a few words, repeated a few times"] * 5
    small = load_tokenizer("bpe", texts, 100_000)
    assert 257 < small.vocab_size < 400
    warning = small.shortfall(100_000)
    assert warning is not None and "\n" not in warning
    assert f"data.vocab-size=100000: the auxiliary text supports only {small.vocab_size}" in warning
    assert small.shortfall(small.vocab_size) is None


def test_federated_text_through_the_data_room() -> None:
    fd = build_federated_data(
        "lee-news", None, 5, "iid", 0, aux_size=500, seq_len=16, vocab_size=1024
    )
    assert fd.dataset.modality == "tokens" and fd.dataset.input_shape == (16,)
    x, y = client_batch(fd, 2, 1, 4, seed=0)
    assert x.shape == (4, 16) and torch.equal(x, y)
    aux_x, _ = auxiliary(fd)
    assert aux_x.shape == (500, 16)
    assert 0 < len(fd.dataset.test_x) <= MAX_TEST_SEQUENCES
    with pytest.raises(DataSplitError, match=r"data.partition='dirichlet'.*expected 'iid'"):
        build_federated_data("lee-news", None, 5, "dirichlet", 0, aux_size=500)


@pytest.mark.parametrize("clients", [2, 10])
def test_no_client_sequence_is_in_the_auxiliary_text_of_the_real_corpora(clients: int) -> None:
    """Lee's corpus files some stories twice with small edits: whole-document splits alone put
    24 and 11 of two clients' sequences in an auxiliary set of 1,000."""
    for name in ("lee-news", "wikipedia"):
        fd = build_federated_data(name, None, clients, "iid", 0, aux_size=1000)
        rows = fd.dataset.train_x.numpy()
        aux = {rows[i].tobytes() for i in fd.aux}
        for partition in fd.partitions:
            assert not any(rows[i].tobytes() in aux for i in partition), name


def test_same_split_and_tokenizer_in_separate_processes(tmp_path: Path) -> None:
    script = (
        "import json; from fedleak.data import build_federated_data; "
        "fd = build_federated_data('lee-news', None, 3, 'iid', 7, aux_size=300, seq_len=8, "
        "vocab_size=600); "
        "print(json.dumps([fd.dataset.tokenizer.fingerprint, fd.dataset.train_x[:50].tolist(), "
        "[p.tolist()[:20] for p in fd.partitions]]))"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
        )
        outputs.append(json.loads(done.stdout))
    assert outputs[0] == outputs[1]


def test_missing_text_sources_say_how_to_get_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(DatasetUnavailable) as caught:
        load_wikitext("wikitext-2", tmp_path, download=True)
    message = str(caught.value)
    assert "data set 'wikitext-2' is not available" in message and "\n" not in message
    assert "wikipedia, lee-news" in message and str(tmp_path) in message
    with pytest.raises(DatasetUnavailable, match=r"tokenizer 'gpt2' is not available.*bpe"):
        load_tokenizer("gpt2", [], 1000)
    with pytest.raises(DatasetUnavailable, match="is not a file"):
        load_tokenizer(f"file:{tmp_path / 'missing.json'}", [], 1000)


def test_gpt2_comes_from_the_hub_cache_offline_and_fails_at_once_without_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("https_proxy", "http_proxy", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    with pytest.raises(DatasetUnavailable, match=r"hub\.invalid:443 cannot be reached"):
        load_tokenizer("gpt2", [], 1000)

    # What a run with internet access leaves behind: a snapshot that refs/main points to.
    repo = tmp_path / "hub" / "models--gpt2"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    trained = load_tokenizer("bpe", ["a cached tokenizer for gpt two"] * 3, 300)
    trained.tokenizer.save(str(repo / "snapshots" / ("0" * 40) / "tokenizer.json"))
    cached = load_tokenizer("gpt2", [], 1000)
    assert cached.kind == "gpt2"
    assert cached.tokenizer.get_vocab() == trained.tokenizer.get_vocab()


def test_the_longest_sequence_is_the_models() -> None:
    """`data.seq-len` is refused in its own name beyond the transformer's positions (the
    model's check would blame `model.name`)."""
    assert parse_flat({"data.seq-len": MAX_POSITIONS}).data.seq_len == MAX_POSITIONS
    with pytest.raises(
        ConfigError, match=rf"data.seq-len={MAX_POSITIONS + 1}: .*{MAX_POSITIONS}\]"
    ):
        parse_flat({"data.seq-len": MAX_POSITIONS + 1})


def _word_level(path: Path, words: list[str]) -> Path:
    """A word-level tokenizer.json knowing only `words` and its unknown token."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{word: i + 1 for i, word in enumerate(words)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(path))
    return path


def test_a_tokenizer_that_maps_text_to_its_unknown_token_is_named_in_a_warning(
    tmp_path: Path,
) -> None:
    # Every [UNK] an attack guesses counts as a recovered token: a file: tokenizer whose
    # vocabulary misses the text inflates token accuracy without a word of warning.
    setting = f"file:{_word_level(tmp_path / 'words.json', ['the', 'a', 'of'])}"
    words = load_tokenizer(setting, [], 0)
    assert words.unknown_id == 0
    ids = torch.tensor(words.encode_batch(["the cat of a dog x", "a b c d e f"]))
    warning = words.unknown_warning(ids)
    assert warning is not None and "\n" not in warning
    assert "data.tokenizer: 66.7% of the training tokens are the unknown token '[UNK]'" in warning
    assert f"tokenizer.json at {tmp_path / 'words.json'}" in warning
    # ROUGE reads the decoded '[UNK]' as the word 'unk', so it is inflated as well.
    assert "in token accuracy and in ROUGE" in warning
    covered = torch.tensor(words.encode_batch(["the a of the a"]))
    assert words.unknown_share(covered) == 0 and words.unknown_warning(covered) is None
    bpe = load_tokenizer("bpe", ["a few words, repeated a few times"] * 5, 300)
    assert bpe.unknown_id is None and bpe.unknown_warning(ids) is None


def test_too_few_auxiliary_sequences_says_why_not_a_false_bound(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A tokenizer that leaves most text unknown makes the auxiliary sequences alike to the
    clients' ones; the refusal gave the count of this aux-size's documents as if it were a
    bound, and aux-size 239, then 127, was asked for in turn."""
    from fedleak.simulations.cli import main

    setting = f"file:{_word_level(tmp_path / 'words.json', ['the', 'a', 'of', 'and', 'in'])}"
    args = ["check", "text-quickstart", "--num-clients", "2", "--set", f"data.tokenizer={setting}"]
    assert main([*args, "--set", "data.aux-size=300"]) == 2
    error = capsys.readouterr().err.strip()
    assert "\n" not in error
    assert re.search(
        r"data.aux-size=300: the \d+ \S+ documents drawn for it hold \d+ sequences", error
    )
    assert "of them also held by a client; sequences this short or of tokens this few" in error
    assert "(a tokenizer that leaves much text unknown makes sequences alike too)" in error
