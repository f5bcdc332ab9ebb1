"""Real text corpora as documents: offline ones shipped inside the gensim wheel, WikiText online.

- `wikipedia`: the English Wikipedia excerpt in gensim's test data (the April 2016 dump's first
  articles: 96 with at least 100 words of prose, about 390k words, once `markup` has stripped
  the wikitext).
- `lee-news`: gensim's Lee background corpus, 293 distinct Australian news articles of its 300
  (about 60k words).
- `wikitext-2`, `wikitext-103`: Merity et al.'s WikiText (raw) through Hugging Face `datasets`,
  downloaded once into the data folder when the internet is reachable; its test split is kept.

The gensim files are read from the installed wheel without importing gensim, which is installed
for its data only (`pip install --no-deps gensim`). Parsing the Wikipedia markup takes tens of
seconds, so the cleaned articles are cached (JSON, keyed by the source file's digest and the
cleaner's version) under the data folder; an unwritable folder only costs the re-parse.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import io
import json
import os
import re
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fedleak.data.dataset import DatasetUnavailable
from fedleak.data.embedded import package_dirs
from fedleak.data.text.markup import CLEANER_VERSION, plain_paragraphs
from fedleak.lines import one_line

GENSIM_DATA = Path("test") / "test_data"
WIKIPEDIA_FILE = (
    GENSIM_DATA / "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
)
LEE_FILE = GENSIM_DATA / "lee_background.cor"
WIKITEXT_CONFIGS = {"wikitext-2": "wikitext-2-raw-v1", "wikitext-103": "wikitext-103-raw-v1"}
TEXT_DATASETS: tuple[str, ...] = ("wikipedia", "lee-news", *WIKITEXT_CONFIGS)
OFFLINE_TEXT = "wikipedia, lee-news"
# Articles with less prose than this are stubs, lists or disambiguation pages.
MIN_ARTICLE_WORDS = 100
_WIKITEXT_TITLE = re.compile(r"^ = [^=].* = $")


@dataclass(frozen=True)
class Document:
    """One article: its title and its prose, paragraphs separated by newlines."""

    title: str
    text: str

    @property
    def words(self) -> int:
        """Whitespace-separated words (each becomes at least one byte-level BPE token)."""
        return len(self.text.split())


@dataclass(frozen=True, eq=False)
class TextCorpus:
    """Documents to split among the attacker, the clients and the server's test set.

    `test_documents` is an official test split (WikiText) or empty, in which case a fraction of
    `documents` is held out. `source` says where the text was read from.
    """

    name: str
    documents: tuple[Document, ...]
    test_documents: tuple[Document, ...]
    source: str


def _gensim_file(name: str, relative: Path) -> Path:
    places = [folder / relative for folder in package_dirs("gensim")]
    for path in places:
        if path.is_file():
            return path
    looked = ", ".join(map(str, places)) or "the gensim package (not installed)"
    raise DatasetUnavailable(
        f"data set {name!r} is not available: looked for {looked}. It ships inside the gensim "
        "wheel (no download at run time): install it with `pip install --no-deps "
        f"gensim==4.4.0`, or choose another data set. Offline text sets: {OFFLINE_TEXT}."
    )


def load_lee_news() -> TextCorpus:
    """gensim's Lee background corpus: one news article per line."""
    path = _gensim_file("lee-news", LEE_FILE)
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    documents = tuple(
        Document(f"lee-{i:03d}", " ".join(line.split())) for i, line in enumerate(lines)
    )
    return TextCorpus("lee-news", distinct(d for d in documents if d.words), (), str(path))


def distinct(documents: Iterable[Document]) -> tuple[Document, ...]:
    """Each text once, at its first place: 7 of the Lee corpus's 300 articles copy others, and a
    copy on each side of the split would put client text in the attacker's auxiliary data."""
    seen: set[str] = set()
    kept = []
    for document in documents:
        if document.text not in seen:
            seen.add(document.text)
            kept.append(document)
    return tuple(kept)


def load_wikipedia(cache_root: Path | None) -> TextCorpus:
    """The Wikipedia excerpt of gensim's test data, markup stripped (cached when possible)."""
    path = _gensim_file("wikipedia", WIKIPEDIA_FILE)
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()[:16]
    cache = None
    if cache_root is not None:
        cache = cache_root / "text" / f"wikipedia-{digest}-clean{CLEANER_VERSION}.json.gz"
    documents = _read_cache(cache)
    if documents is None:
        documents = _wikipedia_articles(bz2.decompress(raw))
        _write_cache(cache, documents)
    return TextCorpus("wikipedia", distinct(documents), (), str(path))


def _wikipedia_articles(xml: bytes) -> tuple[Document, ...]:
    """Main-namespace, non-redirect pages of a MediaWiki XML export, as cleaned prose."""
    articles = []
    for _, element in ET.iterparse(io.BytesIO(xml)):
        if element.tag.rpartition("}")[2] != "page":
            continue
        namespace = element.findtext("{*}ns")
        redirect = element.find("{*}redirect") is not None
        wikitext = element.findtext("{*}revision/{*}text") or ""
        title = element.findtext("{*}title") or ""
        element.clear()
        if namespace != "0" or redirect:
            continue
        document = Document(title, "\n".join(plain_paragraphs(wikitext)))
        if document.words >= MIN_ARTICLE_WORDS:
            articles.append(document)
    return tuple(articles)


def _read_cache(path: Path | None) -> tuple[Document, ...] | None:
    if path is None or not path.is_file():
        return None
    try:
        rows = json.loads(gzip.decompress(path.read_bytes()).decode("utf-8"))
        return tuple(Document(str(r["title"]), str(r["text"])) for r in rows)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a damaged cache is rebuilt


def _write_cache(path: Path | None, documents: tuple[Document, ...]) -> None:
    if path is None:
        return
    rows = [{"title": d.title, "text": d.text} for d in documents]
    data = gzip.compress(json.dumps(rows).encode("utf-8"), mtime=0)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        os.chmod(fd, 0o644)  # mkstemp makes 0600 files; the cache is shared like the data
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except OSError:
        pass  # caching is an optimisation only


def load_wikitext(name: str, root: Path, download: bool) -> TextCorpus:
    """WikiText-2/103 (raw) through Hugging Face `datasets`, cached under `root/huggingface`."""
    config = WIKITEXT_CONFIGS[name]
    cache = root / "huggingface"
    try:
        import datasets
    except ImportError as error:
        raise DatasetUnavailable(
            _wikitext_unavailable(name, cache, download, f"ImportError: {error}")
        ) from error
    try:
        loaded = datasets.load_dataset(
            "Salesforce/wikitext",
            config,
            cache_dir=str(cache),
            download_config=datasets.DownloadConfig(local_files_only=not download),
        )
        train, test = loaded["train"]["text"], loaded["test"]["text"]
    except Exception as error:  # datasets raises ConnectionError, FileNotFoundError, ...
        cause = one_line(error)
        raise DatasetUnavailable(
            _wikitext_unavailable(name, cache, download, f"{type(error).__name__}: {cause}")
        ) from error
    source = f"Hugging Face datasets Salesforce/wikitext {config} at {cache}"
    return TextCorpus(name, distinct(wikitext_articles(train)), wikitext_articles(test), source)


def _wikitext_unavailable(name: str, cache: Path, download: bool, cause: str) -> str:
    tried = "downloading was tried and failed" if download else "downloading was off"
    return (
        f"data set {name!r} is not available: looked in {cache} (Hugging Face datasets' cache "
        f"under data_dir); {tried} ({cause}). To obtain it, `pip install datasets` and run once "
        "with internet access (it is saved under data_dir for later offline runs); point "
        "data_dir or $FEDLEAK_DATA_DIR elsewhere if it lives in another place. Offline text "
        f"sets that need no download: {OFFLINE_TEXT}."
    )


def wikitext_articles(lines: list[str]) -> tuple[Document, ...]:
    """WikiText lines to articles: each starts at a top-level ` = Title = ` line; section
    headings (` = = ... = = `) and blank lines are dropped."""
    articles: list[Document] = []
    title, paragraphs = "", []

    def close() -> None:
        if paragraphs:
            articles.append(Document(title or f"article-{len(articles)}", "\n".join(paragraphs)))

    for raw in lines:
        line = raw.strip()
        if _WIKITEXT_TITLE.match(raw.rstrip("\n")):
            close()
            title, paragraphs = line.strip("= ").strip(), []
        elif line and not line.startswith("="):
            paragraphs.append(" ".join(line.split()))
    close()
    return tuple(articles)
