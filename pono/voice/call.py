"""The per-call loop: listen (VAD → turn-taking → STT), reply, and handle barge-in, on any transport."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from pono.agent.conversation import Conversation
from pono.agent.dlp.engine import DEFAULT_POLICY, DlpPolicy
from pono.agent.llm import LLMClient
from pono.agent.tools.registry import ToolBox, ToolContext, ToolRegistry
from pono.events import EventStream, EventType
from pono.logs import bind_turn
from pono.transport import FRAME_MS, Transport
from pono.voice.actions import AgentActions
from pono.voice.models import SpeechModels
from pono.voice.operator import OperatorControls
from pono.voice.reply import HeldEvents, Reply
from pono.voice.turns import Signal, TurnConfig, TurnDetector

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 2000
BLOCKED_WARNING = "For your safety, please don't share card numbers or other sensitive details on this call."
WITHHELD = "[the caller shared sensitive details, which were withheld]"
DTMF_KEYS = tuple("0123456789*#ABCD")
_PREROLL_MS = 300  # audio kept from before speech was confirmed, so the first syllable is not clipped


class CallState(StrEnum):
    LISTENING = "listening"
    USER_SPEAKING = "user_speaking"
    THINKING = "thinking"
    SPEAKING = "speaking"
    OPERATOR = "operator"  # taken over: the agent is quiet, an operator talks


@dataclass
class Preemption:
    spec: asyncio.Task[str]
    task: asyncio.Task[None]
    held: HeldEvents
    text: str
    transcribed_at: float
    turns_before: int


class Call(AgentActions, OperatorControls):
    def __init__(
        self,
        call_id: str,
        transport: Transport,
        models: SpeechModels,
        llm: LLMClient,
        conversation: Conversation,
        turn_config: TurnConfig,
        *,
        barge_in_min_ms: int = 600,
        partial_interval_s: float = 1.0,
        greeting: str = "",
        persona: str | None = None,
        preemptive: bool = True,
        llm_options: dict[str, Any] | None = None,
        dlp: DlpPolicy = DEFAULT_POLICY,
        tools: ToolRegistry | None = None,
        tool_limits: dict[str, Any] | None = None,
        timezone: str = "UTC",
        knowledge: Any = None,
        collections: list[str] | None = None,
        language: str = "en",
        voice: str | None = None,
    ) -> None:
        self.call_id = call_id
        self.transport = transport
        self.models = models
        self.llm = llm
        self.conversation = conversation
        self.turn_config = turn_config
        self.barge_in_min_ms = barge_in_min_ms
        self.partial_interval_s = partial_interval_s
        self.greeting = greeting
        self.persona = persona
        self.preemptive = preemptive
        self.llm_options = llm_options or {}
        self.dlp = dlp
        self.language = language
        self.voice = voice
        self.toolbox: ToolBox | None = None
        if tools is not None:
            context = ToolContext(call_id, persona or "default", timezone,
                                  actions={"end_call": self._schedule_end, "transfer": self._request_transfer,
                                           "cite": self._cite},
                                  knowledge=knowledge, collections=collections or [])
            self.toolbox = ToolBox(tools, context, **(tool_limits or {}))
        self.events = EventStream(call_id)
        self.state = CallState.LISTENING
        self.taken_over_by: str | None = None
        self.end_reason = "hangup"
        self.started = time.time()
        self._turns = 0
        self._reply: Reply | None = None
        self._reply_task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self._stt_busy = False
        self._spec: asyncio.Task[str] | None = None  # speculative STT of the current pause
        self._preempt: Preemption | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> None:
        t = self.transport
        self.events.emit(EventType.CALL_STARTED, transport=t.kind, has_audio=t.has_audio, persona=self.persona)
        loops = [asyncio.create_task(self._text_loop(), name=f"text-{self.call_id}")]
        if t.has_audio:
            loops.append(asyncio.create_task(self._audio_loop(), name=f"audio-{self.call_id}"))
        if self.greeting:
            self._start_reply(greeting=self.greeting)
        try:
            await t.closed()
        finally:
            await self._cancel_reply(reason=self.end_reason)
            for task in [*loops, *self._tasks]:
                task.cancel()
            for task in [*loops, *self._tasks]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await t.close()
            self.events.emit(
                EventType.CALL_ENDED, reason=self.end_reason, duration_s=round(time.time() - self.started, 3)
            )

    async def hang_up(self, reason: str = "hangup") -> None:
        self.end_reason = reason
        await self.transport.close()

    def _set_state(self, state: CallState | str) -> None:
        state = CallState(state)
        if self.taken_over_by is not None and state is not CallState.OPERATOR:
            return  # while an operator has the call, that is its state whoever speaks
        if state != self.state:
            self.state = state
            self.events.emit(EventType.STATE, state=str(state))

    def _next_turn(self) -> int:
        turn = self._turns
        self._turns += 1
        return turn

    def _spawn(self, coro: object, name: str) -> asyncio.Task[object]:
        task = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- listening ----------------------------------------------------------------------------
    async def _audio_loop(self) -> None:
        assert self.models.vad is not None
        vad = self.models.vad.stream()
        detector = TurnDetector(self.turn_config)
        recent: deque[np.ndarray] = deque(maxlen=(self.turn_config.min_speech_ms + _PREROLL_MS) // FRAME_MS)
        utterance: list[np.ndarray] = []
        pause_at = 0.0
        spec: asyncio.Task[str] | None = None  # speculative STT started at the first pause
        last_partial = 0.0
        barged = started_while_busy = False
        async for frame in self.transport.audio_frames():
            if detector.in_speech:
                utterance.append(frame)
            else:
                recent.append(frame)
            for prob in await self.models.run_vad(vad.process, frame):
                signal = detector.update(prob)
                if signal is Signal.START:
                    utterance = list(recent)
                    recent.clear()
                    spec, barged = None, False
                    started_while_busy = self._reply_task is not None
                    last_partial = time.monotonic()
                    self.events.emit(EventType.SPEECH_STARTED, self._turns)
                    if not started_while_busy:
                        self._set_state(CallState.USER_SPEAKING)
                elif signal is Signal.PAUSE:
                    pause_at = time.monotonic()
                    if not started_while_busy or barged:
                        spec = self._spawn(self._transcribe(np.concatenate(utterance)), "stt-spec")
                        self._spec = spec
                        spec.add_done_callback(lambda task, t0=pause_at: self._preempt_reply(task, t0))
                elif signal is Signal.RESUME:
                    spec = self._spec = None  # the caller went on: that transcript is stale
                    self._drop_preemptive()
                elif signal is Signal.END:
                    audio, utterance = np.concatenate(utterance), []
                    ignored = started_while_busy and not barged
                    self.events.emit(EventType.SPEECH_STOPPED, self._turns, ignored=ignored,
                                     duration_s=round(audio.size / 16000, 3))
                    if self._preempt is not None and self._preempt.spec is spec:
                        self._commit_preemptive()
                    elif not ignored:
                        self._drop_preemptive()
                        self._start_reply(audio=audio, t0=pause_at or time.monotonic(), spec=spec)
                    spec = self._spec = None
                if detector.in_speech and started_while_busy and not barged:
                    if detector.voiced_ms >= self.barge_in_min_ms and self._reply_task is not None:
                        barged = True
                        await self._barge_in()
            if (detector.in_speech and self.partial_interval_s > 0 and not self._stt_busy
                    and (not started_while_busy or barged)
                    and time.monotonic() - last_partial >= self.partial_interval_s):
                last_partial = time.monotonic()
                self._spawn(self._partial(np.concatenate(utterance), self._turns), "stt-partial")

    async def _transcribe(self, audio: np.ndarray) -> str:
        self._stt_busy = True
        try:
            return await self.models.run_stt(audio, self.language)
        finally:
            self._stt_busy = False

    async def _partial(self, audio: np.ndarray, turn: int) -> None:
        text = await self._transcribe(audio)
        if text and self.state == CallState.USER_SPEAKING and turn == self._turns:
            self.events.emit(EventType.TRANSCRIPT_PARTIAL, turn, text=text)

    async def _text_loop(self) -> None:
        async for raw in self.transport.text_messages():
            try:
                message = json.loads(raw)
            except ValueError:
                self.events.emit(EventType.ERROR, kind="bad_message", message="messages must be JSON objects")
                continue
            kind = message.get("type") if isinstance(message, dict) else None
            if kind == "text":
                text = message.get("text")
                if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_CHARS:
                    self.events.emit(EventType.ERROR, kind="bad_message",
                                     message=f"'text' must be a non-empty string of at most {MAX_TEXT_CHARS} chars")
                    continue
                if self._reply_task is not None:
                    await self._barge_in()
                self._start_reply(text=text.strip(), t0=time.monotonic())
            elif kind == "dtmf" and message.get("digit") in DTMF_KEYS:
                # A key press is an event, and words for the agent: menus and PINs work the same way.
                self.events.emit(EventType.DTMF, self._turns, digit=message["digit"])
                if self._reply_task is not None:
                    await self._barge_in()
                self._start_reply(text=f"the caller pressed {message['digit']}", t0=time.monotonic())
            elif kind == "hangup":
                await self.hang_up("caller_hangup")
                return
            else:
                self.events.emit(EventType.ERROR, kind="bad_message", message=f"unknown message type {kind!r}")

    # -- replying -----------------------------------------------------------------------------
    def _start_reply(self, *, audio: np.ndarray | None = None, text: str | None = None, greeting: str | None = None,
                     t0: float | None = None, spec: asyncio.Task[str] | None = None,
                     held: HeldEvents | None = None) -> asyncio.Task[None]:
        task = asyncio.create_task(self._run_reply(audio, text, greeting, t0 or time.monotonic(), spec, held),
                                   name=f"reply-{self.call_id}")
        self._reply_task = task
        task.add_done_callback(self._reply_done)
        return task

    # -- preemptive replies: think while the caller is only pausing -----------------------------
    def _preempt_reply(self, spec: asyncio.Task[str], t0: float) -> None:
        """The pause's transcript is ready before the turn is over: start the reply now, unheard."""
        if (not self.preemptive or self.dlp.before_llm or self.taken_over_by is not None
                or spec is not self._spec or spec.cancelled()
                or spec.exception() is not None or not spec.result() or self._reply_task is not None):
            return
        held = HeldEvents(self.events, open_=False)
        turns_before = self._turns
        task = self._start_reply(text=spec.result(), t0=t0, held=held)
        self._preempt = Preemption(spec, task, held, spec.result(), time.monotonic(), turns_before)

    def _commit_preemptive(self) -> None:
        p, self._preempt = self._preempt, None
        assert p is not None
        self.conversation.add_user(p.text)
        if self._reply is not None:
            self._reply.outcome.marks["speech_end"] = round(time.monotonic() - self._reply.t0, 4)
            self._reply.outcome.marks["stt_final"] = round(p.transcribed_at - self._reply.t0, 4)
        self._set_state(CallState.THINKING)
        p.held.open()

    def _drop_preemptive(self) -> None:
        p, self._preempt = self._preempt, None
        if p is None:
            return
        if self._reply_task is p.task:
            self._reply_task = self._reply = None
        p.task.cancel()  # nothing of it was emitted or played
        self._turns = p.turns_before

    def _reply_done(self, task: asyncio.Task[None]) -> None:
        if self._reply_task is task:
            self._reply_task = None
            self._reply = None
            self._set_state(CallState.LISTENING)
        if not task.cancelled() and task.exception() is not None:
            log.error("reply failed on call %s", self.call_id, exc_info=task.exception())
            self.events.emit(EventType.ERROR, kind="internal", message="the reply failed")

    async def _run_reply(self, audio: np.ndarray | None, text: str | None, greeting: str | None, t0: float,
                         spec: asyncio.Task[str] | None, held: HeldEvents | None) -> None:
        began = time.monotonic()
        speaking = asyncio.Event()
        watcher = asyncio.create_task(self._when_speaking(speaking))
        try:
            if held is not None:  # preemptive: the transcript is known, the turn not yet over
                assert text is not None
                held.emit(EventType.TRANSCRIPT_FINAL, self._next_turn(), text=text, source="voice")
                reply = self._new_reply(t0, speaking, held, pending_user=text)
                await reply.generate()
                await held.opened.wait()
                reply.pending_user = None
                self._finish(reply, interrupted=False)
                return
            if greeting is not None:
                reply = self._new_reply(t0, speaking)
                await reply.speak_text(greeting)
                self._finish(reply, interrupted=False)
                return
            if audio is not None:
                self._set_state(CallState.THINKING)
                text = await (spec if spec is not None else self._transcribe(audio))
                if not text:  # noise, a breath, garbage audio: no turn at all
                    self.events.emit(EventType.TRANSCRIPT_FINAL, None, text="", empty=True)
                    return
            assert text is not None
            stt_done = time.monotonic()
            self.events.emit(EventType.TRANSCRIPT_FINAL, self._next_turn(), text=text,
                             source="voice" if audio is not None else "text")
            llm_text = await self._for_llm(text)
            self.conversation.add_user(llm_text if llm_text is not None else WITHHELD)
            if self.taken_over_by is not None:
                return  # the operator answers; the transcript still reaches the console and storage
            self._set_state(CallState.THINKING)
            reply = self._new_reply(t0, speaking)
            if audio is not None:
                reply.outcome.marks["speech_end"] = round(began - t0, 4)
                reply.outcome.marks["stt_final"] = round(stt_done - t0, 4)
            if llm_text is None:
                await reply.speak_text(BLOCKED_WARNING)
            else:
                await reply.generate()
            self._finish(reply, interrupted=False)
        finally:
            watcher.cancel()

    async def _for_llm(self, text: str) -> str | None:
        """What the LLM may see of the caller's words, by the persona's DLP policy; None if blocked."""
        if not self.dlp.before_llm:
            return text
        result = await asyncio.to_thread(self.dlp.scan, text)
        return None if result.blocked else result.text

    def _new_reply(self, t0: float, speaking: asyncio.Event, held: HeldEvents | None = None,
                   pending_user: str | None = None) -> Reply:
        turn = self._next_turn()
        bind_turn(turn)  # this runs in the reply's own task: its log lines name the turn
        self._reply = Reply(turn=turn, t0=t0, transport=self.transport, models=self.models,
                            llm=self.llm, conversation=self.conversation,
                            events=held or HeldEvents(self.events, open_=True), on_speaking=speaking,
                            pending_user=pending_user, llm_options=self.llm_options,
                            toolbox=self.toolbox, voice=self.voice)
        return self._reply

    async def _when_speaking(self, speaking: asyncio.Event) -> None:
        await speaking.wait()
        self._set_state(CallState.SPEAKING)

    def _finish(self, reply: Reply, *, interrupted: bool) -> None:
        if reply.finished:
            return
        reply.finished = True
        outcome = reply.outcome
        outcome.interrupted = interrupted
        reply.emit_latency()
        self.events.emit(EventType.AGENT_FINAL, reply.turn, text=outcome.text, interrupted=interrupted)
        self.conversation.add_agent(outcome.text, interrupted=interrupted)

    async def _barge_in(self) -> None:
        await self._cancel_reply(reason="barge_in")
        self._set_state(CallState.USER_SPEAKING)

    async def _cancel_reply(self, reason: str) -> None:
        """Stop the reply in flight: cancel LLM and TTS work, drop queued audio, keep what was heard."""
        self._drop_preemptive()
        task, reply = self._reply_task, self._reply
        if task is None:
            return
        played = self.transport.played_s
        self.transport.clear()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        if reply is None or reply.finished:
            return  # still transcribing, or it had just finished: no agent turn to cut
        if self.transport.has_audio:
            reply.outcome.text = reply.heard(played)
        self.events.emit(EventType.BARGE_IN, reply.turn, reason=reason, heard_chars=len(reply.outcome.text))
        self._finish(reply, interrupted=True)
