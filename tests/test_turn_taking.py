"""Turn-taking with the end-of-turn model (Smart Turn v3.2) in real calls: an aiortc caller speaks espeak-ng."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from typing import Any

import aiohttp
import numpy as np
import pytest
from conftest import espeak
from helpers import settings_for_new_calls, stored_turns
from test_voice_call import LONG_REPLY, open_call, trim, words

from pono.context import SERVICES
from pono.settings import Settings
from pono.testing.caller import RATE as HEARD_RATE
from pono.testing.scripted_llm import Script
from pono.voice import barge_in
from pono.voice.barge_in import OverAgentSpeech
from pono.voice.interruptions import is_backchannel, is_stop_request
from pono.voice.lead_in import LeadIn
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
    # "I would like to book a | table" scored 0.53-0.58 (complete) in 3 of 8 frame alignments of espeak's voice,
    # a borderline call of the model that made this test flaky; this one scored incomplete in all 8 (a review).
    first = trim(espeak("What time does the", audio_dir / "think1.wav"))
    second = trim(espeak("museum open tomorrow", audio_dir / "think2.wav"))
    script.reply = "At nine."
    with settings_for_new_calls(server, end_of_turn_model=True):
        caller = await open_call(server)
    try:
        caller.speak(np.concatenate([first, np.zeros(int(0.7 * RATE), np.int16), second]))
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 40)
        assert final["text"] == script.reply
        heard = [e for e in caller.events if e["type"] == "transcript.final"]
        assert len(heard) == 1 and {"time", "open"} <= words(heard[0]["text"]), heard[0]["text"]
        stops = [e for e in caller.events if e["type"] == "speech.stopped"]
        assert len(stops) == 1 and stops[0]["end_of_turn"] is not None  # the model was asked
        # One utterance, one turn number, whatever a preemptive reply counted meanwhile (a review saw 1, 3, 1).
        started = next(e for e in caller.events if e["type"] == "speech.started")
        assert started["turn"] == stops[0]["turn"] == heard[0]["turn"], (started, stops, heard)
    finally:
        await caller.hang_up()
    users = [t for t in await stored_turns(server, admin_token, caller.call_id, 2) if t["role"] == "user"]
    assert len(users) == 1 and {"time", "open"} <= words(users[0]["text"])


def test_acknowledgements_are_told_from_words() -> None:
    for text in ("", "M-HM", "Mm-hm.", "Yeah, okay.", "Uhuh, right.", "Ah, ah, ah.", "Mmmm.", "I see.", "Got it.",
                 "All right.", "Thank you.", "Perfect.", "That's right.", "Ah ah ah ah ah ah."):
        assert is_backchannel(text), text
    # What Whisper base made of espeak's "Aaaaaaaaaaaaah." at different starts: a sound, no words (one of them,
    # "I", barged in on the agent in a CI run of test_an_acknowledgement_or_a_sound_over_the_agent...).
    for text in ("I", "I-I-I-I-I-I-I-I-I-I", "A-A-A-A-A-A-", "Ha ha ha ha.", "Ah ah ah", "Er, ah", "Ah, I-I-I-",
                 "Ha ha, I", "Oh, er"):
        assert is_backchannel(text), text
    # A letter alone may be an answer ("A", option A) or spelled ("E, A, E"): words.
    for text in ("A", "E?", "E, A, E", "A. B."):
        assert not is_backchannel(text), text
    # "it", "see" alone begin sentences; "I" with more is words ("I think..."); "Huh?" asks to say it again.
    for text in ("Stop, wait", "yeah but no", "No.", "What time is it?", "I think", "It", "See", "Huh?", "Eh?",
                 "Yeah, I think",
                 "4, 5, 6.", "Oui, très bien"):  # digits and accented letters are words (an account number was lost)
        assert not is_backchannel(text), text
    # Too short to pause the agent for: only a request to stop interrupts (Whisper heard a click and "hmm" as
    # "Thumb").
    for text in ("Stop.", "Wait!", "Sorry?", "Hold on.", "No, no."):
        assert is_stop_request(text), text
    # A held letter is the same word to both: "Okaaay" was words (it cut the agent) and "Nooo!" asked nothing.
    for text in ("Okaaay.", "Yeahhh", "Ohhh.", "Mmmm, riiight"):
        assert is_backchannel(text), text
    for text in ("Nooo!", "Waaait", "Sorrry?", "Stooop"):
        assert is_stop_request(text), text
    for text in ("Whaaat a day", "Sooo I need a table"):
        assert not is_backchannel(text), text
    for text in ("Thumb", "Hmm.", "Yeah.", ""):
        assert not is_stop_request(text), text


def test_a_short_first_word_before_a_gap_starts_the_utterance() -> None:
    """ "Stop" (160 ms, too short to confirm speech) | 220 ms | the confirming speech: the word is kept, with
    100 ms before it; nothing further back than 1 s (the recording holds audio from 1 s before speech)."""
    lead_in = LeadIn(keep_ms=500)
    frames = [np.full(320, i, np.int16) for i in range(60)]
    voiced = set(range(6, 14)) | set(range(25, 50))  # "Stop" at frames 6-13, the confirming speech from 25
    for i, frame in enumerate(frames[:50]):
        lead_in.add(frame)
        if i in voiced:
            lead_in.mark_voiced()
    assert [int(f[0]) for f in lead_in.take()] == list(range(1, 50))
    for i, frame in enumerate(frames):  # a word at frames 8-9, speech from 18: 1 s back is frame 10, so not the word
        lead_in.add(frame)
        if i in (8, 9) or i >= 18:
            lead_in.mark_voiced()
    assert [int(f[0]) for f in lead_in.take()] == list(range(13, 60))  # from 100 ms before the speech


async def test_a_short_first_word_after_which_the_caller_pauses_is_heard(server, script: Script, audio_dir,
                                                                        admin_token: str) -> None:
    yes = trim(espeak("Yes", audio_dir / "yes-fast.wav", words_per_minute=400))
    rest = trim(espeak("I need a table for two tonight", audio_dir / "need-table.wav"))
    assert yes.size < 0.15 * RATE  # too short to be confirmed as speech alone (PONO_MIN_SPEECH_MS, voiced)
    script.reply = "Of course."
    caller = await open_call(server)
    try:
        caller.speak(np.concatenate([yes, np.zeros(int(0.4 * RATE), np.int16), rest]))
        heard = await caller.wait_for(lambda e: e["type"] == "transcript.final" and e.get("source") == "voice", 30)
        assert "yes" in words(heard["text"]) and "table" in words(heard["text"]), heard["text"]
    finally:
        await caller.hang_up()


def test_a_turn_found_unfinished_early_is_asked_again() -> None:
    """An early check answers sooner but takes more complete questions for unfinished ones (bench/turns.py): a
    second one, later in the same pause, saves those the long hangover."""
    config = TurnConfig(min_speech_ms=64, chunk_ms=32, end_of_turn=True, check_after_ms=96, recheck_after_ms=320,
                        short_hangover_ms=160, long_hangover_ms=960)
    d = TurnDetector(config)
    [d.update(0.9) for _ in range(5)]
    signals = [d.update(0.0) for _ in range(10)]  # 320 ms of silence
    assert signals.count(Signal.CHECK) == 2 and Signal.END not in signals
    d.turn_complete(d.pauses)  # the second answer: complete; the silence is past the short hangover already
    assert d.update(0.0) is Signal.END
    d = TurnDetector(config)
    [d.update(0.9) for _ in range(5)]
    [d.update(0.0) for _ in range(3)]
    d.turn_complete(d.pauses)  # the first answer: complete, so no second question
    assert Signal.CHECK not in [d.update(0.0) for _ in range(2)]


def test_a_pause_is_signalled_before_an_early_check() -> None:
    """A check due at the first silent chunk once took its place: no PAUSE, so no speculative transcript."""
    d = TurnDetector(TurnConfig(min_speech_ms=64, chunk_ms=32, end_of_turn=True, check_after_ms=32,
                                short_hangover_ms=192, long_hangover_ms=960))
    [d.update(0.9) for _ in range(5)]
    assert [d.update(0.0) for _ in range(2)] == [Signal.PAUSE, Signal.CHECK]


async def _agent_speaking(caller, script: Script) -> None:
    script.reply = LONG_REPLY
    caller.send_text("Tell me about the restaurant")
    await caller.wait_for(lambda e: e["type"] == "call.state" and e["state"] == "speaking", 20)
    await asyncio.sleep(1.5)


@pytest.mark.parametrize("said", ["Yeah, okay, right.", "Aaaaaaaaaaaaah."])
async def test_an_acknowledgement_or_a_sound_over_the_agent_pauses_it_and_it_goes_on(
        server, script: Script, audio_dir, admin_token: str, said: str) -> None:
    sound = trim(espeak(said, audio_dir / f"ack{len(said)}.wav"))
    assert sound.size > 0.6 * RATE  # long enough to be taken for an interruption at first
    caller = await open_call(server)
    try:
        await _agent_speaking(caller, script)
        caller.speak(sound)
        resumed = await caller.wait_for(lambda e: e["type"] == "agent.resumed", 20)
        assert resumed["resumed_s"] > 0
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 60)
        assert final["interrupted"] is False and final["text"] == LONG_REPLY
        assert not [e for e in caller.events if e["type"] == "barge_in"]
    finally:
        await caller.hang_up()
    agent = [t for t in await stored_turns(server, admin_token, caller.call_id, 2) if t["role"] == "agent"]
    assert agent[0]["text"] == LONG_REPLY and agent[0]["interrupted"] is False


class _TalkingAgent:
    """The agent as `OverAgentSpeech` sees it (the responder, its pausable output, the barge-in and the events):
    talking until cut, with what was paused, resumed, cut and answered written down. `decided` is set at the
    first resume or cut."""

    def __init__(self) -> None:
        self.busy, self.paused, self.held_s, self.playing_turn, self.turns = True, False, 2.0, 1, 2
        self.cuts, self.resumes = 0, 0
        self.answered: list[asyncio.Task[str]] = []
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.decided = asyncio.Event()

    def pause(self) -> bool:
        self.paused = True
        return True

    async def resume(self) -> float:
        self.paused, self.resumes = False, self.resumes + 1
        self.decided.set()
        return self.held_s

    async def barge_in(self) -> None:
        self.paused, self.busy, self.cuts = False, False, self.cuts + 1
        self.decided.set()

    def commit_user(self, *, spec: asyncio.Task[str], source: str) -> asyncio.Task[str]:
        return spec

    def reply_to(self, turn: asyncio.Task[str], *, t0: float, spoken: bool) -> None:
        self.answered.append(turn)

    def emit(self, type_: str, turn: int | None = None, **data: Any) -> None:
        self.events.append((str(type_), data))


# Whisper base's transcript of all of espeak's "Aaaaaaaaaaaaah." over a call: a loop to the decoder's 448-token
# limit, about 3 s on a CPU (the first 600 ms were heard as "Ah ah ah" in 0.4-0.6 s, 1 s on 2 busy cores).
_AH_LOOP = "Ah" + " ah" * 223


@pytest.mark.parametrize(("whole", "cut"), [(_AH_LOOP, False), ("Ah, wait, I need a table for two", True)])
async def test_a_sound_that_ends_while_it_is_heard_is_not_words_because_its_whole_transcript_is_late(
        monkeypatch: pytest.MonkeyPatch, whole: str, cut: bool) -> None:
    """The first 600 ms are heard as an acknowledgement only after the sound ended, and the whole sound's
    transcript is late: nothing heard was a word, so the agent goes on, and the whole decides when it comes.
    A late transcript counted as words once, and a loaded machine cut the agent on an "Aaaah" (a flaky test)."""
    monkeypatch.setattr(barge_in, "FALSE_INTERRUPTION_S", 0.01)  # the whole comes only when the test says
    agent = _TalkingAgent()
    detector = TurnDetector(TurnConfig())
    loop = asyncio.get_running_loop()
    first_part, whole_sound = loop.create_future(), loop.create_future()
    tasks: list[asyncio.Task[Any]] = []

    def spawn(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        tasks.append(asyncio.create_task(coro, name=name))
        return tasks[-1]

    async def heard(future: asyncio.Future[str]) -> str:
        return await future

    speech = OverAgentSpeech(responder=agent, output=agent, detector=detector, events=agent,  # type: ignore[arg-type]
                             transcript=lambda: heard(first_part), spawn=spawn, barge_in=agent.barge_in,
                             becomes_turn=lambda _: None, min_ms=600)
    speech.start(agent_busy=True)
    detector.in_speech, detector.voiced_ms = True, 608.0
    await speech.heard_more()
    assert agent.paused and speech.deciding
    detector.in_speech = False  # the sound ends before its first 600 ms are heard
    final = asyncio.create_task(heard(whole_sound))
    speech.ended(final, 0.0, 2, {})
    first_part.set_result("Ah ah ah")  # Whisper base's words for them
    await asyncio.wait_for(agent.decided.wait(), 10)
    assert (agent.resumes, agent.cuts) == (1, 0), "a late transcript of an acknowledgement was taken for words"
    assert [data["heard"] for kind, data in agent.events if kind == "agent.resumed"] == ["Ah ah ah"]
    assert not [data for kind, data in agent.events if kind == "speech.stopped"]  # ignored or not: not known yet
    whole_sound.set_result(whole)
    await asyncio.gather(final, *tasks)
    assert agent.cuts == int(cut) and agent.answered == ([final] if cut else [])
    # Sent once, saying what was decided (it said ignored=False at once, and then the agent went on).
    assert [data["ignored"] for kind, data in agent.events if kind == "speech.stopped"] == [not cut]


async def test_a_short_sound_over_the_agent_is_judged_as_short_when_the_caller_goes_on_before_it_is_heard() -> None:
    """A sound too short to be decided on the way ("Thumb", Whisper's word for a click) is heard whole after it
    ended; the caller's next utterance, decided on the way meanwhile, once made it judged as a long one (any word
    but an acknowledgement), and it cut the agent."""
    agent = _TalkingAgent()
    detector = TurnDetector(TurnConfig())
    loop = asyncio.get_running_loop()
    whole_click = loop.create_future()
    tasks: list[asyncio.Task[Any]] = []

    def spawn(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        tasks.append(asyncio.create_task(coro, name=name))
        return tasks[-1]

    async def heard(future: asyncio.Future[str]) -> str:
        return await future

    async def mhm() -> str:
        return "Mhm"

    speech = OverAgentSpeech(responder=agent, output=agent, detector=detector, events=agent,  # type: ignore[arg-type]
                             transcript=mhm, spawn=spawn, barge_in=agent.barge_in,
                             becomes_turn=lambda _: None, min_ms=600)
    speech.start(agent_busy=True)
    detector.in_speech, detector.voiced_ms = True, 300.0
    await speech.heard_more()
    detector.in_speech = False
    final = asyncio.create_task(heard(whole_click))
    speech.ended(final, 0.0, 2, {})  # too short for a decision on the way
    speech.start(agent_busy=True)  # the caller goes on: "mhm", long enough to pause the agent
    detector.in_speech, detector.voiced_ms = True, 608.0
    await speech.heard_more()
    await asyncio.wait_for(agent.decided.wait(), 10)
    assert (agent.resumes, agent.cuts) == (1, 0)
    whole_click.set_result("Thumb")
    await asyncio.gather(final, *tasks)
    assert agent.cuts == 0 and agent.answered == [], "a click heard as a word cut the agent"
    assert [data["ignored"] for kind, data in agent.events if kind == "speech.stopped"] == [True]


async def test_words_over_the_agent_interrupt_it_where_it_paused(server, script: Script, audio_dir,
                                                                 admin_token: str) -> None:
    stop = trim(espeak("Wait, stop, I need a table for two tomorrow", audio_dir / "stop.wav"))
    caller = await open_call(server)
    try:
        await _agent_speaking(caller, script)
        caller.speak(stop)
        barge = await caller.wait_for(lambda e: e["type"] == "barge_in", 20)
        cut_at = asyncio.get_running_loop().time()
        cut = await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] == barge["turn"], 5)
        assert cut["interrupted"] is True and 0 < len(cut["text"]) < len(LONG_REPLY)
        assert LONG_REPLY.startswith(cut["text"].rstrip(".,"))
        assert not [e for e in caller.events if e["type"] == "agent.resumed"]
        # Silent from the decision on, while the caller goes on talking.
        await asyncio.sleep(1.2)
        audio = caller.recording()
        assert caller.first_arrival is not None
        start = int((cut_at + 0.1 - caller.first_arrival) * HEARD_RATE)
        window = audio[start:start + HEARD_RATE]
        assert window.size == HEARD_RATE and np.abs(window).max() < 500, "the agent kept talking after the interruption"
    finally:
        await caller.hang_up()
    stored = {t["index"]: t for t in await stored_turns(server, admin_token, caller.call_id, 2)}
    assert stored[barge["turn"]]["interrupted"] is True and stored[barge["turn"]]["text"] == cut["text"]


def test_end_of_turn_settings_are_bounded_and_in_order(tmp_path) -> None:
    """An unbounded check time (32 ms once took the PAUSE signal's place) or a short hangover over the long one
    is refused at start, naming the variables."""
    with pytest.raises(ValueError, match="PONO_END_OF_TURN_CHECK_MS"):
        Settings(data_dir=tmp_path, end_of_turn_check_ms=300)  # asked after the short hangover ran out
    with pytest.raises(ValueError, match="PONO_SHORT_HANGOVER_MS"):
        Settings(data_dir=tmp_path, short_hangover_ms=1600)
    with pytest.raises(ValueError):
        Settings(data_dir=tmp_path, end_of_turn_threshold=1.5)
    with pytest.raises(ValueError, match="PONO_END_OF_TURN_RECHECK_MS"):
        Settings(data_dir=tmp_path, end_of_turn_recheck_ms=1600)
    assert TurnConfig(short_hangover_ms=1800, long_hangover_ms=900).short_hangover_ms == 900


async def test_a_personas_turn_taking_is_strict(server, admin_token: str) -> None:
    headers = {"Authorization": f"Bearer {admin_token}"}
    long_ms = server.app[SERVICES].settings.long_hangover_ms
    async with aiohttp.ClientSession(server.url, headers=headers) as http:
        for turn_taking, field in (({"hangover_ms": "300"}, "hangover_ms"), ({"end_of_turn": "yes"}, "end_of_turn"),
                                   ({"hangovr_ms": 300}, "hangovr_ms"),
                                   ({"short_hangover_ms": long_ms + 100}, "short_hangover_ms"),
                                   ({"short_hangover_ms": 64}, "PONO_END_OF_TURN_CHECK_MS")):  # asked after it
            body = {"name": f"tt-{uuid.uuid4().hex[:6]}", "system_prompt": "x", "turn_taking": turn_taking}
            async with http.post("/api/personas", json=body) as r:
                assert r.status == 422, (turn_taking, await r.text())
                assert field in await r.text()
        body = {"name": f"tt-{uuid.uuid4().hex[:6]}", "system_prompt": "x",
                "turn_taking": {"short_hangover_ms": 180, "end_of_turn_threshold": 0.6}}
        async with http.post("/api/personas", json=body) as r:
            assert r.status == 201, await r.text()
            assert (await r.json())["turn_taking"] == {"short_hangover_ms": 180, "end_of_turn_threshold": 0.6}
