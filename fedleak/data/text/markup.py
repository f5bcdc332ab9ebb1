"""Wikipedia markup to plain prose, with a real wikitext parser (mwparserfromhell).

An article's top-level nodes are filtered before the markup is stripped: templates (infoboxes,
citations), comments, headings, reference and table tags, and links into other namespaces
(files with their captions, categories, interlanguage links) are dropped; every other link
keeps its visible text and bold/italic quotes disappear. What remains is cut into lines, and
only prose lines are kept: list items, table debris and lines of fewer than `min_words`
words (captions, stubs) go.
"""

from __future__ import annotations

import re

import mwparserfromhell
from mwparserfromhell.nodes import Comment, Heading, Node, Tag, Template, Wikilink
from mwparserfromhell.smart_list import SmartList
from mwparserfromhell.wikicode import Wikicode

# Bump when the cleaning changes: cached corpora carry it in their file names.
CLEANER_VERSION = 2

DROPPED_TAGS = frozenset(
    {
        "blockquote",
        "chem",
        "code",
        "div",
        "gallery",
        "hiero",
        "imagemap",
        "math",
        "pre",
        "ref",
        "references",
        "score",
        "source",
        "sub",
        "sup",
        "syntaxhighlight",
        "table",
        "timeline",
    }
)
# A namespace prefix such as `File:`, `Category:` or an interlanguage `de:`.
_NAMESPACED = re.compile(r"^\s*:?\s*[A-Za-z][A-Za-z \-]{0,20}\s*:")
# Lines that start like list items, definitions or table rows are not prose.
_NOT_PROSE = ("*", "#", ":", ";", "|", "{", "}", "!", "=")
# Dropped templates (pronunciations, dates) leave `( ; , )` behind.
_EMPTY_PARENS = re.compile(r"\(\s*[,;:\s]*\)")
_LEADING_PUNCT = re.compile(r"\(\s*(?:[,;:]\s*)+")
_TRAILING_PUNCT = re.compile(r"(?:\s*[,;:])+\s*\)")


def _kept(node: Node) -> bool:
    if isinstance(node, Template | Comment | Heading):
        return False
    if isinstance(node, Tag):
        return str(node.tag).strip().lower() not in DROPPED_TAGS
    if isinstance(node, Wikilink):
        return not _NAMESPACED.match(str(node.title))
    return True


def plain_paragraphs(wikitext: str, min_words: int = 8) -> list[str]:
    """The prose paragraphs of one article's wikitext, whitespace-normalised, in order."""
    parsed = mwparserfromhell.parse(wikitext)
    kept = Wikicode(SmartList([node for node in parsed.nodes if _kept(node)]))
    text = kept.strip_code(normalize=True, collapse=True)
    paragraphs = []
    for line in text.splitlines():
        line = _EMPTY_PARENS.sub("", line)
        line = _TRAILING_PUNCT.sub(")", _LEADING_PUNCT.sub("(", line))
        line = " ".join(line.replace(" ,", ",").split())
        if line.startswith(_NOT_PROSE) or len(line.split()) < min_words:
            continue
        paragraphs.append(line)
    return paragraphs
