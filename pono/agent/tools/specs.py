"""A persona's `tools`: built-in names, declared webhooks, and MCP servers. Validated when the persona is saved.

Entries (a plain string is a built-in's name):
- `{"type": "builtin", "name": "end_call"}`
- `{"type": "webhook", "name", "url", "method", "parameters", "timeout_s", "description", "secret_env"}`:
  `secret_env` is PONO_WEBHOOK_SECRET (the default) or PONO_WEBHOOK_SECRET_<SUFFIX> (`webhook.check_secret_env`).
- `{"type": "mcp", "name", "server", "tools", "timeout_s"}`: a stdio server the operator declared in
  PONO_MCP_SERVERS (`mcp_servers`); a persona may not give a `command`, `args` or `env`.
- `{"type": "mcp", "name", "url", "tools", "timeout_s"}`: a streamable-HTTP server, reached only on the
  tool host allow-list (`netguard`).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Collection
from typing import Any
from urllib.parse import urlsplit

from pono.agent.tools.builtin import BUILTIN
from pono.agent.tools.mcp_servers import SERVER_NAME, McpServerConfig, mcp_servers_from_env
from pono.agent.tools.registry import ToolRegistry
from pono.agent.tools.webhook import DEFAULT_MAX_RESPONSE_BYTES, check_secret_env, webhook_tool

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_MCP_NAME = re.compile(r"^[a-zA-Z0-9-]{1,32}$")
_PERSONA_MAY_NOT_RUN = ("command", "args", "env", "cwd")


def _parse_one(i: int, spec: Any, known_servers: Collection[str] | None) -> dict[str, Any]:
    if isinstance(spec, str):
        spec = {"type": "builtin", "name": spec}
    if not isinstance(spec, dict):
        raise ValueError(f"tools[{i}]: a built-in tool name or an object")
    kind = spec.get("type", "builtin")
    if kind == "builtin":
        if spec.get("name") not in BUILTIN:
            raise ValueError(f"tools[{i}]: unknown built-in {spec.get('name')!r}; known: {', '.join(BUILTIN)}")
    elif kind == "webhook":
        url = str(spec.get("url", ""))
        if not _NAME.match(str(spec.get("name", ""))):
            raise ValueError(f"tools[{i}]: a webhook needs a name of letters, digits, _ or -")
        if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).hostname:
            raise ValueError(f"tools[{i}]: a webhook needs an http(s) url")
        if spec.get("method", "POST").upper() not in ("POST", "PUT", "GET"):
            raise ValueError(f"tools[{i}]: method must be POST, PUT or GET")
        if not isinstance(spec.get("parameters", {}), dict):
            raise ValueError(f"tools[{i}]: parameters must be a JSON schema object")
        if not 0 < float(spec.get("timeout_s", 8)) <= 30:
            raise ValueError(f"tools[{i}]: timeout_s must be between 0 and 30")
        if "secret_env" in spec:
            try:
                check_secret_env(spec["secret_env"])
            except ValueError as exc:
                raise ValueError(f"tools[{i}]: {exc}") from None
    elif kind == "mcp":
        if not _MCP_NAME.match(str(spec.get("name", ""))):
            raise ValueError(f"tools[{i}]: an MCP server needs a short name of letters, digits or -")
        given = [key for key in _PERSONA_MAY_NOT_RUN if key in spec]
        if given:
            raise ValueError(f"tools[{i}]: a persona can't give an MCP server's {', '.join(given)}: the operator "
                             "declares stdio servers in PONO_MCP_SERVERS and a persona names one with \"server\"")
        url, server = spec.get("url"), spec.get("server")
        if bool(url) == bool(server):
            raise ValueError(f"tools[{i}]: an MCP server needs either a server (a name from PONO_MCP_SERVERS) "
                             "or a url (streamable HTTP)")
        if url and (urlsplit(str(url)).scheme not in ("http", "https") or not urlsplit(str(url)).hostname):
            raise ValueError(f"tools[{i}]: an MCP url must be http(s)")
        if server and not (isinstance(server, str) and SERVER_NAME.match(server)):
            raise ValueError(f"tools[{i}]: server must be the name of an entry of PONO_MCP_SERVERS")
        if server and known_servers is not None and server not in known_servers:
            raise ValueError(f"tools[{i}]: no MCP server {server!r} in PONO_MCP_SERVERS; configured: "
                             f"{', '.join(sorted(known_servers)) or 'none'}")
        if not isinstance(spec.get("tools", []), list):
            raise ValueError(f"tools[{i}]: tools must be a list of tool names")
        if not 0 < float(spec.get("timeout_s", 10)) <= 60:
            raise ValueError(f"tools[{i}]: timeout_s must be between 0 and 60")
    else:
        raise ValueError(f"tools[{i}]: unsupported tool type {kind!r} (builtin, webhook or mcp)")
    return {**spec, "type": kind}


def parse_tool_specs(specs: list[Any], known_servers: Collection[str] | None = None) -> list[dict[str, Any]]:
    """Normalise to dicts with a "type"; raise ValueError naming the entry that is wrong. `known_servers`:
    the names in PONO_MCP_SERVERS, to refuse a `server` that isn't one (None: not checked here; a call
    with an unknown one reports it as an MCP error)."""
    return [_parse_one(i, spec, known_servers) for i, spec in enumerate(specs)]


def _mcp_launch(spec: dict[str, Any], servers: dict[str, McpServerConfig], allowed_hosts: list[str]) -> \
        dict[str, Any]:
    """A persona's MCP entry with what `mcp_tools.mcp_session` needs: `_stdio` (the operator's config) or
    `_allowed_hosts`, or `_error` (said on the call's event stream)."""
    if spec.get("url"):
        return {**spec, "_allowed_hosts": list(allowed_hosts)}
    config = servers.get(spec["server"])
    if config is None:
        return {**spec, "_error": f"no server {spec['server']!r} in PONO_MCP_SERVERS"}
    return {**spec, "_stdio": config}


def build_registry(specs: list[Any], allowed_hosts: list[str], *,
                   mcp_servers: dict[str, McpServerConfig] | None = None,
                   max_response_bytes: int | None = None) -> tuple[ToolRegistry, list[dict[str, Any]]]:
    """The call's tools, and the MCP servers whose tools join them once connected (`serve_mcp_tools`).

    `allowed_hosts`: PONO_WEBHOOK_ALLOWED_HOSTS. `mcp_servers`: PONO_MCP_SERVERS (None: read from the
    environment). `max_response_bytes`: PONO_WEBHOOK_MAX_RESPONSE_BYTES (None: the environment's, else 64 KiB).
    An invalid entry (a hand-edited row, or one saved before a rule) is left out alone, logged; an MCP entry
    is kept with an `_error` so the call reports it.
    """
    if mcp_servers is None:
        try:
            mcp_servers = mcp_servers_from_env()
        except ValueError as exc:
            log.error("%s; no stdio MCP server can start", exc)
            mcp_servers = {}
    if max_response_bytes is None:
        max_response_bytes = int(os.environ.get("PONO_WEBHOOK_MAX_RESPONSE_BYTES", DEFAULT_MAX_RESPONSE_BYTES))
    registry = ToolRegistry()
    mcp: list[dict[str, Any]] = []
    for i, raw in enumerate(specs):
        try:
            spec = _parse_one(i, raw, None)
        except ValueError as exc:
            log.error("persona tool is invalid (%s); the call runs without it", exc)
            if isinstance(raw, dict) and raw.get("type") == "mcp" and _MCP_NAME.match(str(raw.get("name", ""))):
                mcp.append({"type": "mcp", "name": raw["name"], "_error": str(exc).split(": ", 1)[-1]})
            continue
        if spec["type"] == "builtin":
            registry.add(BUILTIN[spec["name"]])
        elif spec["type"] == "webhook":
            registry.add(webhook_tool(spec, allowed_hosts, max_response_bytes))
        else:
            mcp.append(_mcp_launch(spec, mcp_servers, allowed_hosts))
    return registry, mcp
