"""HTTP webhook tools declared in a persona: signed requests to allow-listed hosts, retried on failure.

Every request carries `X-Pono-Timestamp` and `X-Pono-Signature: sha256=<hex>`, an HMAC-SHA256 of
"<timestamp>.<body>" with a secret taken from the environment (never from the persona itself).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from pono.agent.tools.registry import Tool, ToolContext

_JSON_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "number": (int, float), "integer": (int,),
                                            "boolean": (bool,), "array": (list,), "object": (dict,)}


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def check_arguments(schema: dict[str, Any], args: dict[str, Any]) -> None:
    """The declared schema's required fields and top-level types: enough to catch an LLM's slips."""
    missing = [k for k in schema.get("required", []) if k not in args]
    if missing:
        raise ValueError(f"missing required arguments: {', '.join(missing)}")
    for key, value in args.items():
        expected = schema.get("properties", {}).get(key, {}).get("type")
        kinds = _JSON_TYPES.get(expected) if isinstance(expected, str) else None
        if kinds and (not isinstance(value, kinds) or (expected != "boolean" and isinstance(value, bool))):
            raise ValueError(f"argument {key!r} must be a {expected}")


def webhook_tool(spec: dict[str, Any], allowed_hosts: list[str]) -> Tool:
    name, url = spec["name"], spec["url"]
    method = spec.get("method", "POST").upper()
    schema = spec.get("parameters") or {"type": "object", "properties": {}}
    timeout_s = float(spec.get("timeout_s", 8.0))
    secret_env = spec.get("secret_env", "PONO_WEBHOOK_SECRET")
    host = urlsplit(url).hostname or ""

    async def run(args: dict[str, Any], ctx: ToolContext) -> Any:
        if host not in allowed_hosts:
            raise PermissionError(f"host {host!r} is not on the webhook allow-list (PONO_WEBHOOK_ALLOWED_HOSTS)")
        check_arguments(schema, args)
        secret = os.environ.get(secret_env)
        if not secret:
            raise RuntimeError(f"the webhook secret {secret_env} is not set")
        body = json.dumps({"call_id": ctx.call_id, "persona": ctx.persona, "tool": name, "arguments": args}).encode()
        deadline = time.monotonic() + timeout_s
        delay = 0.2
        async with aiohttp.ClientSession() as http:
            while True:
                timestamp = str(int(time.time()))
                headers = {"Content-Type": "application/json", "X-Pono-Timestamp": timestamp,
                           "X-Pono-Signature": sign(secret.encode(), timestamp, body)}
                remaining = deadline - time.monotonic()
                try:
                    async with http.request(method, url, data=body, headers=headers,
                                            timeout=aiohttp.ClientTimeout(total=max(0.1, remaining))) as r:
                        if r.status < 400:
                            text = await r.text()
                            try:
                                return json.loads(text)
                            except ValueError:
                                return {"text": text[:2000]}
                        if r.status < 500 and r.status != 429:
                            raise RuntimeError(f"webhook answered {r.status}: {(await r.text())[:200]}")
                        failure = f"webhook answered {r.status}"
                except TimeoutError:
                    failure = f"webhook timed out after {timeout_s:g} s"
                except aiohttp.ClientError as exc:
                    failure = f"webhook unreachable: {type(exc).__name__}"
                # 5xx, 429 or no answer: retry with backoff while the tool's time lasts.
                if time.monotonic() + delay >= deadline:
                    raise RuntimeError(f"{failure}; gave up after retries")
                await asyncio.sleep(delay)
                delay *= 2

    return Tool(name, spec.get("description", name), schema, run, timeout_s=timeout_s + 0.5)
