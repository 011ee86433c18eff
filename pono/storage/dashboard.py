"""The console dashboard's figures from Postgres: calls per hour, voice-to-voice latency, barge-ins, errors and
DLP findings over the last hours. The live figure (active calls) comes from the Redis registry, in pono.web.

Hours are UTC hours, numbered as unix seconds // 3600. Calls count by when they started, turns (latency,
barge-ins) by when they started, DLP findings by when they were written; deleted calls never count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from pono.storage.reports import VOICE_TO_VOICE, voice_to_voice_percentile

ERROR_REASON = "error"  # the end reason of a call that failed (as the nightly report counts it)
LOST_AFTER_S = 60  # a call with no end stored this long after it started, and not live, was lost with its replica


@dataclass(frozen=True)
class Window:
    """The last `hours` whole or partial UTC hours up to `until`: hours `first`..`last` (unix s // 3600)."""

    until: datetime
    hours: int

    @property
    def last(self) -> int:
        return math.floor(self.until.timestamp() / 3600)

    @property
    def first(self) -> int:
        return self.last - self.hours + 1

    @property
    def since(self) -> datetime:
        """The start of the first hour (timezone-aware, UTC)."""
        return datetime.fromtimestamp(self.first * 3600, UTC)


def _hour_keyed(rows: list[asyncpg.Record]) -> dict[int, asyncpg.Record]:
    return {int(r["hour"]): r for r in rows if r["hour"] is not None}


def _seconds(value: float | None) -> float | None:
    return None if value is None else round(float(value), 3)


async def dashboard_figures(pool: asyncpg.Pool, window: Window, persona: str | None) -> dict[str, Any]:
    """The figures for calls of `persona` (None: every persona) in `window`.

    Returns {"since", "until": datetime, "totals": {"calls", "ended", "errors", "barge_ins", "agent_turns",
    "voice_to_voice_p50_s", "voice_to_voice_p95_s" (float s | None), "latency_turns"}, "hourly": [one per hour,
    oldest first: {"hour": datetime (its start), "calls", "errors", "barge_ins", "agent_turns", "latency_turns",
    "p50_s", "p95_s" (float s | None)}], "end_reasons": {reason: calls ("" while not ended)}, "unended":
    [call ids with no end stored that started over LOST_AFTER_S ago, at most 10,000], "dlp_findings":
    [{"entity_type", "transcript": int (found in text), "audio": int (spans replaced in recordings)}, most first]}.

    Voice-to-voice is an agent turn's `first_audio_sent` latency mark, for turns that answer speech (they have a
    `speech_end` mark; greetings and replies to typed text do not count): seconds from the caller's end of speech
    to the first audio of the reply sent. A barge-in is an agent turn the caller interrupted.
    """
    since, until = window.since, window.until
    calls = await pool.fetch(
        "SELECT floor(extract(epoch FROM started_at) / 3600)::bigint AS hour, count(*) AS calls,"
        " count(*) FILTER (WHERE end_reason = $4) AS errors, count(ended_at) AS ended"
        " FROM calls WHERE deleted_at IS NULL AND started_at >= $1 AND started_at <= $2"
        " AND ($3::text IS NULL OR persona = $3)"
        " GROUP BY GROUPING SETS ((floor(extract(epoch FROM started_at) / 3600)::bigint), ())",
        since, until, persona, ERROR_REASON)
    turns = await pool.fetch(
        "SELECT floor(extract(epoch FROM t.started_at) / 3600)::bigint AS hour, count(*) AS agent_turns,"
        " count(*) FILTER (WHERE t.interrupted) AS barge_ins,"
        f" count(*) FILTER (WHERE {VOICE_TO_VOICE}) AS latency_turns,"
        f" {voice_to_voice_percentile(0.5)} AS p50, {voice_to_voice_percentile(0.95)} AS p95"
        " FROM turns t JOIN calls c ON c.id = t.call_id"
        " WHERE t.role = 'agent' AND c.deleted_at IS NULL AND t.started_at >= $1 AND t.started_at <= $2"
        " AND ($3::text IS NULL OR c.persona = $3)"
        " GROUP BY GROUPING SETS ((floor(extract(epoch FROM t.started_at) / 3600)::bigint), ())",
        since, until, persona)
    reasons = await pool.fetch(
        "SELECT coalesce(end_reason, '') AS reason, count(*) AS calls FROM calls"
        " WHERE deleted_at IS NULL AND started_at >= $1 AND started_at <= $2 AND ($3::text IS NULL OR persona = $3)"
        " GROUP BY 1 ORDER BY 2 DESC, 1", since, until, persona)
    unended = await pool.fetch(
        "SELECT id FROM calls WHERE deleted_at IS NULL AND ended_at IS NULL AND started_at >= $1"
        " AND started_at <= $2 AND ($3::text IS NULL OR persona = $3) ORDER BY started_at DESC LIMIT 10000",
        since, min(until, datetime.now(UTC) - timedelta(seconds=LOST_AFTER_S)), persona)
    findings = await pool.fetch(
        "SELECT f.entity_type, count(*) FILTER (WHERE f.channel = '') AS transcript,"
        " count(*) FILTER (WHERE f.channel <> '') AS audio"
        " FROM dlp_findings f JOIN calls c ON c.id = f.call_id"
        " WHERE c.deleted_at IS NULL AND f.created_at >= $1 AND f.created_at <= $2"
        " AND ($3::text IS NULL OR c.persona = $3)"
        " GROUP BY 1 ORDER BY count(*) DESC, 1 LIMIT 50", since, until, persona)

    call_hours, turn_hours = _hour_keyed(calls), _hour_keyed(turns)
    call_total = next((r for r in calls if r["hour"] is None), None)
    turn_total = next((r for r in turns if r["hour"] is None), None)
    hourly = []
    for hour in range(window.first, window.last + 1):
        c, t = call_hours.get(hour), turn_hours.get(hour)
        hourly.append({"hour": datetime.fromtimestamp(hour * 3600, UTC),
                       "calls": c["calls"] if c else 0, "errors": c["errors"] if c else 0,
                       "barge_ins": t["barge_ins"] if t else 0, "agent_turns": t["agent_turns"] if t else 0,
                       "latency_turns": t["latency_turns"] if t else 0,
                       "p50_s": _seconds(t["p50"]) if t else None, "p95_s": _seconds(t["p95"]) if t else None})
    totals = {"calls": call_total["calls"] if call_total else 0, "ended": call_total["ended"] if call_total else 0,
              "errors": call_total["errors"] if call_total else 0,
              "barge_ins": turn_total["barge_ins"] if turn_total else 0,
              "agent_turns": turn_total["agent_turns"] if turn_total else 0,
              "latency_turns": turn_total["latency_turns"] if turn_total else 0,
              "voice_to_voice_p50_s": _seconds(turn_total["p50"]) if turn_total else None,
              "voice_to_voice_p95_s": _seconds(turn_total["p95"]) if turn_total else None}
    return {"since": since, "until": until, "totals": totals, "hourly": hourly,
            "end_reasons": {r["reason"]: r["calls"] for r in reasons},
            "unended": [r["id"] for r in unended],
            "dlp_findings": [{"entity_type": r["entity_type"], "transcript": r["transcript"], "audio": r["audio"]}
                             for r in findings]}
