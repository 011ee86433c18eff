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
from helpers import settings_for_new_calls
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
    url = f"{server.url}/api/phone/twilio"
    behind_proxy = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pono.example.com"}
    since = time.time() - 1
    with settings_for_new_calls(server, twilio_auth_token=SecretStr(auth_token)):
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
            with settings_for_new_calls(server, public_url="https://voice.example.org"):
                ws = await http.ws_connect(url, headers={"X-Twilio-Signature": sign("wss://voice.example.org/api/phone/twilio")})
                assert not ws.closed
                await ws.close()
                # The provider token keeps working for other providers.
                ws = await http.ws_connect(url, headers={"Authorization": f"Bearer {TOKEN}"})
                assert not ws.closed
                await ws.close()
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


# -- media formats other than μ-law 8 kHz: `start.mediaFormat` ----------------------------------------------------

def _media_start(stream_sid: str, media_format: object, **parameters: str) -> str:
    return json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": stream_sid, "start": {
        "streamSid": stream_sid, "callSid": "CA" + uuid.uuid4().hex, "tracks": ["inbound"],
        "customParameters": parameters, "mediaFormat": media_format}})


async def _l16_call(server: RunningServer, question: np.ndarray, dtype: str) -> tuple[np.ndarray, list[int]]:
    """A provider streaming L16 at 16 kHz (`dtype` ">i2" big-endian or "<i2" little-endian): half a second of
    silence, the question, then silence until the reply has been played (its mark). What came back, decoded
    the same way, and the byte length of each media payload."""
    stream_sid = "MZ" + uuid.uuid4().hex
    frame = 320  # 20 ms at 16 kHz
    line = np.concatenate([np.zeros(8000, np.int16), question])
    heard: list[np.ndarray] = []
    sizes: list[int] = []
    async with aiohttp.ClientSession() as http, http.ws_connect(stream_url(server)) as ws:
        await ws.send_str(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await ws.send_str(_media_start(stream_sid, {"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 1},
                                       caller="+15550008888"))

        async def speak() -> None:
            started = time.monotonic()
            for n in range(10_000):
                chunk = line[n * frame:(n + 1) * frame]
                chunk = np.concatenate([chunk, np.zeros(frame - chunk.size, np.int16)])
                payload = base64.b64encode(chunk.astype(dtype).tobytes()).decode()
                await ws.send_str(json.dumps({"event": "media", "streamSid": stream_sid,
                                              "media": {"track": "inbound", "payload": payload}}))
                await asyncio.sleep(max(0.0, started + (n + 1) * 0.02 - time.monotonic()))

        speaker = asyncio.create_task(speak())
        try:
            while True:
                message = await ws.receive(timeout=40)
                assert message.type is aiohttp.WSMsgType.TEXT, message
                event = json.loads(message.data)
                if event["event"] == "media":
                    payload = base64.b64decode(event["media"]["payload"])
                    sizes.append(len(payload))
                    heard.append(np.frombuffer(payload, dtype).astype(np.int16))
                elif event["event"] == "mark" and heard:
                    break
        finally:
            speaker.cancel()
        await ws.send_str(json.dumps({"event": "stop", "streamSid": stream_sid}))
    return np.concatenate(heard), sizes


@pytest.mark.parametrize("byte_order", ["big", "little"])
async def test_an_l16_stream_is_heard_and_answered_in_l16(server: RunningServer, admin_token: str, script: Script,
                                                          phone_question: np.ndarray, byte_order: str) -> None:
    """`start.mediaFormat` audio/x-l16 at 16 kHz: the caller's L16 is heard and the reply goes out in the same
    format (640-byte payloads: 20 ms of 16-bit samples at 16 kHz). L16 is big-endian (RFC 3551 §4.5.11);
    PONO_TWILIO_L16_BYTE_ORDER=little serves providers that send it little-endian."""
    script.reply = "Certainly, your table for two is booked for seven."
    since = time.time() - 1
    with settings_for_new_calls(server, twilio_l16_byte_order=byte_order):
        heard, sizes = await _l16_call(server, trim(phone_question), ">i2" if byte_order == "big" else "<i2")
    assert set(sizes) == {640}, sorted(set(sizes))
    transcript = await server.app[SERVICES].models.run_stt(heard)
    assert len(words(transcript) & words(script.reply)) >= 4, transcript
    call = await latest_call(server, admin_token, since, "twilio")
    assert call["caller"] == "+15550008888" and heard_the_question(call), call["turns"]


@pytest.mark.parametrize("media_format", [
    {"encoding": "audio/opus", "sampleRate": 48000, "channels": 1},
    {"encoding": "audio/x-mulaw", "sampleRate": 16000, "channels": 1},
    {"encoding": "audio/x-l16", "sampleRate": 16000, "channels": 6},
    {"encoding": "audio/x-l16", "sampleRate": 12, "channels": 1},
    "audio/x-l16",
], ids=["opus", "mulaw-16k", "six-channels", "12-hz", "not-an-object"])
async def test_a_media_format_we_cannot_handle_is_refused_with_the_reason(server: RunningServer,
                                                                          media_format: object) -> None:
    async with aiohttp.ClientSession() as http, http.ws_connect(stream_url(server)) as ws:
        await ws.send_str(_media_start("MZ" + uuid.uuid4().hex, media_format))
        closing = await ws.receive(timeout=10)
    assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1003, closing
    assert "mediaFormat" in (closing.extra or ""), closing.extra


async def test_l16_media_that_is_not_whole_samples_closes_the_stream(server: RunningServer) -> None:
    stream_sid = "MZ" + uuid.uuid4().hex
    async with aiohttp.ClientSession() as http, http.ws_connect(stream_url(server)) as ws:
        await ws.send_str(_media_start(stream_sid, {"encoding": "audio/x-l16", "sampleRate": 8000, "channels": 1}))
        await ws.send_str(json.dumps({"event": "media", "streamSid": stream_sid,
                                      "media": {"payload": base64.b64encode(b"\x00\x01\x02").decode()}}))
        closing = await ws.receive(timeout=10)
    assert closing.type is aiohttp.WSMsgType.CLOSE and closing.data == 1003, closing
    assert "L16" in (closing.extra or ""), closing.extra
