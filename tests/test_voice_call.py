"""Real calls over WebRTC: an aiortc caller speaks espeak-ng audio and listens to what comes back."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import numpy as np
from helpers import settings_for_new_calls

from pono.agent.conversation import APOLOGY
from pono.context import SERVICES
from pono.signaling.audio_out import Resampler
from pono.testing.caller import RATE, Caller
from pono.testing.scripted_llm import Script

LONG_REPLY = (
    "Let me tell you about our restaurant. We open every day at noon and close at midnight. "
    "The kitchen serves fresh fish from the harbour, vegetables from our own garden, and bread baked "
    "every morning. On weekends there is live music in the courtyard, and children eat for free. "
    "Parking is available behind the building, and the bus stops right at the door."
)


def trim(pcm: np.ndarray) -> np.ndarray:
    """Speech without espeak's leading and trailing silence, so pauses in a test are the ones it makes."""
    loud = np.flatnonzero(np.abs(pcm) > 300)
    return pcm[loud[0]:loud[-1] + 1]


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


async def open_call(server, **kwargs) -> Caller:
    caller = Caller(server.url)
    await caller.connect(**kwargs)
    await caller.wait_open()
    return caller


async def test_spoken_question_gets_spoken_answer(server, script: Script, question: np.ndarray) -> None:
    script.reply = "Your table is booked for seven o'clock tonight. We look forward to seeing you."
    with settings_for_new_calls(server, stt_partial_interval_s=0.8):  # the caller sees partials while speaking
        caller = await open_call(server)
    try:
        await asyncio.sleep(0.3)
        caller.speak(question)
        final = await caller.wait_for(lambda e: e["type"] == "transcript.final" and e.get("text"), 30)
        assert {"book", "table"} <= words(final["text"])
        partials = [e for e in caller.events if e["type"] == "transcript.partial"]
        assert partials and all(e["turn"] == final["turn"] for e in partials)
        agent = await caller.wait_for(lambda e: e["type"] == "agent.final", 30)
        assert agent["text"] == script.reply and agent["interrupted"] is False
        latency = await caller.wait_for(lambda e: e["type"] == "latency", 5)
        assert set(latency["marks"]) >= {"speech_end", "stt_final", "llm_first_token", "first_sentence",
                                         "tts_first_audio", "first_audio_sent"}
        # The LLM got the caller's words as the user message.
        assert "table" in script.requests[-1]["messages"][-1]["content"].lower()
        await asyncio.sleep(0.5)
        audio = caller.recording()
        assert np.abs(audio).max() > 2000, "agent audio is silent"
        # The reply must be intelligible: the project's own STT hears the agent's words in it.
        heard = await server.app[SERVICES].models.run_stt(Resampler(16000)(audio, RATE))
        assert len(words(heard) & words(script.reply)) >= 5, heard
    finally:
        await caller.hang_up()


async def test_barge_in_stops_audio_and_truncates_turn(server, script: Script, question: np.ndarray,
                                                       admin_token: str) -> None:
    script.reply = LONG_REPLY
    caller = await open_call(server)
    try:
        caller.send_text("Tell me about the restaurant")
        await caller.wait_for(lambda e: e["type"] == "call.state" and e["state"] == "speaking", 20)
        await asyncio.sleep(2.0)
        caller.speak(question)
        barge = await caller.wait_for(lambda e: e["type"] == "barge_in", 20)
        barge_at = asyncio.get_running_loop().time()
        cut = await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] == barge["turn"], 5)
        assert cut["interrupted"] is True
        assert 0 < len(cut["text"]) < len(LONG_REPLY) * 0.6
        assert LONG_REPLY.startswith(cut["text"].split()[0])
        # The caller is still talking for seconds after the barge-in: the agent must be silent meanwhile.
        await asyncio.sleep(1.6)
        audio = caller.recording()
        assert caller.first_arrival is not None
        start = int((barge_at + 0.4 - caller.first_arrival) * RATE)
        window = audio[start:start + RATE]
        assert window.size == RATE and np.abs(window).max() < 500, "agent kept talking after barge-in"
        # The caller's question then gets its own answer.
        await caller.wait_for(lambda e: e["type"] == "transcript.final" and "table" in e.get("text", "").lower(), 30)
    finally:
        await caller.hang_up()
    # What is stored is what the caller heard, marked interrupted.
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
        for _ in range(50):
            async with http.get(f"{server.url}/api/calls/{caller.call_id}") as r:
                stored = await r.json()
            turns = {t["index"]: t for t in stored.get("turns", [])}
            if barge["turn"] in turns:
                break
            await asyncio.sleep(0.1)
    assert turns[barge["turn"]]["interrupted"] is True and turns[barge["turn"]]["text"] == cut["text"]


async def test_short_noise_does_not_interrupt(server, script: Script, audio_dir) -> None:
    from conftest import espeak

    hmm = espeak("hmm", audio_dir / "hmm.wav")
    click = np.zeros(1600, np.int16)
    click[:160] = 20000
    script.reply = "We open at noon. We close at midnight. The kitchen closes an hour earlier."
    caller = await open_call(server)
    try:
        caller.send_text("When are you open?")
        await caller.wait_for(lambda e: e["type"] == "call.state" and e["state"] == "speaking", 20)
        await asyncio.sleep(0.5)
        caller.speak(np.concatenate([click, np.zeros(8000, np.int16), hmm]))
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 30)
        assert final["interrupted"] is False and final["text"] == script.reply
        assert not [e for e in caller.events if e["type"] == "barge_in"]
    finally:
        await caller.hang_up()


async def test_llm_failure_gets_spoken_apology(server, script: Script) -> None:
    script.failure = "http_500"
    caller = await open_call(server)
    try:
        caller.send_text("Hello?")
        error = await caller.wait_for(lambda e: e["type"] == "error", 20)
        assert error["kind"] == "llm"
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 20)
        assert final["text"] == APOLOGY
        await asyncio.sleep(1.0)
        assert np.abs(caller.recording()).max() > 2000, "the apology was not spoken"
    finally:
        await caller.hang_up()


async def test_llm_timeout_gets_apology_and_call_goes_on(server, script: Script) -> None:
    script.failure = "hang"
    caller = await open_call(server)
    try:
        caller.send_text("Are you there?")
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 20)
        assert final["text"] == APOLOGY
        script.failure = "none"
        script.reply = "Yes, I am here now."
        caller.send_text("Are you there now?")
        final = await caller.wait_for(lambda e: e["type"] == "agent.final" and e["text"] == script.reply, 20)
    finally:
        await caller.hang_up()


async def test_garbage_audio_makes_no_turn(server, script: Script) -> None:
    rng = np.random.default_rng(7)
    noise = (rng.standard_normal(16000 * 2) * 3000).astype(np.int16)
    clicks = np.zeros(16000, np.int16)
    clicks[::1600] = 30000
    silence = np.zeros(16000, np.int16)
    caller = await open_call(server)
    try:
        caller.speak(np.concatenate([noise, clicks, silence]))
        await caller.mic.speech_done.wait()
        await asyncio.sleep(1.5)
        texts = [e for e in caller.events if e["type"] == "transcript.final" and e.get("text")]
        assert texts == []
        assert not [e for e in caller.events if e["type"].startswith("agent.")]
        assert not script.requests
    finally:
        await caller.hang_up()


async def test_preemptive_reply_is_committed_at_end_of_turn(server, script: Script, question: np.ndarray) -> None:
    # A long end-of-turn wait, by silence alone: STT and the LLM finish inside it.
    with settings_for_new_calls(server, hangover_ms=1500, end_of_turn_model=False):
        caller = await open_call(server)
    script.reply = "Booked, see you at seven."
    try:
        caller.speak(question)
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 30)
        assert final["text"] == script.reply and not final["interrupted"]
        latency = await caller.wait_for(lambda e: e["type"] == "latency", 5)
        marks = latency["marks"]
        # The reply was thought up while the caller was still only pausing, and spoken after.
        assert marks["stt_final"] < marks["speech_end"] and marks["llm_first_token"] < marks["speech_end"]
        assert marks["first_audio_sent"] >= marks["speech_end"]
        users = [e for e in caller.events if e["type"] == "transcript.final"]
        assert len(users) == 1 and users[0]["turn"] == 0 and final["turn"] == 1
        assert len(script.requests) == 1
    finally:
        await caller.hang_up()


async def test_preemptive_reply_is_dropped_when_caller_goes_on(server, script: Script, audio_dir) -> None:
    from conftest import espeak

    first = trim(espeak("Please book a table", audio_dir / "first.wav"))
    second = trim(espeak("for two people at seven", audio_dir / "second.wav"))
    with settings_for_new_calls(server, hangover_ms=2000, end_of_turn_model=False):  # silence alone decides, here
        caller = await open_call(server)
    script.reply = "Done, a table for two at seven."
    script.first_token_s = 0.0
    try:
        # A 1 s pause: long enough for a preemptive reply to start, shorter than the hangover.
        caller.speak(np.concatenate([first, np.zeros(16000, np.int16), second]))
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 40)
        assert final["text"] == script.reply
        users = [e for e in caller.events if e["type"] == "transcript.final"]
        assert len(users) == 1 and {"table", "two"} <= words(users[0]["text"])
        assert users[0]["turn"] == 0 and final["turn"] == 1
        assert not [e for e in caller.events if e["type"] in ("barge_in", "error")]
        # The LLM was asked twice: once on the pause (dropped unheard), once on the whole turn.
        assert len(script.requests) == 2
        assert "two" in script.requests[-1]["messages"][-1]["content"].lower()
        assert [e["text"] for e in caller.events if e["type"] == "agent.delta"] != []
        assert "".join(e["text"] for e in caller.events if e["type"] == "agent.delta").strip() == script.reply
    finally:
        await caller.hang_up()
