"""The nightly report: one day's calls, minutes, p95 latency, barge-ins and failures, kept in `reports`."""

from __future__ import annotations

import json
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

import asyncpg

# An agent turn that answers speech: its latency marks start at the caller's end of speech. Greetings (no caller
# before them) and replies to typed text have first_audio_sent too, within tens of ms: counted, they made the
# voice-to-voice figures look several times better than they were (a review's dashboard showed p50 0.23 s for 1.06).
VOICE_TO_VOICE = "(t.latency ? 'first_audio_sent' AND t.latency ? 'speech_end')"


def voice_to_voice_percentile(fraction: float) -> str:
    """SQL: the `fraction` percentile (0..1) of voice-to-voice seconds over the agent turns `t` of a query,
    counting only the turns that answer speech (VOICE_TO_VOICE), as the dashboard and this report both show it."""
    return (f"percentile_cont({fraction}) WITHIN GROUP (ORDER BY (t.latency->>'first_audio_sent')::float8)"
            f" FILTER (WHERE {VOICE_TO_VOICE})")


async def daily_report(pool: asyncpg.Pool, day: date) -> dict[str, Any]:
    """The figures for calls that started on `day` (UTC), stored (replacing an earlier report of that day) and
    returned: {"day": ISO date, "calls": int, "minutes": float, "p95_first_audio_s": float | None (caller's end
    of speech to the agent's first audio, agent turns that answer speech), "barge_ins": int (agent turns cut
    off), "failed_calls": int (ended with reason "error"), "failed_workflow_runs": int}. Deleted calls, and their
    turns, are not counted."""
    start = datetime.combine(day, time(), UTC)
    end = start + timedelta(days=1)
    row = await pool.fetchrow(
        "SELECT count(*) AS calls,"
        " coalesce(sum(extract(epoch FROM ended_at - started_at)) / 60, 0) AS minutes,"
        " count(*) FILTER (WHERE end_reason = 'error') AS failed_calls"
        " FROM calls WHERE started_at >= $1 AND started_at < $2 AND deleted_at IS NULL", start, end)
    turns = await pool.fetchrow(
        f"SELECT {voice_to_voice_percentile(0.95)} AS p95,"
        " count(*) FILTER (WHERE t.interrupted) AS barge_ins"
        " FROM turns t JOIN calls c ON c.id = t.call_id"
        " WHERE c.started_at >= $1 AND c.started_at < $2 AND c.deleted_at IS NULL AND t.role = 'agent'",
        start, end)
    failed_runs = await pool.fetchval(
        "SELECT count(*) FROM workflow_runs WHERE status = 'failed' AND created_at >= $1 AND created_at < $2",
        start, end)
    body = {"day": day.isoformat(), "calls": row["calls"], "minutes": round(float(row["minutes"]), 2),
            "p95_first_audio_s": None if turns["p95"] is None else round(float(turns["p95"]), 3),
            "barge_ins": turns["barge_ins"], "failed_calls": row["failed_calls"], "failed_workflow_runs": failed_runs}
    await pool.execute("INSERT INTO reports (kind, period, body) VALUES ('nightly', $1, $2::jsonb)"
                       " ON CONFLICT (kind, period) DO UPDATE SET body = EXCLUDED.body, created_at = now()",
                       day, json.dumps(body))
    return body


def _report(row: asyncpg.Record) -> dict[str, Any]:
    return {"id": row["id"], "day": row["period"], "body": json.loads(row["body"]), "created_at": row["created_at"]}


async def list_reports(pool: asyncpg.Pool, before: date | None, count: int) -> list[dict[str, Any]]:
    """Up to `count` nightly reports, newest day first, of the days before `before` (all when None): each
    {"id", "day" (a date), "body" (as `daily_report` returned it), "created_at"}."""
    rows = await pool.fetch(
        "SELECT id, period, body, created_at FROM reports WHERE kind = 'nightly'"
        " AND ($1::date IS NULL OR period < $1) ORDER BY period DESC LIMIT $2", before, count)
    return [_report(r) for r in rows]


async def get_report(pool: asyncpg.Pool, day: date) -> dict[str, Any] | None:
    """The nightly report of `day` (as `list_reports` gives them), or None when there is none."""
    row = await pool.fetchrow(
        "SELECT id, period, body, created_at FROM reports WHERE kind = 'nightly' AND period = $1", day)
    return None if row is None else _report(row)
