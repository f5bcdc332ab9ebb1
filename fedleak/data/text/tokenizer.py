"""The federation's tokenizer: a byte-level BPE trained offline on the attacker's auxiliary
text (Hugging Face `tokenizers`), GPT-2's when it can be fetched, or any `tokenizer.json`.

Byte-level BPE (GPT-2's scheme) never meets an unknown character, so every sequence decodes
back to its text. Training is deterministic: every client process that trains it on the same
auxiliary text gets the same vocabulary (a test checks this across processes).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch import Tensor

from fedleak.data.dataset import DatasetUnavailable
from fedleak.lines import one_line

FILE_PREFIX = "file:"
TOKENIZER_KINDS = ("bpe", "gpt2", f"{FILE_PREFIX}<path to tokenizer.json>")
MIN_BPE_VOCAB = 257  # the 256 byte symbols and at least one merge
# Far above any language model's vocabulary (GPT-2: 50,257); the BPE trainer allocates for the
# size asked, and a mistyped 1e11 aborted the process inside it. config.py holds the same bounds.
MAX_BPE_VOCAB = 262_144
# Above this share of unknown tokens a run warns that token scores and ROUGE overstate leakage.
UNKNOWN_SHARE = 0.01


def _byte_level_symbols() -> dict[str, int]:
    """The byte each symbol of a byte-level vocabulary stands for (GPT-2's scheme): printable
    Latin-1 bytes stand for themselves, the other 68 take the code points from 256 on, in
    byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(shifted)}


_BYTE_OF_SYMBOL = _byte_level_symbols()


class TokenizerError(ValueError):
    """A tokenizer setting cannot be honoured."""


@dataclass(frozen=True, eq=False)
class TextTokenizer:
    """A trained tokenizer and how it came about (`description`, for the run's environment)."""

    kind: str
    tokenizer: Tokenizer
    description: str

    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1."""
        return self.tokenizer.get_vocab_size()

    @property
    def fingerprint(self) -> str:
        """A digest of the whole vocabulary and merges: equal fingerprints, equal tokenizers."""
        return hashlib.sha256(self.tokenizer.to_str().encode("utf-8")).hexdigest()[:16]

    def shortfall(self, asked: int) -> str | None:
        """Why a trained BPE holds fewer tokens than `data.vocab-size` asked, else None: the
        trainer stops when the auxiliary text offers no more merges, and the run uses what
        it got."""
        if self.kind != "bpe" or self.vocab_size >= asked:
            return None
        return (
            f"data.vocab-size={asked}: the auxiliary text supports only {self.vocab_size} BPE "
            "tokens, which the run uses (environment.json records them); more auxiliary text "
            "(data.aux-size) or a smaller data.vocab-size removes this warning"
        )

    @functools.cached_property
    def unknown_id(self) -> int | None:
        """The id of the token that stands for text outside the vocabulary; None where the
        model has none (byte-level BPE covers every byte). Read once: it parses the whole
        serialised tokenizer."""
        model = json.loads(self.tokenizer.to_str()).get("model", {})
        if isinstance(model.get("unk_id"), int):  # Unigram names it by id
            return int(model["unk_id"])
        token = model.get("unk_token")
        return self.tokenizer.token_to_id(token) if isinstance(token, str) else None

    def unknown_share(self, ids: Tensor) -> float | None:
        """The share of `ids` that are the unknown token; None without one (or without ids)."""
        unknown = self.unknown_id
        if unknown is None or ids.numel() == 0:
            return None
        return float((ids == unknown).double().mean())

    def unknown_warning(self, ids: Tensor) -> str | None:
        """Why the scores of these sequences overstate leakage, else None: where more than
        UNKNOWN_SHARE of the tokens are the unknown token, an attack that guesses it gets
        every such position right without learning the text there."""
        share = self.unknown_share(ids)
        if share is None or share <= UNKNOWN_SHARE:
            return None
        token = self.tokenizer.id_to_token(self.unknown_id)
        return (
            f"data.tokenizer: {share:.1%} of the training tokens are the unknown token {token!r} "
            f"of the {self.description} (text outside its vocabulary); every one that an attack "
            "guesses counts as recovered, in token accuracy and in ROUGE (which reads it as a "
            "word), so both overstate what leaked. A tokenizer that covers the text (bpe, gpt2) "
            "avoids this"
        )

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of a token sequence."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def pieces(self, ids: Sequence[int]) -> list[str]:
        """Each token decoded on its own (its leading space kept), for token-level display.

        A byte-level token can hold part of a multi-byte character; decoded alone it would
        read as U+FFFD whatever its bytes, so such bytes are written as `\\xNN` instead."""
        if not isinstance(self.tokenizer.decoder, decoders.ByteLevel):
            return self._decoded_pieces([int(i) for i in ids])
        pieces = []
        for i in ids:
            symbols = self.tokenizer.id_to_token(int(i)) or ""
            if all(symbol in _BYTE_OF_SYMBOL for symbol in symbols):
                raw = bytes(_BYTE_OF_SYMBOL[symbol] for symbol in symbols)
                pieces.append(raw.decode("utf-8", errors="backslashreplace"))
            else:  # an added token, stored as its text
                pieces.append(self.tokenizer.decode([int(i)], skip_special_tokens=False))
        return pieces

    def _decoded_pieces(self, ids: list[int]) -> list[str]:
        """What each token adds to the decoded text: a tokenizer that is not byte-level (word
        level, WordPiece) puts the spaces between tokens in its decoder, so tokens decoded
        alone ran the words together (audit FD2). A token whose decoding rewrites the text
        before it is shown decoded alone."""
        pieces, text = [], ""
        for end in range(1, len(ids) + 1):
            longer = self.tokenizer.decode(ids[:end], skip_special_tokens=False)
            if longer.startswith(text):
                pieces.append(longer[len(text) :])
            else:
                pieces.append(self.tokenizer.decode(ids[end - 1 : end], skip_special_tokens=False))
            text = longer
        return pieces

    def record(self) -> dict[str, object]:
        """What the run's environment record says about the tokenizer."""
        return {
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "fingerprint": self.fingerprint,
            "description": self.description,
        }


def train_bpe(texts: Sequence[str], vocab_size: int) -> TextTokenizer:
    """A byte-level BPE with `vocab_size` tokens learnt from `texts` (no special tokens)."""
    if not MIN_BPE_VOCAB <= vocab_size <= MAX_BPE_VOCAB:
        raise TokenizerError(
            f"data.vocab-size={vocab_size}: expected an integer from {MIN_BPE_VOCAB} (the 256 "
            f"bytes and one merge) to {MAX_BPE_VOCAB}"
        )
    if not any(text.strip() for text in texts):
        raise TokenizerError("the BPE tokenizer has no text to learn from")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    words = sum(len(text.split()) for text in texts)
    return TextTokenizer(
        "bpe",
        tokenizer,
        f"byte-level BPE, {tokenizer.get_vocab_size()} tokens, trained with Hugging Face "
        f"tokenizers on the attacker's auxiliary text only ({len(texts)} documents, "
        f"{words} words)",
    )


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """The Hugging Face Hub's client logs every retry of a failed request as a warning; the
    outcome reaches the user as one line (`DatasetUnavailable`), so they are held back."""
    try:
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:  # tokenizers then fails on its own, in one exception
        yield
        return
    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        yield
    finally:
        hub_logging.set_verbosity(level)


def _gpt2_file() -> str:
    """GPT-2's `tokenizer.json` from the Hub's cache, else fetched. Without a network the Hub
    client retries for about half a minute; a failed connection to the Hub ends it at once."""
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return hf_hub_download("gpt2", "tokenizer.json", local_files_only=True)
    except LocalEntryNotFoundError:
        pass
    endpoint = urlsplit(constants.ENDPOINT)
    if not constants.HF_HUB_OFFLINE and not _proxied() and endpoint.hostname:
        port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
        try:
            socket.create_connection((endpoint.hostname, port), timeout=10).close()
        except OSError as error:
            raise ConnectionError(
                f"{endpoint.hostname}:{port} cannot be reached ({error})"
            ) from None
    return hf_hub_download("gpt2", "tokenizer.json")


def _proxied() -> bool:
    """Whether requests go through a proxy, where this machine may not resolve the Hub itself."""
    names = ("https_proxy", "http_proxy", "all_proxy")
    return any(os.environ.get(n) or os.environ.get(n.upper()) for n in names)


def load_tokenizer(kind: str, aux_texts: Sequence[str], vocab_size: int) -> TextTokenizer:
    """The tokenizer a run names: `bpe` (trained on `aux_texts`), `gpt2` (Hugging Face Hub) or
    `file:<path>` (a saved `tokenizer.json`)."""
    if kind == "bpe":
        return train_bpe(aux_texts, vocab_size)
    if kind == "gpt2":
        try:
            with _quiet_hub():
                tokenizer = Tokenizer.from_file(_gpt2_file())
        except Exception as error:  # offline: connection or hub errors
            cause = one_line(error, 200)
            raise DatasetUnavailable(
                f"tokenizer 'gpt2' is not available: fetching it from the Hugging Face Hub "
                f"failed ({type(error).__name__}: {cause}). Run once with internet access (the "
                "hub caches it), or use data.tokenizer=bpe (trained offline on the attacker's "
                "auxiliary text) or file:<path to a tokenizer.json>."
            ) from error
        return TextTokenizer("gpt2", tokenizer, "GPT-2's byte-level BPE from the Hugging Face Hub")
    if kind.startswith(FILE_PREFIX):
        path = Path(kind.removeprefix(FILE_PREFIX)).expanduser()
        if not path.is_file():
            raise DatasetUnavailable(
                f"tokenizer {kind!r} is not available: {path} is not a file; save one with "
                "`tokenizers.Tokenizer.save(path)` or use data.tokenizer=bpe"
            )
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:  # the tokenizers library raises a bare Exception
            cause = one_line(error, 200)
            raise TokenizerError(
                f"data.tokenizer={kind!r}: {path} is not a Hugging Face tokenizer.json ({cause}); "
                "save one with `tokenizers.Tokenizer.save(path)` or use data.tokenizer=bpe"
            ) from None
        return TextTokenizer("file", tokenizer, f"tokenizer.json at {path}")
    raise TokenizerError(f"data.tokenizer={kind!r}: expected one of {', '.join(TOKENIZER_KINDS)}")
