"""Turn-taking with the end-of-turn model (Smart Turn v3.2) in real calls: an aiortc caller speaks espeak-ng."""

from __future__ import annotations

import numpy as np
from conftest import espeak
from helpers import settings_for_new_calls, stored_turns
from test_voice_call import open_call, trim, words

from pono.testing.scripted_llm import Script
from pono.voice.turns import Signal, TurnConfig, TurnDetector

RATE = 16000


def test_the_model_decides_the_hangover_of_each_pause() -> None:
    config = TurnConfig(min_speech_ms=64, chunk_ms=32, end_of_turn=True, check_after_ms=96,
                        short_hangover_ms=192, long_hangover_ms=960)
    d = TurnDetector(config)
    signals = [d.update(0.9) for _ in range(5)] + [d.update(0.0) for _ in range(3)]
    assert Signal.START in signals and signals[-1] is Signal.CHECK
    # No answer yet: the pause may last up to the long hangover; an answer for an older pause changes nothing.
    d.turn_complete(d.pauses - 1)
    assert [d.update(0.0) for _ in range(10)].count(Signal.END) == 0
    d.update(0.9)  # the caller speaks again: a new pause, checked again
    assert [d.update(0.0) for _ in range(3)][-1] is Signal.CHECK
    d.turn_complete(d.pauses)  # complete: the turn ends after the short hangover
    assert [d.update(0.0) for _ in range(3)][-1] is Signal.END


async def test_a_thinking_pause_does_not_end_the_turn(server, script: Script, audio_dir, admin_token: str) -> None:
    first = trim(espeak("I would like to book a", audio_dir / "think1.wav"))
    second = trim(espeak("table for four tonight please", audio_dir / "think2.wav"))
    script.reply = "A table for four, tonight."
    with settings_for_new_calls(server, end_of_turn_model=True):
        caller = await open_call(server)
    try:
        caller.speak(np.concatenate([first, np.zeros(int(0.7 * RATE), np.int16), second]))
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 40)
        assert final["text"] == script.reply
        heard = [e for e in caller.events if e["type"] == "transcript.final"]
        assert len(heard) == 1 and {"like", "table"} <= words(heard[0]["text"]), heard[0]["text"]
        stops = [e for e in caller.events if e["type"] == "speech.stopped"]
        assert len(stops) == 1 and stops[0]["end_of_turn"] is not None  # the model was asked
    finally:
        await caller.hang_up()
    users = [t for t in await stored_turns(server, admin_token, caller.call_id, 2) if t["role"] == "user"]
    assert len(users) == 1 and {"like", "table"} <= words(users[0]["text"])
