"""A text corpus split by whole documents among the server's test set, the attacker and the
clients, tokenised and cut into sequences of L tokens.

Order of the splits, all from one seeded permutation of the documents and none depending on
the number of clients (so the server, building the data with one partition, sees the same
auxiliary text and tokenizer as every client):
1. the test documents: the corpus' own test split, or a `test_fraction` of the words;
2. the attacker's auxiliary documents: enough to hold `aux_size` sequences for sure (every
   whitespace word is at least one byte-level token, and each document loses fewer than L
   tokens to the cut), from which exactly `aux_size` sequences are drawn, none of them a
   sequence that a client's document also holds (near-copies of an article exist);
3. the clients' documents: the rest, dealt to partitions in random order, each document to the
   partition holding the fewest sequences so far (balanced, every document whole).
The tokenizer is trained on the auxiliary documents only, then every document is tokenised on
its own and cut into consecutive, non-overlapping windows of L tokens (the remainder dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedleak.data.stratify import DataSplitError
from fedleak.data.text.corpus import Document, TextCorpus
from fedleak.data.text.dataset import TokenDataset
from fedleak.data.text.tokenizer import load_tokenizer

# Stream tags keeping these draws independent of the other draws made from the same seed.
_ORDER_STREAM = 0x54455854
_AUX_STREAM = 0x54415558
_TEST_STREAM = 0x54455354
# The server evaluates the global model on at most this many test sequences (a seeded draw):
# a language model's forward pass over a whole held-out split would dominate a CPU round.
MAX_TEST_SEQUENCES = 1024


@dataclass(frozen=True, eq=False)
class TextSplit:
    """The data set and sorted, disjoint indices into its training sequences."""

    dataset: TokenDataset
    aux: np.ndarray
    partitions: tuple[np.ndarray, ...]


def _cut(ids: list[int], seq_len: int) -> np.ndarray:
    whole = len(ids) // seq_len
    return np.asarray(ids[: whole * seq_len], dtype=np.int64).reshape(whole, seq_len)


def _take_words(order: list[int], documents: Sequence[Document], enough: int) -> list[int]:
    """The first documents of `order` whose word count reaches `enough`."""
    taken, words = [], 0
    while order and words < enough:
        taken.append(order.pop(0))
        words += documents[taken[-1]].words
    return taken


def split_text(
    corpus: TextCorpus,
    num_partitions: int,
    seed: int,
    *,
    aux_size: int,
    test_fraction: float,
    seq_len: int,
    vocab_size: int,
    tokenizer_kind: str,
) -> TextSplit:
    """Split, tokenise and cut `corpus` as described in the module docstring."""
    if seq_len < 2:
        raise DataSplitError(f"data.seq-len={seq_len}: a causal language model needs >= 2 tokens")
    if num_partitions < 1:
        raise DataSplitError(f"num_partitions={num_partitions}: expected at least 1")
    documents = corpus.documents
    rng = np.random.default_rng([seed, _ORDER_STREAM])
    order = [int(i) for i in rng.permutation(len(documents))]
    total_words = sum(d.words for d in documents)
    test_docs: list[Document] = list(corpus.test_documents)
    if not test_docs:
        test_docs = [
            documents[i] for i in _take_words(order, documents, test_fraction * total_words)
        ]
    aux_words = 0
    aux_ids: list[int] = []
    while order and aux_words - seq_len * len(aux_ids) < aux_size * seq_len:
        aux_ids.append(order.pop(0))
        aux_words += documents[aux_ids[-1]].words
    if aux_words - seq_len * len(aux_ids) < aux_size * seq_len:
        raise DataSplitError(
            f"data.aux-size={aux_size}: the {corpus.name} documents left after the test split "
            f"hold too few words for {aux_size} auxiliary sequences of {seq_len} tokens and "
            "clients besides; lower aux-size, seq-len or test-fraction"
        )
    if len(order) < num_partitions:
        raise DataSplitError(
            f"num_partitions={num_partitions}: only {len(order)} {corpus.name} documents remain "
            "for the clients after the test and auxiliary splits; lower the number of clients, "
            "data.aux-size or data.test-fraction"
        )
    if tokenizer_kind == "bpe" and not aux_ids:
        raise DataSplitError(
            "data.aux-size=0: the BPE tokenizer is trained on the attacker's auxiliary text, so "
            "expected aux-size > 0 (or data.tokenizer=gpt2 / file:<path>)"
        )
    tokenizer = load_tokenizer(tokenizer_kind, [documents[i].text for i in aux_ids], vocab_size)
    client_ids = order

    def sequences(docs: Sequence[Document]) -> list[np.ndarray]:
        return [_cut(ids, seq_len) for ids in tokenizer.encode_batch([d.text for d in docs])]

    aux_seqs = sequences([documents[i] for i in aux_ids])
    client_seqs = sequences([documents[i] for i in client_ids])
    test_seqs = np.concatenate([np.zeros((0, seq_len), np.int64), *sequences(test_docs)])

    aux_pool = np.concatenate([np.zeros((0, seq_len), np.int64), *aux_seqs])
    aux_owner = np.repeat(np.asarray(aux_ids, dtype=np.int64), [len(s) for s in aux_seqs])
    # Different documents can share a passage (a news story filed twice with small edits): no
    # sequence a client holds may reach the attacker through another document.
    held = {row.tobytes() for seqs in client_seqs for row in seqs}
    fresh = np.asarray([row.tobytes() not in held for row in aux_pool], dtype=bool)
    aux_pool, aux_owner = aux_pool[fresh], aux_owner[fresh]
    if len(aux_pool) < aux_size:
        # The documents drawn depend on aux-size, so the count here is no bound for a lower
        # one; what is said is why these documents fell short.
        alike = int((~fresh).sum())
        # Mostly alike: short sequences of few distinct tokens recur in every document, and
        # fewer or shorter ones would only recur more.
        advice = (
            "sequences this short or of tokens this few recur across documents; raise "
            "data.seq-len or, with the BPE tokenizer, data.vocab-size (a tokenizer that leaves "
            "much text unknown makes sequences alike too)"
            if 2 * alike >= len(fresh)
            else "lower data.aux-size or data.seq-len"
        )
        raise DataSplitError(
            f"data.aux-size={aux_size}: the {len(aux_ids)} {corpus.name} documents drawn for it "
            f"hold {len(fresh)} sequences of {seq_len} tokens, {alike} of them also held by a "
            f"client; {advice}"
        )
    aux_rng = np.random.default_rng([seed, _AUX_STREAM])
    chosen = np.sort(aux_rng.choice(len(aux_pool), size=aux_size, replace=False))

    sizes = np.zeros(num_partitions, dtype=np.int64)
    owner = []
    for seqs in client_seqs:
        part = int(np.argmin(sizes))  # fewest sequences so far; ties go to the lowest id
        owner.append(part)
        sizes[part] += len(seqs)
    if (sizes == 0).any():
        empty = int(np.flatnonzero(sizes == 0)[0])
        raise DataSplitError(
            f"num_partitions={num_partitions}: partition {empty} got no sequence of {seq_len} "
            f"tokens from the {len(client_ids)} client documents; use fewer clients"
        )

    train = [aux_pool[chosen], *client_seqs]
    doc_index = [
        aux_owner[chosen],
        *(np.full(len(s), d) for s, d in zip(client_seqs, client_ids, strict=True)),
    ]
    starts = np.cumsum([0, *(len(t) for t in train)])
    aux = np.arange(aux_size, dtype=np.int64)
    partitions = []
    for p in range(num_partitions):
        members = [
            np.arange(starts[k + 1], starts[k + 2], dtype=np.int64)
            for k, o in enumerate(owner)
            if o == p
        ]
        partitions.append(np.sort(np.concatenate(members)))

    test_rng = np.random.default_rng([seed, _TEST_STREAM])
    if len(test_seqs) > MAX_TEST_SEQUENCES:
        test_seqs = test_seqs[
            np.sort(test_rng.choice(len(test_seqs), MAX_TEST_SEQUENCES, replace=False))
        ]
    dataset = TokenDataset(
        name=corpus.name,
        train_x=torch.from_numpy(np.concatenate(train)),
        test_x=torch.from_numpy(np.ascontiguousarray(test_seqs)),
        documents=np.concatenate(doc_index).astype(np.int64),
        tokenizer=tokenizer,
        source=corpus.source,
    )
    return TextSplit(dataset, aux, tuple(partitions))
