"""Phone numbers → personas: which persona answers a dialed number (SIP and provider streams)."""

from __future__ import annotations

from aiohttp import web
from pydantic import BaseModel, Field

from pono.access import audit, require
from pono.agent.personas import UnknownPersona, load_persona, normalize_number
from pono.context import SERVICES
from pono.http import ApiError, read_json_model


class NumberIn(BaseModel):
    persona: str = Field(min_length=1, max_length=200)  # a persona name or id


def _number(request: web.Request) -> str:
    raw = request.match_info["number"]
    if not 1 <= len(raw) <= 64:
        raise ApiError(422, "invalid number", fields=[{"field": "number", "message": "1 to 64 characters"}])
    return normalize_number(raw)


async def list_numbers(request: web.Request) -> web.Response:
    await require(request, "viewer", "personas")
    pool = request.app[SERVICES].storage.db.pool  # type: ignore[union-attr]
    rows = await pool.fetch("SELECT n.number, p.name FROM phone_numbers n JOIN personas p ON p.id = n.persona_id"
                            " WHERE p.deleted_at IS NULL ORDER BY n.number")
    return web.json_response({"numbers": [{"number": r["number"], "persona": r["name"]} for r in rows]})


async def put_number(request: web.Request) -> web.Response:
    who = await require(request, "admin", "personas")
    number = _number(request)
    body = await read_json_model(request, NumberIn)
    pool = request.app[SERVICES].storage.db.pool  # type: ignore[union-attr]
    try:
        persona = await load_persona(pool, body.persona)
    except UnknownPersona:
        raise ApiError(422, f"no persona {body.persona!r}") from None
    await pool.execute("INSERT INTO phone_numbers (number, persona_id) VALUES ($1, $2)"
                       " ON CONFLICT (number) DO UPDATE SET persona_id = excluded.persona_id", number, persona.id)
    await audit(pool, who.name, "phone_number.set", number, request.remote, persona=persona.name)
    return web.json_response({"number": number, "persona": persona.name})


async def delete_number(request: web.Request) -> web.Response:
    who = await require(request, "admin", "personas")
    number = _number(request)
    pool = request.app[SERVICES].storage.db.pool  # type: ignore[union-attr]
    if await pool.fetchval("DELETE FROM phone_numbers WHERE number = $1 RETURNING number", number) is None:
        raise ApiError(404, f"no mapping for {number}")
    await audit(pool, who.name, "phone_number.delete", number, request.remote)
    return web.Response(status=204)


def routes() -> list[web.RouteDef]:
    return [web.get("/api/phone-numbers", list_numbers), web.put("/api/phone-numbers/{number}", put_number),
            web.delete("/api/phone-numbers/{number}", delete_number)]
