"""One call's recording: taps both sides of its audio, follows its events, and writes the redacted mix.

It is an audio tap (`pono.voice.tap.TappedTransport`) and an event observer. The caller's speech is held from
`speech.started` until its `transcript.final` has been checked for personal data (`redaction.py`): found
data is located with word timestamps (Whisper alignment, in a worker thread) and replaced by a tone or
silence before the audio is encoded. The agent's replies are held the same way until `agent.final`. So the
file lags the call by a few seconds (`lag_s`, longer while a turn is being checked, at most `cap_s`), and
the unredacted audio never reaches disk. Encoding runs in worker threads, one chunk at a time.

Operator audio is recorded in the agent's channel. A taken-over call's audio is not held (no text to check it
against; the agent is quiet); an operator's `say` is the agent's voice, held and checked as a reply is. Where
operator audio begins and ends in the recording is told through `on_mark` (see OnMark).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import av
import numpy as np

from pono.agent.dlp.engine import DlpPolicy
from pono.events import CallEvent, EventType
from pono.settings import RECORDING_LAG_MIN_S
from pono.voice.recording.ogg import CODEC, OggOpusWriter, file_digest
from pono.voice.recording.redaction import sensitive_spans, time_span
from pono.voice.recording.timeline import AGENT, CALLER, RATE, Hold, Span, Timeline
from pono.voice.speech.alignment import align_words
from pono.voice.speech.whisper import MAX_CLIP_S, BatchedWhisper

log = logging.getLogger(__name__)

# speech.started comes after the VAD heard enough speech: the hold starts this much earlier (and the recording's
# lag, PONO_RECORDING_LAG_S, may not be shorter, or that audio would be written before the hold began).
PRE_SPEECH_S = RECORDING_LAG_MIN_S
CHUNK_S = 0.5  # audio goes to the encoder in pieces at least this long
HOLD_TIMEOUT_S = 10.0  # a caller turn with no transcript this long after it ended is kept silenced
SAY_WAIT_S = 120.0  # an operator's `say` not heard within this long was dropped (a barge-in drops queued speech)


@dataclass(frozen=True)
class RecordingInfo:
    """A finished recording: `duration_s` of audio, `size` bytes, `sha256` of the file, `codec`."""

    path: Path
    duration_s: float
    size: int
    sha256: str
    codec: str = CODEC
    muted_s: float = 0.0  # audio released silenced because no check came in time


# A redaction as storage keeps it: {"turn", "channel": "caller"|"agent", "entity_type", "start", "end" (character
# offsets in the turn's text), "start_ms", "end_ms" (in the recording), "action": "tone"|"silence", "recognizer"}.
OnRedaction = Callable[[dict[str, Any]], None]
# Operator audio in the recording: {"action": "audio_started"|"audio_stopped", "via": "take_over"|"say", "actor",
# "recording_offset_ms": where, in ms from the recording's start}. A take-over's audio starts with the operator's
# first frame and stops at the hand-back (or the call's end); a say's are known once it has been spoken.
OnMark = Callable[[dict[str, Any]], None]


class CallRecording:
    """Record one call to `path`. `mode` is "tone" or "silence"; `whisper` gives word timestamps (None: a
    turn with personal data is replaced whole); `on_redaction` hears of every span replaced."""

    def __init__(self, path: Path, *, policy: DlpPolicy, mode: str = "tone", whisper: BatchedWhisper | None = None,
                 language: str = "en", on_redaction: OnRedaction | None = None, lag_s: float = 1.5,
                 cap_s: float = 60.0, on_mark: OnMark | None = None) -> None:
        self.path = path
        self.policy = policy
        self.mode = mode if mode in ("tone", "silence") else "tone"
        self.whisper = whisper
        self.language = language
        self.on_redaction = on_redaction or (lambda record: None)
        self.on_mark = on_mark or (lambda mark: None)
        self.timeline = Timeline(lag_s=lag_s, cap_s=cap_s)
        self.started_at = time.time()
        self._queue: asyncio.Queue[np.ndarray | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._writer: OggOpusWriter | None = None
        self._caller_hold: Hold | None = None
        self._caller_closed: list[Hold] = []  # ended turns waiting for their transcript
        self._agent_hold: Hold | None = None
        self._agent_free_at = 0  # a new agent hold opens once the last reply's audio has played
        self._agent_waiting: list[Hold] = []  # replies whose text is known, waiting for their audio to play
        self._resolving: set[asyncio.Task[None]] = set()
        self._resampler: av.AudioResampler | None = None
        self._resampler_rate = 0
        self._closed = False
        self._transcribed = asyncio.Event()  # set by every transcript.final (close waits for the last ones)
        self._operator: str | None = None  # who has taken the call over
        self._operator_from: int | None = None  # where their audio began (None: not heard yet)
        self._says: list[tuple[str, int]] = []  # (operator, position) of each `say` not yet spoken
        self._llm_turns: set[int] = set()  # turns the LLM answered (a say's turn is not one)

    def start(self) -> None:
        """Start the encoder task (the file is created in a worker thread)."""
        self._task = asyncio.create_task(self._encode(), name=f"recording-{self.path.stem}")

    # -- audio taps ----------------------------------------------------------------------------
    def caller_audio(self, frame: np.ndarray) -> None:
        if self._closed:
            return
        t = self.timeline
        if t.agent_queued and self._agent_hold is None and t.pos >= self._agent_free_at and (
                self._operator is None or self._says):
            self._agent_hold = t.hold(AGENT, t.pos)
        t.caller(frame)
        self._tick()

    def agent_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        if self._closed:
            return
        t = self.timeline
        if self._operator is not None and self._operator_from is None:
            self._operator_from = t.pos + t.agent_queued
            self._mark("audio_started", "take_over", self._operator, self._operator_from)
        t.agent(self._resample(pcm, sample_rate))

    def agent_cleared(self) -> None:
        self.timeline.clear_agent()

    def _resample(self, pcm: np.ndarray, rate: int) -> np.ndarray:
        if rate == RATE:
            return pcm.astype(np.int16, copy=False)
        if self._resampler is None or rate != self._resampler_rate:
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=RATE)
            self._resampler_rate = rate
        frame = av.AudioFrame.from_ndarray(pcm.astype(np.int16).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = rate
        out = self._resampler.resample(frame)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in out]) if out else np.zeros(0, np.int16)

    # -- events --------------------------------------------------------------------------------
    def observe(self, event: CallEvent) -> None:
        """The call's event stream: turns open and close holds, transcripts and replies resolve them."""
        if self._closed:
            return
        t = self.timeline
        if event.type is EventType.SPEECH_STARTED and self._caller_hold is None:
            self._caller_hold = t.hold(CALLER, t.pos - int(PRE_SPEECH_S * RATE))
        elif event.type is EventType.SPEECH_STOPPED and self._caller_hold is not None:
            hold, self._caller_hold = self._caller_hold, None
            hold.end = hold.closed_at = t.pos
            self._caller_closed.append(hold)
        elif event.type is EventType.TRANSCRIPT_FINAL and event.data.get("source", "voice") == "voice":
            self._transcribed.set()
            holds, self._caller_closed = self._caller_closed, []
            text = str(event.data.get("text") or "")
            if holds and text:
                self._spawn(self._resolve(holds, CALLER, text, event.turn))
            for h in holds if not text else ():
                h.resolved = True
        elif event.type is EventType.AGENT_FINAL:
            self._agent_final(event)
        elif event.type is EventType.LATENCY and event.turn is not None and (
                event.data.get("llm_endpoint") or "llm_first_token" in event.data.get("marks", {})):
            self._llm_turns.add(event.turn)
        elif event.type is EventType.OPERATOR:
            self._operator_action(str(event.data.get("action")), str(event.data.get("actor") or ""))
        elif event.type is EventType.CALL_ENDED and self._operator is not None:
            self._operator_action("hand_back", self._operator)

    def _agent_final(self, event: CallEvent) -> None:
        """A reply (or a greeting, a say) is over: its hold gets its text, checked once its audio has played.
        The first reply after a `say` that the LLM did not write, and whose audio began after it, is that say."""
        t, hold = self.timeline, self._agent_hold
        self._says = [s for s in self._says if t.pos - s[1] < SAY_WAIT_S * RATE]
        said = None
        if self._says and event.turn not in self._llm_turns and (hold is None or hold.start >= self._says[0][1]):
            said = self._says.pop(0)[0]
        if hold is None:
            return
        self._agent_hold = None
        hold.text, hold.turn = str(event.data.get("text") or ""), event.turn
        hold.end = hold.closed_at = self._agent_free_at = t.pos + t.agent_queued
        self._agent_waiting.append(hold)
        if said is not None:
            self._mark("audio_started", "say", said, hold.start)
            self._mark("audio_stopped", "say", said, hold.end)

    def _operator_action(self, action: str, actor: str) -> None:
        t = self.timeline
        if action == "take_over":
            self._operator, self._operator_from = actor, None
        elif action == "hand_back" and self._operator is not None:
            if self._operator_from is not None:
                end = t.pos + t.agent_queued  # where the operator's queued audio ends
                self._mark("audio_stopped", "take_over", self._operator, end)
                self._agent_free_at = max(self._agent_free_at, end)  # the next reply's hold opens after it
            self._operator = self._operator_from = None
        elif action == "say":
            self._says.append((actor, t.pos))

    def _mark(self, action: str, via: str, actor: str, at: int) -> None:
        self.on_mark({"action": action, "via": via, "actor": actor, "recording_offset_ms": at * 1000 // RATE})

    def _tick(self) -> None:
        t = self.timeline
        for hold in [h for h in self._agent_waiting if t.pos >= (h.end or 0)]:
            self._agent_waiting.remove(hold)
            self._start_agent(hold)
        if self._agent_hold is not None and not t.agent_queued and t.pos - self._agent_hold.start > (
                HOLD_TIMEOUT_S * RATE) and self._agent_hold.end is None:
            # Audio with no reply text (an operator speaking, say): nothing to check it against.
            self._agent_hold.end, self._agent_hold.resolved, self._agent_hold = t.pos, True, None
        for hold in [h for h in self._caller_closed if t.pos - (h.closed_at or 0) > HOLD_TIMEOUT_S * RATE]:
            self._caller_closed.remove(hold)  # never transcribed: not kept (released silenced)
            t.redact(Span(CALLER, hold.start, hold.end or t.pos, "silence"))
            hold.resolved = True
        if t.pos - t.released - t.lag >= CHUNK_S * RATE:
            out = t.take()
            if out is not None:
                self._queue.put_nowait(out)

    def _start_agent(self, hold: Hold) -> None:
        if hold.text:
            self._spawn(self._resolve([hold], AGENT, hold.text, hold.turn))
        else:
            hold.resolved = True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._resolving.add(task)
        task.add_done_callback(self._resolving.discard)

    async def _resolve(self, holds: list[Hold], channel: int, text: str, turn: int | None) -> None:
        """Check one turn's text; replace what it holds in the turn's audio. Whatever fails, the holds are
        released: with the whole turn replaced when personal data was found and could not be located."""
        t = self.timeline
        start = max(min(h.start for h in holds), t.released)
        end = max((h.end or t.pos) for h in holds)
        try:
            spans = await asyncio.to_thread(sensitive_spans, text, self.policy)
            if not spans:
                return
            audio = t.channel(channel, start, end)
            words = None
            if self.whisper is not None and 0 < len(audio) <= MAX_CLIP_S * RATE:
                try:
                    words = await asyncio.to_thread(align_words, self.whisper, audio, text, self.language)
                except Exception as exc:  # the whole turn is replaced instead
                    log.warning("word alignment failed (%s): the turn's audio is replaced whole", type(exc).__name__)
            length_s = max(len(audio), end - start) / RATE
            for span in spans:
                t0, t1 = time_span(span, words, length_s)
                s0, s1 = start + int(t0 * RATE), start + int(t1 * RATE)
                t.redact(Span(channel, s0, s1, self.mode))
                self.on_redaction({"turn": turn, "channel": "caller" if channel == CALLER else "agent",
                                   "entity_type": span.entity_type, "start": span.start, "end": span.end,
                                   "start_ms": s0 * 1000 // RATE, "end_ms": s1 * 1000 // RATE,
                                   "action": self.mode, "recognizer": span.recognizer})
        except Exception:
            log.exception("redaction check failed: the turn's audio is silenced")
            t.redact(Span(channel, start, end, "silence"))
        finally:
            for h in holds:
                h.resolved = True

    # -- encoding ------------------------------------------------------------------------------
    async def _encode(self) -> None:
        self._writer = await asyncio.to_thread(OggOpusWriter, self.path)
        while (chunk := await self._queue.get()) is not None:
            await asyncio.to_thread(self._writer.write, chunk)

    async def _settle(self) -> None:
        """Until no turn is being checked and none waits for its transcript."""
        while self._resolving or self._caller_closed:
            if self._resolving:
                await asyncio.wait(set(self._resolving))
            else:
                self._transcribed.clear()
                await self._transcribed.wait()

    async def close(self, wait_s: float = 5.0) -> RecordingInfo:
        """End the recording: wait up to `wait_s` for turns still being checked, write the rest (anything
        unchecked silenced), close the file. Returns what storage keeps about it."""
        for hold in self._agent_waiting:  # the call ended before these replies had played out
            self._start_agent(hold)
        self._agent_waiting.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._settle(), wait_s)
        self._closed = True
        out = self.timeline.take(final=True)
        if out is not None:
            self._queue.put_nowait(out)
        self._queue.put_nowait(None)
        if self._task is None:
            self.start()
        assert self._task is not None
        try:
            await self._task
        finally:
            if self._writer is not None:
                await asyncio.to_thread(self._writer.close)
        size, sha256 = await asyncio.to_thread(file_digest, self.path)
        duration = self._writer.duration_s if self._writer is not None else 0.0
        return RecordingInfo(self.path, duration, size, sha256, muted_s=self.timeline.muted_samples / RATE)

    async def abort(self) -> None:
        """Stop without waiting (shutdown): what was written stays a playable prefix."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._writer is not None:
            await asyncio.to_thread(self._writer.close)
