"""Personas: list, read (viewer); create, replace, delete (admin). Bodies are validated before they are stored."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import asyncpg
from aiohttp import web
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from pono.agent.dlp.engine import DlpPolicy
from pono.agent.tools.specs import parse_tool_specs
from pono.context import SERVICES
from pono.http import ApiError, read_json_model
from pono.settings import MIN_SPEECH_MAX_MS
from pono.storage import personas as stored
from pono.timecheck import check_timezone
from pono.voice.speech.languages import whisper_language
from pono.web.access import require
from pono.web.params import database, decode_cursor, iso, page_limit, paginate, path_uuid


class TurnTaking(BaseModel):
    """A persona's turn-taking; unset fields follow the server's PONO_* settings. Strict: "300" is not 300, and
    a misspelt field is refused, not ignored."""

    model_config = ConfigDict(extra="forbid", strict=True)

    hangover_ms: int | None = Field(default=None, ge=100, le=3000)
    min_speech_ms: int | None = Field(default=None, ge=32, le=MIN_SPEECH_MAX_MS)
    barge_in_min_ms: int | None = Field(default=None, ge=100, le=5000)
    # The end-of-turn model (on unless PONO_END_OF_TURN_MODEL=false): its threshold and the two hangovers.
    end_of_turn: bool | None = None
    end_of_turn_threshold: float | None = Field(default=None, gt=0.0, lt=1.0)
    short_hangover_ms: int | None = Field(default=None, ge=64, le=2000)
    long_hangover_ms: int | None = Field(default=None, ge=200, le=5000)

    @model_validator(mode="after")
    def _short_before_long(self) -> TurnTaking:
        if self.short_hangover_ms and self.long_hangover_ms and self.short_hangover_ms >= self.long_hangover_ms:
            raise ValueError("short_hangover_ms must be shorter than long_hangover_ms")
        return self


def _valid_dlp_policy(value: dict[str, Any]) -> dict[str, Any]:
    DlpPolicy.from_config(value)  # raises ValueError naming what is wrong: a 422 for the field
    return value


def _valid_language(value: str) -> str:
    whisper_language(value)  # raises ValueError naming the tag: a 422 for the field
    return value


def _valid_timezone(value: str) -> str:
    return check_timezone(value)  # raises ValueError (a 422), also for "Europe", "__pycache__", very long names


def _valid_tools(value: list[Any]) -> list[Any]:
    parse_tool_specs(value)  # raises ValueError naming the bad entry
    return value


class LlmParams(BaseModel):
    """The LLM settings a persona may set; anything else is refused (it would reach the LLM request)."""

    model_config = ConfigDict(extra="forbid")

    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    max_tokens: int | None = Field(default=None, ge=1, le=8192)


class PersonaIn(BaseModel):
    name: str = Field(min_length=1, max_length=100, pattern=r"^[\w .-]+$")
    system_prompt: str = Field(min_length=1, max_length=20_000)
    greeting: str = Field(default="", max_length=2000)
    language: Annotated[str, AfterValidator(_valid_language)] = Field(default="en", min_length=2, max_length=16)
    tts_voice: str | None = Field(default=None, max_length=100)
    llm_model: str | None = Field(default=None, max_length=200)
    llm_params: LlmParams = Field(default_factory=LlmParams)
    tools: Annotated[list[Any], AfterValidator(_valid_tools)] = Field(default_factory=list)
    knowledge_collections: list[str] = Field(default_factory=list)
    dlp_policy: Annotated[dict[str, Any], AfterValidator(_valid_dlp_policy)] = Field(default_factory=dict)
    turn_taking: TurnTaking = Field(default_factory=TurnTaking)
    is_default: bool = False
    timezone: Annotated[str, AfterValidator(_valid_timezone)] = "UTC"
    # Anonymous callers of this persona: whether the call page may get call tokens, and how many a minute per IP.
    call_tokens_enabled: bool = True
    call_tokens_per_minute: int | None = Field(default=None, ge=1, le=10_000)
    # Call recordings: off, on, or on with `recording_notice` said before the greeting (consent); spoken
    # personal data is replaced by a tone or silence; kept `recording_retention_days` (None: PONO_RETENTION_DAYS).
    recording: Literal["off", "on", "announce"] = "off"
    recording_notice: str = Field(default="", max_length=1000)
    recording_redaction: Literal["tone", "silence"] = "tone"
    recording_retention_days: int | None = Field(default=None, ge=1, le=36_500)


# Tool settings that may hold a credential. A persona can no longer be given them (tools name operator-side
# servers and PONO_WEBHOOK_SECRET_* variables instead), but a row saved before that may still carry them:
# they are write-only, never shown back.
SECRET_TOOL_KEYS = frozenset({"env", "headers", "secret", "token", "password", "api_key", "authorization"})
REDACTED = "[redacted]"


def _redact_tool(tool: Any) -> Any:
    if not isinstance(tool, dict):
        return tool
    return {k: (REDACTED if k.lower() in SECRET_TOOL_KEYS else v) for k, v in tool.items()}


def _persona_json(persona: dict[str, Any]) -> dict[str, Any]:
    """A persona as the API shows it: times in ISO 8601, credentials in tool settings redacted."""
    tools = persona.get("tools")
    shown = [_redact_tool(t) for t in tools] if isinstance(tools, list) else tools
    return {**persona, "tools": shown, "created_at": iso(persona["created_at"]),
            "updated_at": iso(persona["updated_at"])}


async def list_personas(request: web.Request) -> web.Response:
    """GET /api/personas?limit=&cursor= (viewer, personas): oldest first."""
    await require(request, "viewer", "personas")
    limit = page_limit(request)
    cursor = decode_cursor(request.query.get("cursor"))
    rows = await stored.list_personas(database(request), cursor, limit + 1)
    page, next_cursor = paginate(rows, limit, "created_at")
    return web.json_response({"personas": [_persona_json(r) for r in page], "next_cursor": next_cursor})


async def get_persona(request: web.Request) -> web.Response:
    """GET /api/personas/{persona_id} (viewer, personas)."""
    await require(request, "viewer", "personas")
    persona_id = path_uuid(request, "persona_id", "persona")
    persona = await stored.get_persona(database(request), persona_id)
    if persona is None:
        raise ApiError(404, f"no persona {persona_id}")
    return web.json_response(_persona_json(persona))


async def _save_persona(request: web.Request, persona_id: uuid.UUID | None) -> web.Response:
    who = await require(request, "admin", "personas")
    body = await read_json_model(request, PersonaIn)
    try:  # a stdio MCP server must be one the operator configured (PONO_MCP_SERVERS), known at save time
        parse_tool_specs(body.tools, known_servers=request.app[SERVICES].settings.mcp_servers)
    except ValueError as exc:
        raise ApiError(422, "invalid request body", fields=[{"field": "tools", "message": str(exc)}]) from None
    settings = request.app[SERVICES].settings  # one hangover set here, the other the server's: still in order
    short = body.turn_taking.short_hangover_ms or settings.short_hangover_ms
    long = body.turn_taking.long_hangover_ms or settings.long_hangover_ms
    check, recheck = settings.end_of_turn_check_ms, settings.end_of_turn_recheck_ms
    # The order Settings._turn_taking holds the server's own to: check < short < long, and recheck (0: off) < long.
    problems = [message for broken, message in (
        (short >= long, f"short_hangover_ms ({short}) must be shorter than long_hangover_ms ({long})"),
        (short <= check, f"short_hangover_ms ({short}) must be longer than PONO_END_OF_TURN_CHECK_MS ({check})"),
        (0 < recheck and long <= recheck,
         f"long_hangover_ms ({long}) must be longer than PONO_END_OF_TURN_RECHECK_MS ({recheck})")) if broken]
    if problems:
        raise ApiError(422, "invalid request body", fields=[{"field": "turn_taking", "message": problems[0]}])
    values = {**body.model_dump(), "turn_taking": body.turn_taking.model_dump(exclude_none=True),
              "llm_params": body.llm_params.model_dump(exclude_none=True)}
    try:
        persona = await stored.save_persona(database(request), persona_id, values, who.name, request.remote)
    except stored.PersonaNotFound:
        raise ApiError(404, f"no persona {persona_id}") from None
    except asyncpg.UniqueViolationError:
        raise ApiError(409, f"a persona named {body.name!r} already exists") from None
    await request.app[SERVICES].storage.persona_cache.remember(persona)  # what calls get during an outage
    return web.json_response(_persona_json(persona), status=201 if persona_id is None else 200)


async def create_persona(request: web.Request) -> web.Response:
    """POST /api/personas (admin, personas): a PersonaIn body; 201 with the stored persona, 409 on a taken name."""
    return await _save_persona(request, None)


async def update_persona(request: web.Request) -> web.Response:
    """PUT /api/personas/{persona_id} (admin, personas): replaces every field; 404, 409 on a taken name."""
    return await _save_persona(request, path_uuid(request, "persona_id", "persona"))


async def delete_persona(request: web.Request) -> web.Response:
    """DELETE /api/personas/{persona_id} (admin, personas): 204; 409 for the default persona."""
    who = await require(request, "admin", "personas")
    persona_id = path_uuid(request, "persona_id", "persona")
    try:
        await stored.delete_persona(database(request), persona_id, who.name, request.remote)
    except stored.PersonaNotFound:
        raise ApiError(404, f"no persona {persona_id}") from None
    except stored.DefaultPersonaKept:
        raise ApiError(409, "the default persona cannot be deleted; make another one the default first") from None
    await request.app[SERVICES].storage.persona_cache.forget(str(persona_id))
    return web.Response(status=204)
