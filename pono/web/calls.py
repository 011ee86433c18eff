"""Calls: the live ones (from the registry, every replica) and the history (from Postgres), one call in full."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from aiohttp import web
from redis.exceptions import RedisError

from pono.context import SERVICES
from pono.http import ApiError
from pono.storage.history import call_dlp_findings, call_tool_calls, call_turns, find_call, find_calls
from pono.storage.recordings import find_recording
from pono.storage.workflow_runs import call_summary, list_runs
from pono.web.access import require
from pono.web.params import database, decode_cursor, iso, page_limit, paginate
from pono.web.workflows import runs_with_steps


def _time(raw: str | None, field: str) -> datetime | None:
    """?since= / ?until=: ISO 8601 (UTC when it has no zone) or unix seconds. Raises ApiError 422."""
    if not raw:
        return None
    try:
        value = datetime.fromtimestamp(float(raw), UTC) if raw.replace(".", "", 1).isdigit() \
            else datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(422, "invalid query", fields=[{"field": field, "message": "ISO 8601 time or unix seconds"}]) \
            from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _call_json(call: dict[str, Any]) -> dict[str, Any]:
    return {"id": call["id"], "transport": call["transport"], "persona": call["persona"], "caller": call["caller"],
            "replica": call["replica"], "started_at": iso(call["started_at"]), "ended_at": iso(call["ended_at"]),
            "end_reason": call["end_reason"]}


async def list_calls(request: web.Request) -> web.Response:
    """GET /api/calls?state=live|ended&persona=&since=&until=&q=&limit=&cursor= (viewer, calls)."""
    await require(request, "viewer", "calls")
    services = request.app[SERVICES]
    state = request.query.get("state")
    persona = request.query.get("persona") or None
    limit = page_limit(request)
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

    cursor = decode_cursor(request.query.get("cursor"))
    since = _time(request.query.get("since"), "since")
    until = _time(request.query.get("until"), "until")
    text = request.query.get("q") or None  # full-text search over the stored (redacted) turns
    if text is not None and len(text) > 500:
        raise ApiError(422, "invalid query", fields=[{"field": "q", "message": "at most 500 characters"}])
    rows = await find_calls(database(request), persona=persona, since=since, until=until, ended_only=state == "ended",
                            text=text, before=cursor, count=limit + 1)
    page, next_cursor = paginate(rows, limit, "started_at")
    return web.json_response({"calls": [_call_json(r) for r in page], "next_cursor": next_cursor})


async def get_call(request: web.Request) -> web.Response:
    """GET /api/calls/{call_id} (viewer, calls): the call with its turns, tool calls, DLP findings, summary (from a
    workflow's summarize step, or null) and workflow runs (the newest 50, with their steps; `workflow_runs_next`,
    the link to the rest, or null)."""
    await require(request, "viewer", "calls")
    call_id = request.match_info["call_id"]
    pool = database(request)
    call = await find_call(pool, call_id)
    if call is None:
        raise ApiError(404, f"no call {call_id}")
    turns = await call_turns(pool, call_id)
    tools = await call_tool_calls(pool, call_id)
    findings = await call_dlp_findings(pool, call_id)
    body = _call_json(call)
    body["turns"] = [{"index": t["idx"], "role": t["role"], "text": t["text"], "source": t["source"],
                      "started_at": iso(t["started_at"]), "ended_at": iso(t["ended_at"]),
                      "interrupted": t["interrupted"], "truncated": t["truncated"], "latency": t["latency"]}
                     for t in turns]
    body["tool_calls"] = [{"turn": t["turn_idx"], "id": t["tool_call_id"], "name": t["name"],
                           "arguments": t["arguments"], "result": t["result"],
                           "duration_ms": t["duration_ms"], "error": t["error"]} for t in tools]
    body["dlp_findings"] = [{"turn": f["turn_idx"], "entity_type": f["entity_type"], "start": f["span_start"],
                             "end": f["span_end"], "action": f["action"],
                             **({"channel": f["channel"], "audio_start_ms": f["audio_start_ms"],
                                 "audio_end_ms": f["audio_end_ms"]} if f["channel"] else {})} for f in findings]
    recording = await find_recording(pool, call_id)
    body["recording"] = None if recording is None else {
        "url": f"/api/calls/{call_id}/recording", "codec": recording["codec"], "status": recording["status"],
        "duration_s": recording["duration_s"], "size": recording["size_bytes"], "sha256": recording["sha256"]}
    summary = await call_summary(pool, call_id)
    body["summary"] = None if summary is None else {**summary, "created_at": iso(summary["created_at"])}
    # The newest 50 runs; `workflow_runs_next` (null when that is all) pages on through the rest.
    found, next_cursor = paginate(await list_runs(pool, call_id=call_id, count=51), 50, "created_at")
    body["workflow_runs"] = await runs_with_steps(pool, found)
    body["workflow_runs_next"] = None if next_cursor is None else \
        f"/api/workflow-runs?{urlencode({'call_id': call_id, 'cursor': next_cursor})}"
    return web.json_response(body)

