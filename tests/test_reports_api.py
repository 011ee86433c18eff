"""The nightly reports' API, GET /api/reports and GET /api/reports/{day}, on the shared server and its Postgres.

Two real text calls (one with a barge-in) are moved whole onto a day of their own in the past, the report is
built for that day by the function the nightly job runs (pono.storage.reports.daily_report), and the API must
show exactly those figures; paging walks every report newest first; anonymous callers get 401, a day that is
not YYYY-MM-DD 422, a day without a report 404.
"""

from __future__ import annotations

import random
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import aiohttp
from conftest import RunningServer
from helpers import stored_end_reason, stored_turns, text_call

from pono.context import SERVICES
from pono.storage.reports import daily_report
from pono.storage.users import create_api_key, create_user
from pono.testing.scripted_llm import Script


async def _viewer_token(server: RunningServer) -> str:
    pool = server.app[SERVICES].storage.db.pool
    user = await create_user(pool, f"reports-viewer-{uuid.uuid4().hex[:6]}", "viewer")
    return (await create_api_key(pool, user, "viewer", "reports"))[1]


async def _two_calls(server: RunningServer, script: Script, admin_token: str) -> list[str]:
    """A call answered once, and a call whose first answer the caller cuts off; both hung up and stored."""
    ids = []
    async with text_call(server.url) as caller:
        caller.send_text("When do you open?")
        await caller.wait_for(lambda e: e["type"] == "agent.final", 30)
        ids.append(caller.call_id)
    script.reply = "Let me tell you all about our long history, our cooks, and our garden. " * 6
    script.token_interval_s = 0.05
    async with text_call(server.url) as caller:
        caller.send_text("Tell me about the restaurant")
        await caller.wait_for(lambda e: e["type"] == "agent.delta", 20)
        caller.send_text("Stop, when do you open?")
        await caller.wait_for(lambda e: e["type"] == "agent.final" and e["interrupted"], 20)
        await caller.wait_for(lambda e: e["type"] == "agent.final" and not e["interrupted"], 60)
        ids.append(caller.call_id)
    for call_id, turns in zip(ids, (2, 4), strict=True):
        assert await stored_end_reason(server, admin_token, call_id)
        assert len(await stored_turns(server, admin_token, call_id, turns)) == turns
    return ids


async def _get(http: aiohttp.ClientSession, url: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with http.get(url, headers=headers) as r:
        return r.status, await r.json()


async def test_reports_list_and_read(server: RunningServer, script: Script, admin_token: str) -> None:
    pool = server.app[SERVICES].storage.db.pool
    day = date(2000, 1, 1) + timedelta(days=random.randrange(7000))  # a day no other test has calls on
    older = day - timedelta(days=3)
    ids = await _two_calls(server, script, admin_token)
    shift = datetime.now(UTC).date() - day
    await pool.execute("UPDATE calls SET started_at = started_at - $2::interval, ended_at = ended_at - $2::interval"
                       " WHERE id = ANY($1::text[])", ids, shift)
    rows = await pool.fetch("SELECT started_at, ended_at FROM calls WHERE id = ANY($1::text[])", ids)
    assert {r["started_at"].date() for r in rows} == {day}, rows  # still on one day after the shift
    minutes = round(sum((r["ended_at"] - r["started_at"]).total_seconds() for r in rows) / 60, 2)

    body = await daily_report(pool, day)  # what the nightly job stores
    assert (body["calls"], body["barge_ins"], body["failed_calls"], body["failed_workflow_runs"]) == (2, 1, 0, 0)
    assert body["minutes"] == minutes
    assert (await daily_report(pool, older))["calls"] == 0  # a quiet day has a report too

    viewer = await _viewer_token(server)
    base = f"{server.url}/api/reports"
    async with aiohttp.ClientSession() as http:
        status, got = await _get(http, f"{base}/{day.isoformat()}", viewer)
        assert status == 200, got
        created = got.pop("created_at")
        assert got == body and datetime.fromisoformat(created).tzinfo is not None
        status, quiet = await _get(http, f"{base}/{older.isoformat()}", viewer)
        assert status == 200 and quiet["day"] == older.isoformat() and quiet["calls"] == 0, quiet

        # Every report, newest day first, one page at a time, each once.
        days: list[str] = []
        cursor: str | None = None
        for _ in range(1000):
            url = f"{base}?limit=1" + (f"&cursor={cursor}" if cursor else "")
            status, page = await _get(http, url, viewer)
            assert status == 200 and len(page["reports"]) == 1, page
            days.append(page["reports"][0]["day"])
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert days == sorted(days, reverse=True) and len(set(days)) == len(days)
        assert days.index(day.isoformat()) < days.index(older.isoformat())
        assert len(days) == await pool.fetchval("SELECT count(*) FROM reports WHERE kind = 'nightly'")
        status, whole = await _get(http, f"{base}?limit=200", viewer)
        assert status == 200 and [r["day"] for r in whole["reports"]] == days[:200]
        assert whole["reports"][days.index(day.isoformat())] == {**body, "created_at": created}

        # No report for the day between: 404. Not a day: 422, naming it. Bad paging: 422.
        status, missing = await _get(http, f"{base}/{(day - timedelta(days=1)).isoformat()}", viewer)
        assert status == 404 and missing["error"], missing
        for bad in ("2001-02-30", "yesterday", "20010101", "2001-1-01", "2001-01-01T00:00"):
            status, refused = await _get(http, f"{base}/{bad}", viewer)
            assert status == 422 and refused["fields"][0]["field"] == "day", (bad, refused)
        for query in ("limit=0", "limit=201", "limit=x", "cursor=not-a-cursor"):
            status, refused = await _get(http, f"{base}?{query}", viewer)
            assert status == 422, (query, refused)

        # Who may ask: any login or key with the calls scope; nobody anonymous.
        for url in (base, f"{base}/{day.isoformat()}", f"{base}/not-a-day"):
            status, refused = await _get(http, url)
            assert status == 401, (url, refused)
        status, _ = await _get(http, f"{base}/{day.isoformat()}", admin_token)
        assert status == 200

    # A deleted call leaves the report, its turns with it (the barge-in was the second call's), as on the
    # dashboard: the report's call figures and its turn figures count the same calls.
    await pool.execute("UPDATE calls SET deleted_at = now() WHERE id = $1", ids[1])
    again = await daily_report(pool, day)
    assert (again["calls"], again["barge_ins"]) == (1, 0), again
