"""The console dashboard: GET /api/dashboard draws live and recent figures from Pono's own data (the Redis call
registry and Postgres), so it works without Prometheus."""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any

from aiohttp import web
from redis.exceptions import RedisError

from pono.context import SERVICES
from pono.http import ApiError
from pono.storage.dashboard import Window, dashboard_figures
from pono.web.access import require
from pono.web.params import database, iso, query_int

MAX_HOURS = 168  # a week


async def active_calls(request: web.Request, persona: str | None) -> dict[str, Any]:
    """The live calls on every replica (of `persona`, when given): {"available": bool (False: Redis is away),
    "total": int | None, "by_state": {state: calls}, "by_transport": {transport: calls}, "operator_requested":
    int, "ids": [call ids]}."""
    live = request.app[SERVICES].storage.live
    try:
        calls = await live.live_calls() if live is not None else None
    except (RedisError, OSError):
        calls = None
    if calls is None:
        return {"available": False, "total": None, "by_state": {}, "by_transport": {}, "operator_requested": 0,
                "ids": []}
    calls = [c for c in calls if persona is None or c.get("persona") == persona]
    return {"available": True, "total": len(calls),
            "by_state": dict(Counter(c.get("state", "") for c in calls).most_common()),
            "by_transport": dict(Counter(c.get("transport", "") for c in calls).most_common()),
            "operator_requested": sum(1 for c in calls if c.get("operator_requested")),
            "ids": [c["call_id"] for c in calls if c.get("call_id")]}


async def get_dashboard(request: web.Request) -> web.Response:
    """GET /api/dashboard?hours=24&persona= (viewer, calls): the last `hours` (1 to 168) UTC hours, this one
    included, for every persona or one.

    Answers {"hours", "persona", "since", "until" (ISO 8601), "active_calls" (see `active_calls`, without ids),
    "totals": {"calls", "ended", "errors", "barge_ins", "agent_turns", "latency_turns", "voice_to_voice_p50_s",
    "voice_to_voice_p95_s", "lost"}, "hourly": [{"hour" (ISO start of the hour), "calls", "errors", "barge_ins",
    "agent_turns", "latency_turns", "p50_s", "p95_s"}], "errors": {"ended_in_error", "lost", "total"},
    "end_reasons": {reason: calls}, "dlp_findings": [{"entity_type", "transcript", "audio"}]}. Latencies are
    seconds (voice-to-voice: the caller's end of speech to the reply's first audio sent). A call is lost when it
    has no end stored a minute after it started and is not live (its replica died under it). 422 for a bad
    `hours` or `persona`."""
    await require(request, "viewer", "calls")
    hours = query_int(request, "hours", 24, MAX_HOURS)
    persona = request.query.get("persona") or None
    if persona is not None and len(persona) > 200:
        raise ApiError(422, "invalid query", fields=[{"field": "persona", "message": "at most 200 characters"}])
    live = await active_calls(request, persona)
    figures = await dashboard_figures(database(request), Window(datetime.now(UTC), hours), persona)
    # Without the registry no call can be told lost from live: none is counted lost then.
    live_ids = set(live.pop("ids"))
    lost = sum(1 for call_id in figures["unended"] if call_id not in live_ids) if live["available"] else 0
    totals = {**figures["totals"], "lost": lost}
    return web.json_response({
        "hours": hours, "persona": persona, "since": iso(figures["since"]), "until": iso(figures["until"]),
        "active_calls": live, "totals": totals,
        "hourly": [{**h, "hour": iso(h["hour"])} for h in figures["hourly"]],
        "errors": {"ended_in_error": totals["errors"], "lost": lost, "total": totals["errors"] + lost},
        "end_reasons": figures["end_reasons"], "dlp_findings": figures["dlp_findings"]},
        headers={"Cache-Control": "no-store"})
