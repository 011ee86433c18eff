"""What the agent's tools may do to the call itself: hang up, ask for an operator, cite documents, and
bring in MCP servers for the length of the call. Mixed into Call."""

from __future__ import annotations

import asyncio
from typing import Any

from pono.agent.tools.mcp_tools import serve_mcp_tools
from pono.agent.tools.registry import ToolBox
from pono.events import EventStream, EventType


class AgentActions:
    # Provided by Call.
    events: EventStream
    toolbox: ToolBox | None
    _turns: int
    _reply_task: asyncio.Task[None] | None

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[object]:
        raise NotImplementedError

    async def hang_up(self, reason: str = "hangup") -> None:
        raise NotImplementedError

    async def _schedule_end(self, reason: str) -> None:
        """The end_call tool: hang up once the goodbye being generated has been heard."""
        self._spawn(self._end_after_reply(reason), "end-call")

    async def _end_after_reply(self, reason: str) -> None:
        task = self._reply_task
        if task is not None:
            await asyncio.wait({task})
        self.events.emit(EventType.STATE, state="ending", reason=reason)
        await self.hang_up("agent_ended")

    def serve_mcp(self, specs: list[dict[str, Any]]) -> None:
        """Connect the persona's MCP servers for the length of the call; their tools join as they come."""
        for spec in specs:
            assert self.toolbox is not None
            self._spawn(serve_mcp_tools(spec, self.toolbox.registry, lambda message: self.events.emit(
                EventType.ERROR, kind="mcp", message=message)), f"mcp-{spec['name']}")

    async def _cite(self, query: str, hits: list[dict[str, Any]]) -> None:
        """Citations go to the event stream (caller's view, operators, storage), not into the spoken text."""
        self.events.emit(EventType.KNOWLEDGE_USED, self._turns - 1, query=query, documents=[
            {k: h[k] for k in ("document", "document_id", "title", "score", "start", "end")} for h in hits])

    async def _request_transfer(self, reason: str) -> None:
        """The transfer_to_operator tool: flag the call; operators (and SIP's REFER) act on the event."""
        self.events.emit(EventType.TRANSFER, reason=reason)
