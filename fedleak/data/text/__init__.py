"""Text for the language task: corpora, the tokenizer, token sequences and their split."""

from fedleak.data.text.corpus import (
    OFFLINE_TEXT,
    TEXT_DATASETS,
    Document,
    TextCorpus,
    load_lee_news,
    load_wikipedia,
    load_wikitext,
)
from fedleak.data.text.dataset import TokenDataset
from fedleak.data.text.split import MAX_TEST_SEQUENCES, TextSplit, split_text
from fedleak.data.text.tokenizer import (
    FILE_PREFIX,
    TOKENIZER_KINDS,
    TextTokenizer,
    TokenizerError,
    load_tokenizer,
    train_bpe,
)

__all__ = [
    "FILE_PREFIX",
    "MAX_TEST_SEQUENCES",
    "OFFLINE_TEXT",
    "TEXT_DATASETS",
    "TOKENIZER_KINDS",
    "Document",
    "TextCorpus",
    "TextSplit",
    "TextTokenizer",
    "TokenDataset",
    "TokenizerError",
    "load_lee_news",
    "load_tokenizer",
    "load_wikipedia",
    "load_wikitext",
    "split_text",
    "train_bpe",
]
