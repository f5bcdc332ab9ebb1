"""A tiny document model and its two renderings: self-contained HTML and Markdown with files.

The report is assembled once as a list of blocks, then rendered twice, so the HTML and the
Markdown always say the same thing. HTML embeds every image as a base64 data URI (it opens
from disk with no server and no network); Markdown references PNG files written beside it.
"""

from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from PIL import Image


@dataclass(frozen=True)
class Heading:
    """A section title; level 2 sections are listed in the table of contents."""

    text: str
    level: int = 2


@dataclass(frozen=True)
class Text:
    """A paragraph of plain text."""

    text: str


@dataclass(frozen=True)
class Code:
    """Preformatted text (configuration files)."""

    text: str


@dataclass(frozen=True)
class Cell:
    """A table cell: `bold` marks the best value of its column; `title` is a hover note;
    `link` a page relative to the report (a sweep's cell report) the text leads to."""

    text: str
    bold: bool = False
    title: str = ""
    link: str = ""


@dataclass(frozen=True)
class Table:
    """Rows of cells under a header; `caption` says what the numbers are."""

    columns: tuple[str, ...]
    rows: tuple[tuple[Cell, ...], ...]
    caption: str = ""


@dataclass(frozen=True)
class Figure:
    """A PNG image with a caption; `scale` enlarges small pixel grids without smoothing."""

    name: str
    png: bytes
    caption: str = ""
    scale: int = 1
    size: tuple[int, int] = field(default=(0, 0))

    @classmethod
    def of(cls, name: str, png: bytes, caption: str = "", scale: int = 1) -> Figure:
        """A figure whose pixel size is read from the PNG."""
        with Image.open(io.BytesIO(png)) as image:
            size = image.size
        return cls(name=name, png=png, caption=caption, scale=scale, size=size)

    def scaled_png(self) -> bytes:
        """The PNG enlarged by `scale` with nearest-neighbour sampling (for Markdown viewers)."""
        if self.scale == 1:
            return self.png
        with Image.open(io.BytesIO(self.png)) as image:
            big = image.resize(
                (image.width * self.scale, image.height * self.scale), Image.Resampling.NEAREST
            )
        buffer = io.BytesIO()
        big.save(buffer, format="PNG")
        return buffer.getvalue()


@dataclass(frozen=True)
class Gallery:
    """Figures shown side by side (wrapping), e.g. each attack's grid for the same samples."""

    figures: tuple[Figure, ...]
    title: str = ""


Block = Heading | Text | Code | Table | Figure | Gallery

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto;
       max-width: 1200px; padding: 0 1rem; color: #1d1d1f; line-height: 1.45; }
h1 { font-size: 1.7rem; margin-bottom: .2rem; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: .2rem; margin-top: 2.2rem; }
h3 { margin-top: 1.4rem; }
table { border-collapse: collapse; margin: .6rem 0 .2rem; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .55rem; text-align: right; }
th.text, td.text { text-align: left; }
td:not(.text) { white-space: nowrap; }  /* a median and its interval stay on one line */
th { background: #f3f3f5; }
td.best { font-weight: 700; background: #cfeccf; }
.wide { overflow-x: auto; max-width: 100%; }
.caption { color: #555; font-size: .85rem; margin: .1rem 0 1rem; }
figure { margin: 1rem 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
img.pixel { image-rendering: pixelated; }
.gallery { display: flex; flex-wrap: wrap; gap: 0 1.5rem; align-items: flex-start; }
.gallery figure { margin: .3rem 0; }
.gallery-title { font-weight: 600; margin: 1rem 0 0; }
code { background: #f3f3f5; padding: 0 .2rem; font-size: .9em; }
pre { background: #f6f6f8; padding: .7rem; overflow-x: auto; font-size: .8rem; }
nav ul { columns: 2; font-size: .9rem; }
"""

_NUMBER = re.compile(r"[-+–]?\d")
_CODE = re.compile(r"`([^`]+)`")


def _html_paragraph(text: str) -> str:
    """Escaped text with Markdown's `code` spans as <code>: paragraphs are written once for
    both renderings, and raw backticks would show in the HTML."""
    return _CODE.sub(r"<code>\1</code>", html.escape(text))


def _anchor(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _numeric_columns(table: Table) -> list[bool]:
    """A column is right-aligned when its cells start like numbers (blanks and dashes aside)."""
    numeric = []
    for i in range(len(table.columns)):
        texts = [row[i].text for row in table.rows if row[i].text not in ("", "–")]
        numeric.append(bool(texts) and all(_NUMBER.match(t) for t in texts))
    return numeric


def _html_table(table: Table) -> str:
    numeric = _numeric_columns(table)
    text = ' class="text"'
    head = "".join(
        f"<th{'' if num else text}>{html.escape(c)}</th>"
        for c, num in zip(table.columns, numeric, strict=True)
    )
    body = []
    for row in table.rows:
        cells = []
        for cell, num in zip(row, numeric, strict=True):
            classes = " ".join((["best"] if cell.bold else []) + ([] if num else ["text"]))
            attrs = f' class="{classes}"' if classes else ""
            if cell.title:
                attrs += f' title="{html.escape(cell.title)}"'
            content = html.escape(cell.text)
            if cell.link:
                content = f'<a href="{html.escape(quote(cell.link))}">{content}</a>'
            cells.append(f"<td{attrs}>{content}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    caption = f'<p class="caption">{html.escape(table.caption)}</p>' if table.caption else ""
    rows_html = "".join(body)
    # A study with many defenses makes tables wider than the page: they scroll, not overflow.
    table_html = f"<table><thead><tr>{head}</tr></thead><tbody>{rows_html}</tbody></table>"
    return f'<div class="wide">{table_html}</div>{caption}'


def _html_figure(figure: Figure) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    width, height = figure.size
    attrs = ""
    if figure.scale > 1:
        attrs = f' class="pixel" width="{width * figure.scale}" height="{height * figure.scale}"'
    caption = f'<figcaption class="caption">{html.escape(figure.caption)}</figcaption>'
    return (
        f'<figure><img{attrs} alt="{html.escape(figure.caption or figure.name)}" '
        f'src="data:image/png;base64,{data}">{caption}</figure>'
    )


def render_html(title: str, blocks: Sequence[Block]) -> str:
    """One self-contained HTML page: inline CSS, images as data URIs, no scripts."""
    parts: list[str] = []
    toc: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            anchor = _anchor(block.text)
            level = min(max(block.level, 2), 4)
            parts.append(f'<h{level} id="{anchor}">{html.escape(block.text)}</h{level}>')
            if level == 2:
                toc.append(f'<li><a href="#{anchor}">{html.escape(block.text)}</a></li>')
        elif isinstance(block, Text):
            parts.append(f"<p>{_html_paragraph(block.text)}</p>")
        elif isinstance(block, Code):
            parts.append(f"<pre>{html.escape(block.text)}</pre>")
        elif isinstance(block, Table):
            parts.append(_html_table(block))
        elif isinstance(block, Gallery):
            title_html = (
                f'<p class="gallery-title">{html.escape(block.title)}</p>' if block.title else ""
            )
            inner = "".join(_html_figure(f) for f in block.figures)
            parts.append(f'{title_html}<div class="gallery">{inner}</div>')
        else:
            parts.append(_html_figure(block))
    nav = f"<nav><ul>{''.join(toc)}</ul></nav>" if toc else ""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{html.escape(title)}</h1>{nav}\n" + "\n".join(parts) + "\n</body></html>\n"
    )


_TAG_OPEN = re.compile(r"<(?=[A-Za-z/!?])")


def _md_escape(text: str) -> str:
    return _no_html(text).replace("|", "\\|").replace("\n", " ")


_TICKS = re.compile(r"`+")


def _no_html(text: str) -> str:
    """A `<` that opens a tag (or comment) outside code spans as `&lt;`: a run's records
    (attack names, environment values, text from a corpus) would otherwise reach a Markdown
    viewer as HTML it renders. `n < 6` stays as it is. Code spans as CommonMark reads them: a
    run of N backticks up to the next run of exactly N (a run of three read as three single
    ones let "```<img ...>`" through)."""
    out, start, position = [], 0, 0
    while (opening := _TICKS.search(text, position)) is not None:
        begin, width = opening.start(), len(opening.group())
        backslashes = begin - len(text[:begin].rstrip("\\"))
        if backslashes % 2:  # an escaped backtick is literal; the rest of its run may open
            begin, width = begin + 1, width - 1
            if not width:
                position = opening.end()
                continue
        closing = re.compile(f"(?<!`){'`' * width}(?!`)").search(text, opening.end())
        if closing is None:  # an unpaired run is literal text
            position = opening.end()
            continue
        out.append(_TAG_OPEN.sub("&lt;", text[start:begin]))
        out.append(text[begin : closing.end()])
        start = position = closing.end()
    out.append(_TAG_OPEN.sub("&lt;", text[start:]))
    return "".join(out)


def _fence(text: str) -> str:
    """A code fence longer than any run of backticks in `text`, which would close a shorter one."""
    longest = max((len(run) for run in _TICKS.findall(text)), default=0)
    return "`" * max(3, longest + 1)


def _md_table(table: Table) -> str:
    rule = "|".join("---:" if num else "---" for num in _numeric_columns(table))
    lines = ["| " + " | ".join(_md_escape(c) for c in table.columns) + " |", f"|{rule}|"]
    for row in table.rows:
        texts = [_md_cell(c) for c in row]
        lines.append("| " + " | ".join(texts) + " |")
    if table.caption:
        lines += ["", f"_{_no_html(table.caption)}_"]
    return "\n".join(lines)


def _md_cell(cell: Cell) -> str:
    text = _md_escape(cell.text)
    if cell.link:
        text = "[" + text.replace("[", "\\[").replace("]", "\\]") + f"]({quote(cell.link)})"
    return f"**{text}**" if cell.bold else text


def _add_file(files: dict[str, bytes], figure: Figure) -> None:
    if figure.name in files:
        raise ValueError(f"figure name {figure.name!r} is used twice in one report")
    files[figure.name] = figure.scaled_png()


def _md_image(figure: Figure, files_dir: str) -> str:
    alt = _md_escape(figure.name.removesuffix(".png")).replace("]", ")")
    return f"![{alt}]({files_dir}/{figure.name})"


def render_markdown(
    title: str, blocks: Sequence[Block], files_dir: str
) -> tuple[str, dict[str, bytes]]:
    """Markdown text plus the image files it references, keyed by name inside `files_dir`."""
    parts = [f"# {title}"]
    files: dict[str, bytes] = {}
    for block in blocks:
        if isinstance(block, Heading):
            parts.append("#" * min(max(block.level, 2), 4) + " " + _no_html(block.text))
        elif isinstance(block, Text):
            parts.append(_no_html(block.text))
        elif isinstance(block, Code):
            fence = _fence(block.text)
            parts.append(f"{fence}\n" + block.text.rstrip("\n") + f"\n{fence}")
        elif isinstance(block, Table):
            parts.append(_md_table(block))
        elif isinstance(block, Gallery):
            # Images in one paragraph render side by side; their captions follow in one line.
            for figure in block.figures:
                _add_file(files, figure)
            images = " ".join(_md_image(f, files_dir) for f in block.figures)
            captions = _no_html("; ".join(f.caption for f in block.figures))
            title_md = f"**{_no_html(block.title)}**\n\n" if block.title else ""
            parts.append(f"{title_md}{images}\n\n_{captions}_")
        else:
            _add_file(files, block)
            parts.append(_md_image(block, files_dir))
            if block.caption:
                parts.append(f"_{_no_html(block.caption)}_")
    return "\n\n".join(parts) + "\n", files
