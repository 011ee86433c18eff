"""Replica administration: drain this replica before a deploy, or take it back into service."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, ConfigDict

from pono.context import SERVICES
from pono.http import read_json_model
from pono.storage.audit import write_audit
from pono.web.access import require


class DrainIn(BaseModel):
    model_config = ConfigDict(strict=True)  # {"drain": "yes"} is a 422, not a guess

    drain: bool  # true: take no new calls; false: take calls again


async def drain(request: web.Request) -> web.Response:
    """POST /api/admin/drain {"drain": true|false} (admin, scope calls): this replica stops (or resumes) taking
    calls. Draining turns /api/ready 503 and new offers, INVITEs and streams 503; live calls go on. The process
    keeps running: SIGTERM drains and then exits. Answers {"draining": bool, "active_calls": int}; 422 without
    a `drain` field."""
    who = await require(request, "admin", "calls")
    body = await read_json_model(request, DrainIn)
    services = request.app[SERVICES]
    if body.drain:
        services.calls.start_draining()
    else:
        services.calls.resume()
    if services.storage.db is not None:
        await write_audit(services.storage.db.pool, who.name, "replica.drain" if body.drain else "replica.resume",
                          services.settings.replica_id, request.remote)
    return web.json_response({"draining": services.calls.draining, "active_calls": len(services.calls.calls)})
