"""Signaling: text-only calls, bad input, tokens, hang-up clean-up, health and metrics endpoints."""

from __future__ import annotations

import asyncio
import gc
from typing import Any

import aiohttp
import pytest
from aiortc import RTCPeerConnection
from helpers import server_tasks, settings_for_new_calls

from pono.context import SERVICES
from pono.testing.caller import Caller
from pono.testing.scripted_llm import Script

VALID_OFFER_HEAD = "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n"


def open_peer_connections() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, RTCPeerConnection) and o.connectionState != "closed")


async def settle(server, base_tasks: set[asyncio.Task[Any]] | None = None) -> tuple[int, set[asyncio.Task[Any]]]:
    """Open peer connections and the server's running tasks once calls have ended; with `base_tasks`, once the
    tasks not among them have had up to 5 s to end. The count of every task in the loop caught transient ones
    (another server's keep-alive connection, a periodic check) and failed a CI run: 21 <= 20."""
    for _ in range(50):
        if not server.app[SERVICES].calls.calls:
            break
        await asyncio.sleep(0.1)
    await asyncio.sleep(0.2)
    return open_peer_connections(), await server_tasks(server, base_tasks)


async def call_token(http: aiohttp.ClientSession, url: str) -> dict[str, str]:
    async with http.post(f"{url}/api/call-tokens") as r:
        assert r.status == 201
        return {"Authorization": f"Bearer {(await r.json())['token']}"}


async def test_text_only_call(server, script: Script) -> None:
    script.reply = "We are open from noon until midnight."
    caller = Caller(server.url)
    try:
        answer = await caller.connect(audio=False)
        assert "m=audio" not in answer["sdp"] and "m=application" in answer["sdp"]
        await caller.wait_open()
        caller.send_text("When are you open?")
        user = await caller.wait_for(lambda e: e["type"] == "transcript.final", 10)
        assert user["text"] == "When are you open?" and user["source"] == "text"
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 10)
        assert final["text"] == script.reply
        deltas = "".join(e["text"] for e in caller.events if e["type"] == "agent.delta" and e["turn"] == final["turn"])
        assert deltas.strip() == script.reply
        # A bad message gets an error event and the call goes on.
        caller.send_raw("this is not json")
        error = await caller.wait_for(lambda e: e["type"] == "error", 10)
        assert error["kind"] == "bad_message"
        caller.send_raw('{"type": "dance"}')
        await caller.wait_for(lambda e: e["type"] == "error" and "dance" in e["message"], 10)
        caller.send_text("And tomorrow?")
        await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] > final["turn"], 10)
        # The conversation so far went to the LLM.
        contents = [m["content"] for m in script.requests[-1]["messages"]]
        assert "When are you open?" in contents and "And tomorrow?" in contents
    finally:
        await caller.hang_up()


async def test_text_in_audio_call_is_answered_in_text_and_speech(server, script: Script) -> None:
    script.reply = "Yes, we have a vegetarian menu."
    caller = Caller(server.url)
    try:
        await caller.connect(audio=True)
        await caller.wait_open()
        caller.send_text("Do you have vegetarian food?")
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 15)
        assert final["text"] == script.reply
        await asyncio.sleep(0.5)
        assert abs(caller.recording()).max() > 2000
    finally:
        await caller.hang_up()


async def test_hang_up_frees_everything(server, script: Script) -> None:
    base_pcs, base_tasks = await settle(server)
    caller = Caller(server.url)
    await caller.connect()
    await caller.wait_open()
    call_id = caller.call_id
    assert call_id in server.app[SERVICES].calls.calls
    assert await caller.hang_up() == 200
    pcs, tasks = await settle(server, base_tasks)
    assert call_id not in server.app[SERVICES].calls.calls
    assert pcs == base_pcs == 0
    assert tasks <= base_tasks
    # The caller's data channel closes before call.ended can reach it; the stored call records the reason.
    ended = [e for e in caller.events if e["type"] == "call.ended"]
    assert ended == [] or ended[0]["reason"] == "caller_hangup"
    pool = server.app[SERVICES].storage.db.pool
    for _ in range(50):
        reason = await pool.fetchval("SELECT end_reason FROM calls WHERE id = $1", call_id)
        if reason:
            break
        await asyncio.sleep(0.1)
    assert reason == "caller_hangup"


async def test_peer_connection_closed_by_caller_ends_call(server) -> None:
    caller = Caller(server.url)
    await caller.connect()
    await caller.wait_open()
    call_id = caller.call_id
    await caller.close()  # no DELETE: the browser tab just went away
    for _ in range(100):
        if call_id not in server.app[SERVICES].calls.calls:
            break
        await asyncio.sleep(0.2)
    assert call_id not in server.app[SERVICES].calls.calls
    assert open_peer_connections() == 0


@pytest.mark.parametrize(
    ("body", "content_type", "status", "message"),
    [
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b"[1, 2]", "application/json", 400, "JSON object"),
        (b'{"sdp": "v=0"}', "text/plain", 415, "Content-Type"),
        (b'{"type": "offer"}', "application/json", 422, "invalid request body"),
        (b'{"sdp": "v=0", "type": "answer"}', "application/json", 422, "invalid request body"),
        (b'{"sdp": "hello", "type": "offer"}', "application/json", 400, "v=0"),
        (('{"sdp": "' + VALID_OFFER_HEAD.replace("\r\n", "\\r\\n") + 'm=video 9 UDP/TLS/RTP/SAVPF 96\\r\\n",'
          ' "type": "offer"}').encode(), "application/json", 400, "neither an audio nor a data channel"),
        (('{"sdp": "' + VALID_OFFER_HEAD.replace("\r\n", "\\r\\n") + 'm=audio 9 UDP/TLS/RTP/SAVPF 111\\r\\n'
          'a=garbage\\r\\n", "type": "offer"}').encode(), "application/json", 400, "invalid SDP"),
        (b'{"sdp": "' + b"v=0" + b"x" * 300_000 + b'", "type": "offer"}', "application/json", 413, "too large"),
    ],
    ids=["malformed-json", "not-object", "content-type", "missing-sdp", "wrong-type", "not-sdp", "no-audio-or-data",
         "broken-sdp", "oversized"],
)
async def test_bad_offers_get_clear_errors_and_leave_nothing(server, body, content_type, status, message) -> None:
    base_pcs, base_tasks = await settle(server)
    async with aiohttp.ClientSession() as http:
        headers = await call_token(http, server.url)
        headers["Content-Type"] = content_type
        async with http.post(f"{server.url}/api/calls", data=body, headers=headers) as r:
            assert r.status == status
            assert r.content_type == "application/json"
            assert message in (await r.text())
    pcs, tasks = await settle(server, base_tasks)
    assert pcs == base_pcs == 0
    assert tasks <= base_tasks
    assert not server.app[SERVICES].calls.calls


async def test_tokens_are_required_and_scoped(server) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/api/calls", json={"sdp": "v=0", "type": "offer"}) as r:
            assert r.status == 401
        async with http.get(f"{server.url}/api/ice-servers") as r:
            assert r.status == 401
        async with http.get(f"{server.url}/api/ice-servers", headers={"Authorization": "Bearer forged.token"}) as r:
            assert r.status == 401
        headers = await call_token(http, server.url)
        async with http.get(f"{server.url}/api/ice-servers", headers=headers) as r:
            assert r.status == 200 and (await r.json()) == {"iceServers": []}
    caller = Caller(server.url)
    other = Caller(server.url)
    try:
        await caller.connect(audio=False)
        await other.connect(audio=False)
        # Someone else's token cannot hang up this call: it looks like a call that does not exist.
        async with other.http.delete(f"{server.url}/api/calls/{caller.call_id}", headers=other.auth) as r:
            assert r.status == 404
        # A call token opens one call only, even with a good offer.
        offer = {"sdp": caller.pc.localDescription.sdp, "type": "offer"}
        async with caller.http.post(f"{server.url}/api/calls", json=offer, headers=caller.auth) as r:
            assert r.status == 409
        assert caller.call_id in server.app[SERVICES].calls.calls
    finally:
        await caller.hang_up()
        await other.hang_up()


async def test_health_ready_startup_and_metrics(server) -> None:
    services = server.app[SERVICES]
    async with aiohttp.ClientSession() as http:
        for path in ("/api/health", "/api/startup", "/api/ready"):
            async with http.get(server.url + path) as r:
                assert r.status == 200, path
        async with http.get(f"{server.url}/api/ready") as r:
            body = await r.json()
            assert body["checks"] == {"models": True, "llm": True, "database": True, "redis": True,
                                      "accepting_calls": True}
        async with http.get(f"{server.url}/metrics") as r:
            assert r.status == 401
        auth = {"Authorization": f"Bearer {services.metrics_token}"}
        async with http.get(f"{server.url}/metrics", headers=auth) as r:
            assert r.status == 200
            text = await r.text()
        for name in ("pono_turn_stage_seconds", "pono_active_calls", "pono_event_loop_lag_seconds",
                     "pono_db_write_queue_depth", "pono_journal_bytes", "pono_db_up 1.0", "pono_redis_up 1.0"):
            assert name in text
        async with http.get(f"{server.url}/nope") as r:
            assert r.status == 404 and r.content_type == "application/json"
        async with http.get(f"{server.url}/") as r:
            assert r.status == 200 and "Start call" in await r.text()
            assert r.headers["X-Content-Type-Options"] == "nosniff"
            assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]


async def test_call_tokens_are_rate_limited_per_ip(server) -> None:
    with settings_for_new_calls(server, call_tokens_per_minute=3):  # read per request; counted in Redis
        async with aiohttp.ClientSession() as http:
            statuses = []
            for _ in range(6):
                async with http.post(f"{server.url}/api/call-tokens") as r:
                    statuses.append(r.status)
                    if r.status == 429:
                        assert 0 < int(r.headers["Retry-After"]) <= 60
                        assert "slow down" in (await r.json())["error"]
            # Earlier tests in this minute count too, so the limit may bite from the first request on.
            assert statuses[-3:] == [429, 429, 429]
    async with aiohttp.ClientSession() as http, http.post(f"{server.url}/api/call-tokens") as r:
        assert r.status == 201
