"""Calls end: at the maximum duration with a goodbye, and when the caller's media stops."""

from __future__ import annotations

import asyncio
import json
import re

from helpers import settings_for_new_calls, stored_end_reason, stored_turns
from test_voice_call import open_call

from pono.context import SERVICES
from pono.testing.scripted_llm import Script
from pono.voice.call import TIME_LIMIT_GOODBYE


async def call_gone(server, call_id: str, within_s: float = 20.0) -> bool:
    calls = server.app[SERVICES].calls.calls
    for _ in range(int(within_s * 10)):
        if call_id not in calls:
            return True
        await asyncio.sleep(0.1)
    return False


async def test_a_call_past_its_maximum_duration_hears_a_goodbye_and_ends(server, script, admin_token) -> None:
    script.reply = "Let me tell you a long story about our restaurant and its history. " * 4
    with settings_for_new_calls(server, call_max_s=4.0):
        caller = await open_call(server)
    try:
        caller.send_text("Tell me everything")
        goodbye = await caller.wait_for(lambda e: e["type"] == "agent.final" and e["text"] == TIME_LIMIT_GOODBYE, 30)
        assert goodbye["interrupted"] is False
        assert await call_gone(server, caller.call_id)
    finally:
        await caller.hang_up()
    assert await stored_end_reason(server, admin_token, caller.call_id) == "max_duration"
    turns = await stored_turns(server, admin_token, caller.call_id, 3)
    assert turns[-1]["text"] == TIME_LIMIT_GOODBYE


async def test_a_caller_whose_media_stops_is_hung_up(server, script, admin_token) -> None:
    with settings_for_new_calls(server, call_idle_timeout_s=3.0):
        caller = await open_call(server)
    try:
        await asyncio.sleep(4.0)  # audio frames (silence) keep flowing: the call stays up
        assert caller.call_id in server.app[SERVICES].calls.calls
        caller.mic.stop()  # the caller's RTP stops, as when a browser tab freezes or a network dies
        assert await call_gone(server, caller.call_id)
    finally:
        await caller.hang_up()
    assert await stored_end_reason(server, admin_token, caller.call_id) == "media_timeout"


async def test_concurrent_offers_cannot_overfill_the_server(server) -> None:
    from pono.testing.caller import Caller

    calls = server.app[SERVICES].calls
    callers = [Caller(server.url) for _ in range(5)]
    with settings_for_new_calls(server, max_calls=len(calls.calls) + 2):
        results = await asyncio.gather(*(c.connect(audio=False) for c in callers), return_exceptions=True)
    try:
        accepted = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, RuntimeError) and "503" in str(r)]
        assert len(accepted) == 2 and len(refused) == 3, results
    finally:
        await asyncio.gather(*(c.hang_up() for c in callers), return_exceptions=True)


async def test_keys_pressed_without_a_pause_are_cut_into_bounded_entries(server, script: Script) -> None:
    from helpers import text_call

    from pono.voice.call import MAX_KEYS

    script.reply = "Okay."
    # Keys closer together than the inter-digit gap, for ever: each entry stops at MAX_KEYS keys.
    with settings_for_new_calls(server, dtmf_interdigit_ms=600_000, call_text_messages_per_10s=10_000):
        async with text_call(server.url) as caller:
            for _ in range(MAX_KEYS + 3):
                caller.send_raw(json.dumps({"type": "dtmf", "digit": "*"}))
            entry = await caller.wait_for(lambda e: e["type"] == "transcript.final", 20)
            assert entry["text"] == "the caller pressed " + "*" * MAX_KEYS


async def test_a_call_whose_loop_fails_ends_as_an_error(server, admin_token, monkeypatch) -> None:
    """A call's audio loop that raised once left the call open, deaf, until the caller gave up, and it was
    stored as a hang-up; nothing ever stored "error" (the dashboard's and the nightly report's failed calls)."""
    models = server.app[SERVICES].models

    async def broken_vad(*args: object) -> list[float]:
        raise RuntimeError("the VAD broke")

    caller = await open_call(server)
    try:
        monkeypatch.setattr(models, "run_vad", broken_vad)  # this call's next frame fails its audio loop
        error = await caller.wait_for(lambda e: e["type"] == "error" and e.get("kind") == "internal", 10)
        assert "ends" in error["message"]
        assert await call_gone(server, caller.call_id)
    finally:
        monkeypatch.undo()
        await caller.hang_up()
    assert await stored_end_reason(server, admin_token, caller.call_id) == "error"


async def test_what_the_caller_said_or_pressed_as_they_hung_up_is_kept(server, admin_token, audio_dir) -> None:
    """A hang-up mid-sentence lost the sentence (only the greeting was stored), and keys pressed just before
    a hang-up were lost with their inter-digit timer (review finding)."""
    from conftest import espeak

    sentence = espeak("I would like to book a table for two people at seven o'clock tonight please",
                      audio_dir / "long-sentence.wav")
    with settings_for_new_calls(server, dtmf_interdigit_ms=600_000):
        caller = await open_call(server)
    try:
        caller.send_raw(json.dumps({"type": "dtmf", "digit": "4"}))
        caller.send_raw(json.dumps({"type": "dtmf", "digit": "2"}))
        await caller.wait_for(lambda e: e["type"] == "dtmf" and e["digit"] == "2", 10)
        caller.speak(sentence)
        await caller.wait_for(lambda e: e["type"] == "speech.started", 10)
        await asyncio.sleep(1.5)  # mid-sentence
    finally:
        await caller.hang_up()
    turns = await stored_turns(server, admin_token, caller.call_id, 2)
    said = " ".join(t["text"].lower() for t in turns if t["role"] == "user")
    assert "42" in said and {"book", "table"} & set(re.findall(r"[a-z]+", said)), turns
