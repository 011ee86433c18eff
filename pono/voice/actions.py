"""What the agent's tools may do to the call itself: hang up, ask for an operator, cite documents, and
bring in MCP servers for the length of the call. The call is given one `AgentActions`; the tool context
holds its bound methods."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from pono.agent.tools.mcp_tools import serve_mcp_tools
from pono.agent.tools.registry import ToolRegistry
from pono.events import EventStream, EventType
from pono.voice.responder import Responder


class AgentActions:
    """The call-level side effects of the built-in tools, for one call.

    `hang_up(reason)` ends the call; `spawn(coro, name)` runs a task that the call cancels when it ends.
    """

    def __init__(self, events: EventStream, responder: Responder, hang_up: Callable[[str], Awaitable[None]],
                 spawn: Callable[[Any, str], asyncio.Task[Any]]) -> None:
        self.events = events
        self.responder = responder
        self._hang_up = hang_up
        self._spawn = spawn

    async def end_call(self, reason: str) -> None:
        """The end_call tool: hang up once the goodbye being generated has been heard."""
        self._spawn(self._end_after_reply(reason), "end-call")

    async def _end_after_reply(self, reason: str) -> None:
        current = self.responder.scheduler.current
        if current is not None:
            await current.wait_for_playout()
        self.events.emit(EventType.STATE, state="ending", reason=reason)
        await self._hang_up("agent_ended")

    def serve_mcp(self, specs: list[dict[str, Any]], registry: ToolRegistry) -> None:
        """Connect the persona's MCP servers for the length of the call; their tools join as they come."""
        for spec in specs:
            self._spawn(serve_mcp_tools(spec, registry, lambda message, tool=spec["name"]: self.events.emit(
                EventType.ERROR, kind="mcp", tool=tool, message=message)), f"mcp-{spec['name']}")

    async def cite(self, query: str, hits: list[dict[str, Any]]) -> None:
        """Citations go to the event stream (caller's view, operators, storage), not into the spoken text."""
        self.events.emit(EventType.KNOWLEDGE_USED, self.responder.turns - 1, query=query, documents=[
            {k: h[k] for k in ("document", "document_id", "title", "score", "start", "end")} for h in hits])

    async def request_transfer(self, reason: str) -> None:
        """The transfer_to_operator tool: flag the call; operators (and SIP's REFER) act on the event."""
        self.events.emit(EventType.TRANSFER, reason=reason)
