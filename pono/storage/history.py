"""Call history: the stored calls, their turns, tool calls and DLP findings (all as stored: redacted)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import asyncpg

_CALL_COLUMNS = "id, transport, persona, caller, replica, started_at, ended_at, end_reason"


async def find_calls(pool: asyncpg.Pool, *, persona: str | None, since: datetime | None, until: datetime | None,
                     ended_only: bool, text: str | None, before: tuple[datetime, str] | None,
                     count: int) -> list[dict[str, Any]]:
    """Up to `count` calls, newest first (by start time, then id), not deleted.

    Filters: `persona` name; started at or after `since` and before `until` (timezone-aware); ended ones only;
    `text`, a web-search query over the stored turns ("quoted phrase", or, -word; a turn that holds the text as
    typed matches too, since the web-search syntax splits "db.example.com:5432" apart); and `before`, a
    (started_at, id) position to continue after. Each call is {"id", "transport", "persona", "caller", "replica",
    "started_at": datetime, "ended_at": datetime | None, "end_reason": str | None}.
    """
    rows = await pool.fetch(
        f"SELECT {_CALL_COLUMNS} FROM calls"
        " WHERE deleted_at IS NULL"
        "   AND ($1::text IS NULL OR persona = $1)"
        "   AND ($2::timestamptz IS NULL OR started_at >= $2)"
        "   AND ($3::boolean IS FALSE OR ended_at IS NOT NULL)"
        "   AND ($4::timestamptz IS NULL OR (started_at, id) < ($4, $5))"
        "   AND ($7::timestamptz IS NULL OR started_at < $7)"
        "   AND ($8::text IS NULL OR EXISTS (SELECT 1 FROM turns t WHERE t.call_id = calls.id"
        "        AND (t.text_search @@ websearch_to_tsquery('english', $8)"
        "             OR t.text_search @@ phraseto_tsquery('english', $8))))"
        " ORDER BY started_at DESC, id DESC LIMIT $6",
        persona, since, ended_only, before[0] if before else None, before[1] if before else "", count,
        until, text)
    return [dict(r) for r in rows]


async def find_call(pool: asyncpg.Pool, call_id: str) -> dict[str, Any] | None:
    """One call as `find_calls` gives it, or None when there is none (or it was deleted)."""
    row = await pool.fetchrow(f"SELECT {_CALL_COLUMNS} FROM calls WHERE id = $1 AND deleted_at IS NULL", call_id)
    return dict(row) if row is not None else None


async def call_turns(pool: asyncpg.Pool, call_id: str) -> list[dict[str, Any]]:
    """A call's turns in order: {"idx": int, "role": "user" | "agent", "text" (redacted), "source",
    "started_at", "ended_at": datetime | None, "interrupted": bool, "truncated": bool (the LLM broke off),
    "latency": {mark: seconds}}."""
    rows = await pool.fetch(
        "SELECT idx, role, text, source, started_at, ended_at, interrupted, truncated, latency FROM turns"
        " WHERE call_id = $1 ORDER BY idx", call_id)
    return [{**dict(r), "latency": json.loads(r["latency"])} for r in rows]


async def call_tool_calls(pool: asyncpg.Pool, call_id: str) -> list[dict[str, Any]]:
    """A call's tool calls in the order made: {"turn_idx", "tool_call_id", "name", "arguments": JSON,
    "result": JSON | None, "duration_ms": float | None, "error": str | None, "created_at": datetime}."""
    rows = await pool.fetch(
        "SELECT turn_idx, tool_call_id, name, arguments, result, duration_ms, error, created_at FROM tool_calls"
        " WHERE call_id = $1 ORDER BY id", call_id)
    return [{**dict(r), "arguments": json.loads(r["arguments"]),
             "result": json.loads(r["result"]) if r["result"] is not None else None} for r in rows]


async def call_dlp_findings(pool: asyncpg.Pool, call_id: str) -> list[dict[str, Any]]:
    """What DLP found in a call's turns, by turn then position: {"turn_idx", "entity_type", "span_start",
    "span_end" (character offsets in the original text), "action", "channel" ("" in the transcript; "caller" or
    "agent" for a span replaced in the recording), "audio_start_ms", "audio_end_ms" (in the recording, or None)}."""
    rows = await pool.fetch(
        "SELECT turn_idx, entity_type, span_start, span_end, action, channel, audio_start_ms, audio_end_ms"
        " FROM dlp_findings WHERE call_id = $1 ORDER BY turn_idx, span_start, channel", call_id)
    return [dict(r) for r in rows]
