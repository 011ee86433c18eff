"""The caller's own view of a call: the documented subset of its events, redacted like the operator feed.

A caller (an anonymous browser, a phone provider's stream) receives on its data channel:

- `call.started`, `call.state`, `call.ended`;
- `speech.started`, `speech.stopped`, `transcript.partial`, `transcript.final` (its own words, redacted);
- `agent.delta` (the agent's words as they are spoken to it), `agent.final` (redacted), `barge_in`;
- `dtmf`, `latency`, `error`.

Never: tool calls and their results (webhook, MCP and CRM answers), `knowledge.used`, `operator.action` (who the
operators are), transfer requests. Operators see those on the console; storage keeps them, redacted.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from pono.events import CallEvent, EventType

log = logging.getLogger(__name__)

CALLER_EVENTS = frozenset({
    EventType.CALL_STARTED, EventType.STATE, EventType.CALL_ENDED,
    EventType.SPEECH_STARTED, EventType.SPEECH_STOPPED, EventType.TRANSCRIPT_PARTIAL, EventType.TRANSCRIPT_FINAL,
    EventType.AGENT_DELTA, EventType.AGENT_FINAL, EventType.BARGE_IN, EventType.AGENT_RESUMED,
    EventType.DTMF, EventType.LATENCY, EventType.ERROR,
})
# What DLP rewrites. Agent deltas are the agent's own speech, heard by this caller as it is sent: they pass
# as they are, and the turn's agent.final carries the redacted whole.
_REDACTED = frozenset({"transcript.partial", "transcript.final", "agent.final"})
# Errors whose message is meant for the caller; others (an MCP server's failure, which can name the operator's
# hosts and settings) reach the caller as their kind with a plain message, operators and logs in full.
_CALLER_ERRORS = frozenset({"bad_message", "rate_limited", "llm", "llm_truncated", "llm_empty", "internal"})
_PLAIN_ERROR = "something went wrong on our side; the call goes on"
_MAX_PENDING = 2000  # a caller that can't keep up loses the oldest events, never the call's memory

RedactEvent = Callable[[dict[str, Any], Any, dict[int, str]], dict[str, Any]]


class CallerView:
    """Observer of one call's event stream that sends the caller's subset with `send(json_dict)`.

    `redact(event, policy, state)` is the operator feed's blocking redaction (agent.dlp.apply.redact_event);
    it runs in a worker thread, in event order, so the call loop never waits for DLP.
    """

    def __init__(self, send: Callable[[dict[str, Any]], None], redact: RedactEvent, policy: Any = None) -> None:
        self._send = send
        self._redact = redact
        self._policy = policy
        self._pending: list[dict[str, Any]] = []
        self._wake = asyncio.Event()
        self._sent = asyncio.Event()  # set while nothing waits to be sent
        self._sent.set()
        self._task = asyncio.create_task(self._run(), name="caller-view")

    def observe(self, event: CallEvent) -> None:
        """The event stream's callback: never blocks."""
        if event.type not in CALLER_EVENTS:
            return
        if len(self._pending) >= _MAX_PENDING:
            del self._pending[0]
        message = event.to_json()
        if event.type is EventType.ERROR and message.get("kind") not in _CALLER_ERRORS:
            # Which tool failed is the persona's own vocabulary; why (hosts, settings) stays with operators.
            tool = message.get("tool")
            message["message"] = f"the tool {tool!r} is unavailable" if tool else _PLAIN_ERROR
        self._pending.append(message)
        self._sent.clear()
        self._wake.set()

    def _prepare(self, batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
        state: dict[int, str] = {}
        return [self._redact(e, self._policy, state) if e["type"] in _REDACTED else e for e in batch]

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._pending = self._pending, []
            if any(e["type"] in _REDACTED for e in batch):
                batch = await asyncio.to_thread(self._prepare, batch)
            for message in batch:
                self._send(message)
            if not self._pending:
                self._sent.set()
            if any(e["type"] == EventType.CALL_ENDED for e in batch):
                return

    async def flush(self) -> None:
        """Return once every event observed so far has been sent (the call is about to close the line)."""
        await self._sent.wait()

    def stop(self) -> None:
        """Send nothing more: the call is gone (normally the view stops by itself after call.ended)."""
        self._task.cancel()
