"""The audit log (admin): newest entries first, optionally by action prefix."""

from __future__ import annotations

from aiohttp import web

from pono.storage.audit import recent_audit
from pono.web.access import require
from pono.web.params import database, page_limit


async def get_audit(request: web.Request) -> web.Response:
    """GET /api/audit?limit=1..1000&action=PREFIX (admin, audit): {"entries": [{"at", "actor", "action",
    "target", "source_ip", "details"}]}."""
    await require(request, "admin", "audit")
    limit = page_limit(request, default=100, most=1000)
    entries = await recent_audit(database(request), request.query.get("action") or None, limit)
    return web.json_response({"entries": [{**e, "at": e["at"].isoformat()} for e in entries]})
