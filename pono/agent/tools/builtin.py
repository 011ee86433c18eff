"""Built-in tools every persona may enable: end_call, transfer_to_operator, current_datetime."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pono.agent.tools.registry import Tool, ToolContext, python_tool


async def end_call(ctx: ToolContext, reason: str = "the caller is done") -> dict[str, str]:
    """End the call after saying goodbye. Use when the caller has what they need or asks to hang up."""
    action = ctx.actions.get("end_call")
    if action is not None:
        # After this turn's audio has played: the caller must hear the goodbye.
        asyncio.get_running_loop().call_soon(lambda: asyncio.ensure_future(action(reason)))
    return {"status": "ending", "reason": reason}


async def transfer_to_operator(ctx: ToolContext, reason: str) -> dict[str, str]:
    """Hand the call to a human operator. Use when the caller asks for a person or you cannot help."""
    action = ctx.actions.get("transfer")
    if action is not None:
        await action(reason)
    return {"status": "an operator has been asked to join", "reason": reason}


async def current_datetime(ctx: ToolContext) -> dict[str, str]:
    """The current date, time and weekday where the business is."""
    try:
        zone = ZoneInfo(ctx.timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):  # OSError: "Europe" is a folder, not a zone
        zone = ZoneInfo("UTC")
    now = datetime.now(zone)
    return {"date": now.date().isoformat(), "time": now.strftime("%H:%M"), "weekday": now.strftime("%A"),
            "timezone": str(zone)}


async def search_knowledge(ctx: ToolContext, query: str, k: int = 3) -> dict[str, Any]:
    """Search the business's documents (opening hours, policies, menus...) for facts to answer with."""
    if ctx.knowledge is None or not ctx.collections:
        raise RuntimeError("this persona has no knowledge collections")
    hits = await ctx.knowledge.search(query, ctx.collections, max(1, min(k, 8)))
    cite = ctx.actions.get("cite")
    if cite is not None and hits:
        await cite(query, hits)
    # The LLM gets the passages; offsets and scores go to the event stream as citations.
    return {"passages": [{"document": h["document"], "text": h["text"]} for h in hits]}


BUILTIN: dict[str, Tool] = {
    "search_knowledge": python_tool(search_knowledge, timeout_s=5),
    "end_call": python_tool(end_call, timeout_s=2),
    "transfer_to_operator": python_tool(transfer_to_operator, timeout_s=5),
    "current_datetime": python_tool(current_datetime, timeout_s=2),
}
