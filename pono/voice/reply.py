"""One agent reply: transcript → streamed LLM text → clause-by-clause TTS → paced playout.

The reply runs as a task of its own so that barge-in can cancel it at any await; what the caller heard
up to that moment is computed from the transport's playout clock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pono.agent.conversation import APOLOGY, Conversation
from pono.agent.llm import LLMClient, LLMError, ToolCallPart
from pono.agent.tools.registry import ToolBox, ToolOutcome
from pono.events import EventStream, EventType
from pono.transport import Transport
from pono.voice.models import SpeechModels
from pono.voice.playout import PlayoutTracker
from pono.voice.sentences import SentenceSplitter, split_all

log = logging.getLogger(__name__)

TRUNCATED_APOLOGY = "Sorry, I lost my train of thought. Could you ask me that again?"
EMPTY_ANSWER = "Sorry, I don't have an answer for that right now. Could you put it another way?"


class HeldEvents:
    """A reply's events, held back until its turn is committed, then passed through in order.

    A preemptive reply starts while the caller is only pausing; if they go on, it is dropped unseen.
    """

    def __init__(self, events: EventStream, *, open_: bool) -> None:
        self.events = events
        self.opened = asyncio.Event()
        self._held: list[tuple[EventType, int | None, dict[str, Any]]] = []
        if open_:
            self.opened.set()

    def emit(self, type_: EventType, turn: int | None = None, **data: Any) -> None:
        if self.opened.is_set():
            self.events.emit(type_, turn, **data)
        else:
            self._held.append((type_, turn, data))

    def open(self) -> None:
        self.opened.set()
        held, self._held = self._held, []
        for type_, turn, data in held:
            self.events.emit(type_, turn, **data)


@dataclass
class ReplyOutcome:
    text: str = ""  # what the agent said (or, if interrupted, what the caller heard of it)
    interrupted: bool = False
    truncated: bool = False  # the LLM's stream broke off mid-answer
    marks: dict[str, float] = field(default_factory=dict)


class Reply:
    """Speak one reply for `turn`. `t0` is the turn's reference time (caller stopped speaking)."""

    def __init__(
        self,
        *,
        turn: int,
        t0: float,
        transport: Transport,
        models: SpeechModels,
        llm: LLMClient,
        conversation: Conversation,
        events: HeldEvents,
        on_speaking: asyncio.Event,
        pending_user: str | None = None,
        llm_options: dict[str, Any] | None = None,
        toolbox: ToolBox | None = None,
        voice: str | None = None,
    ) -> None:
        self.turn = turn
        self.t0 = t0
        self.transport = transport
        self.models = models
        self.llm = llm
        self.conversation = conversation
        self.events = events
        self.on_speaking = on_speaking
        self.pending_user = pending_user
        self.llm_options = llm_options or {}
        self.toolbox = toolbox
        self.voice = voice
        self._text = ""
        self._round_text = ""
        self._no_more_tools = False
        self.playout = PlayoutTracker()
        self.outcome = ReplyOutcome()
        self._latency_sent = False
        self.llm_endpoint: str | None = None
        self.finished = False

    def mark(self, name: str) -> None:
        self.outcome.marks.setdefault(name, round(time.monotonic() - self.t0, 4))

    def emit_latency(self) -> None:
        if not self._latency_sent:
            self._latency_sent = True
            # The reference point on the wall clock too, so a caller on the same host can split its own
            # voice-to-voice figure into the way in, the server, and the way out.
            t0_wall = time.time() - (time.monotonic() - self.t0)
            extra = {"llm_endpoint": self.llm_endpoint} if self.llm_endpoint else {}
            self.events.emit(EventType.LATENCY, self.turn, marks=dict(self.outcome.marks), t0=round(t0_wall, 4),
                             **extra)

    async def speak_text(self, text: str) -> None:
        """Say fixed text (a greeting, an operator's line) without asking the LLM."""
        self.events.emit(EventType.AGENT_DELTA, self.turn, text=text)
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        for piece in split_all(text):
            queue.put_nowait(piece)
        queue.put_nowait(None)
        await self._speak(queue)
        self.outcome.text = text

    async def generate(self) -> None:
        """Stream the LLM's answer to the conversation so far, speaking it as it arrives; run the tools
        it asks for, and ask again with their results, up to the round cap."""
        queue: asyncio.Queue[str | None] = asyncio.Queue()
        speaker = asyncio.create_task(self._speak(queue), name=f"speak-{self.turn}-{self.events.events.call_id}")
        splitter = SentenceSplitter()
        self._text = ""
        try:
            started = time.monotonic()
            rounds = 0
            empty_retries = 1  # an empty completion is asked again once, then the caller hears why
            while True:
                calls = await self._stream_round(queue, splitter)
                if calls is None:
                    break
                if not calls:
                    if self._text.strip():
                        break
                    if empty_retries:
                        empty_retries -= 1
                        log.warning("turn %s: the LLM answered nothing; asking again", self.turn)
                        continue
                    self.events.emit(EventType.ERROR, self.turn, kind="llm_empty",
                                     message="the language model gave an empty answer")
                    self._say(EMPTY_ANSWER, queue, splitter)
                    break
                if self.toolbox is None or rounds >= self.toolbox.max_rounds or self._no_more_tools:
                    # Over the cap: the calls get an error result, and one last request, offered no tools,
                    # must answer with what it has.
                    log.warning("turn %s: tool round cap reached", self.turn)
                    await self._run_tools([], refuse=calls)
                    if self._no_more_tools:
                        break
                    self._no_more_tools = True
                    continue
                rounds += 1
                await self._run_tools_with_filler(calls, queue, splitter)
            self.outcome.marks["llm_total"] = round(time.monotonic() - started, 4)
            for piece in splitter.flush():
                self.mark("first_sentence")
                queue.put_nowait(piece)
            queue.put_nowait(None)
            self.outcome.text = self._text.strip()
            await speaker
        finally:
            if not speaker.done():
                speaker.cancel()

    def _say(self, delta: str, queue: asyncio.Queue[str | None], splitter: SentenceSplitter) -> None:
        self._text += delta
        self.events.emit(EventType.AGENT_DELTA, self.turn, text=delta)
        for piece in splitter.feed(delta):
            self.mark("first_sentence")
            queue.put_nowait(piece)

    async def _stream_round(self, queue: asyncio.Queue[str | None],
                            splitter: SentenceSplitter) -> list[dict[str, Any]] | None:
        """One LLM request. Returns the tool calls it asked for ([] for none), or None if it failed."""
        parts: dict[int, dict[str, Any]] = {}
        self._round_text = ""
        offer = self.toolbox is not None and bool(self.toolbox.registry.tools) and not self._no_more_tools
        tools = self.toolbox.registry.schemas() if offer and self.toolbox else None
        if self.toolbox is not None and self.toolbox.in_flight:
            # A barge-in cut the last reply during a tool: its result lands in the conversation first.
            await asyncio.gather(*self.toolbox.in_flight, return_exceptions=True)
        try:
            prompt = self.conversation.prompt(self.pending_user)
            stream = self.llm.stream(prompt, tools=tools, **self.llm_options)
            async for part in stream:
                self.llm_endpoint = stream.endpoint  # which endpoint answered: primary or fallback
                if isinstance(part, ToolCallPart):
                    call = parts.setdefault(part.index, {"id": None, "name": "", "arguments": ""})
                    call["id"] = call["id"] or part.id
                    call["name"] += part.name or ""
                    call["arguments"] += part.arguments
                    continue
                if part:
                    self.mark("llm_first_token")
                    self._round_text += part
                    self._say(part, queue, splitter)
        except LLMError as exc:
            log.warning("LLM failed on turn %s: %s", self.turn, exc)
            if self._round_text.strip():
                # It broke off mid-answer: say so honestly rather than stop mid-sentence in silence.
                self.outcome.truncated = True
                self.events.emit(EventType.ERROR, self.turn, kind="llm_truncated",
                                 message="the language model's answer broke off")
                self._say(("" if self._text.endswith(" ") else "… ") + TRUNCATED_APOLOGY, queue, splitter)
                return None
            self.events.emit(EventType.ERROR, self.turn, kind="llm", message="the language model failed")
            if not self._text.strip():  # never leave the caller in silence
                self._say(APOLOGY, queue, splitter)
            return None
        return [{"id": c["id"] or f"call_{self.turn}_{i}", "type": "function",
                 "function": {"name": c["name"], "arguments": c["arguments"]}} for i, c in sorted(parts.items())]

    async def _run_tools_with_filler(self, calls: list[dict[str, Any]], queue: asyncio.Queue[str | None],
                                     splitter: SentenceSplitter) -> None:
        assert self.toolbox is not None
        # Tools act on the world: a preemptive reply runs them only once its turn is committed.
        await self.events.opened.wait()
        self.pending_user = None
        # Shielded: a barge-in cancels this reply, never the tools mid-way. The round finishes and is
        # committed to the conversation whole, so nothing runs twice and no result is lost.
        round_task = asyncio.ensure_future(self._run_tools(calls))
        self.toolbox.in_flight.add(round_task)
        round_task.add_done_callback(self.toolbox.in_flight.discard)
        done, _ = await asyncio.wait({round_task}, timeout=self.toolbox.slow_after_s)
        if not done and self.toolbox.filler:
            for piece in splitter.flush():
                queue.put_nowait(piece)
            self._say(("" if self._text.endswith(" ") or not self._text else " ") + self.toolbox.filler + " ",
                      queue, splitter)
            for piece in splitter.flush():
                queue.put_nowait(piece)
        await asyncio.shield(round_task)

    async def _run_tools(self, calls: list[dict[str, Any]], refuse: list[dict[str, Any]] | None = None) -> None:
        """Run a round's calls in parallel and commit calls and results to the conversation together."""
        assert self.toolbox is not None or refuse is not None
        at = len(self.conversation.messages)
        for call in calls:
            self.events.emit(EventType.TOOL_CALL, self.turn, id=call["id"], name=call["function"]["name"],
                             arguments=call["function"]["arguments"])
        outcomes: list[ToolOutcome] = []
        if calls and self.toolbox is not None:
            outcomes = list(await asyncio.gather(*(
                self.toolbox.registry.call(c["id"], c["function"]["name"], c["function"]["arguments"],
                                           self.toolbox.context) for c in calls)))
        for call in refuse or []:
            outcomes.append(ToolOutcome(call["id"], call["function"]["name"], call["function"]["arguments"], None,
                                        "tool round limit reached for this turn; answer with what you have", 0.0))
        for outcome in outcomes:
            self.events.emit(EventType.TOOL_RESULT, self.turn, id=outcome.call_id, name=outcome.name,
                             arguments=outcome.arguments, result=outcome.result, error=outcome.error,
                             duration_ms=outcome.duration_ms)
        self.conversation.add_tool_round(self._round_text, [*calls, *(refuse or [])],
                                         [o.message() for o in outcomes], at=at)

    async def _speak(self, queue: asyncio.Queue[str | None]) -> None:
        t = self.transport
        rate = self.models.tts_rate
        while (piece := await queue.get()) is not None:
            if not t.has_audio:
                continue
            synth_started = time.monotonic()
            chunks = await self.models.run_tts(piece, self.voice)
            self.outcome.marks.setdefault("tts_synth", round(time.monotonic() - synth_started, 4))
            if not chunks:
                continue
            self.mark("tts_first_audio")
            await self.events.opened.wait()  # a preemptive reply is heard only once its turn is committed
            start = t.played_s + t.queued_s
            self.playout.add(piece, start, sum(c.size for c in chunks) / rate)
            first_piece = len(self.playout.pieces) == 1
            for chunk in chunks:
                await t.send_audio(chunk, rate)
            if first_piece:
                self.on_speaking.set()
                await self._wait_played(start + 0.001)
                self.mark("first_audio_sent")
                self.emit_latency()
        if t.has_audio and self.playout.pieces:
            await self._wait_played(self.playout.end_s - 0.021)

    async def _wait_played(self, position_s: float) -> None:
        # The playout clock advances in 20 ms frames; polling it at 5 ms is cheaper than a wake-up per frame.
        while self.transport.played_s < position_s and self.transport.queued_s > 0:  # noqa: ASYNC110
            await asyncio.sleep(0.005)

    @property
    def text_so_far(self) -> str:
        """The reply's text streamed so far (as agent.delta events), stripped."""
        return self._text.strip()

    def heard(self, played_s: float) -> str:
        return self.playout.heard_text(played_s)
