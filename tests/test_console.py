"""The operator console across two replicas: a real Chromium logs in on replica A and watches and acts on a
call held by a second `pono serve` process (replica B) that shares Postgres and Redis. Also: the console's
WebSocket under garbage, take-over with an aiortc operator, logs without PII, traces and metrics."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp import web
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from conftest import RunningServer, espeak, write_wav
from helpers import console_login, console_user, settings_for_new_calls
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from playwright.async_api import async_playwright
from servers import PonoProcess
from test_browser import CHROMIUM, chromium_args

from pono.agent.embedded import free_port
from pono.context import SERVICES
from pono.signaling.audio_out import Resampler
from pono.testing.caller import RATE, Caller, MicrophoneTrack
from pono.testing.scripted_llm import Script, ScriptedLLM

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts" / "console"


class OtlpReceiver:
    """A real OTLP/HTTP endpoint: decodes the protobuf export requests the SDK sends."""

    def __init__(self) -> None:
        self.spans: list[dict[str, Any]] = []
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.add_routes([web.post("/v1/traces", self._traces)])
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        port = free_port()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"

    async def _traces(self, request: web.Request) -> web.Response:
        export = ExportTraceServiceRequest.FromString(await request.read())
        for resource_spans in export.resource_spans:
            service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}.get("service.name")
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    attrs = {a.key: a.value.string_value or a.value.int_value for a in span.attributes}
                    self.spans.append({"name": span.name, "service": service, "attributes": attrs,
                                       "start": span.start_time_unix_nano, "end": span.end_time_unix_nano,
                                       "trace_id": span.trace_id.hex(), "parent": span.parent_span_id.hex()})
        return web.Response(status=200)


@pytest.fixture(scope="module")
async def otlp() -> AsyncIterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    await receiver.start()
    yield receiver
    assert receiver.runner is not None
    await receiver.runner.cleanup()


@pytest.fixture(scope="module")
async def replica(tmp_path_factory: pytest.TempPathFactory, scripted_llm: ScriptedLLM, postgres_url: str,
                  redis_url: str, otlp: OtlpReceiver) -> AsyncIterator[PonoProcess]:
    process = PonoProcess(
        tmp_path_factory.mktemp("replica-b"), DATABASE_URL=postgres_url, REDIS_URL=redis_url,
        OPENAI_BASE_URL=scripted_llm.base_url, PONO_LLM_MODEL="scripted", PONO_REPLICA_ID="replica-b",
        PONO_LOG_FORMAT="json", PONO_METRICS_PORT=str(free_port()),
        OTEL_EXPORTER_OTLP_ENDPOINT=otlp.url, OTEL_BSP_SCHEDULE_DELAY="200", OTEL_SERVICE_NAME="pono-replica-b")
    await process.start()
    yield process
    await process.stop()


async def _operator_login(server: RunningServer, admin_token: str) -> tuple[str, str]:
    password = "listen carefully 42"
    return await console_user(server, admin_token, "operator", password), password


async def _heard(server: RunningServer, caller: Caller, since_sample: int) -> str:
    audio = caller.recording()[since_sample:]
    return (await server.app[SERVICES].models.run_stt(Resampler(16000)(audio, RATE))).lower()


async def test_operator_watches_and_acts_across_replicas(server: RunningServer, replica: PonoProcess,
                                                         admin_token: str, script: Script, question: np.ndarray,
                                                         audio_dir: Path) -> None:
    if shutil.which("chromium") is None:
        pytest.fail("Debian chromium is not installed: run scripts/install.sh --test")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    name, password = await _operator_login(server, admin_token)
    script.reply = "Certainly, your table for two is booked."
    silence = audio_dir / "console_mic.wav"
    write_wav(silence, np.zeros(48000, np.int16), 48000)
    caller = Caller(replica.url)
    console: list[str] = []
    async with async_playwright() as p:
        ctx = await p.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="pono-console-"), executable_path=CHROMIUM, headless=True, bypass_csp=True,
            args=chromium_args(str(silence)), viewport={"width": 1280, "height": 900})
        try:
            page = await ctx.new_page()
            page.on("console", lambda m: console.append(m.text))
            await console_login(page, server.url, name, password)

            # A call on the other replica appears in the live list without a reload.
            await caller.connect()
            await caller.wait_open()
            row = page.locator(f"#calls tbody tr[data-call-id='{caller.call_id}']")
            await row.wait_for(timeout=15000)
            assert "replica-b" in (await row.text_content() or "")
            assert "webrtc" in (await row.text_content() or "")
            await page.screenshot(path=str(ARTIFACTS / "live-calls.png"), full_page=True)

            # Open it: the caller's words and the agent's streamed reply show up, with latency.
            await row.click()
            await page.wait_for_function("document.getElementById('call').hidden === false")
            await asyncio.sleep(0.5)  # the watch subscription is in place
            caller.speak(question)
            user_line = page.locator("#transcript .line.user:not(.partial)").first
            await user_line.wait_for(timeout=40000)
            assert "table" in (await user_line.text_content() or "").lower(), console
            await page.wait_for_function(
                f"[...document.querySelectorAll('#transcript .line.agent')].some(e => e.textContent === "
                f"{script.reply!r})", timeout=20000)
            await page.locator("#latency tbody tr").first.wait_for(timeout=10000)
            state = await row.locator("td").nth(4).text_content()
            assert state in ("listening", "speaking", "thinking", "user_speaking")

            # Listen in: both sides, mixed, reach the operator's page from replica B.
            await page.click("#listen")
            await page.wait_for_function("document.getElementById('listen').textContent === 'Stop listening'",
                                         timeout=15000)
            caller.speak(question)
            await page.wait_for_function("window.consoleState.listenPeak > 0.01", timeout=30000)
            await page.screenshot(path=str(ARTIFACTS / "call-open.png"), full_page=True)

            # Say: the agent speaks the operator's words to the caller next.
            await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] == 3, timeout=30)
            said = "Your booking is confirmed for seven o'clock."
            mark = caller.recording().size
            await page.fill("#say-text", said)
            await page.click("#say button[type=submit]")
            await caller.wait_for(lambda e: e["type"] == "agent.final" and e["text"] == said, timeout=20)
            await asyncio.sleep(3.5)  # the queued speech plays out in real time
            heard = await _heard(server, caller, mark)
            assert sum(w in heard for w in ("booking", "confirmed", "seven")) >= 2, heard
            await page.wait_for_function(
                "[...document.querySelectorAll('#transcript .line.operator')].some(e => e.textContent.includes('say'))",
                timeout=10000)
            await page.screenshot(path=str(ARTIFACTS / "after-say.png"), full_page=True)

            # Hang up: the call ends on replica B and leaves the list.
            await page.click("#hang-up")
            await row.wait_for(state="detached", timeout=15000)
            await page.screenshot(path=str(ARTIFACTS / "after-hang-up.png"), full_page=True)
        finally:
            await ctx.close()
            await caller.close()

    async with aiohttp.ClientSession() as http:
        headers = {"Authorization": f"Bearer {admin_token}"}
        for _ in range(50):
            async with http.get(f"{server.url}/api/calls/{caller.call_id}", headers=headers) as r:
                stored = await r.json()
            if stored.get("ended_at"):
                break
            await asyncio.sleep(0.2)
        assert stored["end_reason"] == "operator_hangup" and stored["replica"] == "replica-b"
        async with http.get(f"{server.url}/api/audit?action=call.", headers=headers) as r:
            audited = {(e["action"], e["actor"]) for e in (await r.json())["entries"] if e["target"] == caller.call_id}
        assert {("call.listen", name), ("call.say", name), ("call.hang_up", name)} <= audited
        # History: the ended call is found by what was said in it.
        async with http.get(f"{server.url}/api/calls", params={"state": "ended", "q": "booking confirmed"},
                            headers=headers) as r:
            assert caller.call_id in [c["id"] for c in (await r.json())["calls"]]
        async with http.get(f"{server.url}/api/calls", params={"state": "ended", "q": "zebra xylophone"},
                            headers=headers) as r:
            assert caller.call_id not in [c["id"] for c in (await r.json())["calls"]]


async def _socket(server: RunningServer, http: aiohttp.ClientSession) -> aiohttp.ClientWebSocketResponse:
    return await http.ws_connect(f"{server.url.replace('http', 'ws')}/api/console/ws")


async def _next(ws: aiohttp.ClientWebSocketResponse, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        msg = await ws.receive(timeout=max(0.1, deadline - time.monotonic()))
        assert msg.type == aiohttp.WSMsgType.TEXT, (msg.type, msg.data, msg.extra)
        data = json.loads(msg.data)
        if data["type"] == kind:
            return data


async def test_console_socket_refuses_strangers_and_garbage(server: RunningServer, admin_token: str) -> None:
    async with aiohttp.ClientSession() as http:
        ws = await _socket(server, http)
        await ws.send_str(json.dumps({"type": "auth", "token": "pono_not-a-real-key"}))
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4401 and "invalid" in msg.extra
        ws = await _socket(server, http)
        await ws.send_str(json.dumps({"type": "watch", "call_id": "x"}))  # no auth first
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4401

        good = await _socket(server, http)
        await good.send_str(json.dumps({"type": "auth", "token": admin_token}))
        await _next(good, "hello")
        await _next(good, "calls")
        bad = await _socket(server, http)
        await bad.send_str(json.dumps({"type": "auth", "token": admin_token}))
        await _next(bad, "hello")
        for garbage in ("{not json", json.dumps({"type": "rm -rf"}), json.dumps([1, 2])):
            await bad.send_str(garbage)
            while (msg := await bad.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT:
                pass
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1003 and msg.extra, garbage
            bad = await _socket(server, http)
            await bad.send_str(json.dumps({"type": "auth", "token": admin_token}))
            await _next(bad, "hello")
        for watch in ({"type": "watch"}, {"type": "watch", "call_id": 7}, {"type": "watch", "call_id": "x" * 65}):
            await bad.send_str(json.dumps(watch))
            while (msg := await bad.receive(timeout=10)).type == aiohttp.WSMsgType.TEXT:
                pass
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 1003, watch
            assert "watch needs a call_id string" in msg.extra, (watch, msg.extra)
            bad = await _socket(server, http)
            await bad.send_str(json.dumps({"type": "auth", "token": admin_token}))
            await _next(bad, "hello")
        # Watching a call that does not exist is answered in-band, never with "watching".
        await good.send_str(json.dumps({"type": "watch", "call_id": "no-such-call"}))
        while (answer := json.loads((await good.receive(timeout=10)).data))["type"] not in ("error", "watching"):
            pass
        assert answer["type"] == "error" and "no-such-call" in answer["error"], answer
        # An action on a call that is not live is refused in-band; the other console is unaffected.
        await good.send_str(json.dumps({"type": "action", "action": "hang_up", "call_id": "nope", "ref": 1}))
        error = await _next(good, "action.error")
        assert error["status"] == 404 and error["ref"] == 1
        await good.send_str(json.dumps({"type": "action", "action": "explode", "call_id": "nope", "ref": 2}))
        assert (await _next(good, "action.error"))["status"] == 422
        await good.send_str(json.dumps({"type": "ping"}))
        await _next(good, "pong")
        await good.close()
        await bad.close()


async def test_viewer_can_watch_but_not_act(server: RunningServer, replica: PonoProcess) -> None:
    pool = server.app[SERVICES].storage.db.pool
    from pono.storage.users import create_api_key, create_user

    _, token = await create_api_key(pool, await create_user(pool, f"viewer-{uuid.uuid4().hex[:6]}", "viewer"),
                                    "viewer", "console")
    caller = Caller(replica.url)
    try:
        await caller.connect(audio=False)
        await caller.wait_open()
        async with aiohttp.ClientSession() as http:
            ws = await _socket(server, http)
            await ws.send_str(json.dumps({"type": "auth", "token": token}))
            await _next(ws, "hello")
            await ws.send_str(json.dumps({"type": "action", "action": "hang_up", "call_id": caller.call_id}))
            assert (await _next(ws, "action.error"))["status"] == 403
            await ws.close()
        assert not [e for e in caller.events if e["type"] == "call.ended"]
    finally:
        await caller.hang_up()


async def test_take_over_and_hand_back(server: RunningServer, replica: PonoProcess, admin_token: str,
                                       script: Script, question: np.ndarray, audio_dir: Path) -> None:
    """An operator (an aiortc peer here) takes the call: the agent goes quiet, the caller hears the operator's
    voice and is still transcribed; handed back, the agent answers again."""
    script.reply = "The agent is back."
    operator_voice = espeak("This is the manager speaking", audio_dir / "operator.wav")
    caller = Caller(replica.url)
    operator = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    mic = MicrophoneTrack()
    try:
        await caller.connect()
        await caller.wait_open()
        async with aiohttp.ClientSession() as http:
            ws = await _socket(server, http)
            await ws.send_str(json.dumps({"type": "auth", "token": admin_token}))
            await _next(ws, "hello")
            operator.addTrack(mic)
            await operator.setLocalDescription(await operator.createOffer())
            await ws.send_str(json.dumps({"type": "action", "action": "take_over", "call_id": caller.call_id,
                                          "sdp": operator.localDescription.sdp, "ref": "t"}))
            answer = await _next(ws, "action.result", timeout=20)
            await operator.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            await caller.wait_for(lambda e: e["type"] == "call.state" and e["state"] == "operator")
            requests_before = len(script.requests)

            caller.speak(question)  # the caller talks; only the operator should answer
            final = await caller.wait_for(lambda e: e["type"] == "transcript.final" and e.get("text"), timeout=40)
            assert "table" in final["text"].lower()
            mark = caller.recording().size
            mic.play(Resampler(RATE)(operator_voice, 16000))
            await asyncio.sleep(operator_voice.size / 16000 + 1.5)
            heard = await _heard(server, caller, mark)
            assert "manager" in heard or "speaking" in heard, heard
            assert len(script.requests) == requests_before, "the agent stayed quiet while taken over"

            await ws.send_str(json.dumps({"type": "action", "action": "hand_back", "call_id": caller.call_id}))
            await _next(ws, "action.result")
            await caller.wait_for(lambda e: e["type"] == "call.state" and e["state"] == "listening")
            caller.send_text("Are you there?")
            await caller.wait_for(lambda e: e["type"] == "agent.final" and e["text"] == script.reply, timeout=20)
            await ws.close()
    finally:
        await operator.close()
        await caller.hang_up()


async def test_replica_logs_traces_and_metrics(server: RunningServer, replica: PonoProcess, otlp: OtlpReceiver,
                                               admin_token: str, script: Script) -> None:
    script.reply = "Thanks, I have noted that down."
    card, email = "4111 1111 1111 1111", "jane.doe@example.com"
    caller = Caller(replica.url)
    try:
        await caller.connect(audio=False)
        await caller.wait_open()
        async with aiohttp.ClientSession() as http:
            # An operator watching on the other replica sees the kinds of data, never the values.
            ws = await _socket(server, http)
            await ws.send_str(json.dumps({"type": "auth", "token": admin_token}))
            await _next(ws, "hello")
            await ws.send_str(json.dumps({"type": "watch", "call_id": caller.call_id}))
            await _next(ws, "watching")
            caller.send_text(f"My card is {card} and my email is {email}")
            while (event := (await _next(ws, "event"))["event"])["type"] != "transcript.final":
                pass
            assert card not in event["text"] and email not in event["text"]
            assert event["dlp"] == ["CREDIT_CARD", "EMAIL_ADDRESS"]
            await ws.close()
        await caller.wait_for(lambda e: e["type"] == "latency", timeout=20)
    finally:
        await caller.hang_up()
    await asyncio.sleep(1.0)

    # Logs: JSON, the call's lines carry call_id and turn, and no raw PII anywhere.
    text = (replica.data_dir / "server.log").read_text()
    assert card not in text and email not in text and card.replace(" ", "") not in text
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("call_id") == caller.call_id]
    assert mine and all("turn" in line for line in mine)
    assert any(line["event"] == "latency" and line["turn"] is not None for line in mine)

    # Traces: a call span, a turn span under it, stage spans under that, from the replica's service.
    for _ in range(50):
        spans = [s for s in otlp.spans if s["attributes"].get("pono.call_id") == caller.call_id]
        if {"call", "turn", "stage.first_audio_sent"} <= {s["name"] for s in spans} or \
                {"call", "turn"} <= {s["name"] for s in spans}:
            break
        await asyncio.sleep(0.2)
    names = {s["name"] for s in spans}
    assert {"call", "turn", "stage.llm_first_token", "model.llm"} <= names, names
    call_span = next(s for s in spans if s["name"] == "call")
    turn_span = next(s for s in spans if s["name"] == "turn")
    assert turn_span["trace_id"] == call_span["trace_id"] and call_span["service"] == "pono-replica-b"

    # Metrics: the histograms after a call, with an admin key made on the other replica; and on the
    # separate metrics port without a token.
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{replica.url}/metrics", headers={"Authorization": f"Bearer {admin_token}"}) as r:
            assert r.status == 200
            body = await r.text()
        async with http.get(f"{replica.url}/metrics") as r:
            assert r.status == 401
        port = replica.env["PONO_METRICS_PORT"]
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            assert r.status == 200 and "pono_turn_stage_seconds_bucket" in await r.text()
    for family in ('pono_turn_stage_seconds_bucket{le="0.5",stage="llm_first_token"}',
                   'pono_model_seconds_count{model="llm"}', 'pono_active_calls{transport="webrtc"}',
                   "pono_event_loop_lag_seconds_bucket", "pono_db_write_queue_depth", "pono_journal_bytes",
                   "pono_calls_total"):
        assert family in body, family


async def _closed(ws: aiohttp.ClientWebSocketResponse, timeout: float = 15.0) -> aiohttp.WSMessage:
    """The close frame, skipping the feed's messages before it."""
    deadline = time.monotonic() + timeout
    while (msg := await ws.receive(timeout=max(0.1, deadline - time.monotonic()))).type == aiohttp.WSMsgType.TEXT:
        pass
    return msg


async def _login(server: RunningServer, http: aiohttp.ClientSession, name: str, password: str) -> dict[str, Any]:
    async with http.post(f"{server.url}/api/auth/login", json={"name": name, "password": password}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_console_checks_its_principal_on_every_action_and_periodically(server: RunningServer,
                                                                             admin_token: str) -> None:
    services = server.app[SERVICES]
    pool = services.storage.db.pool
    from pono.storage.users import create_api_key, create_user

    admin = {"Authorization": f"Bearer {admin_token}"}
    key_id, key = await create_api_key(pool, await create_user(pool, f"op-{uuid.uuid4().hex[:6]}", "operator"),
                                       "operator", "console")
    async with aiohttp.ClientSession() as http:
        # A revoked key: its very next action closes the socket, whatever the re-check interval.
        ws = await _socket(server, http)
        await ws.send_str(json.dumps({"type": "auth", "token": key}))
        await _next(ws, "hello")
        async with http.delete(f"{server.url}/api/keys/{key_id}", headers=admin) as r:
            assert r.status == 204
        await ws.send_str(json.dumps({"type": "action", "action": "hang_up", "call_id": "nope", "ref": 1}))
        msg = await _closed(ws)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4401 and "revoked" in msg.extra, msg

        # A deleted user's login, and a login that expires: an idle console closes by itself.
        with settings_for_new_calls(server, console_reauth_s=0.2):
            name, password = await _operator_login(server, admin_token)
            tokens = await _login(server, http, name, password)
            ws = await _socket(server, http)
            await ws.send_str(json.dumps({"type": "auth", "token": tokens["access_token"]}))
            await _next(ws, "hello")
            async with http.delete(f"{server.url}/api/users/{tokens['user']['id']}", headers=admin) as r:
                assert r.status == 204
            msg = await _closed(ws)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4401, msg

            import jwt

            secret = await pool.fetchval("SELECT value FROM server_secrets WHERE name = 'jwt'")
            admin_name, admin_password = f"admin-{uuid.uuid4().hex[:6]}", "a long admin password"
            async with http.post(f"{server.url}/api/users", headers=admin,
                                 json={"name": admin_name, "role": "admin", "password": admin_password}) as r:
                admin_id = (await r.json())["id"]
            now = int(time.time())
            short = jwt.encode({"sub": admin_id, "name": admin_name, "role": "admin", "typ": "access", "iat": now,
                                "exp": now + 2, "jti": "short"}, secret.encode(), algorithm="HS256")
            ws = await _socket(server, http)
            await ws.send_str(json.dumps({"type": "auth", "token": short}))
            await _next(ws, "hello")
            msg = await _closed(ws)
            assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4401 and "expired" in msg.extra, msg


async def test_console_takes_a_fresh_token_for_the_same_user(server: RunningServer, admin_token: str) -> None:
    """The console sends {"type": "auth"} after each refresh (about hourly): the socket stays open."""
    name, password = await _operator_login(server, admin_token)
    other, other_password = await _operator_login(server, admin_token)
    async with aiohttp.ClientSession() as http:
        first = await _login(server, http, name, password)
        ws = await _socket(server, http)
        await ws.send_str(json.dumps({"type": "auth", "token": first["access_token"]}))
        await _next(ws, "hello")
        async with http.post(f"{server.url}/api/auth/refresh", json={"refresh_token": first["refresh_token"]}) as r:
            second = await r.json()
        await ws.send_str(json.dumps({"type": "auth", "token": second["access_token"]}))
        assert (await _next(ws, "auth.ok"))["user"]["name"] == name
        await ws.send_str(json.dumps({"type": "ping"}))
        await _next(ws, "pong")
        # Someone else's token does not take over an open console; a bad one closes it.
        stranger = await _login(server, http, other, other_password)
        await ws.send_str(json.dumps({"type": "auth", "token": stranger["access_token"]}))
        msg = await _closed(ws)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4401 and "same user" in msg.extra, msg
        ws = await _socket(server, http)
        await ws.send_str(json.dumps({"type": "auth", "token": second["access_token"]}))
        await _next(ws, "hello")
        await ws.send_str(json.dumps({"type": "auth", "token": "pono_not-a-real-key"}))
        msg = await _closed(ws)
        assert msg.type == aiohttp.WSMsgType.CLOSE and msg.data == 4401, msg


async def test_an_operator_who_may_no_longer_act_loses_the_call(server: RunningServer, admin_token: str) -> None:
    """A take-over (with the operator's audio) ends once the operator's key is revoked: the agent has the call
    again and the operator's connection closes, wherever the action was asked."""
    services = server.app[SERVICES]
    pool = services.storage.db.pool
    from pono.storage.users import create_api_key, create_user

    key_id, key = await create_api_key(pool, await create_user(pool, f"op-{uuid.uuid4().hex[:6]}", "operator"),
                                       "operator", "take-over")
    caller = Caller(server.url)
    operator = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        with settings_for_new_calls(server, console_reauth_s=0.2):
            await caller.connect()
            await caller.wait_open()
            operator.addTrack(MicrophoneTrack())
            await operator.setLocalDescription(await operator.createOffer())
            async with aiohttp.ClientSession() as http:
                async with http.post(f"{server.url}/api/calls/{caller.call_id}/actions",
                                     json={"action": "take_over", "sdp": operator.localDescription.sdp},
                                     headers={"Authorization": f"Bearer {key}"}) as r:
                    assert r.status == 200, await r.text()
                    answer = await r.json()
                await operator.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
                await caller.wait_for(lambda e: e["type"] == "call.state" and e["state"] == "operator")
                mark = len(caller.events)
                async with http.delete(f"{server.url}/api/keys/{key_id}",
                                       headers={"Authorization": f"Bearer {admin_token}"}) as r:
                    assert r.status == 204
            for _ in range(150):
                if any(e["type"] == "call.state" and e["state"] == "listening" for e in caller.events[mark:]):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the revoked operator still has the call")
            desk = services.control.execute.__self__  # type: ignore[union-attr]
            for _ in range(50):
                if not desk.media.owned():
                    break
                await asyncio.sleep(0.1)
            assert not desk.media.owned()
    finally:
        await operator.close()
        await caller.hang_up()
