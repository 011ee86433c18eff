"""What the agent says and when: every utterance becomes a handle on the call's reply scheduler.

The responder turns a caller's turn (audio, typed text, a key press), the greeting, an operator's words and
the DLP warning into `SpeechHandle`s, runs each as one `Reply` (reply.py) when the scheduler authorises it,
and records what the caller heard when a handle is interrupted. It also runs preemptive replies: thinking
while the caller is only pausing, heard only once the turn is committed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pono.agent.conversation import Conversation
from pono.agent.dlp.engine import DlpPolicy
from pono.agent.dlp.window import CrossTurnRedaction, SpeakerWindow
from pono.agent.llm import LLMClient
from pono.agent.tools.registry import ToolBox
from pono.events import EventStream, EventType
from pono.logs import bind_turn
from pono.transport import Transport
from pono.voice.interruptions import PausableOutput
from pono.voice.models import SpeechModels
from pono.voice.reply import HeldEvents, Reply
from pono.voice.scheduler import Priority, ReplyScheduler, SpeechHandle
from pono.voice.state import TurnStateMachine

log = logging.getLogger(__name__)

BLOCKED_WARNING = "For your safety, please don't share card numbers or other sensitive details on this call."
WITHHELD = "[the caller shared sensitive details, which were withheld]"


@dataclass
class Preemption:
    """A reply started on a pause's transcript; committed at the end of the turn or dropped unheard."""

    spec: asyncio.Task[str]
    handle: SpeechHandle
    held: HeldEvents
    text: str
    transcribed_at: float
    turns_before: int


@dataclass
class UserTurn:
    """A committed caller turn: whether DLP kept it from the LLM, and when STT finished."""

    blocked: bool
    transcribed_at: float  # time.monotonic()


@dataclass
class ReplySettings:
    """The persona's choices that shape every reply of a call."""

    llm_options: dict[str, Any]
    dlp: DlpPolicy
    toolbox: ToolBox | None
    voice: str | None
    preemptive: bool = True


class Responder:
    """Schedules, runs and interrupts the agent's utterances for one call.

    `transcribe(audio)` returns the text of 16 kHz int16 audio (the call's STT, counted as busy);
    `spawn(coro, name)` runs a helper task that the call cancels when it ends.
    """

    def __init__(self, events: EventStream, transport: Transport, models: SpeechModels, llm: LLMClient,
                 conversation: Conversation, state: TurnStateMachine, settings: ReplySettings,
                 transcribe: Callable[[np.ndarray], Any], spawn: Callable[[Any, str], asyncio.Task[Any]]) -> None:
        self.events = events
        self.transport = transport
        self.models = models
        self.llm = llm
        self.conversation = conversation
        self.state = state
        self.settings = settings
        self._transcribe = transcribe
        self._spawn = spawn
        self.turns = 0  # the next turn index; caller and agent turns share one numbering
        self.scheduler = ReplyScheduler(on_idle=state.agent_done, on_failed=self._failed)
        self._playing: tuple[SpeechHandle, Reply] | None = None  # the handle that plays now, and its Reply
        self._preempt: Preemption | None = None
        self.spec: asyncio.Task[str] | None = None  # speculative STT of the current pause
        self._last_commit: asyncio.Task[UserTurn | None] | None = None
        self._window = SpeakerWindow(settings.dlp)  # the caller's recent turns, scanned together
        self._said: dict[int, str] = {}  # turn → the caller's words as the LLM got them (for retro redaction)

    @property
    def busy(self) -> bool:
        """True while the agent says something or has something queued to say."""
        return self.scheduler.busy

    def next_turn(self) -> int:
        turn = self.turns
        self.turns += 1
        return turn

    # -- scheduling ---------------------------------------------------------------------------
    def commit_user(self, *, text: str | None = None, audio: np.ndarray | None = None,
                    spec: asyncio.Task[str] | None = None, source: str = "text") -> asyncio.Task[UserTurn | None]:
        """Commit one caller turn (typed text, or audio and its transcription) to the event stream and the
        conversation, in arrival order. Returns the task that does it; it resolves to None for audio with no
        words in it. The commit does not depend on any reply: a barge-in, a burst of messages or a dropped
        reply never loses what the caller said."""
        if audio is not None and spec is None:
            # Transcription starts at once, even when the answer has to wait for a handle in play.
            spec = self._spawn(self._transcribe(audio), "stt-final")
        previous = self._last_commit

        async def commit() -> UserTurn | None:
            words = await spec if spec is not None else text
            transcribed_at = time.monotonic()
            if previous is not None:
                await asyncio.wait({previous})
            if not words:  # noise, a breath, garbage audio: no turn at all
                self.events.emit(EventType.TRANSCRIPT_FINAL, None, text="", empty=True)
                return None
            turn = self.next_turn()
            # Read with the caller's last turns first: a number in pieces is redacted in every piece, and
            # this turn's own piece never leaves the call loop unredacted.
            cross = await asyncio.to_thread(self._window.add, turn, words, transcribed_at)
            shown = words if cross is None else cross.texts.get(turn, words)
            self.events.emit(EventType.TRANSCRIPT_FINAL, turn, text=shown, source=source)
            if cross is not None:
                self._redact_earlier(turn, cross)
            llm_text = await self._for_llm(shown, joined_finding=cross is not None)
            self.conversation.add_user(llm_text if llm_text is not None else WITHHELD)
            self._said[turn] = words
            while len(self._said) > 16:
                del self._said[next(iter(self._said))]
            return UserTurn(llm_text is None, transcribed_at)
        task = self._spawn(commit(), "user-turn")
        self._last_commit = task
        return task

    def reply_to(self, turn: asyncio.Task[UserTurn | None], *, t0: float | None = None,
                 spoken: bool = False) -> SpeechHandle:
        """Answer the conversation once `turn` (from `commit_user`) is committed. `t0` is the turn's reference
        time (the caller stopped speaking, or the message arrived); `spoken` adds the STT latency marks."""
        t0 = t0 or time.monotonic()
        began = time.monotonic()

        async def work(handle: SpeechHandle) -> None:
            await self._answer(handle, turn, t0, began if spoken else None)
        return self.scheduler.schedule(SpeechHandle("reply", work, name=f"reply-{self.events.call_id}"))

    def say(self, text: str, *, kind: str = "greeting", priority: Priority = Priority.NORMAL,
            allow_interruptions: bool = True) -> SpeechHandle:
        """Say fixed text (a greeting, an operator's words, a warning) without asking the LLM."""
        t0 = time.monotonic()

        async def work(handle: SpeechHandle) -> None:
            with self._watch_speaking() as speaking:
                reply = self._new_reply(handle, t0, speaking)
                await reply.speak_text(text)
                self._finish(handle, reply, interrupted=False)
        return self.scheduler.schedule(SpeechHandle(kind, work, priority=priority,
                                                    allow_interruptions=allow_interruptions,
                                                    name=f"{kind}-{self.events.call_id}"))

    @property
    def playing_turn(self) -> int | None:
        """The turn number of the agent's utterance playing now, if any."""
        return self._playing[1].turn if self._playing is not None else None

    def pause(self) -> bool:
        """Pause the agent's audio where it is, for a suspected interruption. False (and nothing paused) when
        nothing that may be interrupted is playing, or the output cannot pause."""
        handle = self.scheduler.current
        if handle is None or not handle.allow_interruptions or not isinstance(self.transport, PausableOutput):
            return False
        self.transport.pause()
        return True

    async def resume(self) -> float:
        """Go on after a false interruption, from where the audio paused; the seconds of audio resumed."""
        if not isinstance(self.transport, PausableOutput):
            return 0.0
        return await self.transport.resume()

    async def interrupt(self, reason: str, *, force: bool = False) -> None:
        """Stop what plays (keeping what was heard), drop what is queued and any preemptive reply.

        `reason` goes to the barge_in event ("barge_in", "operator_takeover", "hangup", ...). `force`
        also stops a handle that does not allow interruptions.
        """
        self.drop_preemptive()  # unheard and unseen: nothing of it to cut, no barge-in to report
        handle = self.scheduler.current
        reply = self._playing[1] if self._playing is not None and self._playing[0] is handle else None
        if handle is None or (not handle.allow_interruptions and not force):
            self.scheduler.drop_queued()
            if handle is None and isinstance(self.transport, PausableOutput) and self.transport.paused:
                self.transport.clear()  # a pause whose reply ended meanwhile must not hold the next one
            return
        played = self.transport.played_s
        self.transport.clear()
        await self.scheduler.interrupt(force=force)
        if reply is None or reply.finished:
            return  # still transcribing, or it had just finished: no agent turn to cut
        # What the caller got: with audio, the words played so far; without, the text already sent to them.
        reply.outcome.text = reply.heard(played) if self.transport.has_audio else reply.text_so_far
        self.events.emit(EventType.BARGE_IN, reply.turn, reason=reason, heard_chars=len(reply.outcome.text))
        self._finish(handle, reply, interrupted=True)

    async def close(self, reason: str) -> None:
        """The call is over: interrupt everything and refuse new utterances."""
        await self.interrupt(reason, force=True)
        await self.scheduler.close()

    # -- preemptive replies: think while the caller is only pausing -----------------------------
    def preempt(self, spec: asyncio.Task[str], t0: float) -> None:
        """The pause's transcript is ready before the turn is over: start the reply now, unheard."""
        if (not self.settings.preemptive or self.settings.dlp.before_llm or self.state.operator is not None
                or spec is not self.spec or spec.cancelled()
                or spec.exception() is not None or not spec.result() or self.busy):
            return
        held = HeldEvents(self.events, open_=False)
        turns_before, text = self.turns, spec.result()

        async def work(handle: SpeechHandle) -> None:
            with self._watch_speaking() as speaking:
                held.emit(EventType.TRANSCRIPT_FINAL, self.next_turn(), text=text, source="voice")
                reply = self._new_reply(handle, t0, speaking, held, pending_user=text)
                await reply.generate()
                await held.opened.wait()
                reply.pending_user = None
                self._finish(handle, reply, interrupted=False)
        handle = self.scheduler.schedule(SpeechHandle("reply", work, name=f"reply-{self.events.call_id}"))
        self._preempt = Preemption(spec, handle, held, text, time.monotonic(), turns_before)

    def preempted_by(self, spec: asyncio.Task[str] | None) -> bool:
        """Whether a preemptive reply was started on this speculative transcript."""
        return self._preempt is not None and spec is not None and self._preempt.spec is spec

    def commit_preemptive(self) -> None:
        """The turn really ended: the preemptive reply's events flow and its audio may play."""
        p, self._preempt = self._preempt, None
        assert p is not None
        self.conversation.add_user(p.text)
        if self._playing is not None and self._playing[0] is p.handle:
            reply = self._playing[1]
            reply.outcome.marks["speech_end"] = round(time.monotonic() - reply.t0, 4)
            reply.outcome.marks["stt_final"] = round(p.transcribed_at - reply.t0, 4)
        self.state.thinking()
        p.held.open()

    def drop_preemptive(self) -> None:
        """The caller went on: cancel the preemptive reply (nothing of it was emitted or played)."""
        p, self._preempt = self._preempt, None
        if p is None:
            return
        if p.handle.task is not None:
            p.handle.task.cancel()
        if self._playing is not None and self._playing[0] is p.handle:
            self._playing = None
        self.turns = p.turns_before

    # -- one reply ----------------------------------------------------------------------------
    async def _answer(self, handle: SpeechHandle, turn: asyncio.Task[UserTurn | None], t0: float,
                      speech_end: float | None) -> None:
        with self._watch_speaking() as speaking:
            self.state.thinking()
            committed = await asyncio.shield(turn)  # a barge-in cancels the answer, never the commit
            if committed is None or self.state.operator is not None:
                return  # no words; or the operator answers (the transcript still reaches console and storage)
            if committed.blocked:
                self.say(BLOCKED_WARNING, kind="warning", priority=Priority.HIGH)
                return
            reply = self._new_reply(handle, t0, speaking)
            if speech_end is not None:
                reply.outcome.marks["speech_end"] = round(speech_end - t0, 4)
                reply.outcome.marks["stt_final"] = round(committed.transcribed_at - t0, 4)
            await reply.generate()
            self._finish(handle, reply, interrupted=False)

    async def _for_llm(self, text: str, *, joined_finding: bool = False) -> str | None:
        """What the LLM may see of the caller's words, by the persona's DLP policy; None if blocked.
        `joined_finding`: these words finish personal data begun in earlier turns (already redacted here)."""
        policy = self.settings.dlp
        if not policy.before_llm:
            return text
        if joined_finding and policy.action == "block_and_warn":
            return None
        result = await asyncio.to_thread(policy.scan, text)
        return None if result.blocked else result.text

    def _redact_earlier(self, turn: int, cross: CrossTurnRedaction) -> None:
        """Personal data arrived in pieces: storage, operators and (with before_llm) the LLM's copy of the
        earlier turns get their redacted text; the event carries redacted texts and spans, never values."""
        earlier = {str(t): text for t, text in cross.texts.items() if t != turn}
        self.events.emit(EventType.DLP_REDACTED, turn, turns=earlier,
                         findings=[{"turn": t, "entity_type": f.entity_type, "start": f.start, "end": f.end,
                                    "action": f.action, "recognizer": f.recognizer} for t, f in cross.findings])
        if self.settings.dlp.before_llm:
            for before, text in cross.texts.items():
                if before != turn and before in self._said:
                    self.conversation.replace_user_text(self._said[before], text)

    def _new_reply(self, handle: SpeechHandle, t0: float, speaking: asyncio.Event, held: HeldEvents | None = None,
                   pending_user: str | None = None) -> Reply:
        turn = self.next_turn()
        bind_turn(turn)  # this runs in the handle's own task: its log lines name the turn
        s = self.settings
        reply = Reply(turn=turn, t0=t0, transport=self.transport, models=self.models,
                      llm=self.llm, conversation=self.conversation,
                      events=held or HeldEvents(self.events, open_=True), on_speaking=speaking,
                      pending_user=pending_user, llm_options=s.llm_options,
                      toolbox=s.toolbox, voice=s.voice)
        self._playing = (handle, reply)
        return reply

    def _finish(self, handle: SpeechHandle, reply: Reply, *, interrupted: bool) -> None:
        if reply.finished:
            return
        reply.finished = True
        outcome = reply.outcome
        outcome.interrupted = interrupted
        handle.heard = outcome.text
        reply.emit_latency()
        self.events.emit(EventType.AGENT_FINAL, reply.turn, text=outcome.text, interrupted=interrupted,
                         truncated=outcome.truncated)
        self.conversation.add_agent(outcome.text, interrupted=interrupted)
        if self._playing is not None and self._playing[1] is reply:
            self._playing = None

    def _watch_speaking(self) -> _SpeakingWatch:
        return _SpeakingWatch(self.state, f"speaking-{self.events.call_id}")

    def _failed(self, handle: SpeechHandle, exc: BaseException) -> None:
        log.error("%s failed on call %s", handle.kind, self.events.call_id, exc_info=exc)
        self.events.emit(EventType.ERROR, kind="internal", message="the reply failed")


class _SpeakingWatch:
    """Within a handle's work: the state turns `speaking` when its first audio goes out."""

    def __init__(self, state: TurnStateMachine, name: str) -> None:
        self.state = state
        self.name = name
        self.event = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def __enter__(self) -> asyncio.Event:
        self._task = asyncio.create_task(self._wait(), name=self.name)
        return self.event

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    async def _wait(self) -> None:
        await self.event.wait()
        self.state.speaking()
