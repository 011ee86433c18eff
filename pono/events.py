"""The call event stream: one typed, timestamped log per call that every observer reads.

The call loop only emits. Observers (the caller's data channel, metrics, storage, operators) subscribe
with a plain callback that must not block; one that needs I/O hands the event to its own queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

log = logging.getLogger(__name__)


class EventType(StrEnum):
    CALL_STARTED = "call.started"
    CALL_ENDED = "call.ended"
    STATE = "call.state"  # listening / user_speaking / thinking / speaking
    SPEECH_STARTED = "speech.started"
    SPEECH_STOPPED = "speech.stopped"
    TRANSCRIPT_PARTIAL = "transcript.partial"
    TRANSCRIPT_FINAL = "transcript.final"
    AGENT_DELTA = "agent.delta"
    AGENT_FINAL = "agent.final"
    BARGE_IN = "barge_in"
    AGENT_RESUMED = "agent.resumed"  # a suspected interruption held no words: the agent went on where it paused
    TOOL_CALL = "tool.call"
    TOOL_RESULT = "tool.result"
    TRANSFER = "call.transfer_requested"
    KNOWLEDGE_USED = "knowledge.used"
    DLP_REDACTED = "dlp.redacted"  # earlier turns redacted after the fact: PII that arrived in pieces
    DTMF = "dtmf"  # a key the caller pressed on a phone
    OPERATOR = "operator.action"  # say / take_over / hand_back / listen / hang_up, and by whom
    LATENCY = "latency"
    ERROR = "error"


# Per-turn latency marks, in pipeline order. Each is seconds since the turn's reference point
# (speech_end for voice turns, text arrival for typed turns).
LATENCY_MARKS = (
    "speech_end",
    "stt_final",
    "llm_first_token",
    "first_sentence",
    "tts_first_audio",
    "first_audio_sent",
)


@dataclass(frozen=True, slots=True)
class CallEvent:
    type: EventType
    call_id: str
    turn: int | None
    data: dict[str, Any] = field(default_factory=dict)
    ts: float = field(default_factory=time.time)

    def to_json(self) -> dict[str, Any]:
        return {"type": str(self.type), "call_id": self.call_id, "turn": self.turn, "ts": self.ts, **self.data}


Observer = Callable[[CallEvent], None]
Flush = Callable[[], Awaitable[None]]


class EventStream:
    """Fan-out of one call's events to its observers, in emission order."""

    def __init__(self, call_id: str) -> None:
        self.call_id = call_id
        self._observers: list[Observer] = []
        self._flushes: list[Flush] = []

    def subscribe(self, observer: Observer, flush: Flush | None = None) -> None:
        """Call `observer(event)` for every event from now on. An observer that sends events on later (off
        the loop, in batches) gives `flush`, awaited by `flush()` before the call closes its line."""
        self._observers.append(observer)
        if flush is not None:
            self._flushes.append(flush)

    async def flush(self, timeout_s: float = 1.0) -> None:
        """Let observers that deliver later finish what they hold (at most `timeout_s`): the caller's view
        gets the last words before the line closes."""
        if self._flushes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*(f() for f in self._flushes)), timeout_s)

    def emit(self, type_: EventType, turn: int | None = None, **data: Any) -> CallEvent:
        event = CallEvent(type_, self.call_id, turn, data)
        for observer in list(self._observers):
            try:
                observer(event)
            except Exception:  # one broken observer must not break the call or the others
                log.exception("event observer failed on %s", type_)
        return event
