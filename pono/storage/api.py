"""The storage API: calls (live from the registry, history from Postgres) and personas."""

from __future__ import annotations

import base64
import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
from aiohttp import web
from pydantic import AfterValidator, BaseModel, Field
from redis.exceptions import RedisError

from pono.access import audit, require
from pono.agent.dlp.engine import DlpPolicy
from pono.agent.tools.specs import parse_tool_specs
from pono.context import SERVICES, Services
from pono.http import ApiError, read_json_model


def _pool(services: Services) -> asyncpg.Pool:
    assert services.storage.db is not None
    return services.storage.db.pool


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


# -- pagination -------------------------------------------------------------------------------
def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 200:
        raise ApiError(422, "invalid query", fields=[{"field": "limit", "message": "an integer from 1 to 200"}])
    return int(raw)


def _encode_cursor(at: datetime, row_id: str) -> str:
    return base64.urlsafe_b64encode(json.dumps([at.isoformat(), row_id]).encode()).decode()


def _decode_cursor(raw: str | None) -> tuple[datetime, str] | None:
    if not raw:
        return None
    try:
        at, row_id = json.loads(base64.urlsafe_b64decode(raw.encode()))
        return datetime.fromisoformat(at), str(row_id)
    except (ValueError, TypeError):
        raise ApiError(422, "invalid query", fields=[{"field": "cursor", "message": "not a cursor from this API"}]) \
            from None


def _since(raw: str | None, field: str = "since") -> datetime | None:
    if not raw:
        return None
    try:
        value = datetime.fromtimestamp(float(raw), UTC) if raw.replace(".", "", 1).isdigit() \
            else datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(422, "invalid query", fields=[{"field": field, "message": "ISO 8601 time or unix seconds"}]) \
            from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


# -- calls ------------------------------------------------------------------------------------
async def list_calls(request: web.Request) -> web.Response:
    await require(request, "viewer", "calls")
    services = request.app[SERVICES]
    state = request.query.get("state")
    persona = request.query.get("persona") or None
    limit = _limit(request)
    if state not in (None, "live", "ended"):
        raise ApiError(422, "invalid query", fields=[{"field": "state", "message": "'live' or 'ended'"}])
    if state == "live":
        assert services.storage.live is not None
        try:
            calls = await services.storage.live.live_calls()
        except (RedisError, OSError):
            raise ApiError(503, "the live call registry (Redis) is unavailable") from None
        calls = [c for c in calls if persona is None or c.get("persona") == persona]
        calls.sort(key=lambda c: c.get("started", ""), reverse=True)
        return web.json_response({"calls": calls[:limit], "next_cursor": None})

    cursor = _decode_cursor(request.query.get("cursor"))
    since = _since(request.query.get("since"), "since")
    until = _since(request.query.get("until"), "until")
    text = request.query.get("q") or None  # full-text search over the stored (redacted) turns
    if text is not None and len(text) > 500:
        raise ApiError(422, "invalid query", fields=[{"field": "q", "message": "at most 500 characters"}])
    rows = await _pool(services).fetch(
        "SELECT id, transport, persona, caller, replica, started_at, ended_at, end_reason FROM calls"
        " WHERE deleted_at IS NULL"
        "   AND ($1::text IS NULL OR persona = $1)"
        "   AND ($2::timestamptz IS NULL OR started_at >= $2)"
        "   AND ($3::boolean IS FALSE OR ended_at IS NOT NULL)"
        "   AND ($4::timestamptz IS NULL OR (started_at, id) < ($4, $5))"
        "   AND ($7::timestamptz IS NULL OR started_at < $7)"
        "   AND ($8::text IS NULL OR EXISTS (SELECT 1 FROM turns t WHERE t.call_id = calls.id"
        "        AND t.text_search @@ websearch_to_tsquery('english', $8)))"
        " ORDER BY started_at DESC, id DESC LIMIT $6",
        persona, since, state == "ended", cursor[0] if cursor else None, cursor[1] if cursor else "", limit + 1,
        until, text)
    page = rows[:limit]
    next_cursor = _encode_cursor(page[-1]["started_at"], page[-1]["id"]) if len(rows) > limit else None
    return web.json_response({"calls": [_call_json(r) for r in page], "next_cursor": next_cursor})


def _call_json(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["id"], "transport": row["transport"], "persona": row["persona"], "caller": row["caller"],
            "replica": row["replica"], "started_at": _iso(row["started_at"]), "ended_at": _iso(row["ended_at"]),
            "end_reason": row["end_reason"]}


async def get_call(request: web.Request) -> web.Response:
    await require(request, "viewer", "calls")
    call_id = request.match_info["call_id"]
    pool = _pool(request.app[SERVICES])
    call = await pool.fetchrow(
        "SELECT id, transport, persona, caller, replica, started_at, ended_at, end_reason FROM calls"
        " WHERE id = $1 AND deleted_at IS NULL", call_id)
    if call is None:
        raise ApiError(404, f"no call {call_id}")
    turns = await pool.fetch(
        "SELECT idx, role, text, source, started_at, ended_at, interrupted, latency FROM turns"
        " WHERE call_id = $1 ORDER BY idx", call_id)
    tools = await pool.fetch(
        "SELECT turn_idx, tool_call_id, name, arguments, result, duration_ms, error, created_at FROM tool_calls"
        " WHERE call_id = $1 ORDER BY id", call_id)
    findings = await pool.fetch(
        "SELECT turn_idx, entity_type, span_start, span_end, action FROM dlp_findings WHERE call_id = $1"
        " ORDER BY turn_idx, span_start", call_id)
    body = _call_json(call)
    body["turns"] = [{"index": t["idx"], "role": t["role"], "text": t["text"], "source": t["source"],
                      "started_at": _iso(t["started_at"]), "ended_at": _iso(t["ended_at"]),
                      "interrupted": t["interrupted"], "latency": json.loads(t["latency"])} for t in turns]
    body["tool_calls"] = [{"turn": t["turn_idx"], "id": t["tool_call_id"], "name": t["name"],
                           "arguments": json.loads(t["arguments"]),
                           "result": json.loads(t["result"]) if t["result"] is not None else None,
                           "duration_ms": t["duration_ms"], "error": t["error"]} for t in tools]
    body["dlp_findings"] = [{"turn": f["turn_idx"], "entity_type": f["entity_type"], "start": f["span_start"],
                             "end": f["span_end"], "action": f["action"]} for f in findings]
    return web.json_response(body)


# -- personas ---------------------------------------------------------------------------------
class TurnTaking(BaseModel):
    hangover_ms: int | None = Field(default=None, ge=100, le=3000)
    min_speech_ms: int | None = Field(default=None, ge=32, le=2000)
    barge_in_min_ms: int | None = Field(default=None, ge=100, le=5000)


def _valid_dlp_policy(value: dict[str, Any]) -> dict[str, Any]:
    DlpPolicy.from_config(value)  # raises ValueError naming what is wrong: a 422 for the field
    return value


def _valid_timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"unknown time zone {value!r}") from None
    return value


def _valid_tools(value: list[Any]) -> list[Any]:
    parse_tool_specs(value)  # raises ValueError naming the bad entry
    return value


class PersonaIn(BaseModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[\w .-]+$")
    system_prompt: str = Field(min_length=1, max_length=20_000)
    greeting: str = Field(default="", max_length=2000)
    language: str = Field(default="en", min_length=2, max_length=16)
    tts_voice: str | None = Field(default=None, max_length=100)
    llm_model: str | None = Field(default=None, max_length=200)
    llm_params: dict[str, Any] = Field(default_factory=dict)
    tools: Annotated[list[Any], AfterValidator(_valid_tools)] = Field(default_factory=list)
    knowledge_collections: list[str] = Field(default_factory=list)
    dlp_policy: Annotated[dict[str, Any], AfterValidator(_valid_dlp_policy)] = Field(default_factory=dict)
    turn_taking: TurnTaking = Field(default_factory=TurnTaking)
    is_default: bool = False
    timezone: Annotated[str, AfterValidator(_valid_timezone)] = "UTC"
    # Anonymous callers of this persona: whether the call page may get call tokens, and how many a minute per IP.
    call_tokens_enabled: bool = True
    call_tokens_per_minute: int | None = Field(default=None, ge=1, le=10_000)


_PERSONA_COLUMNS = ("id, name, system_prompt, greeting, language, tts_voice, llm_model, llm_params, tools,"
                    " knowledge_collections, dlp_policy, turn_taking, is_default, timezone, call_tokens_enabled,"
                    " call_tokens_per_minute, created_at, updated_at")
_JSON_FIELDS = ("llm_params", "tools", "dlp_policy", "turn_taking")


def _persona_json(row: asyncpg.Record) -> dict[str, Any]:
    body = dict(row)
    body["id"] = str(body["id"])
    for key in _JSON_FIELDS:
        body[key] = json.loads(body[key])
    body["created_at"], body["updated_at"] = _iso(body["created_at"]), _iso(body["updated_at"])
    return body


def _persona_args(p: PersonaIn) -> tuple[Any, ...]:
    return (p.name, p.system_prompt, p.greeting, p.language, p.tts_voice, p.llm_model, json.dumps(p.llm_params),
            json.dumps(p.tools), p.knowledge_collections, json.dumps(p.dlp_policy),
            p.turn_taking.model_dump_json(exclude_none=True), p.is_default, p.timezone, p.call_tokens_enabled,
            p.call_tokens_per_minute)


def _persona_id(request: web.Request) -> uuid.UUID:
    raw = request.match_info["persona_id"]
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise ApiError(404, f"no persona {raw}") from None


async def list_personas(request: web.Request) -> web.Response:
    await require(request, "viewer", "personas")
    limit = _limit(request)
    cursor = _decode_cursor(request.query.get("cursor"))
    rows = await _pool(request.app[SERVICES]).fetch(
        f"SELECT {_PERSONA_COLUMNS} FROM personas WHERE deleted_at IS NULL"
        " AND ($1::timestamptz IS NULL OR (created_at, id::text) > ($1, $2))"
        " ORDER BY created_at, id::text LIMIT $3",
        cursor[0] if cursor else None, cursor[1] if cursor else "", limit + 1)
    page = rows[:limit]
    next_cursor = _encode_cursor(page[-1]["created_at"], str(page[-1]["id"])) if len(rows) > limit else None
    return web.json_response({"personas": [_persona_json(r) for r in page], "next_cursor": next_cursor})


async def get_persona(request: web.Request) -> web.Response:
    await require(request, "viewer", "personas")
    persona_id = _persona_id(request)
    row = await _pool(request.app[SERVICES]).fetchrow(
        f"SELECT {_PERSONA_COLUMNS} FROM personas WHERE id = $1 AND deleted_at IS NULL", persona_id)
    if row is None:
        raise ApiError(404, f"no persona {persona_id}")
    return web.json_response(_persona_json(row))


async def _save_persona(request: web.Request, persona_id: uuid.UUID | None) -> web.Response:
    who = await require(request, "admin", "personas")
    body = await read_json_model(request, PersonaIn)
    pool = _pool(request.app[SERVICES])
    try:
        async with pool.acquire() as conn, conn.transaction():
            if body.is_default:  # one default at a time: taking it moves it
                await conn.execute("UPDATE personas SET is_default = false WHERE is_default AND deleted_at IS NULL"
                                   " AND id IS DISTINCT FROM $1", persona_id)
            if persona_id is None:
                row = await conn.fetchrow(
                    "INSERT INTO personas (name, system_prompt, greeting, language, tts_voice, llm_model, llm_params,"
                    " tools, knowledge_collections, dlp_policy, turn_taking, is_default, timezone, call_tokens_enabled,"
                    " call_tokens_per_minute) VALUES ($1, $2, $3, $4, $5, $6, $7::jsonb, $8::jsonb, $9, $10::jsonb,"
                    " $11::jsonb, $12, $13, $14, $15)"
                    f" RETURNING {_PERSONA_COLUMNS}", *_persona_args(body))
            else:
                row = await conn.fetchrow(
                    "UPDATE personas SET name = $1, system_prompt = $2, greeting = $3, language = $4,"
                    " tts_voice = $5, llm_model = $6, llm_params = $7::jsonb, tools = $8::jsonb,"
                    " knowledge_collections = $9, dlp_policy = $10::jsonb, turn_taking = $11::jsonb,"
                    " is_default = $12, timezone = $13, call_tokens_enabled = $14, call_tokens_per_minute = $15,"
                    " updated_at = now() WHERE id = $16 AND deleted_at IS NULL"
                    f" RETURNING {_PERSONA_COLUMNS}", *_persona_args(body), persona_id)
                if row is None:
                    raise ApiError(404, f"no persona {persona_id}")
            await audit(conn, who.name, "persona.create" if persona_id is None else "persona.update",
                        str(row["id"]), request.remote)
    except asyncpg.UniqueViolationError:
        raise ApiError(409, f"a persona named {body.name!r} already exists") from None
    return web.json_response(_persona_json(row), status=201 if persona_id is None else 200)


async def create_persona(request: web.Request) -> web.Response:
    return await _save_persona(request, None)


async def update_persona(request: web.Request) -> web.Response:
    return await _save_persona(request, _persona_id(request))


async def delete_persona(request: web.Request) -> web.Response:
    who = await require(request, "admin", "personas")
    persona_id = _persona_id(request)
    pool = _pool(request.app[SERVICES])
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT is_default FROM personas WHERE id = $1 AND deleted_at IS NULL", persona_id)
        if row is None:
            raise ApiError(404, f"no persona {persona_id}")
        if row["is_default"]:
            raise ApiError(409, "the default persona cannot be deleted; make another one the default first")
        await conn.execute("UPDATE personas SET deleted_at = now() WHERE id = $1", persona_id)
        await audit(conn, who.name, "persona.delete", str(persona_id), request.remote)
    return web.Response(status=204)


def routes() -> list[web.RouteDef]:
    return [
        web.get("/api/calls", list_calls),
        web.get("/api/calls/{call_id}", get_call),
        web.get("/api/personas", list_personas),
        web.post("/api/personas", create_persona),
        web.get("/api/personas/{persona_id}", get_persona),
        web.put("/api/personas/{persona_id}", update_persona),
        web.delete("/api/personas/{persona_id}", delete_persona),
    ]
