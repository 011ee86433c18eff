"""RAG against real Postgres + pgvector and the bundled MiniLM embeddings."""

from __future__ import annotations

import uuid
from itertools import pairwise
from pathlib import Path

import aiohttp
from feeds import operator_feed
from helpers import pdf_file, text_call

from pono.agent.knowledge.base import KnowledgeBase
from pono.agent.knowledge.documents import DocumentError, chunk_text, extract_text
from pono.agent.knowledge.evaluate import ingest_folder, retrieval_scores
from pono.context import SERVICES
from pono.testing.scripted_llm import Script

FIXTURES = Path(__file__).parent / "fixtures" / "knowledge"
HIT_AT_3_FLOOR = 0.9


def tiny_pdf(text: str) -> bytes:
    """A one-page PDF with `text`, built by hand (a byte-exact xref table)."""
    stream = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R"
               b" /Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    return pdf_file(objects)


def test_chunks_follow_headings_overlap_and_keep_offsets() -> None:
    text = extract_text((FIXTURES / "menu.html").read_bytes(), "html")
    assert "console.log" not in text and "color:red" not in text
    chunks = chunk_text(text)
    assert [c.metadata.get("heading") for c in chunks] == ["Our menu", "Vegetarian and vegan", "Allergies"]
    assert all(text[c.start:c.end].strip() == c.text for c in chunks)
    long = "\n\n".join(f"Paragraph {i} talks about topic {i} at some length, " * 4 for i in range(12))
    pieces = chunk_text(long, max_chars=400, overlap_chars=100)
    assert len(pieces) > 3 and all(len(p.text) <= 400 for p in pieces)
    assert all(b.start < a.end for a, b in pairwise(pieces))  # overlapping


async def test_ingest_search_reingest_and_pdf(server) -> None:
    knowledge: KnowledgeBase = server.app[SERVICES].storage.knowledge
    collection = f"bistro-{uuid.uuid4().hex[:6]}"
    assert await ingest_folder(knowledge, FIXTURES, collection) > 0
    scores = await retrieval_scores(knowledge, FIXTURES, collection)
    assert scores["hit@3"] >= HIT_AT_3_FLOOR, scores
    (top,) = await knowledge.search("Where can I park my car?", [collection], 1)
    assert top["document"] == "parking.md" and "behind the building" in top["text"]
    assert top["heading"] == "Parking" and top["end"] > top["start"] >= 0

    text = extract_text((FIXTURES / "parking.md").read_bytes(), "markdown")
    assert (await knowledge.ingest(collection, "parking.md", text)).status == "unchanged"
    changed = await knowledge.ingest(collection, "parking.md", text.replace("Mill Lane", "Rope Walk"))
    assert changed.status == "replaced"
    (top,) = await knowledge.search("public garage during the day", [collection], 1)
    assert "Rope Walk" in top["text"]
    pool = server.app[SERVICES].storage.db.pool
    assert await pool.fetchval("SELECT count(*) FROM documents WHERE collection = $1 AND source = 'parking.md'",
                               collection) == 1

    pdf = extract_text(tiny_pdf("Our sommelier pairs Riesling with the smoked trout."), "pdf")
    await knowledge.ingest(collection, "wine.pdf", pdf)
    (top,) = await knowledge.search("which wine goes with trout", [collection], 1)
    assert top["document"] == "wine.pdf"


async def test_documents_api_rejects_bad_input_and_stores_nothing_partial(server, admin_token: str) -> None:
    collection = f"api-{uuid.uuid4().hex[:6]}"
    url = f"{server.url}/api/knowledge/{collection}"
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{url}/documents?source=menu.html", data=(FIXTURES / "menu.html").read_bytes(),
                             headers={"Content-Type": "text/html"}) as r:
            assert r.status == 201 and (await r.json())["chunks"] == 3
        async with http.post(f"{url}/documents?source=broken.pdf", data=b"%PDF-1.4 garbage that is not a pdf",
                             headers={"Content-Type": "application/pdf"}) as r:
            assert r.status == 422 and "cannot read the PDF" in (await r.json())["error"]
        async with http.post(f"{url}/documents?source=empty.txt", data=b"  \n ",
                             headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 422 and "no text" in (await r.json())["error"]
        async with http.post(f"{url}/documents?source=x.doc", data=b"x",
                             headers={"Content-Type": "application/msword"}) as r:
            assert r.status == 415
        for field, document in [("source", {"source": {"a": 1}, "text": "x"}), ("text", {"source": "a", "text": ["x"]}),
                                ("title", {"source": "a", "text": "x", "title": 7}),
                                ("source", {"source": None, "text": "x"})]:
            async with http.post(f"{url}/documents", json=document) as r:  # never stored as a Python repr
                body = await r.json()
                assert r.status == 422 and f"'{field}'" in body["error"], body
                assert body["fields"][0]["field"] == field, body
        async with http.get(f"{url}/search", params={"q": "vegan dishes", "k": "2"}) as r:
            results = (await r.json())["results"]
            assert results[0]["document"] == "menu.html" and len(results) == 2
    async with aiohttp.ClientSession() as http, http.get(f"{url}/search", params={"q": "x"}) as r:
        assert r.status == 401
    pool = server.app[SERVICES].storage.db.pool
    sources = await pool.fetch("SELECT source FROM documents WHERE collection = $1", collection)
    assert [s["source"] for s in sources] == ["menu.html"]


async def test_agent_searches_knowledge_and_cites(server, script: Script, admin_token: str) -> None:
    knowledge: KnowledgeBase = server.app[SERVICES].storage.knowledge
    collection = f"cite-{uuid.uuid4().hex[:6]}"
    await ingest_folder(knowledge, FIXTURES, collection)
    name = f"rag-{uuid.uuid4().hex[:6]}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
        async with http.post(f"{server.url}/api/personas", json={
                "name": name, "system_prompt": "Answer from the documents.", "tools": ["search_knowledge"],
                "knowledge_collections": [collection]}) as r:
            assert r.status == 201
    script.responses = [{"tool_calls": [{"name": "search_knowledge", "arguments": {"query": "can I bring a dog"}}]},
                        {"text": "Dogs are welcome on the terrace."}]
    async with text_call(server.url, name) as caller:
        async with operator_feed(server, caller.call_id) as feed:
            caller.send_text("Can I bring my dog?")
            final = await caller.wait_for(lambda e: e["type"] == "agent.final", 15)
            used = await feed.wait_for(lambda e: e["type"] == "knowledge.used", 5)
        assert final["text"] == "Dogs are welcome on the terrace."  # no citation in the spoken text
        assert not [e for e in caller.events if e["type"] == "knowledge.used"]  # citations are for operators
        assert used["documents"][0]["document"] == "policies.txt"
        passages = [m["content"] for m in script.requests[-1]["messages"] if m["role"] == "tool"]
        assert "terrace" in passages[0]


def test_corrupt_and_empty_documents_are_refused() -> None:
    for data, kind in ((b"%PDF-1.4 nope", "pdf"), (b"", "text"), (b"\xff\xfe\x00", "markdown")):
        try:
            extract_text(data, kind)
        except DocumentError:
            continue
        raise AssertionError(f"{kind} {data!r} was accepted")


async def test_openai_compatible_embeddings_endpoint(server, scripted_llm, script: Script) -> None:
    from pono.agent.knowledge.base import RemoteEmbedder

    pool = server.app[SERVICES].storage.db.pool
    remote = KnowledgeBase(pool, remote=RemoteEmbedder(scripted_llm.base_url, "key", "scripted-embed"))
    collection = f"remote-{uuid.uuid4().hex[:6]}"
    await ingest_folder(remote, FIXTURES, collection)
    (top,) = await remote.search("free parking behind the building", [collection], 1)
    assert top["document"] == "parking.md"
    asked = [r for r in script.requests if r.get("model") == "scripted-embed"]
    assert asked and all(r["dimensions"] == 384 for r in asked)

    # An endpoint that ignores the requested size is refused clearly, and nothing is stored.
    script.embedding_size = 128
    try:
        await remote.ingest(collection, "extra.md", "# Extra\n\nSomething new.")
    except ValueError as exc:
        assert "returned 128 dimensions; 384 are needed" in str(exc)
    else:
        raise AssertionError("a 128-dimension endpoint was accepted")
    assert await pool.fetchval("SELECT count(*) FROM documents WHERE collection = $1 AND source = 'extra.md'",
                               collection) == 0
