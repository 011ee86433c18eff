"""Twilio-style media streams, driven by streamdouble (a real Media Streams simulator from PyPI)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from conftest import RunningServer, write_wav
from phone_peers import heard_the_question, latest_call
from pydantic import SecretStr
from streamdouble.api import CallReport, run_scenario
from streamdouble.session import SessionConfig
from test_voice_call import LONG_REPLY, trim, words

from pono.context import SERVICES
from pono.signaling.audio_out import Resampler
from pono.signaling.phone import g711
from pono.testing.scripted_llm import Script

TOKEN = "provider-secret"  # the session server's PONO_TWILIO_TOKEN (tests/conftest.py)


def stream_url(server: RunningServer, token: str = TOKEN) -> str:
    return server.url.replace("http://", "ws://") + f"/api/phone/twilio?token={token}"


def scenario(folder: Path, steps: str) -> Path:
    path = folder / f"scenario-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(f"name: pono test\nsteps:\n{steps}")
    return path


@pytest.fixture
def speech(tmp_path: Path, phone_question: np.ndarray) -> Path:
    path = tmp_path / "question-8k.wav"  # what a phone network carries
    write_wav(path, Resampler(8000)(trim(phone_question), 16000), 8000)
    return path


async def test_stream_holds_a_spoken_conversation(server: RunningServer, admin_token: str, script: Script,
                                                  speech: Path) -> None:
    script.reply = "Certainly, your table for two is booked for seven."
    persona = f"line-{uuid.uuid4().hex[:6]}"
    async with aiohttp.ClientSession() as http, http.post(
            f"{server.url}/api/personas", headers={"Authorization": f"Bearer {admin_token}"},
            json={"name": persona, "system_prompt": "You answer the phone."}) as r:
        assert r.status == 201
    since = time.time() - 1
    # Like Twilio, the caller's line keeps streaming (silence) after the question, until the reply is heard.
    steps = f"  - wait: 0.5\n  - say: {speech}\n  - wait_for: {{event: mark, timeout: 40}}\n"
    report: CallReport = await run_scenario(stream_url(server), scenario(speech.parent, steps), config=SessionConfig(
        custom_parameters={"persona": persona, "caller": "+15550003333"}, response_timeout_s=40))
    assert report.violations == [] and report.spoke, report.to_dict()
    assert report.time_to_first_audio_ms is not None and report.time_to_first_audio_ms > 0
    assert report.metrics.marks_received >= 1 and report.metrics.marks_echoed >= 1
    # What the caller heard is the agent's reply, at telephone bandwidth.
    heard_pcm = Resampler(16000)(g711.decode(report.audio_received, "PCMU"), 8000)
    heard = await server.app[SERVICES].models.run_stt(heard_pcm)
    assert len(words(heard) & words(script.reply)) >= 4, heard

    call = await latest_call(server, admin_token, since, "twilio")
    assert call["persona"] == persona and call["caller"] == "+15550003333"
    assert heard_the_question(call), call["turns"]
    assert any(t["role"] == "agent" and t["text"] == script.reply for t in call["turns"])


async def test_barge_in_sends_clear(server: RunningServer, admin_token: str, script: Script, speech: Path) -> None:
    script.reply = LONG_REPLY
    since = time.time() - 1
    steps = (f"  - say: {speech}\n  - wait_for: {{event: audio, timeout: 40}}\n  - wait: 2\n"
             f"  - say: {speech}\n  - expect: clear\n  - wait: 1\n")
    report = await run_scenario(stream_url(server), scenario(speech.parent, steps),
                                config=SessionConfig(response_timeout_s=40, quiet_period_s=0.5))
    assert report.violations == [], report.to_dict()
    assert report.metrics.clears_received >= 1, report.to_dict()
    assert report.result.failed_expectations == []
    call = await latest_call(server, admin_token, since, "twilio")
    interrupted = [t for t in call["turns"] if t["role"] == "agent" and t["interrupted"]]
    assert interrupted and len(interrupted[0]["text"]) < len(LONG_REPLY)


async def test_stream_needs_the_provider_token(server: RunningServer) -> None:
    url = f"{server.url}/api/phone/twilio"
    async with aiohttp.ClientSession() as http:
        for params, headers in (({}, {}), ({"token": "wrong"}, {}), ({}, {"Authorization": "Bearer wrong"})):
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(url, params=params, headers=headers)
            assert refused.value.status == 401
        ws = await http.ws_connect(url, headers={"Authorization": f"Bearer {TOKEN}"})
        assert not ws.closed  # the provider's own token opens the stream
        await ws.close()


async def test_malformed_stream_messages_close_only_that_stream(server: RunningServer, script: Script,
                                                                speech: Path) -> None:
    script.reply = "Yes, we are open."
    steps = f"  - say: {speech}\n  - wait_for: {{event: mark, timeout: 40}}\n"
    good = asyncio.create_task(run_scenario(stream_url(server), scenario(speech.parent, steps),
                                            config=SessionConfig(response_timeout_s=40)))
    async with aiohttp.ClientSession() as http:
        bad_messages = ["not json", "[1, 2]", '{"event": "media", "media": {"payload": "x"}}',
                        '{"event": "start", "start": {"streamSid": "MZ1"}}\n' + "x" * 10,  # trailing junk
                        '{"event": "start", "start": {"streamSid": "MZ2", "customParameters": {"persona": "nobody"}}}']
        for bad in bad_messages:
            ws = await http.ws_connect(stream_url(server))
            await ws.send_str(bad)
            closing = await ws.receive(timeout=10)
            assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1003, (bad, closing)
            assert closing.extra, "the close says why"
        ws = await http.ws_connect(stream_url(server))
        await ws.send_bytes(b"\x00\x01")
        assert (await ws.receive(timeout=10)).data == 1003
        async with http.get(f"{server.url}/api/health") as r:
            assert r.status == 200
    report = await good
    assert report.spoke and report.violations == [], report.to_dict()


async def test_stream_dtmf_reaches_the_agent(server: RunningServer, admin_token: str, script: Script,
                                             tmp_path: Path) -> None:
    script.reply = "You chose option four."
    since = time.time() - 1
    steps = "  - wait: 0.5\n  - dtmf: 4\n  - wait_for: {event: mark, timeout: 30}\n"
    report = await run_scenario(stream_url(server), scenario(tmp_path, steps),
                                config=SessionConfig(response_timeout_s=30))
    assert report.violations == [] and report.spoke, report.to_dict()
    call = await latest_call(server, admin_token, since, "twilio")
    assert [t["text"] for t in call["turns"] if t["role"] == "user"] == ["the caller pressed 4"]
    assert any(t["role"] == "agent" and t["text"] == script.reply for t in call["turns"])


async def _stored(server: RunningServer, token: str, since: float, which: Callable[[dict[str, Any]], bool],
                  timeout: float = 15) -> dict[str, Any]:
    """The newest stored call since `since` that `which` picks, once the write queue has stored it."""
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        for _ in range(int(timeout * 5)):
            async with http.get(f"{server.url}/api/calls", params={"since": str(since), "limit": "10"}) as r:
                found = [c for c in (await r.json())["calls"] if which(c)]
            if found:
                return found[0]
            await asyncio.sleep(0.2)
    raise AssertionError("the call was not stored")


def _twilio_start(stream_sid: str, **parameters: str) -> str:
    """A `start` message as Twilio sends it."""
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": stream_sid, "start": {
        "streamSid": stream_sid, "accountSid": "AC" + "0" * 32, "callSid": "CA" + uuid.uuid4().hex,
        "tracks": ["inbound"], "customParameters": parameters,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})


async def test_twilio_signature_authenticates_the_stream(server: RunningServer, admin_token: str) -> None:
    """Real Twilio strips the query string and sends no Authorization: it signs the upgrade with
    X-Twilio-Signature over the URL it connected to, keyed with the account's auth token."""
    auth_token = "twilio-account-auth-token"

    def sign(url: str) -> str:  # Twilio's algorithm: base64(HMAC-SHA1(auth token, URL)), no parameters on a GET
        return base64.b64encode(hmac.new(auth_token.encode(), url.encode(), hashlib.sha1).digest()).decode()

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http, http.post(
            f"{server.url}/api/personas", json={"name": (persona := f"tw-{uuid.uuid4().hex[:6]}"),
                                                "system_prompt": "You answer the phone."}) as r:
        assert r.status == 201
    settings = server.app[SERVICES].settings
    settings.twilio_auth_token = SecretStr(auth_token)
    url = f"{server.url}/api/phone/twilio"
    behind_proxy = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pono.example.com"}
    since = time.time() - 1
    try:
        async with aiohttp.ClientSession() as http:
            for headers in ({"X-Twilio-Signature": sign("wss://elsewhere.example.com/api/phone/twilio"),
                             **behind_proxy},  # signed for another URL
                            {"X-Twilio-Signature": sign("wss://pono.example.com/api/phone/twilio") + "x",
                             **behind_proxy},
                            {"X-Twilio-Signature": sign(url.replace("http://", "ws://"))[::-1]}):
                with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                    await http.ws_connect(url, headers=headers)
                assert refused.value.status == 401, headers
            # Behind a TLS proxy: the URL Twilio signed is the public one the forwarded headers describe.
            ws = await http.ws_connect(url, headers={"X-Twilio-Signature": sign("wss://pono.example.com/api/phone/twilio"),
                                                     **behind_proxy})
            await ws.send_str(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send_str(_twilio_start("MZ" + uuid.uuid4().hex, persona=persona, caller="+15550006666"))
            await ws.send_str(json.dumps({"event": "stop", "streamSid": "MZ0"}))
            await ws.close()
            # With PONO_PUBLIC_URL set, that is the URL signed, whatever the request's own host is.
            settings.public_url = "https://voice.example.org"
            ws = await http.ws_connect(url, headers={"X-Twilio-Signature": sign("wss://voice.example.org/api/phone/twilio")})
            assert not ws.closed
            await ws.close()
            # The provider token keeps working for other providers.
            ws = await http.ws_connect(url, headers={"Authorization": f"Bearer {TOKEN}"})
            assert not ws.closed
            await ws.close()
    finally:
        settings.twilio_auth_token, settings.public_url = None, None
    call = await _stored(server, admin_token, since, lambda c: c["caller"] == "+15550006666")
    assert call["persona"] == persona  # the custom parameters still choose


async def test_provider_ids_are_checked_and_never_our_call_id(server: RunningServer, admin_token: str) -> None:
    """A streamSid or callSid from the provider is only an attribute, and must look like one."""
    async with aiohttp.ClientSession() as http:
        for sid in ("MZ" + "x" * 10_000, "MZ\u0000../../etc", ""):
            ws = await http.ws_connect(stream_url(server))
            await ws.send_str(_twilio_start(sid))
            closing = await ws.receive(timeout=10)
            assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1003, (sid[:20], closing)
        since = time.time() - 1
        stream_sid = "MZ" + uuid.uuid4().hex
        ws = await http.ws_connect(stream_url(server))
        await ws.send_str(_twilio_start(stream_sid))
        await ws.send_str(json.dumps({"event": "stop", "streamSid": stream_sid}))
        await ws.close()
    call = await _stored(server, admin_token, since, lambda c: c["transport"] == "twilio")
    assert call["id"] != stream_sid and len(call["id"]) == 32
