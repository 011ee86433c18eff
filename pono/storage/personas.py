"""Personas as stored: find, page through, create, update and (softly) delete them.

A persona is a plain dict: {"id": str (UUID), "name", "system_prompt", "greeting", "language", "tts_voice",
"llm_model", "llm_params": dict, "tools": list, "knowledge_collections": list[str], "dlp_policy": dict,
"turn_taking": dict, "is_default": bool, "timezone", "call_tokens_enabled": bool,
"call_tokens_per_minute": int | None, "recording": "off"|"on"|"announce", "recording_notice",
"recording_redaction": "tone"|"silence", "recording_retention_days": int | None, "created_at", "updated_at": datetime}.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import asyncpg

from pono.storage.audit import save_audited, write_audit
from pono.storage.db import live_rows_oldest_first

_COLUMNS = ("id, name, system_prompt, greeting, language, tts_voice, llm_model, llm_params, tools,"
            " knowledge_collections, dlp_policy, turn_taking, is_default, timezone, call_tokens_enabled,"
            " call_tokens_per_minute, recording, recording_notice, recording_redaction, recording_retention_days,"
            " created_at, updated_at")
_JSON_FIELDS = ("llm_params", "tools", "dlp_policy", "turn_taking")
# What save_persona stores: these, then the recording fields (absent ones take these defaults).
_FIELDS = ("name", "system_prompt", "greeting", "language", "tts_voice", "llm_model", "llm_params", "tools",
           "knowledge_collections", "dlp_policy", "turn_taking", "is_default", "timezone", "call_tokens_enabled",
           "call_tokens_per_minute")
_RECORDING_DEFAULTS = {"recording": "off", "recording_notice": "", "recording_redaction": "tone",
                       "recording_retention_days": None}


class PersonaNotFound(LookupError):
    """No persona with that id (or it was deleted)."""


class DefaultPersonaKept(Exception):
    """The default persona cannot be deleted; another must become the default first."""


def _persona(row: asyncpg.Record) -> dict[str, Any]:
    persona = dict(row)
    persona["id"] = str(persona["id"])
    for key in _JSON_FIELDS:
        persona[key] = json.loads(persona[key])
    return persona


def _fields(p: dict[str, Any]) -> dict[str, Any]:
    """The stored fields of a persona, column → value (the recording ones may be absent: their defaults)."""
    return {**{f: p[f] for f in _FIELDS}, **{f: p.get(f, default) for f, default in _RECORDING_DEFAULTS.items()}}


async def find_persona(pool: asyncpg.Pool, ref: str | None) -> dict[str, Any] | None:
    """The persona whose id or name is `ref`, or the default one when `ref` is None; None when there is none."""
    if ref is None:
        row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM personas WHERE is_default AND deleted_at IS NULL")
    else:
        try:
            persona_id = uuid.UUID(ref)
        except ValueError:
            persona_id = None
        row = await pool.fetchrow(
            f"SELECT {_COLUMNS} FROM personas WHERE deleted_at IS NULL AND (id = $1 OR name = $2)", persona_id, ref)
    return _persona(row) if row is not None else None


async def get_persona(pool: asyncpg.Pool, persona_id: uuid.UUID) -> dict[str, Any] | None:
    """The persona with this id, or None (also when deleted)."""
    row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM personas WHERE id = $1 AND deleted_at IS NULL", persona_id)
    return _persona(row) if row is not None else None


async def list_personas(pool: asyncpg.Pool, after: tuple[datetime, str] | None, count: int) -> list[dict[str, Any]]:
    """Up to `count` personas, oldest first, continuing after the (created_at, id) position `after`."""
    return [_persona(r) for r in await live_rows_oldest_first(pool, "personas", _COLUMNS, after, count)]


async def save_persona(pool: asyncpg.Pool, persona_id: uuid.UUID | None, values: dict[str, Any], actor: str,
                       source_ip: str | None) -> dict[str, Any]:
    """Create (`persona_id` None) or replace a persona, and audit it, in one transaction; the saved persona.

    `values` holds every stored field but the id and times. A new default takes the flag from the old one.
    Raises PersonaNotFound (nothing changed), asyncpg.UniqueViolationError when the name is taken.
    """
    async with pool.acquire() as conn, conn.transaction():
        if values["is_default"]:  # one default at a time: taking it moves it
            await conn.execute("UPDATE personas SET is_default = false WHERE is_default AND deleted_at IS NULL"
                               " AND id IS DISTINCT FROM $1", persona_id)
        row = await save_audited(conn, "personas", persona_id, _fields(values), _COLUMNS, jsonb=_JSON_FIELDS,
                                 actor=actor, kind="persona", source_ip=source_ip)
        if row is None:
            raise PersonaNotFound(str(persona_id))  # rolls back the default's move too
    return _persona(row)


async def delete_persona(pool: asyncpg.Pool, persona_id: uuid.UUID, actor: str, source_ip: str | None) -> None:
    """Mark a persona deleted (purged after retention) and audit it, in one transaction.

    Raises PersonaNotFound, or DefaultPersonaKept for the default persona.
    """
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT is_default FROM personas WHERE id = $1 AND deleted_at IS NULL", persona_id)
        if row is None:
            raise PersonaNotFound(str(persona_id))
        if row["is_default"]:
            raise DefaultPersonaKept(str(persona_id))
        await conn.execute("UPDATE personas SET deleted_at = now() WHERE id = $1", persona_id)
        await write_audit(conn, actor, "persona.delete", str(persona_id), source_ip)
