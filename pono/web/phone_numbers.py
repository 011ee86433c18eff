"""Phone numbers → personas: which persona answers a dialed number (SIP and provider streams)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, Field

from pono.agent.personas import normalize_number
from pono.context import SERVICES
from pono.http import ApiError, read_json_model
from pono.storage.audit import write_audit
from pono.storage.numbers import delete_number, list_numbers, set_number
from pono.storage.personas import find_persona
from pono.web.access import require
from pono.web.params import database


class NumberIn(BaseModel):
    persona: str = Field(min_length=1, max_length=200)  # a persona name or id


def _number(request: web.Request) -> str:
    """The {number} in the path, normalised. Raises ApiError 422 unless 1 to 64 characters."""
    raw = request.match_info["number"]
    if not 1 <= len(raw) <= 64:
        raise ApiError(422, "invalid number", fields=[{"field": "number", "message": "1 to 64 characters"}])
    return normalize_number(raw)


async def get_numbers(request: web.Request) -> web.Response:
    """GET /api/phone-numbers (viewer, personas): {"numbers": [{"number", "persona": name}]}."""
    await require(request, "viewer", "personas")
    return web.json_response({"numbers": await list_numbers(database(request))})


async def put_number(request: web.Request) -> web.Response:
    """PUT /api/phone-numbers/{number} {"persona": name or id} (admin, personas); 422 for an unknown persona."""
    who = await require(request, "admin", "personas")
    number = _number(request)
    body = await read_json_model(request, NumberIn)
    pool = database(request)
    persona = await find_persona(pool, body.persona)
    if persona is None:
        raise ApiError(422, f"no persona {body.persona!r}")
    await set_number(pool, number, persona["id"])
    await request.app[SERVICES].storage.persona_cache.remember_number(number, persona["id"])
    await write_audit(pool, who.name, "phone_number.set", number, request.remote, persona=persona["name"])
    return web.json_response({"number": number, "persona": persona["name"]})


async def remove_number(request: web.Request) -> web.Response:
    """DELETE /api/phone-numbers/{number} (admin, personas): 204, or 404 when the number is not mapped."""
    who = await require(request, "admin", "personas")
    number = _number(request)
    pool = database(request)
    if not await delete_number(pool, number):
        raise ApiError(404, f"no mapping for {number}")
    await request.app[SERVICES].storage.persona_cache.remember_number(number, None)  # unmapped: the default
    await write_audit(pool, who.name, "phone_number.delete", number, request.remote)
    return web.Response(status=204)
