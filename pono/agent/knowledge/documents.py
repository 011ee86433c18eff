"""Documents in, text and overlapping chunks out: plain text, Markdown, HTML and PDF."""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from pono import textsafe


class DocumentError(ValueError):
    """A document that cannot be read (empty, corrupt, unsupported): nothing of it is stored."""


KINDS = {".txt": "text", ".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html", ".pdf": "pdf"}
CONTENT_TYPES = {"text/plain": "text", "text/markdown": "markdown", "text/html": "html", "application/pdf": "pdf"}


class _HTMLText(HTMLParser):
    """Visible text of an HTML page, with headings turned into Markdown headings for chunking."""

    _SKIP = frozenset({"script", "style", "noscript", "template", "head"})
    _BLOCK = frozenset({"p", "div", "li", "br", "tr", "section", "article", "table", "ul", "ol", "blockquote", "pre"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._SKIP:
            self._skipping += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._SKIP and self._skipping:
            self._skipping -= 1
        elif re.fullmatch(r"h[1-6]", tag) or tag in self._BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self.parts.append(data)


def extract_text(data: bytes, kind: str) -> str:
    """The text of a document (`kind`: "text", "markdown", "html" or "pdf"), blank runs squeezed, NUL and lone
    surrogates made U+FFFD (Postgres text holds neither). CPU-bound (a big PDF takes seconds): call it in a worker
    thread from async code. Raises DocumentError for a corrupt, non-UTF-8 or empty document."""
    if kind == "pdf":
        from pypdf import PdfReader

        try:
            reader = PdfReader(io.BytesIO(data))
            text = "\n\n".join(page.extract_text() or "" for page in reader.pages)
        except Exception as exc:  # pypdf fails on broken files in many ways (its errors, and builtins)
            raise DocumentError(f"cannot read the PDF: {type(exc).__name__}: {exc}") from None
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise DocumentError("the document is not UTF-8 text") from None
        if kind == "html":
            parser = _HTMLText()
            parser.feed(text)
            text = "".join(parser.parts)
    text = re.sub(r"[ \t]+", " ", textsafe.repair_text(text))
    text = re.sub(r"\n\s*\n\s*", "\n\n", text).strip()
    if not text:
        raise DocumentError("the document has no text")
    return text


def kind_of(path: Path) -> str:
    kind = KINDS.get(path.suffix.lower())
    if kind is None:
        raise DocumentError(f"{path.name}: unsupported file type (use {', '.join(KINDS)})")
    return kind


@dataclass
class Chunk:
    text: str
    start: int
    end: int
    metadata: dict[str, Any] = field(default_factory=dict)


def chunk_text(text: str, max_chars: int = 700, overlap_chars: int = 150) -> list[Chunk]:
    """Chunks along headings and paragraphs; a chunk carries the tail of the one before it (overlap) and
    the heading it sits under. Offsets point into `text`."""
    paragraphs = [(m.start(), m.end()) for m in re.finditer(r"[^\n]+(?:\n(?!\n)[^\n]+)*", text)]
    chunks: list[Chunk] = []
    heading = ""
    start = end = None

    def flush() -> None:
        nonlocal start, end
        if start is not None and end is not None and text[start:end].strip():
            chunks.append(Chunk(text[start:end].strip(), start, end, {"heading": heading} if heading else {}))
        start = end = None

    for p_start, p_end in paragraphs:
        block = text[p_start:p_end]
        if block.lstrip().startswith("#"):
            flush()
            heading = block.lstrip("# ").split("\n", 1)[0].strip()
            start, end = p_start, p_end  # a section starts with its heading
            continue
        while p_end - p_start > max_chars:  # a paragraph longer than a chunk: cut at a sentence end
            cut = text.rfind(". ", p_start, p_start + max_chars)
            cut = cut + 1 if cut > p_start + max_chars // 3 else p_start + max_chars
            if start is not None:
                flush()
            chunks.append(Chunk(text[p_start:cut].strip(), p_start, cut, {"heading": heading} if heading else {}))
            p_start = max(p_start + 1, cut - overlap_chars)
        if start is not None and p_end - start > max_chars:
            previous_end = end
            flush()
            # Overlap: the next chunk starts inside the previous one, on a word boundary.
            back = max(p_start - overlap_chars, 0)
            space = text.find(" ", back, p_start)
            start = space + 1 if previous_end and space != -1 and back < previous_end else p_start
        if start is None:
            start = p_start
        end = p_end
    flush()
    return chunks
