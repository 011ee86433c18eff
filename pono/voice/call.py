"""The per-call loop: listen (VAD → turn-taking → STT), reply, and handle barge-in, on any transport.

A `Call` is given its transport, models, LLM and the persona's settings. It owns three collaborators:
the `Responder` (every utterance the agent says, through the reply scheduler), `OperatorControls`
(`call.operator`: say, take over, hand back) and `AgentActions` (what tools may do to the call). The
turn state (listening, user speaking, thinking, speaking, operator) lives in a `TurnStateMachine`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from typing import Any, cast

import numpy as np
from aiolimiter import AsyncLimiter

from pono import textsafe
from pono.agent.conversation import Conversation
from pono.agent.dlp.engine import DEFAULT_POLICY, DlpPolicy
from pono.agent.llm import LLMClient
from pono.agent.tools.registry import ToolBox, ToolContext, ToolRegistry
from pono.events import EventStream, EventType
from pono.transport import FRAME_MS, Transport
from pono.voice.actions import AgentActions
from pono.voice.barge_in import OverAgentSpeech
from pono.voice.interruptions import PausableOutput
from pono.voice.lead_in import LeadIn
from pono.voice.models import SpeechModels
from pono.voice.operator import OperatorControls
from pono.voice.responder import BLOCKED_WARNING, WITHHELD, ReplySettings, Responder
from pono.voice.scheduler import Priority
from pono.voice.state import CallState, TurnStateMachine
from pono.voice.turns import Signal, TurnConfig, TurnDetector

__all__ = ["BLOCKED_WARNING", "WITHHELD", "Call", "CallState"]

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 2000
TIME_LIMIT_GOODBYE = "We have reached the time limit for this call. Thank you for calling, goodbye."
UNFINISHED_WAIT_S = 5.0  # a call's end waits this long for the transcript of a sentence the caller was cut off in
GOODBYE_WAIT_S = 15.0  # a goodbye that can't be played in this long (a dead line) doesn't hold the hang-up
DTMF_KEYS = tuple("0123456789*#ABCD")
MAX_KEYS = 64  # one keypad entry holds at most this many keys: a key every second forever is many entries
# Audio kept from before speech was confirmed, so the first syllable is not clipped; an earlier short word close
# before it is kept too (pono.voice.lead_in).
_PREROLL_MS = 300
_NARROWBAND = ("sip", "twilio")  # transports whose audio is 8 kHz telephone speech
_TURN_WINDOW_MS = 8000  # the end-of-turn model reads the last 8 s of the turn


class Call:
    """One caller's conversation with the agent, from `run()` until the transport closes.

    Audio in: 20 ms frames of 16 kHz int16 from `transport.audio_frames()`; text in: JSON messages
    (`{"type": "text"|"dtmf"|"hangup", ...}`). Everything that happens is emitted on `events`.
    """

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
        notice: str = "",
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
        text_messages_per_10s: int = 20,
        max_duration_s: float = 0.0,
        idle_timeout_s: float = 0.0,
        dtmf_interdigit_s: float = 1.0,
    ) -> None:
        self.call_id = call_id
        self.transport = transport
        self.models = models
        self.turn_config = turn_config
        self.barge_in_min_ms = barge_in_min_ms
        self.partial_interval_s = partial_interval_s
        self.greeting = greeting
        self.notice = notice  # said first and whole: no barge-in, no typed text cuts it (a recording's consent)
        self.persona = persona
        self.dlp = dlp
        self.language = language
        self.events = EventStream(call_id)
        self.state = TurnStateMachine(lambda state: self.events.emit(EventType.STATE, state=str(state)))
        self.end_reason = "hangup"
        self.started = time.time()
        self.max_duration_s = max_duration_s  # 0: no limit
        self.idle_timeout_s = idle_timeout_s  # 0: no limit
        self._last_activity = time.monotonic()
        self._closing: asyncio.Future[None] | None = None
        self.dtmf_interdigit_s = dtmf_interdigit_s  # keys pressed closer than this are one entry
        self._keys: list[str] = []
        self._keys_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._utterance_samples = self._utterance_turn = 0
        self._end_of_turn_p: float | None = None  # the model's answer for the current pause
        self.detector = TurnDetector(turn_config)
        # Streaming STT: partials while the caller speaks, the final on demand (pono.voice.speech.recognizer).
        self.recognizer = models.recognizer(
            language, partial_interval_s=partial_interval_s, on_partial=self._partial, spawn=self._spawn,
            # Phone audio (8 kHz G.711) lost words in a 20 s encoder window that wideband audio did not: Whisper's own.
            narrowband=transport.kind in _NARROWBAND,
            on_error=lambda message: self.events.emit(EventType.ERROR, kind="stt_unavailable", message=message))
        # A per-call budget for typed messages and key presses: a burst is fine, a flood is refused.
        self._text_budget = AsyncLimiter(max(1, text_messages_per_10s), 10.0)
        toolbox: ToolBox | None = None
        self.output = PausableOutput(transport)  # a suspected interruption pauses it (pono.voice.interruptions)
        self.responder = Responder(
            self.events, cast(Transport, self.output), models, llm, conversation, self.state,
            ReplySettings(llm_options or {}, dlp, None, voice, preemptive), self._transcribe, self._spawn)
        self.actions = AgentActions(self.events, self.responder, self.hang_up, self._spawn)
        self.operator = OperatorControls(self.events, cast(Transport, self.output), self.responder, self.state)
        # Speech over the agent: an interruption, or a backchannel to talk over (pono.voice.barge_in).
        self.over_agent = OverAgentSpeech(
            responder=self.responder, output=self.output, detector=self.detector, events=self.events,
            transcript=self.recognizer.final, spawn=self._spawn, barge_in=self._barge_in,
            becomes_turn=self._caller_turn, min_ms=barge_in_min_ms)
        if tools is not None:
            context = ToolContext(call_id, persona or "default", timezone,
                                  actions={"end_call": self.actions.end_call,
                                           "transfer": self.actions.request_transfer,
                                           "cite": self.actions.cite},
                                  knowledge=knowledge, collections=collections or [])
            toolbox = ToolBox(tools, context, **(tool_limits or {}))
        self.toolbox = self.responder.settings.toolbox = toolbox

    # -- lifecycle ----------------------------------------------------------------------------
    async def run(self) -> None:
        t = self.transport
        self.events.emit(EventType.CALL_STARTED, transport=t.kind, has_audio=t.has_audio, persona=self.persona)
        # The audio loop runs even while the transport has no audio: a caller may start sending it later.
        loops = [asyncio.create_task(self._text_loop(), name=f"text-{self.call_id}"),
                 asyncio.create_task(self._audio_loop(), name=f"audio-{self.call_id}"),
                 asyncio.create_task(self._watch_limits(), name=f"limits-{self.call_id}")]
        if self.notice:
            self.responder.say(self.notice, kind="notice", allow_interruptions=False)
        if self.greeting:
            self.responder.say(self.greeting, kind="greeting")
        closed = asyncio.ensure_future(t.closed())
        try:
            await self._until_closed_or_failed(closed, loops)
        finally:
            closed.cancel()
            if self._keys_timer is not None:
                self._keys_timer.cancel()
            await self._keep_what_was_cut_off(loops[1])
            await self.responder.close(reason=self.end_reason)
            for task in [*loops, *self._tasks]:
                task.cancel()
            for task in [*loops, *self._tasks]:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self.recognizer.close()
            await self._close_transport()
            self.events.emit(
                EventType.CALL_ENDED, reason=self.end_reason, duration_s=round(time.time() - self.started, 3)
            )

    async def _keep_what_was_cut_off(self, audio_loop: asyncio.Task[None]) -> None:
        """The call ends while the caller is mid-sentence or mid-keypad-entry: what they said or pressed is kept as
        their last turn (stored, not answered) instead of lost with the call. Its transcript is waited for at most
        UNFINISHED_WAIT_S."""
        keys, self._keys = "".join(self._keys), []
        turns = [self.responder.commit_user(text=f"the caller pressed {keys}")] if keys else []
        audio_loop.cancel()  # no frame may move the utterance on while its transcript is taken
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await audio_loop
        if self.detector.in_speech and not self.over_agent.active:
            turns.append(self.responder.commit_user(spec=self._spawn(self.recognizer.final(), "stt-final"),
                                                    source="voice"))
        if turns:
            await asyncio.wait([asyncio.ensure_future(asyncio.shield(t)) for t in turns], timeout=UNFINISHED_WAIT_S)

    async def _until_closed_or_failed(self, closed: asyncio.Future[None], loops: list[asyncio.Task[None]]) -> None:
        """Until the caller has gone, or one of the call's loops failed: a call whose loop died would otherwise
        stay open, deaf or mute, until the caller gave up; it ends with reason "error" instead."""
        waiting: set[asyncio.Future[Any]] = {closed, *loops}
        while closed in waiting:
            done, waiting = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            failed = [task for task in done if task is not closed and not task.cancelled() and task.exception()]
            if failed:
                log.error("call %s: %s failed", self.call_id, failed[0].get_name(), exc_info=failed[0].exception())
                self.end_reason = "error"
                self.events.emit(EventType.ERROR, kind="internal", message="the call failed and ends")
                return

    async def end_with_goodbye(self, reason: str, text: str) -> None:
        """Stop whatever the agent says, say `text` whole (no barge-in), then hang up for `reason`.

        A goodbye that cannot be played within GOODBYE_WAIT_S (a dead line) does not delay the hang-up."""
        await self.responder.interrupt(reason, force=True)
        goodbye = self.responder.say(text, kind="notice", priority=Priority.HIGH, allow_interruptions=False)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(goodbye.wait_for_playout(), GOODBYE_WAIT_S)
        await self.hang_up(reason)

    async def _watch_limits(self) -> None:
        """Hang up a call past its maximum duration (with a goodbye), or one whose caller sent nothing, neither
        audio frames nor messages, for the idle timeout while the agent had nothing to say."""
        while True:
            await asyncio.sleep(0.5)
            now = time.monotonic()
            if self.max_duration_s and time.time() - self.started >= self.max_duration_s:
                await self.end_with_goodbye("max_duration", TIME_LIMIT_GOODBYE)
                return
            if (self.idle_timeout_s and not self.responder.busy
                    and now - self._last_activity >= self.idle_timeout_s):
                await self.hang_up("media_timeout")
                return

    async def hang_up(self, reason: str = "hangup") -> None:
        """End the call for `reason` (stored as its end reason); `run()` then cleans up and returns."""
        self.end_reason = reason
        await self.events.flush()  # what was said reaches the caller's screen before the line closes
        # Shielded: the caller of hang_up may be one of the call's own tasks, which run() cancels as the call
        # ends; a transport close cut half-way (aiortc's pc.close) would never finish.
        await asyncio.shield(self._close_transport())

    def _close_transport(self) -> asyncio.Future[None]:
        if self._closing is None:
            self._closing = asyncio.ensure_future(self.transport.close())
        return self._closing

    def serve_mcp(self, specs: list[dict[str, Any]]) -> None:
        """Connect the persona's MCP servers for the length of the call."""
        if self.toolbox is not None:
            self.actions.serve_mcp(specs, self.toolbox.registry)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Run a helper task (STT, MCP, end of call) that ends with the call; its name carries the call id."""
        task = asyncio.create_task(coro, name=f"{name}-{self.call_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _barge_in(self) -> None:
        await self.responder.interrupt("barge_in")
        self.state.barge_in()

    # -- listening ----------------------------------------------------------------------------
    async def _audio_loop(self) -> None:
        assert self.models.vad is not None
        vad = self.models.vad.stream()
        detector, over_agent = self.detector, self.over_agent
        lead_in = LeadIn(self.turn_config.min_speech_ms + _PREROLL_MS)  # what an utterance starts with
        recognizer, responder = self.recognizer, self.responder
        turn_audio: deque[np.ndarray] = deque(maxlen=_TURN_WINDOW_MS // FRAME_MS)  # for the end-of-turn model
        pause_at = 0.0
        spec: asyncio.Task[str] | None = None  # speculative final transcript started at the first pause
        async for frame in self.transport.audio_frames():
            self._last_activity = time.monotonic()
            if detector.in_speech:
                recognizer.push(frame)
                turn_audio.append(frame)
            else:
                lead_in.add(frame)
            for prob in await self.models.run_vad(vad.process, frame):
                if not detector.in_speech and prob >= self.turn_config.threshold:
                    lead_in.mark_voiced()
                signal = detector.update(prob)
                if signal is Signal.START:
                    recognizer.reset()
                    earlier = lead_in.take()
                    for piece in earlier:
                        recognizer.push(piece)
                    turn_audio.clear()
                    turn_audio.extend(earlier)
                    self._end_of_turn_p, spec = None, None
                    over_agent.start(agent_busy=responder.busy)
                    recognizer.partials = not over_agent.active
                    detector.use_model(not over_agent.active)  # "mhm" over the agent ends on silence alone
                    self._utterance_samples, self._utterance_turn = 0, responder.turns
                    self.events.emit(EventType.SPEECH_STARTED, responder.turns)
                    self.state.caller_started(agent_busy=over_agent.active)
                elif signal is Signal.PAUSE:
                    pause_at = time.monotonic()
                    if not over_agent.active:
                        spec = self._spawn(recognizer.final(), "stt-spec")
                        responder.spec = spec
                        spec.add_done_callback(lambda task, t0=pause_at: responder.preempt(task, t0))
                elif signal is Signal.CHECK:
                    if not over_agent.active:
                        self._spawn(self._check_end_of_turn(detector, detector.pauses, list(turn_audio)),
                                    "end-of-turn")
                elif signal is Signal.RESUME:
                    self._end_of_turn_p = None
                    spec = responder.spec = None  # the caller went on: that transcript is stale
                    responder.drop_preemptive()
                elif signal is Signal.END:
                    stopped = {"duration_s": round(self._utterance_samples / 16000, 3),
                               "end_of_turn": self._end_of_turn_p}
                    if over_agent.active:  # heard whole before it counts, or not (pono.voice.barge_in)
                        over_agent.ended(self._spawn(recognizer.final(), "stt-final"), pause_at or time.monotonic(),
                                         self._utterance_turn, stopped)
                    else:  # the turn number speech.started gave, whatever was committed meanwhile (a preemptive)
                        self.events.emit(EventType.SPEECH_STOPPED, self._utterance_turn, ignored=False, **stopped)
                        if responder.preempted_by(spec):
                            responder.commit_preemptive()
                        else:
                            responder.drop_preemptive()
                            turn = responder.commit_user(spec=spec or self._spawn(recognizer.final(), "stt-final"),
                                                         source="voice")
                            responder.reply_to(turn, t0=pause_at or time.monotonic(), spoken=True)
                    spec = responder.spec = None
                    recognizer.reset()  # a final in flight keeps its own copy of the audio
                elif signal is Signal.SEGMENT:
                    # A long turn is cut for transcription; each piece is kept, and one reply answers them all.
                    spec = responder.spec = None
                    responder.drop_preemptive()
                    if not over_agent.active:
                        responder.commit_user(spec=self._spawn(recognizer.final(), "stt-final"), source="voice")
                    recognizer.reset()
                await over_agent.heard_more()
            if detector.in_speech:
                self._utterance_samples += frame.size

    def _caller_turn(self, barged: bool) -> None:
        """Speech over the agent became the caller's own turn: an interruption, or the agent stopped first."""
        self.recognizer.partials = True
        self.detector.use_model(True)
        if not barged:
            self.state.caller_started(agent_busy=False)

    async def _check_end_of_turn(self, detector: TurnDetector, pause: int, audio: list[np.ndarray]) -> None:
        """Ask the end-of-turn model about the turn so far (its pause included); a complete turn ends after the
        short hangover. A model that fails leaves the long hangover in force."""
        try:
            probability = await self.models.run_end_of_turn(audio)
        except Exception as exc:
            log.error("end-of-turn model failed (%s); waiting out the long hangover", type(exc).__name__)
            return
        if pause == detector.pauses:
            self._end_of_turn_p = round(probability, 3)
            if probability >= detector.config.end_of_turn_threshold:
                detector.turn_complete(pause)

    async def _transcribe(self, audio: np.ndarray) -> str:
        return await self.models.run_stt(audio, self.language)

    def _partial(self, text: str) -> None:
        if self.state.state is CallState.USER_SPEAKING and self.responder.turns == self._utterance_turn:  # not late
            self.events.emit(EventType.TRANSCRIPT_PARTIAL, self._utterance_turn, text=text)

    def _keys_pressed(self) -> None:
        keys, self._keys = "".join(self._keys), []
        self._keys_timer = None
        if keys:
            pressed = self.responder.commit_user(text=f"the caller pressed {keys}")
            self.responder.reply_to(pressed, t0=time.monotonic())

    async def _text_loop(self) -> None:
        async for raw in self.transport.text_messages():
            self._last_activity = time.monotonic()
            try:
                message = textsafe.loads(raw)  # lone surrogates are repaired before anything keeps the text
            except (ValueError, RecursionError):
                self.events.emit(EventType.ERROR, kind="bad_message", message="messages must be JSON objects")
                continue
            kind = message.get("type") if isinstance(message, dict) else None
            if kind in ("text", "dtmf"):
                if not self._text_budget.has_capacity():
                    self.events.emit(EventType.ERROR, kind="rate_limited",
                                     message="too many messages; slow down")
                    continue
                await self._text_budget.acquire()
            if kind == "text":
                text = message.get("text")
                if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_CHARS:
                    self.events.emit(EventType.ERROR, kind="bad_message",
                                     message=f"'text' must be a non-empty string of at most {MAX_TEXT_CHARS} chars")
                    continue
                if self.responder.busy:
                    await self._barge_in()
                self.responder.reply_to(self.responder.commit_user(text=text.strip()), t0=time.monotonic())
            elif kind == "dtmf" and message.get("digit") not in DTMF_KEYS:
                self.events.emit(EventType.ERROR, kind="bad_message",
                                 message=f"'digit' must be one of {''.join(DTMF_KEYS)}")
            elif kind == "dtmf":
                # A key press is an event at once, and words for the agent once the caller stops pressing:
                # a menu choice, a PIN or a card number typed on the keypad is one turn, read (and DLP-scanned)
                # whole. "#" ends the keys at once.
                self.events.emit(EventType.DTMF, self.responder.turns, digit=message["digit"])
                if not self._keys and self.responder.busy:
                    await self._barge_in()
                self._keys.append(message["digit"])
                if self._keys_timer is not None:
                    self._keys_timer.cancel()
                if message["digit"] == "#" or len(self._keys) >= MAX_KEYS:
                    self._keys_pressed()
                else:
                    self._keys_timer = asyncio.get_running_loop().call_later(self.dtmf_interdigit_s,
                                                                             self._keys_pressed)
            elif kind == "hangup":
                await self.hang_up("caller_hangup")
                return
            else:
                self.events.emit(EventType.ERROR, kind="bad_message", message=f"unknown message type {kind!r}")
