"""A persona's `tools`: built-in names, or declared webhooks. Validated when the persona is saved."""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import urlsplit

from pono.agent.tools.builtin import BUILTIN
from pono.agent.tools.registry import ToolRegistry
from pono.agent.tools.webhook import webhook_tool

log = logging.getLogger(__name__)

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def parse_tool_specs(specs: list[Any]) -> list[dict[str, Any]]:
    """Normalise to dicts with a "type"; raise ValueError naming the entry that is wrong."""
    parsed = []
    for i, spec in enumerate(specs):
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
        elif kind == "mcp":
            if not re.match(r"^[a-zA-Z0-9-]{1,32}$", str(spec.get("name", ""))):
                raise ValueError(f"tools[{i}]: an MCP server needs a short name of letters, digits or -")
            url, command = spec.get("url"), spec.get("command")
            if bool(url) == bool(command):
                raise ValueError(f"tools[{i}]: an MCP server needs either a command (stdio) or a url (HTTP)")
            if url and urlsplit(str(url)).scheme not in ("http", "https"):
                raise ValueError(f"tools[{i}]: an MCP url must be http(s)")
            if not isinstance(spec.get("args", []), list):
                raise ValueError(f"tools[{i}]: args must be a list")
            if not 0 < float(spec.get("timeout_s", 10)) <= 60:
                raise ValueError(f"tools[{i}]: timeout_s must be between 0 and 60")
        else:
            raise ValueError(f"tools[{i}]: unsupported tool type {kind!r} (builtin, webhook or mcp)")
        parsed.append({**spec, "type": kind})
    return parsed


def build_registry(specs: list[Any], allowed_hosts: list[str]) -> tuple[ToolRegistry, list[dict[str, Any]]]:
    """The call's tools, and the MCP servers whose tools join them once connected."""
    registry = ToolRegistry()
    try:
        parsed = parse_tool_specs(specs)
    except ValueError as exc:  # validated on save; a hand-edited row may not be
        log.error("persona tools are invalid (%s); the call runs without tools", exc)
        return registry, []
    for spec in parsed:
        if spec["type"] == "builtin":
            registry.add(BUILTIN[spec["name"]])
        elif spec["type"] == "webhook":
            registry.add(webhook_tool(spec, allowed_hosts))
    return registry, [spec for spec in parsed if spec["type"] == "mcp"]
