"""Call recordings, the agent's side: a reply that reads a card number back is redacted in the agent's channel
too; the persona's `silence` choice leaves silence where the number was (the `tone` choice is checked in
test_recordings); `announce` says the notice before the greeting, also for the fallback persona.

Real calls: an aiortc caller speaking espeak-ng audio to the shared server, the scripted LLM answering, and the
stored recording decoded and heard again by the project's own STT.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from conftest import espeak
from helpers import poll_call, server_on_own_stores, settings_for_new_calls
from test_recordings import CARD_SENTENCE, call_with_recording, decode, recorded_persona, recording_of

from pono.context import SERVICES
from pono.testing.caller import Caller

READBACK = "Thank you. I have your card as 4 1 1 1, 1 1 1 1, 1 1 1 1, 1 1 1 1, and the payment is done."
RATE = 16_000


@pytest.fixture(scope="module")
def script(scripted_llm):
    from pono.testing.scripted_llm import Script

    scripted_llm.script = Script()
    yield scripted_llm.script
    scripted_llm.script = Script()  # the next module's tests get the default answer, not the card read back


async def recorded_call(server, admin_token: str, persona: str, speak: np.ndarray | None = None,
                        wait_s: float = 2.0) -> dict:
    """One call on `persona`: the caller says `speak` (if given) and waits for the agent's answer. Returns
    {"call": the stored call once its recording is complete, "stereo": the recording decoded, "events"}."""
    caller, call = await call_with_recording(server, admin_token, persona, speak, wait_s)
    data = await recording_of(server.url, admin_token, caller.call_id)
    return {"call": call, "stereo": decode(data), "events": caller.events, "call_id": caller.call_id}


@pytest.fixture(scope="module")
async def readback(server, admin_token: str, audio_dir: Path, script) -> dict:
    """A recorded call with `silence` redaction: the caller reads a card number, the agent reads it back."""
    script.reply = READBACK
    persona = await recorded_persona(server.url, admin_token, recording_redaction="silence")
    return await recorded_call(server, admin_token, persona, espeak(CARD_SENTENCE, audio_dir / "card.wav"),
                               wait_s=3.0)


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) if len(pcm) else 0.0


def spans_of(call: dict, channel: str) -> list[dict]:
    return [f for f in call["dlp_findings"] if f.get("channel") == channel]


async def test_a_card_number_the_agent_reads_back_is_not_in_its_channel(server, readback) -> None:
    call, stereo = readback["call"], readback["stereo"]
    agent_side = np.ascontiguousarray(stereo[:, 1])
    assert rms(agent_side) > 100, "the agent's reply is in the recording"
    heard = await server.app[SERVICES].models.run_stt(agent_side)
    words = re.sub(r"[^a-z0-9 ]", " ", heard.lower()).split()
    assert {"thank", "card", "payment"} <= set(words), heard  # the rest of the reply is kept
    digits = re.sub(r"\D", "", heard)
    spoken_ones = sum(w in ("one", "1") for w in words)
    assert "1111" not in digits and "4111" not in digits and spoken_ones < 4, heard  # no digit run of the card
    spans = spans_of(call, "agent")
    assert spans, call["dlp_findings"]
    span = spans[0]
    assert span["audio_end_ms"] - span["audio_start_ms"] > 2000, span  # sixteen digits take seconds to say
    assert span["action"] == "silence" and "4111" not in str(span)
    agent_turns = [t["index"] for t in call["turns"] if t["role"] == "agent"]
    assert span["turn"] in agent_turns


async def test_silence_mode_leaves_near_silence_where_the_number_was(readback) -> None:
    """Both channels' replaced spans are near-silent; the same channel around them carries speech."""
    call, stereo = readback["call"], readback["stereo"]
    for channel, index in (("caller", 0), ("agent", 1)):
        spans = spans_of(call, channel)
        assert spans, (channel, call["dlp_findings"])
        start, end = spans[0]["audio_start_ms"] * 16, spans[0]["audio_end_ms"] * 16
        side = stereo[:, index]
        inside = side[start + 1600:end - 1600]  # Opus smears a few ms at the edges
        assert len(inside) > RATE and rms(inside) < 30, (channel, rms(inside))
        # The rest of that turn is speech: the second before the span.
        assert rms(side[max(0, start - RATE):start]) > 300, (channel, rms(side[max(0, start - RATE):start]))
        spectrum = np.abs(np.fft.rfft(inside.astype(np.float64)))
        assert spectrum.max() < 50 * len(inside) ** 0.5, channel  # no tone either


NOTICE = "Calls on this line are recorded."


async def test_announce_says_the_notice_before_the_greeting_and_records(server, admin_token: str, script) -> None:
    persona = await recorded_persona(server.url, admin_token, recording="announce", recording_notice=NOTICE,
                                     greeting="How can I help?")
    caller = Caller(server.url)
    with settings_for_new_calls(server, speak_greeting=True):
        try:
            await caller.connect(persona=persona)
            await caller.wait_open()
            # At once, as an impatient caller would: the notice is not cut short (a review found it cut to "This
            # call is recorded" by a barge-in, and the call recorded on).
            caller.send_text("Hello, I want to pay my bill")
            said = await caller.wait_for(lambda e: e["type"] == "agent.final", 30)
            await asyncio.sleep(1.0)
        finally:
            await caller.hang_up()
    assert said["text"] == NOTICE and said["interrupted"] is False
    call = await poll_call(server, admin_token, caller.call_id,
                           lambda c: (c.get("recording") or {}).get("status") == "complete", tries=300)
    assert call["turns"][0]["role"] == "agent" and call["turns"][0]["text"] == NOTICE
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http, \
            http.get(f"{server.url}/api/calls/{caller.call_id}/recording") as r:
        stereo = decode(await r.read())
    heard = await server.app[SERVICES].models.run_stt(np.ascontiguousarray(stereo[:, 1]))
    assert "recorded" in heard.lower(), heard  # the notice itself is in the recording


async def test_the_fallback_persona_records_as_pono_recording_default(tmp_path_factory, scripted_llm,
                                                                      script) -> None:
    """Postgres is down when the call starts and no copy of the default persona is known: the persona of last
    resort records and announces by PONO_RECORDING_DEFAULT (greetings off: the notice is still said); the
    recording's row reaches Postgres through the journal once it is back."""
    notice = "This line records every call."
    async with server_on_own_stores(tmp_path_factory, scripted_llm, "recdefault", recording_default="announce",
                                    recording_notice=notice) as (running, pg, _valkey, token):
        await pg.astop()
        caller = Caller(running.url)
        try:
            await caller.connect()
            await caller.wait_open()
            said = await caller.wait_for(lambda e: e["type"] == "agent.final", 30)
            await asyncio.sleep(1.0)
        finally:
            await caller.hang_up()
            await pg.astart()
        assert said["text"] == notice
        call = await poll_call(running, token, caller.call_id,
                               lambda c: (c.get("recording") or {}).get("status") == "complete", tries=300)
        assert call["persona"] == "default" and (call["recording"] or {}).get("duration_s", 0) > 1.0, call


async def _act(http: aiohttp.ClientSession, url: str, token: str, call_id: str, **body: object) -> dict:
    async with http.post(f"{url}/api/calls/{call_id}/actions", json=body,
                         headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200, await r.text()
        return await r.json()


async def test_operator_audio_is_recorded_and_marked(server, admin_token: str, redis_url: str, audio_dir: Path,
                                                     script) -> None:
    """An operator (an aiortc peer) takes a recorded call over and speaks, hands it back, then has the agent say a
    line. The operator's voice is in the recording's agent channel, and operators watching the call (its Redis
    event channel) are told where in the recording operator audio started and stopped."""
    import json

    import redis.asyncio as aioredis
    from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

    from pono.signaling.audio_out import Resampler
    from pono.testing.caller import RATE as MIC_RATE
    from pono.testing.caller import MicrophoneTrack

    persona = await recorded_persona(server.url, admin_token)
    voice = espeak("This is the manager speaking", audio_dir / "manager.wav")
    line = "Your parcel left the warehouse today."
    caller = Caller(server.url)
    operator = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    mic = MicrophoneTrack()
    redis = aioredis.from_url(redis_url)
    feed = redis.pubsub()
    published: list[dict] = []

    async def follow() -> None:
        async for message in feed.listen():
            if message["type"] == "message":
                published.append(json.loads(message["data"]))

    follower: asyncio.Task | None = None
    try:
        await caller.connect(persona=persona)
        await caller.wait_open()
        await feed.subscribe(f"pono:events:{caller.call_id}")
        follower = asyncio.create_task(follow())
        await asyncio.sleep(1.0)
        operator.addTrack(mic)
        await operator.setLocalDescription(await operator.createOffer())
        async with aiohttp.ClientSession() as http:
            answer = await _act(http, server.url, admin_token, caller.call_id, action="take_over",
                                sdp=operator.localDescription.sdp)
            await operator.setRemoteDescription(RTCSessionDescription(sdp=answer["sdp"], type="answer"))
            await caller.wait_for(lambda e: e["type"] == "call.state" and e["state"] == "operator")
            await asyncio.sleep(0.5)
            mic.play(Resampler(MIC_RATE)(voice, 16_000))
            await asyncio.sleep(voice.size / 16_000 + 1.0)
            await _act(http, server.url, admin_token, caller.call_id, action="hand_back")
            await caller.wait_for(lambda e: e["type"] == "call.state" and e["state"] == "listening")
            await _act(http, server.url, admin_token, caller.call_id, action="say", text=line)
            await caller.wait_for(lambda e: e["type"] == "agent.final" and e["text"] == line, 30)
        await asyncio.sleep(2.0)
    finally:
        await operator.close()
        await caller.hang_up()
        if follower is not None:
            follower.cancel()
        await feed.aclose()
        await redis.aclose()
    call = await poll_call(server, admin_token, caller.call_id,
                           lambda c: (c.get("recording") or {}).get("status") == "complete", tries=300)
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http, \
            http.get(f"{server.url}/api/calls/{caller.call_id}/recording") as r:
        stereo = decode(await r.read())
    marks = [e for e in published if e["type"] == "operator.action" and "recording_offset_ms" in e]
    spans = {}
    for via in ("take_over", "say"):
        started = [m["recording_offset_ms"] for m in marks if m["via"] == via and m["action"] == "audio_started"]
        stopped = [m["recording_offset_ms"] for m in marks if m["via"] == via and m["action"] == "audio_stopped"]
        assert len(started) == 1 and len(stopped) == 1 and started[0] < stopped[0], (via, marks)
        spans[via] = (started[0] * 16, stopped[0] * 16)
    assert spans["take_over"][1] <= spans["say"][0] <= call["recording"]["duration_s"] * RATE, spans
    models = server.app[SERVICES].models
    for via, words in (("take_over", {"manager", "speaking"}), ("say", {"parcel", "warehouse"})):
        start, end = spans[via]
        agent, caller_side = stereo[start:end, 1], stereo[start:end, 0]
        assert rms(agent) > 300 and rms(caller_side) < 100, (via, rms(agent), rms(caller_side))
        heard = await models.run_stt(np.ascontiguousarray(agent))
        assert words & set(re.sub(r"[^a-z ]", " ", heard.lower()).split()), (via, heard)
    # Before the take-over, the agent channel was quiet (no greeting): the operator's audio is what is there.
    assert rms(stereo[:spans["take_over"][0], 1]) < 100
    assert len({m["actor"] for m in marks}) == 1 and marks[0]["actor"].startswith("admin-"), marks  # who spoke
