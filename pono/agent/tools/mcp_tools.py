"""MCP servers a persona names: stdio servers from the operator's PONO_MCP_SERVERS, or streamable-HTTP
URLs on the tool host allow-list. Their tools are offered to the LLM as `<name>__<tool>`.

Each server lives for one call, in a task of its own (the SDK's streams belong to the task that opened
them); cancelling that task at the end of the call closes the session and stops a stdio server.
`serve_mcp_tools` takes the entries `specs.build_registry` returns: `_stdio` (an McpServerConfig),
`_allowed_hosts` for a URL, or `_error`. An entry without them is refused, never run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

import httpx2

from pono.agent.tools.mcp_servers import McpServerConfig, child_environment
from pono.agent.tools.netguard import AddressRefused, HostPolicy, guarded_http_client, refusal_in
from pono.agent.tools.registry import Tool, ToolContext, ToolRegistry

log = logging.getLogger(__name__)


class McpRefused(PermissionError):
    """An MCP entry that may not run: not from PONO_MCP_SERVERS, or a URL off the allow-list."""


@contextlib.asynccontextmanager
async def mcp_session(spec: dict[str, Any]) -> AsyncIterator[Any]:
    """An initialised MCP ClientSession for a resolved entry (see the module doc). Raises McpRefused or
    AddressRefused for what may not run; the SDK's errors for a server that fails."""
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    async with contextlib.AsyncExitStack() as stack:
        if spec.get("url"):
            from mcp.client.streamable_http import streamable_http_client

            policy = HostPolicy(spec.get("_allowed_hosts") or [])
            policy.check_host(urlsplit(spec["url"]).hostname or "")
            # The SDK's own client's timeouts: 30 s, and 300 s to read (a server may hold a stream open).
            http = await stack.enter_async_context(guarded_http_client(policy, timeout=httpx2.Timeout(30, read=300)))
            streams = await stack.enter_async_context(streamable_http_client(spec["url"], http_client=http))
            read, write = streams[0], streams[1]
        else:
            config = spec.get("_stdio")
            if not isinstance(config, McpServerConfig):
                raise McpRefused("a stdio MCP server must come from PONO_MCP_SERVERS")
            params = StdioServerParameters(command=config.command, args=list(config.args),
                                           env=child_environment(config))
            # A server's chatter on stderr is not ours to print. (Opening /dev/null never blocks.)
            devnull = stack.enter_context(open(os.devnull, "w"))  # noqa: ASYNC230
            read, write = await stack.enter_async_context(stdio_client(params, errlog=devnull))
        session = await stack.enter_async_context(ClientSession(read, write))
        await session.initialize()
        yield session


def _result_value(result: Any) -> Any:
    if getattr(result, "isError", False) or getattr(result, "is_error", False):
        texts = [getattr(c, "text", "") for c in getattr(result, "content", [])]
        raise RuntimeError(" ".join(t for t in texts if t) or "the MCP tool reported an error")
    structured = getattr(result, "structuredContent", None) or getattr(result, "structured_content", None)
    if structured is not None:
        return structured
    texts = [t for t in (getattr(c, "text", None) for c in getattr(result, "content", [])) if t is not None]
    if len(texts) == 1:  # most servers answer with one JSON text block
        try:
            return json.loads(texts[0])
        except ValueError:
            pass
    return {"content": texts}


def _tool(prefix: str, remote: Any, session: Any, timeout_s: float) -> Tool:
    schema = getattr(remote, "inputSchema", None) or getattr(remote, "input_schema", None) or {"type": "object"}

    async def run(args: dict[str, Any], ctx: ToolContext) -> Any:
        return _result_value(await session.call_tool(remote.name, args, read_timeout_seconds=timeout_s))

    # OpenAI function names allow [a-zA-Z0-9_-]{1,64}: servers are namespaced as <server>__<tool>.
    name = f"{prefix}__{remote.name}"[:64]
    return Tool(name, remote.description or remote.name, dict(schema), run, timeout_s=timeout_s + 0.5)


async def serve_mcp_tools(spec: dict[str, Any], registry: ToolRegistry,
                          on_error: Callable[[str], None], open_timeout_s: float = 15.0) -> None:
    """Connect, offer the server's tools for the rest of the call, and disconnect when cancelled."""
    name = spec["name"]
    timeout_s = float(spec.get("timeout_s", 10.0))
    if spec.get("_error"):
        log.warning("MCP server %s not started: %s", name, spec["_error"])
        on_error(f"MCP server {name} is unavailable: {spec['_error']}")
        return
    try:
        async with contextlib.AsyncExitStack() as stack:
            async with asyncio.timeout(open_timeout_s):
                session = await stack.enter_async_context(mcp_session(spec))
                listed = await session.list_tools()
            allowed = set(spec.get("tools") or [])
            for remote in listed.tools:
                if not allowed or remote.name in allowed:
                    registry.add(_tool(name, remote, session, timeout_s))
            log.info("MCP server %s offers %d tools", name, len(listed.tools))
            await asyncio.Event().wait()  # until the call ends and cancels us
    except asyncio.CancelledError:
        raise
    except BaseException as exc:  # a dead, hanging or refused server costs its tools, never the call
        refused = refusal_in(exc, (McpRefused, AddressRefused))
        if refused is not None:
            log.warning("MCP server %s refused: %s", name, refused)
            on_error(f"MCP server {name} is unavailable: {refused}")
        else:
            log.warning("MCP server %s unavailable: %s", name, type(exc).__name__)
            on_error(f"MCP server {name} is unavailable")
    finally:
        for tool_name in [t for t in registry.tools if t.startswith(f"{name}__")]:
            registry.tools.pop(tool_name, None)
