"""The operator's allow-list of stdio MCP servers (`PONO_MCP_SERVERS`); personas refer to them by name.

A persona can't say what program to run: `{"type": "mcp", "name": "orders", "server": "orders-db"}` names an
entry of this map, which only configuration sets. `PONO_MCP_SERVERS` is a JSON object:

    {"orders-db": {"command": "/opt/mcp/orders/bin/orders-mcp",
                   "args": ["--read-only"],
                   "env": {"ORDERS_DSN": "$ORDERS_DSN", "LOG_LEVEL": "warning"}}}

- `command` (required): the program, a path or a name looked up on PATH; `args`: its arguments (strings).
- `env`: the child's variables. A value `"$NAME"` is copied from Pono's own environment when the server
  starts (an error if unset); anything else is used as written.

A child never inherits Pono's environment (OPENAI_API_KEY, DATABASE_URL, tokens, passwords). It gets
its `env`, the MCP SDK's short safe list (HOME, LOGNAME, PATH, SHELL, TERM, USER: what a program needs to
start and find its files), and the locale and time zone variables below when Pono has them.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

# Inherited besides the MCP SDK's own list (mcp.client.stdio.DEFAULT_INHERITED_ENV_VARS).
BASIC_ENV = ("LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR")
_REFERENCE = re.compile(r"^\$([A-Za-z_][A-Za-z0-9_]*)$")
SERVER_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class McpServerConfig(BaseModel):
    """One entry of PONO_MCP_SERVERS: how to start a stdio MCP server."""

    model_config = ConfigDict(extra="forbid")

    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list)
    env: dict[str, str] = Field(default_factory=dict)


_SERVERS = TypeAdapter(dict[str, McpServerConfig])


def parse_mcp_servers(value: str | Mapping[str, Any] | None) -> dict[str, McpServerConfig]:
    """PONO_MCP_SERVERS (its JSON text, or the decoded object) → configs by name. Raises ValueError naming
    what is wrong (not JSON, a bad server name, a missing command, an unknown field)."""
    if value is None or value == "":
        return {}
    try:
        raw = json.loads(value) if isinstance(value, str) else dict(value)
        servers = _SERVERS.validate_python(raw)
    except (ValueError, ValidationError) as exc:
        raise ValueError(f"PONO_MCP_SERVERS is invalid: {exc}") from None
    bad = [name for name in servers if not SERVER_NAME.match(name)]
    if bad:
        raise ValueError(f"PONO_MCP_SERVERS: server names are letters, digits, _ . or -, not {bad}")
    return servers


def mcp_servers_from_env(environ: Mapping[str, str] = os.environ) -> dict[str, McpServerConfig]:
    """The allow-list as the process environment has it. Raises ValueError as `parse_mcp_servers`."""
    return parse_mcp_servers(environ.get("PONO_MCP_SERVERS"))


def child_environment(config: McpServerConfig, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The variables to start `config`'s server with (the SDK adds its safe list on top of these; see the
    module doc). Raises ValueError when a `"$NAME"` reference names a variable that is not set."""
    env = {name: environ[name] for name in BASIC_ENV if name in environ}
    for key, value in config.env.items():
        reference = _REFERENCE.match(value)
        if reference is None:
            env[key] = value
        elif reference.group(1) in environ:
            env[key] = environ[reference.group(1)]
        else:
            raise ValueError(f"the variable {reference.group(1)} (for {key}) is not set")
    return env
