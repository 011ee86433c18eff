"""Speech that begins while the agent talks: an interruption to stop for, or a backchannel to talk over.

Decided with the words the STT hears, not with duration alone (Pipecat's minimum-words interruption strategy),
and a false interruption resumes where the audio paused (LiveKit Agents' false-interruption resume):

- once the speech has `min_ms` of voice, the agent's audio pauses and the utterance so far is transcribed.
  Words beyond an acknowledgement make it an interruption: the reply is cut where it paused. No words, or only
  "mhm", "yeah", "I see", within `FALSE_INTERRUPTION_S`: the audio resumes. A transcript that takes longer
  counts as words (better to stop than to talk over the caller).
- an utterance that ends while its first decision is heard is decided by all of it: if the part heard was only an
  acknowledgement and the whole takes longer than `FALSE_INTERRUPTION_S` (Whisper can turn a held "Aaaah" into
  a 448-token "Ah ah ah ..." loop, 3 s on a CPU), the caller has stopped and nothing heard was a word, so the
  audio resumes, and the whole is decided when it arrives, as for an utterance that ended after its last
  decision (below). Lateness is load, not words.
- a caller who goes on after a resume is heard again each further `min_ms`: "Yeah, I think that's wrong" is
  an interruption once "I think" is heard, not an acknowledgement decided on its first word.
- an utterance that ends before any decision (shorter than `min_ms`) interrupts only when it asks the agent to
  stop ("Stop.", "Wait", "Sorry?": `is_stop_request`; Whisper makes words of a click or a hum); one that ends
  after the last decision is heard whole when it ends and decided as on the way. Its `speech.stopped` event
  waits for that hearing, so `ignored` says what was decided; the agent talks on meanwhile, so this hearing has
  no 1.5 s limit.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from typing import Any

from pono.events import EventStream, EventType
from pono.voice.interruptions import FALSE_INTERRUPTION_S, PausableOutput, is_backchannel, is_stop_request
from pono.voice.responder import Responder
from pono.voice.turns import TurnDetector

log = logging.getLogger(__name__)

ENDED_HEARING_S = 10.0  # the most an utterance over the agent that ended waits for its transcript
Spawn = Callable[[Coroutine[Any, Any, Any], str], "asyncio.Task[Any]"]


@dataclass(frozen=True)
class Ended:
    """An utterance over the agent that is over: `final` transcribes all of it, `t0` is when its speech stopped
    (for latency), `turn` and `stopped` are its `speech.stopped` event's turn number and fields, sent once it is
    known whether it was ignored."""

    final: asyncio.Task[str]
    t0: float
    turn: int
    stopped: dict[str, Any]


class Unheard(Enum):
    """Why a hearing of speech over the agent has no transcript."""

    LATE = "late"  # not within FALSE_INTERRUPTION_S; the transcript still comes
    FAILED = "failed"  # the STT failed


class OverAgentSpeech:
    """One call's judge of caller speech that starts while the agent is busy.

    `start()` at each confirmed utterance, `heard_more()` after every VAD step while it lasts, `ended()` when it
    is over. `active` is True while the utterance is speech over the agent and not (yet) the caller's own turn:
    no partials, no speculative transcript, no end-of-turn model for it. `transcript` gives the utterance's
    transcript so far (the call's streaming recognizer's `final`)."""

    def __init__(self, *, responder: Responder, output: PausableOutput, detector: TurnDetector,
                 events: EventStream, transcript: Callable[[], Coroutine[Any, Any, str]], spawn: Spawn,
                 barge_in: Callable[[], Awaitable[None]], becomes_turn: Callable[[bool], None], min_ms: int) -> None:
        self.responder, self.output, self.detector, self.events = responder, output, detector, events
        self._transcript, self._spawn, self._barge_in, self._becomes_turn = transcript, spawn, barge_in, becomes_turn
        self.min_ms = min_ms
        self.active = False
        self._deciding: asyncio.Task[None] | None = None  # the decision on the way; None again at each utterance
        self._decide_at_ms = float(min_ms)  # above min_ms once a decision was started on the way
        self._ended: Ended | None = None  # the utterance, once it ended mid-decision (its speech.stopped unsent)

    def start(self, agent_busy: bool) -> None:
        """A new utterance is confirmed; `agent_busy` says whether the agent is talking (or about to)."""
        self._send_stopped(self._ended, ignored=False)  # undecided when the caller spoke again: as before
        self.active = agent_busy
        self._deciding, self._ended, self._decide_at_ms = None, None, float(self.min_ms)

    @property
    def deciding(self) -> bool:
        return self._deciding is not None and not self._deciding.done()

    def _superseded(self) -> bool:
        """In a decision: a later utterance started meanwhile (`start()` forgot this decision), so it changes
        nothing."""
        return self._deciding is not asyncio.current_task()

    async def heard_more(self) -> None:
        """After each VAD step of the utterance: decide once it is long enough, or hand the turn to the caller
        when the agent stopped first."""
        if not self.active or not self.detector.in_speech:
            return
        if not self.responder.busy:  # the agent stopped before the caller did: this is the caller's turn now
            self.active = False
            self._becomes_turn(False)
            return
        if self.detector.voiced_ms < self._decide_at_ms or self.deciding:
            return
        self._decide_at_ms = self.detector.voiced_ms + self.min_ms  # past min_ms: decided on the way
        if self.responder.pause():  # audio stops now; the caller's words decide what follows
            self._deciding = self._spawn(self._decide(self._spawn(self._transcript(), "stt-suspect")), "barge-in")
        else:  # nothing that can pause (or be interrupted) is playing: the interruption is real
            await self._interrupt()

    def ended(self, final: asyncio.Task[str], t0: float, turn: int, stopped: dict[str, Any]) -> None:
        """The utterance (turn number `turn`, as its speech.started said) is over; `final` transcribes all of it,
        `t0` is when its speech stopped (for latency), `stopped` the `speech.stopped` event's fields. A decision
        in flight commits it if it was an interruption; otherwise it is heard whole now."""
        ended = Ended(final, t0, turn, stopped)
        if self.deciding:
            self._ended = ended
            return
        # Whether it was decided on the way is known now: a later utterance resets _decide_at_ms during the hearing.
        self._spawn(self._decide_ended(ended, on_the_way=self._decide_at_ms > self.min_ms), "barge-in-at-end")

    def _send_stopped(self, ended: Ended | None, *, ignored: bool) -> None:
        if ended is not None:
            self.events.emit(EventType.SPEECH_STOPPED, ended.turn, ignored=ignored, **ended.stopped)

    async def _interrupt(self) -> None:
        self.active = False
        self._becomes_turn(True)
        await self._barge_in()

    async def _hear(self, transcript: asyncio.Task[str]) -> str | Unheard:
        """The transcript, or why there is none: it takes longer than FALSE_INTERRUPTION_S (LATE: the task goes
        on) or it failed (FAILED)."""
        try:
            return await asyncio.wait_for(asyncio.shield(transcript), FALSE_INTERRUPTION_S)
        except TimeoutError:
            return Unheard.LATE
        except Exception as exc:
            log.error("hearing a suspected interruption failed (%s)", type(exc).__name__)
            return Unheard.FAILED

    async def _decide(self, transcript: asyncio.Task[str]) -> None:
        text = await self._hear(transcript)  # none at all counts as words: better to stop than to talk over
        if self._superseded():
            return
        late: Ended | None = None  # the whole, decided when it arrives
        if self._ended is not None and isinstance(text, str) and is_backchannel(text):
            whole = await self._hear(self._ended.final)  # it ended meanwhile: the whole of it decides
            if self._superseded():
                return
            if whole is Unheard.LATE:  # the caller stopped after an acknowledgement: go on, decide it later
                late = self._ended
            else:
                text = whole
        # Once the agent is cut (active is False) the call ends the utterance itself: nothing more comes here.
        ended, self._ended = self._ended, None
        if not self.output.paused:  # typed text, a key or an operator already cut the agent: nothing to decide
            self._send_stopped(ended, ignored=True)
            return
        if isinstance(text, str) and is_backchannel(text):  # the caller's turn (if over) was only this
            turn = self.responder.playing_turn  # the agent's turn that goes on
            self.events.emit(EventType.AGENT_RESUMED, self.responder.turns if turn is None else turn, heard=text,
                             resumed_s=round(self.output.held_s, 3))
            # Decided: the resume plays on by itself (seconds of held audio), and more words may pause it again.
            self._spawn(self.responder.resume(), "resume")
            if late is not None:
                self._spawn(self._decide_ended(late, on_the_way=True), "barge-in-late")
            else:
                self._send_stopped(ended, ignored=True)
            return
        self._send_stopped(ended, ignored=False)
        await self._interrupt()
        if ended is not None and not self._superseded():  # the caller stopped before the decision: answered now
            self._answer(ended)

    async def _decide_ended(self, ended: Ended, *, on_the_way: bool) -> None:
        """An utterance that is over while the agent talks on: heard whole, and its `speech.stopped` sent with the
        outcome. There is no hurry, so a slow transcript is waited for (up to ENDED_HEARING_S), and none (the STT
        failed) is no reason to cut the agent. One too short to have been decided on the way (not `on_the_way`):
        Whisper makes words of a click or a hum ("Thumb"), so only a word that asks the agent to stop counts; a
        longer one, or one heard as an acknowledgement that ended before its whole transcript came, is decided
        as on the way."""
        try:
            text = await asyncio.wait_for(asyncio.shield(ended.final), ENDED_HEARING_S)
        except Exception as exc:
            log.error("hearing speech over the agent failed (%s)", type(exc).__name__)
            text = ""
        words = not is_backchannel(text) if on_the_way else is_stop_request(text)
        self._send_stopped(ended, ignored=not words)
        if not words:
            return
        if self.responder.busy:  # "Stop.": the agent talked through it, and stops now
            await self._barge_in()
        self._answer(ended)

    def _answer(self, ended: Ended) -> None:
        self.responder.reply_to(self.responder.commit_user(spec=ended.final, source="voice"), t0=ended.t0, spoken=True)
