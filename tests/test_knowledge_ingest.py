"""Knowledge ingest over HTTP does its CPU work (PDF extraction, chunking) in worker threads, so a big upload
does not stall the event loop that every live call runs on."""

from __future__ import annotations

import asyncio
import threading
import uuid

import aiohttp
import pytest
from conftest import RunningServer
from helpers import pdf_file

import pono.agent.knowledge.base as knowledge_base
import pono.web.knowledge as knowledge_api
from pono.context import SERVICES

_DEADLOCK_S = 60.0  # breaks a deadlock (extraction on the event loop) instead of hanging; never reached otherwise


def big_pdf(pages: int, strokes: int) -> bytes:
    """A PDF of `pages` pages, each `strokes` drawn lines (bulk that pypdf must parse) and one line of text."""
    drawing = b"".join(b"%d %d m %d %d l S\n" % (i % 600, i % 700, i * 7 % 600, i * 3 % 700) for i in range(strokes))
    kids = b" ".join(b"%d 0 R" % (4 + 2 * n) for n in range(pages))
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [%s] /Count %d >>" % (kids, pages),
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    for n in range(pages):
        stream = drawing + b"BT /F1 12 Tf 72 720 Td (Page %d of the maintenance manual.) Tj ET" % n
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents %d 0 R"
                       b" /Resources << /Font << /F1 3 0 R >> >> >>" % (5 + 2 * n))
        objects.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    return pdf_file(objects)


async def test_pdf_ingest_leaves_the_event_loop_free(server: RunningServer, admin_token: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The observable: while the server is inside the PDF extraction of an upload, it answers /api/health.

    The real extraction is wrapped (it still does all the work) so that it starts by waiting for a gate that
    this test opens only once a health request, sent after the extraction began, has been answered. The server
    and this test share one event loop: if extraction ran on it, nothing could answer the health request, the
    gate would never open, and the wrapper gives up after `_DEADLOCK_S`, so the test fails instead of hanging.
    That bound is a deadlock breaker, not a timing assertion: on a free loop the gate opens as soon as the health
    answer arrives, however slow the machine. Chunking is checked the same way, by the thread it runs on.
    """
    loop_thread = threading.get_ident()
    extracting, gate = threading.Event(), threading.Event()
    seen: dict[str, object] = {}
    real_extract, real_chunk = knowledge_api.extract_text, knowledge_base.chunk_text

    def gated_extract(data: bytes, kind: str) -> str:
        seen["extract_thread"] = threading.get_ident()
        extracting.set()
        seen["gate_opened"] = gate.wait(_DEADLOCK_S)
        return real_extract(data, kind)

    def watched_chunk(text: str, *args: object, **kwargs: object) -> object:
        seen["chunk_thread"] = threading.get_ident()
        return real_chunk(text, *args, **kwargs)

    monkeypatch.setattr(knowledge_api, "extract_text", gated_extract)
    monkeypatch.setattr(knowledge_base, "chunk_text", watched_chunk)
    pdf = big_pdf(300, 400)  # 2.6 MB; pypdf takes seconds over it on one core
    url = f"/api/knowledge/big-{uuid.uuid4().hex[:6]}/documents?source=manual.pdf"
    headers = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/pdf"}
    async with aiohttp.ClientSession(server.url) as http:

        async def upload() -> tuple[int, dict[str, object]]:
            async with http.post(url, data=pdf, headers=headers) as r:
                return r.status, await r.json()

        ingest = asyncio.create_task(upload())
        assert await asyncio.to_thread(extracting.wait, _DEADLOCK_S), "the upload never reached extraction"
        async with http.get("/api/health") as r:
            assert r.status == 200
        gate.set()
        status, body = await ingest
    assert status == 201 and body["chunks"] > 0, body
    assert seen["gate_opened"] is True, "the health check was answered only after extraction gave up"
    assert seen["extract_thread"] != loop_thread and seen["chunk_thread"] != loop_thread



async def test_a_big_upload_is_read_whole(server: RunningServer, admin_token: str) -> None:
    """The body once came from one read of the stream, which returns what has arrived so far: a few hundred kB of
    a 2.6 MB PDF, refused as corrupt."""
    collection = f"whole-{uuid.uuid4().hex[:6]}"
    headers = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/pdf"}
    async with aiohttp.ClientSession(server.url) as http:
        async with http.post(f"/api/knowledge/{collection}/documents?source=manual.pdf", data=big_pdf(300, 400),
                             headers=headers) as r:
            assert r.status == 201, await r.text()
    pool = server.app[SERVICES].storage.db.pool
    texts = [r["text"] for r in await pool.fetch(
        "SELECT c.text FROM chunks c JOIN documents d ON d.id = c.document_id WHERE d.collection = $1", collection)]
    assert any("Page 299 of the maintenance manual." in t for t in texts)


async def test_a_pdf_pypdf_gives_up_on_is_a_422(server: RunningServer, admin_token: str) -> None:
    """pypdf refuses some broken files with errors beside PdfReadError (here LimitReachedError, for an xref
    table whose header lost its count): each is an unreadable document, not a server error."""
    broken = big_pdf(2, 5).replace(b"xref\n0 8\n", b"xref\n\r\n")
    headers = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/pdf"}
    async with aiohttp.ClientSession(server.url) as http:
        async with http.post("/api/knowledge/broken/documents?source=broken.pdf", data=broken, headers=headers) as r:
            assert r.status == 422 and "cannot read the PDF" in (await r.json())["error"], await r.text()
