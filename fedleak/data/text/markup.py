"""Wikipedia markup to plain prose, with a real wikitext parser (mwparserfromhell).

An article's nodes are filtered, at every depth, before the markup is stripped: templates
(infoboxes, citations), comments, headings, reference and table tags, and links into other
namespaces (files with their captions, categories, interlanguage links) are dropped; every
other link keeps its visible text and bold/italic quotes disappear. What remains is cut into
lines, and only prose lines are kept: list items, table debris, lines holding markup the parser
could not read (malformed nesting) and lines of fewer than `min_words` words (captions, stubs)
go.
"""

from __future__ import annotations

import re

import mwparserfromhell
from mwparserfromhell.nodes import Comment, Heading, Node, Tag, Template, Text, Wikilink
from mwparserfromhell.smart_list import SmartList
from mwparserfromhell.wikicode import Wikicode

# Bump when the cleaning changes: cached corpora carry it in their file names.
CLEANER_VERSION = 5

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
# Markup the parser could not read (malformed nesting) survives stripping; such lines go.
_LEFTOVER = ("[[", "]]", "{{", "}}", "{|", "|}")
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
# List items (`*`, `#`), definitions (`;`, `:`): their markers parse as tags.
_LIST_TAGS = frozenset({"li", "dt", "dd"})
_LIST_ITEM = "\u2022"
# Italics next to an apostrophe (''Iliad'''s) defeat the parser: an odd run keeps one quote.
_QUOTES = re.compile(r"'{2,}")
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


def _pruned(code: Wikicode) -> Wikicode:
    """`code` without the dropped nodes, at every depth (a ref inside italics goes too); list
    markers become `_LIST_ITEM`, so that their lines can be recognised after stripping."""
    kept: list[Node] = []
    for node in code.nodes:
        if isinstance(node, Tag) and str(node.tag).strip().lower() in _LIST_TAGS:
            kept.append(Text(_LIST_ITEM))
            continue
        if not _kept(node):
            continue
        if isinstance(node, Tag) and node.contents is not None:
            node.contents = _pruned(node.contents)
        elif isinstance(node, Wikilink) and node.text is not None:
            node.text = _pruned(node.text)
        kept.append(node)
    return Wikicode(SmartList(kept))


def plain_paragraphs(wikitext: str, min_words: int = 8) -> list[str]:
    """The prose paragraphs of one article's wikitext, whitespace-normalised, in order."""
    text = _pruned(mwparserfromhell.parse(wikitext)).strip_code(normalize=True, collapse=True)
    paragraphs = []
    for line in text.splitlines():
        line = _EMPTY_PARENS.sub("", line)
        line = _TRAILING_PUNCT.sub(")", _LEADING_PUNCT.sub("(", line))
        line = _QUOTES.sub(lambda m: "'" if len(m.group()) % 2 else "", line)
        line = " ".join(line.replace(" ,", ",").split())
        if line.startswith((*_NOT_PROSE, _LIST_ITEM)) or _leftover(line):
            continue
        if len(line.split()) < min_words:
            continue
        paragraphs.append(line)
    return paragraphs


def _leftover(line: str) -> bool:
    return any(mark in line for mark in _LEFTOVER) or _TAG.search(line) is not None
