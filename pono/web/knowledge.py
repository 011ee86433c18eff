"""Knowledge endpoints: add documents to a collection, and search it."""

from __future__ import annotations

import asyncio
import re

from aiohttp import web

from pono import textsafe
from pono.agent.knowledge.base import KnowledgeBase
from pono.agent.knowledge.documents import CONTENT_TYPES, DocumentError, extract_text
from pono.context import SERVICES
from pono.http import ApiError
from pono.web.access import require
from pono.web.params import query_int

MAX_DOCUMENT_BYTES = 10 * 1024 * 1024
_COLLECTION = re.compile(r"^[\w.-]{1,100}$")
_JSON_TYPES = {dict: "an object", list: "an array", bool: "a boolean", int: "a number", float: "a number",
               type(None): "null"}


def _collection(request: web.Request) -> str:
    name = request.match_info["collection"]
    if not _COLLECTION.match(name):
        raise ApiError(404, f"no collection {name!r}")
    return name


async def _read_limited(request: web.Request) -> bytes:
    """The whole body (one read returns only what has arrived so far); ApiError 413 past MAX_DOCUMENT_BYTES."""
    if request.content_length is not None and request.content_length > MAX_DOCUMENT_BYTES:
        raise ApiError(413, f"document too large (limit {MAX_DOCUMENT_BYTES} bytes)")
    data = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):
        data += chunk
        if len(data) > MAX_DOCUMENT_BYTES:
            raise ApiError(413, f"document too large (limit {MAX_DOCUMENT_BYTES} bytes)")
    return bytes(data)


def _knowledge(request: web.Request) -> KnowledgeBase:
    knowledge: KnowledgeBase | None = request.app[SERVICES].storage.knowledge
    assert knowledge is not None  # built at start-up, before any request
    return knowledge


async def add_document(request: web.Request) -> web.Response:
    """POST /api/knowledge/{collection}/documents (admin, knowledge): 201 created or replaced, 200 unchanged;
    413 over 10 MiB, 415 for another content type, 422 for an unreadable document.

    Body: the document itself (text/plain, text/markdown, text/html, application/pdf) with ?source=NAME,
    or JSON {"source", "text", "title"?}.
    """
    await require(request, "admin", "knowledge")
    collection = _collection(request)
    data = await _read_limited(request)
    title = request.query.get("title")
    if request.content_type == "application/json":
        try:
            body = textsafe.loads(data)  # NUL and lone surrogates repaired here, at the edge
        except (ValueError, RecursionError):
            raise ApiError(400, "body is not valid JSON") from None
        try:
            source, text, title = body["source"], body["text"], body.get("title", title)
        except (KeyError, TypeError, AttributeError):
            raise ApiError(422, "JSON documents need 'source' and 'text'") from None
        for name, value in (("source", source), ("text", text), ("title", title)):
            if not isinstance(value, str) and not (name == "title" and value is None):
                message = f"a JSON document's '{name}' is a string, not {_JSON_TYPES.get(type(value), 'that')}"
                raise ApiError(422, message, fields=[{"field": name, "message": message}])
        kind = "markdown"
        data = text.encode()
    else:
        kind = CONTENT_TYPES.get(request.content_type, "")
        source = request.query.get("source", "")
        if not kind:
            raise ApiError(415, f"unsupported content type {request.content_type!r}; use "
                                f"{', '.join(CONTENT_TYPES)} or application/json")
        if not source:
            raise ApiError(422, "a ?source= name is required")
    try:
        text = await asyncio.to_thread(extract_text, data, kind)  # seconds for a big PDF: off the event loop
    except DocumentError as exc:
        raise ApiError(422, f"cannot ingest {source}: {exc}") from None
    result = await _knowledge(request).ingest(collection, source, text, title=title)
    status = 200 if result.status == "unchanged" else 201
    return web.json_response({"document_id": result.document_id, "source": source, "status": result.status,
                              "chunks": result.chunks}, status=status)


async def search(request: web.Request) -> web.Response:
    """GET /api/knowledge/{collection}/search?q=&k=1..50 (viewer, knowledge): {"results": [...]}, best first."""
    await require(request, "viewer", "knowledge")
    collection = _collection(request)
    query = request.query.get("q", "")
    if not query:
        raise ApiError(422, "invalid query", fields=[{"field": "q", "message": "required"}])
    k = query_int(request, "k", default=5, most=50)
    return web.json_response({"results": await _knowledge(request).search(query, [collection], k)})

