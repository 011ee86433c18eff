"""The call loop's parts that need no audio: turn-taking, sentence cutting, playout, conversation, pacing."""

from __future__ import annotations

import asyncio
import time

import numpy as np

from pono.agent.conversation import Conversation
from pono.signaling.audio_out import OUT_FRAME, PacedAudioTrack
from pono.voice.playout import PlayoutTracker
from pono.voice.sentences import SentenceSplitter, split_all
from pono.voice.turns import Signal, TurnConfig, TurnDetector


def run(detector: TurnDetector, probs: list[float]) -> list[Signal]:
    return [s for p in probs if (s := detector.update(p)) is not None]


def test_turn_detector_needs_min_speech_and_hangover() -> None:
    d = TurnDetector(TurnConfig(min_speech_ms=200, hangover_ms=480, chunk_ms=32))
    assert run(d, [0.9] * 3 + [0.0] * 5) == []  # 96 ms of sound: a click, not speech
    signals = run(d, [0.9] * 10 + [0.1] * 5 + [0.9] * 3 + [0.1] * 20)
    assert signals == [Signal.START, Signal.PAUSE, Signal.RESUME, Signal.PAUSE, Signal.END]
    assert not d.in_speech


def test_turn_detector_caps_utterance_length() -> None:
    d = TurnDetector(TurnConfig(min_speech_ms=64, hangover_ms=500, max_utterance_ms=1000, chunk_ms=32))
    signals = run(d, [0.9] * 60)
    # A long turn is cut into segments (each transcribed and kept); it ends only on silence.
    assert signals[0] is Signal.START and Signal.SEGMENT in signals and Signal.END not in signals
    assert d.in_speech
    assert run(d, [0.0] * 20)[-1] is Signal.END


def test_sentence_splitter_speaks_early_and_whole() -> None:
    s = SentenceSplitter(first_clause_words=4, max_chars=60)
    pieces: list[str] = []
    for token in "Sure, I can help with that, it is easy. The **table** is booked. Bye".split(" "):
        pieces += s.feed(token + " ")
    pieces += s.flush()
    assert pieces == ["Sure, I can help", "with that, it is easy.", "The table is booked.", "Bye"]


def test_a_first_sentence_without_commas_starts_at_a_phrase() -> None:
    s = SentenceSplitter(first_clause_words=4)
    pieces: list[str] = []
    for token in "The store opens at nine in the morning tomorrow. It closes at six.".split(" "):
        pieces += s.feed(token + " ")
    pieces += s.flush()
    # Not before four words (the prosody of "The store" alone is poor), and later sentences stay whole.
    assert pieces == ["The store opens at nine", "in the morning tomorrow.", "It closes at six."]
    assert split_all("Yes, and then some.") == ["Yes, and then some."]


def test_fixed_text_is_spoken_whole() -> None:
    # A greeting whose last sentence has no full stop must not lose it.
    assert split_all("Hello. Welcome to the Blue Door bistro") == ["Hello.", "Welcome to the Blue Door bistro"]
    assert split_all("Coffee time!") == ["Coffee time!"]
    # All of it is there: no early first piece, which only buys time while an LLM streams.
    assert split_all("The store opens at nine in the morning. Welcome, dear caller, to our shop.") == [
        "The store opens at nine in the morning.", "Welcome, dear caller, to our shop."]


def test_a_question_is_not_cut_before_a_phrase() -> None:
    """"Would you like a table | for four?" made the first piece a statement to the TTS."""
    s = SentenceSplitter(first_clause_words=4)
    pieces: list[str] = []
    for token in "Would you like a table for four tonight at the window? I can book it.".split(" "):
        pieces += s.feed(token + " ")
    assert pieces + s.flush() == ["Would you like a table for four tonight at the window?", "I can book it."]


def test_playout_tracker_keeps_only_heard_words() -> None:
    t = PlayoutTracker()
    t.add("One two three four.", 0.0, 2.0)
    t.add("Five six.", 2.0, 1.0)
    assert t.heard_text(0.0) == ""
    assert t.heard_text(1.0) == "One two"
    assert t.heard_text(2.5) == "One two three four. Five"
    assert t.heard_text(9.0) == "One two three four. Five six."


def test_conversation_marks_interruptions_and_merges_user_turns() -> None:
    c = Conversation("be brief", max_messages=4)
    c.add_user("hello")
    c.add_agent("Hi there, how can I", interrupted=True)
    c.add_user("book a table")
    c.add_user("for two")
    prompt = c.prompt()
    assert prompt[0] == {"role": "system", "content": "be brief"}
    assert prompt[2]["content"].endswith("[interrupted by the caller]")
    assert prompt[3] == {"role": "user", "content": "book a table for two"}


async def test_paced_track_runs_on_wall_clock_and_clears_at_once() -> None:
    track = PacedAudioTrack(max_queue_s=1.0)
    await track.push(np.full(OUT_FRAME * 10, 1000, np.int16))
    started = time.monotonic()
    for _ in range(5):
        await track.recv()
    assert time.monotonic() - started >= 0.07  # 5 frames are 80 ms apart at least 4 intervals
    assert track.played_frames == 5 and track.queued_s > 0
    track.clear()
    frame = await track.recv()
    assert track.queued_s == 0 and not frame.to_ndarray().any()
    # The queue is bounded: a push beyond it waits until playout makes room.
    push = asyncio.create_task(track.push(np.ones(OUT_FRAME * 60, np.int16)))
    await asyncio.sleep(0.05)
    assert not push.done()
    track.clear()
    push.cancel()
    track.stop()
