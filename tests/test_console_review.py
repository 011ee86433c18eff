"""The console for people reviewing calls, through real calls on the shared server (real Postgres, Redis, Whisper,
an aiortc caller speaking espeak-ng audio): the recording's waveform peaks API, the dashboard API, and headless
Chromium (under the app's strict CSP, not bypassed) playing a recorded call with a card number read aloud, seeking
from the transcript, drawing the latency waterfall and the dashboard's charts."""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from datetime import datetime
from itertools import pairwise
from pathlib import Path
from typing import Any

import aiohttp
import av
import numpy as np
import pytest
from conftest import RunningServer, espeak
from helpers import poll_call, text_call

from pono.context import SERVICES
from pono.storage.users import create_api_key, create_user
from pono.testing.caller import Caller

CARD_SENTENCE = "Hello, my card is 4 1 1 1, 1 1 1 1, 1 1 1 1, 1 1 1 1, and I want to pay the bill"
TONE_PEAK = 6000 / 32768  # pono.voice.recording.timeline.TONE_LEVEL


@pytest.fixture(scope="module")
def script(scripted_llm):
    from pono.testing.scripted_llm import Script

    scripted_llm.script = Script()
    return scripted_llm.script


async def api(server: RunningServer, token: str | None, path: str) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(f"{server.url}{path}", headers=headers) as r:
        return r.status, await r.json()


@pytest.fixture(scope="module")
async def persona(server: RunningServer, admin_token: str) -> str:
    name = f"review-{uuid.uuid4().hex[:8]}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http, \
            http.post(f"{server.url}/api/personas", json={"name": name, "system_prompt": "x", "recording": "on"}) as r:
        assert r.status == 201, await r.text()
    return name


@pytest.fixture(scope="module")
def made() -> list[str]:
    """The ids of the calls this module made with its persona (the dashboard's figures must match them)."""
    return []


@pytest.fixture(scope="module")
async def card_call(server: RunningServer, admin_token: str, audio_dir: Path, script, persona: str,
                    made: list[str]) -> dict:
    """One recorded call in which the caller reads a card number mid-sentence; the call as the API gives it, its
    recording's bytes, and the wall time the caller's speech began."""
    script.reply = "Thank you, I have noted that."
    sentence = espeak(CARD_SENTENCE, audio_dir / "review-card.wav")
    lead_s = int(np.flatnonzero(np.abs(sentence) > 500)[0]) / 16_000  # espeak's own silence before the first word
    caller = Caller(server.url)
    try:
        await caller.connect(persona=persona)
        made.append(caller.call_id)
        await caller.wait_open()
        await asyncio.sleep(1.5)
        spoke_at = time.time() + lead_s
        caller.speak(sentence)
        await caller.wait_for(lambda e: e["type"] == "agent.final", 60)
        await asyncio.sleep(2.5)
    finally:
        await caller.hang_up()
    call = await poll_call(server, admin_token, caller.call_id,
                           lambda c: (c.get("recording") or {}).get("status") == "complete"
                           and any(f.get("channel") for f in c.get("dlp_findings", [])), tries=300)
    assert call["recording"]["status"] == "complete", call
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http, \
            http.get(f"{server.url}/api/calls/{caller.call_id}/recording") as r:
        data = await r.read()
    return {"call": call, "id": caller.call_id, "data": data, "spoke_at": spoke_at}


@pytest.fixture(scope="module")
async def viewer(server: RunningServer) -> str:
    pool = server.app[SERVICES].storage.db.pool
    user = await create_user(pool, f"viewer-{uuid.uuid4().hex[:6]}", "viewer")
    return (await create_api_key(pool, user, "viewer", "review"))[1]


def decode_native(data: bytes) -> np.ndarray:
    """Ogg Opus bytes → stereo float [n, 2] at the decoder's own rate (48 kHz), no resampling."""
    with av.open(io.BytesIO(data)) as container:
        planes = [frame.to_ndarray() for frame in container.decode(audio=0)]
    return np.concatenate(planes, axis=1).T.astype(np.float64)


def decode(data: bytes) -> np.ndarray:
    """Ogg Opus bytes → 16 kHz stereo float [n, 2] in -1..1."""
    with av.open(io.BytesIO(data)) as container:
        resampler = av.AudioResampler(format="s16", layout="stereo", rate=16_000)
        frames = [f for frame in container.decode(audio=0) for f in resampler.resample(frame)]
    return np.concatenate([f.to_ndarray().reshape(-1, 2) for f in frames]).astype(np.float64) / 32768


def within_neighbours(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether each level in `a` is at most the greatest of the same bucket and its two neighbours in `b`: bucket
    edges here (by sample) and in the API (by 10 ms window) differ by up to 10 ms, less than a bucket, so each
    bucket lies within its neighbours on the other side."""
    padded = np.pad(b, 1, mode="edge")
    return bool(np.all(a <= np.maximum(np.maximum(padded[:-2], padded[1:-1]), padded[2:]) + 0.02))


def stamp(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


async def test_peaks_are_the_recordings_two_channels(server: RunningServer, card_call: dict, viewer: str) -> None:
    call, stereo = card_call["call"], decode_native(card_call["data"])
    status, peaks = await api(server, viewer, f"/api/calls/{card_call['id']}/recording/peaks?buckets=400")
    assert status == 200, peaks
    assert peaks["buckets"] == 400 and set(peaks["channels"]) == {"caller", "agent"}
    assert abs(peaks["duration_s"] - call["recording"]["duration_s"]) < 0.1
    assert abs(peaks["bucket_s"] * 400 - peaks["duration_s"]) < 1e-3
    for lane in peaks["channels"].values():
        low, high = np.array(lane["min"]), np.array(lane["max"])
        assert len(low) == len(high) == 400 and np.all(low <= high) and np.all(np.abs(low) <= 1)
    # Each lane follows its own channel of the file (decoded here independently): the same envelope.
    edges = np.linspace(0, len(stereo), 401).astype(int)
    for i, name in enumerate(("caller", "agent")):
        envelope = np.array([np.abs(stereo[lo:hi, i]).max() for lo, hi in pairwise(edges)])
        lane = np.maximum(np.array(peaks["channels"][name]["max"]), -np.array(peaks["channels"][name]["min"]))
        assert within_neighbours(lane, envelope) and within_neighbours(envelope, lane), name
        assert np.corrcoef(envelope, lane)[0, 1] > 0.9, name
    assert max(peaks["channels"]["agent"]["max"]) > 0.02  # the agent's reply is in the right channel
    # The redacted span is the tone, in the caller's lane only at the tone's level.
    span = next(f for f in call["dlp_findings"] if f.get("channel") == "caller")
    inside = [b for b in range(400) if span["audio_start_ms"] / 1000 + 0.3 < (b + 0.5) * peaks["bucket_s"]
              < span["audio_end_ms"] / 1000 - 0.3]
    assert inside
    tone = np.array(peaks["channels"]["caller"]["max"])[inside]
    assert np.all(np.abs(tone - TONE_PEAK) < 0.06), tone


async def test_time_zero_places_the_callers_words_where_they_were_said(server: RunningServer, card_call: dict,
                                                                        viewer: str) -> None:
    _, peaks = await api(server, viewer, f"/api/calls/{card_call['id']}/recording/peaks")
    caller = decode(card_call["data"])[:, 0]
    onset = int(np.flatnonzero(np.abs(caller) > 0.03)[0]) / 16_000
    said = stamp(peaks["time_zero"]) + onset  # the wall time the recording says the words began
    assert abs(said - card_call["spoke_at"]) < 0.25, (said - card_call["spoke_at"], peaks["time_zero"])
    first_user = next(t for t in card_call["call"]["turns"] if t["role"] == "user")
    offset = stamp(first_user["started_at"]) - stamp(peaks["time_zero"])
    assert onset - 0.2 < offset < onset + 1.5  # speech.started comes once the VAD has heard enough


async def test_peaks_bounds_refusals_and_audit(server: RunningServer, card_call: dict, viewer: str,
                                               admin_token: str, persona: str, made: list[str]) -> None:
    path = f"/api/calls/{card_call['id']}/recording/peaks"
    for bad in ("0", "5001", "abc", "-3", "1.5"):
        status, body = await api(server, viewer, f"{path}?buckets={bad}")
        assert status == 422 and body["fields"][0]["field"] == "buckets", (bad, body)
    status, body = await api(server, viewer, f"{path}?buckets=5000")
    assert status == 200 and body["buckets"] == min(5000, int(np.ceil(body["duration_s"] / 0.01 - 1e-6)))
    status, body = await api(server, None, path)
    assert status == 401
    async with aiohttp.ClientSession() as http, http.post(f"{server.url}/api/call-tokens") as r:
        call_token = (await r.json())["token"]
    assert (await api(server, call_token, path))[0] == 401
    status, body = await api(server, viewer, f"/api/calls/{uuid.uuid4()}/recording/peaks")
    assert status == 404 and "no recording" in body["error"]
    async with text_call(server.url, persona) as unrecorded:  # no audio: nothing is recorded
        unrecorded_id = unrecorded.call_id
        made.append(unrecorded_id)
    status, body = await api(server, viewer, f"/api/calls/{unrecorded_id}/recording/peaks")
    assert status == 404 and "no recording" in body["error"]
    pool = server.app[SERVICES].storage.db.pool
    rows = await pool.fetch("SELECT actor, details FROM audit_log WHERE action = 'recording.peaks' AND target = $1",
                            card_call["id"])
    assert any('"buckets": 5000' in r["details"] for r in rows) and len(rows) >= 2


async def dashboard(server: RunningServer, token: str, persona: str, hours: int = 24) -> dict:
    status, body = await api(server, token, f"/api/dashboard?hours={hours}&persona={persona}")
    assert status == 200, body
    return body


async def test_dashboard_figures_match_the_calls_made(server: RunningServer, admin_token: str, viewer: str,
                                                      persona: str, card_call: dict, made: list[str],
                                                      script) -> None:
    # A typed call whose first reply the caller cuts off by typing again (a barge-in), seen live while open.
    script.reply, script.token_interval_s = "Let me think about that for a moment, " * 6, 0.1
    try:
        async with text_call(server.url, persona) as caller:
            made.append(caller.call_id)
            caller.send_text("What are your opening hours?")
            await caller.wait_for(lambda e: e["type"] == "agent.delta", 20)
            caller.send_text("Actually, never mind.")
            await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] > 1, 30)
            for _ in range(50):
                live = (await dashboard(server, viewer, persona))["active_calls"]
                if live["total"] == 1:
                    break
                await asyncio.sleep(0.1)
            assert live["available"] and live["total"] == 1 and live["by_transport"] == {"webrtc": 1}, live
    finally:
        script.reply, script.token_interval_s = "Thank you.", 0.01
    # A typed question in a call with audio: its spoken answer has first_audio_sent but is no voice-to-voice turn.
    caller = Caller(server.url)
    try:
        await caller.connect(persona=persona)
        await caller.wait_open()
        made.append(caller.call_id)
        caller.send_text("Hello there")
        await caller.wait_for(lambda e: e["type"] == "latency" and "first_audio_sent" in e["marks"], 20)
    finally:
        await caller.hang_up()
    # What no real call can be made to do here: one that ended in error, and one whose replica died (never ended).
    pool = server.app[SERVICES].storage.db.pool
    failed, lost = f"review-failed-{uuid.uuid4().hex[:6]}", f"review-lost-{uuid.uuid4().hex[:6]}"
    await pool.execute("INSERT INTO calls (id, transport, persona, replica, started_at, ended_at, end_reason)"
                       " VALUES ($1, 'sip', $2, 'gone', now() - interval '3 minutes', now() - interval '2 minutes',"
                       " 'error')", failed, persona)
    await pool.execute("INSERT INTO calls (id, transport, persona, replica, started_at)"
                       " VALUES ($1, 'sip', $2, 'gone', now() - interval '5 minutes')", lost, persona)

    calls = [await poll_call(server, admin_token, call_id, lambda c: bool(c.get("ended_at"))) for call_id in made]
    agent_turns = [t for c in calls for t in c["turns"] if t["role"] == "agent"]
    # Answers to speech only: the typed call's replies (and any greeting) have first_audio_sent but no speech_end.
    voice_to_voice = [t["latency"]["first_audio_sent"] for t in agent_turns
                      if {"first_audio_sent", "speech_end"} <= t["latency"].keys()]
    assert len(voice_to_voice) < sum("first_audio_sent" in t["latency"] for t in agent_turns)
    barge_ins = sum(t["interrupted"] for t in agent_turns)
    assert voice_to_voice and barge_ins >= 1, agent_turns
    for _ in range(50):
        body = await dashboard(server, viewer, persona)
        if body["active_calls"]["total"] == 0 and body["totals"]["agent_turns"] == len(agent_turns):
            break
        await asyncio.sleep(0.1)
    totals = body["totals"]
    assert totals["calls"] == len(made) + 2 and totals["ended"] == len(made) + 1
    assert body["errors"] == {"ended_in_error": 1, "lost": 1, "total": 2}
    assert body["end_reasons"]["error"] == 1 and body["end_reasons"][""] == 1
    assert totals["agent_turns"] == len(agent_turns) and totals["barge_ins"] == barge_ins
    assert totals["latency_turns"] == len(voice_to_voice)
    assert abs(totals["voice_to_voice_p50_s"] - np.percentile(voice_to_voice, 50)) < 1e-3
    assert abs(totals["voice_to_voice_p95_s"] - np.percentile(voice_to_voice, 95)) < 1e-3
    assert len(body["hourly"]) == 24 and sum(h["calls"] for h in body["hourly"]) == totals["calls"]
    assert sum(h["barge_ins"] for h in body["hourly"]) == barge_ins
    assert 0 <= stamp(body["until"]) - stamp(body["hourly"][-1]["hour"]) < 3600  # the last hour is this one
    findings = [f for c in calls for f in c["dlp_findings"]]
    expected = {t: {"transcript": sum(1 for f in findings if f["entity_type"] == t and not f.get("channel")),
                    "audio": sum(1 for f in findings if f["entity_type"] == t and f.get("channel"))}
                for t in {f["entity_type"] for f in findings}}
    assert {f["entity_type"]: {"transcript": f["transcript"], "audio": f["audio"]}
            for f in body["dlp_findings"]} == expected
    redacted = {f["entity_type"] for f in card_call["call"]["dlp_findings"] if f.get("channel")}
    assert redacted and all(expected[t]["audio"] >= 1 for t in redacted), expected  # the card read aloud
    assert (await dashboard(server, viewer, persona, hours=1))["hourly"][0]["hour"] == body["hourly"][-1]["hour"]


async def test_dashboard_refusals(server: RunningServer, viewer: str) -> None:
    for bad in ("0", "169", "x", "-1", "", "2.5"):
        status, body = await api(server, viewer, f"/api/dashboard?hours={bad}")
        assert status == 422 and body["fields"][0]["field"] == "hours", (bad, body)
    status, body = await api(server, viewer, f"/api/dashboard?persona={'p' * 201}")
    assert status == 422 and body["fields"][0]["field"] == "persona"
    assert (await api(server, None, "/api/dashboard"))[0] == 401
    async with aiohttp.ClientSession() as http, http.post(f"{server.url}/api/call-tokens") as r:
        call_token = (await r.json())["token"]
    assert (await api(server, call_token, "/api/dashboard"))[0] == 401
    status, body = await api(server, viewer, "/api/dashboard?hours=168")
    assert status == 200 and len(body["hourly"]) == 168
