"""The nightly reports (pono.storage.reports: one UTC day's calls, minutes, p95 first-audio latency, barge-ins,
failed calls and failed workflow runs, written by the job worker's `pono.report` schedule): list and read
(viewer, calls)."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, time
from typing import Any

from aiohttp import web

from pono.http import ApiError
from pono.storage import reports as stored
from pono.web.access import require
from pono.web.params import database, decode_cursor, encode_cursor, iso, page_limit

_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def report_json(report: dict[str, Any]) -> dict[str, Any]:
    """A report as the API shows it: its figures, "day" (YYYY-MM-DD, UTC) and "created_at" (when it was
    last built: a rerun of the day's job replaces it)."""
    return {**report["body"], "day": report["day"].isoformat(), "created_at": iso(report["created_at"])}


def _day(raw: str) -> date:
    try:
        if _DAY.fullmatch(raw):
            return date.fromisoformat(raw)
    except ValueError:
        pass
    raise ApiError(422, "invalid path", fields=[{"field": "day", "message": "a date as YYYY-MM-DD"}])


async def list_reports(request: web.Request) -> web.Response:
    """GET /api/reports?limit=&cursor= (viewer, calls): nightly reports, newest day first."""
    await require(request, "viewer", "calls")
    limit = page_limit(request)
    cursor = decode_cursor(request.query.get("cursor"))
    found = await stored.list_reports(database(request), cursor[0].date() if cursor else None, limit + 1)
    page = found[:limit]
    last = page[-1] if page else None
    next_cursor = encode_cursor(datetime.combine(last["day"], time(), UTC), str(last["id"])) \
        if last is not None and len(found) > limit else None
    return web.json_response({"reports": [report_json(r) for r in page], "next_cursor": next_cursor})


async def get_report(request: web.Request) -> web.Response:
    """GET /api/reports/{day} (viewer, calls): one day's report; 422 for a day that is not YYYY-MM-DD, 404
    when none was made for it."""
    await require(request, "viewer", "calls")
    day = _day(request.match_info["day"])
    report = await stored.get_report(database(request), day)
    if report is None:
        raise ApiError(404, f"no report for {day.isoformat()}")
    return web.json_response(report_json(report))
