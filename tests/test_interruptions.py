"""Interruptions decided by words: the pausable output under a pause during a resume, an interruption that
starts with an acknowledgement, and one too short to pause the agent ("Stop.")."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from conftest import espeak
from helpers import stored_turns
from test_turn_taking import _agent_speaking
from test_voice_call import LONG_REPLY, open_call, trim, words

from pono.signaling.audio_out import PacedAudioTrack
from pono.testing.scripted_llm import Script
from pono.voice.interruptions import PausableOutput

RATE = 16000


class TrackLine:
    """The outbound half of a transport on a real paced track (20 ms a frame by the wall clock), with a
    listener that keeps every frame of real audio it plays."""

    kind = "webrtc"
    has_audio = True

    def __init__(self) -> None:
        self.track = PacedAudioTrack(max_queue_s=0.4, rate=RATE)
        self.heard: list[np.ndarray] = []
        self.silent_frames_after: list[int] = []  # len(heard) at each silent frame
        self._listener = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        while True:
            frame = (await self.track.recv()).to_ndarray().reshape(-1)
            if frame.any():
                self.heard.append(frame)
            else:
                self.silent_frames_after.append(len(self.heard))

    async def audio_frames(self) -> AsyncIterator[np.ndarray]:
        await asyncio.Event().wait()
        yield np.zeros(320, np.int16)

    async def send_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        await self.track.push(pcm)

    def clear(self) -> None:
        self.track.clear()

    @property
    def played_s(self) -> float:
        return self.track.played_s

    @property
    def queued_s(self) -> float:
        return self.track.queued_s

    async def stop(self) -> None:
        self._listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._listener
        self.track.stop()


async def test_a_pause_during_a_resume_holds_again_and_nothing_is_lost_or_played_twice() -> None:
    line = TrackLine()
    out = PausableOutput(line)  # type: ignore[arg-type]
    speech = (np.arange(2 * RATE) % 20000 + 1).astype(np.int16)  # 2 s, never 0, each sample told apart
    try:
        sending = asyncio.create_task(out.send_audio(speech, RATE))
        await asyncio.sleep(0.3)
        out.pause()
        assert out.paused and 1.0 < out.held_s < 1.8
        assert abs(out.queued_s - out.held_s) < 0.02  # the transport's queue was handed to the hold
        paused_at = len(line.heard)
        await asyncio.sleep(0.2)
        assert len(line.heard) == paused_at, "audio went out while paused"
        resuming = asyncio.create_task(out.resume())
        await asyncio.sleep(0.15)
        out.pause()  # a second suspected interruption while the first resume still plays the held audio
        resumed_s = await asyncio.wait_for(resuming, 2)
        assert out.paused and 0 < resumed_s < 1.8
        held = out.held_s
        assert held > 0.5 and abs(out.queued_s - held) < 0.02
        again = len(line.heard)
        await asyncio.sleep(0.2)
        assert len(line.heard) == again, "the first resume went on after the second pause"
        await out.resume()
        await asyncio.wait_for(sending, 5)
        for _ in range(250):  # the rest plays out, 20 ms a frame
            if out.queued_s == 0:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.06)
        played = np.concatenate(line.heard)
        assert played.size == speech.size and np.array_equal(played, speech), "audio lost or played twice"
        assert not out.paused and out.held_s == 0
    finally:
        await line.stop()


async def test_an_acknowledgement_that_goes_on_into_words_interrupts(server, script: Script, audio_dir,
                                                                     admin_token: str) -> None:
    """Decided on its first 600 ms, "Yeah, yeah" resumed the agent and the rest of the sentence was dropped."""
    said = trim(espeak("Yeah, yeah. I think you are wrong about the hours.", audio_dir / "yeah-but.wav"))
    caller = await open_call(server)
    try:
        await _agent_speaking(caller, script)
        script.reply = "Sorry, let me check the hours."
        caller.speak(said)
        barge = await caller.wait_for(lambda e: e["type"] == "barge_in", 20)
        heard = await caller.wait_for(lambda e: e["type"] == "transcript.final" and e.get("source") == "voice", 20)
        assert {"think", "hours"} <= words(heard["text"]), heard["text"]
        cut = await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] == barge["turn"], 10)
        assert cut["interrupted"] is True
        await caller.wait_for(lambda e: e["type"] == "agent.final" and e["text"] == script.reply, 30)
    finally:
        await caller.hang_up()
    users = [t for t in await stored_turns(server, admin_token, caller.call_id, 4) if t["role"] == "user"]
    assert any({"think", "hours"} <= words(t["text"]) for t in users), users


async def test_a_one_word_interruption_too_short_to_pause_the_agent_stops_it(server, script: Script, audio_dir,
                                                                             admin_token: str) -> None:
    """"Stop." is shorter than PONO_BARGE_IN_MIN_MS: it was ignored and the agent talked on to the end."""
    stop = trim(espeak("Stop.", audio_dir / "stop-short.wav"))
    assert stop.size < 0.5 * RATE
    caller = await open_call(server)
    try:
        await _agent_speaking(caller, script)
        script.reply = "Of course."
        caller.speak(stop)
        stopped = await caller.wait_for(lambda e: e["type"] == "speech.stopped", 20)
        started = next(e for e in caller.events if e["type"] == "speech.started")
        assert stopped["ignored"] is False and stopped["turn"] == started["turn"]  # one utterance, one number
        barge = await caller.wait_for(lambda e: e["type"] == "barge_in", 10)
        cut = await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] == barge["turn"], 10)
        assert cut["interrupted"] is True and len(cut["text"]) < len(LONG_REPLY)
        await caller.wait_for(lambda e: e["type"] == "agent.final" and e["text"] == script.reply, 30)
    finally:
        await caller.hang_up()
    users: list[dict[str, Any]] = [t for t in await stored_turns(server, admin_token, caller.call_id, 4)
                                   if t["role"] == "user"]
    assert any("stop" in words(t["text"]) for t in users), users
