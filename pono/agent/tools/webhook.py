"""HTTP webhook tools declared in a persona: signed requests to allow-listed hosts, retried on failure.

Every request carries `X-Pono-Timestamp` and `X-Pono-Signature: sha256=<hex>`, an HMAC-SHA256 of
"<timestamp>.<body>" with a secret taken from the environment (never from the persona itself): the variable
`PONO_WEBHOOK_SECRET`, or one a persona names in `secret_env`, which must start with `PONO_WEBHOOK_SECRET_`
(so a persona can't have a request signed with, say, OPENAI_API_KEY).

Where a request may go is `netguard`'s rule (allow-listed host; non-public addresses only when listed as an
IP/CIDR; checked on the resolved addresses the connection uses). Redirects are not followed (a 3xx is an
error result: following one would re-send the signed body elsewhere), and an answer larger than
`max_response_bytes` is refused rather than read.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import time
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from pono.agent.tools.netguard import GuardedResolver, HostPolicy, refusal_in
from pono.agent.tools.registry import Tool, ToolContext

DEFAULT_SECRET_ENV = "PONO_WEBHOOK_SECRET"
# The variables a persona may name as its webhook's secret: the default, or PONO_WEBHOOK_SECRET_<SUFFIX>.
SECRET_ENV = re.compile(r"^PONO_WEBHOOK_SECRET(?:_[A-Z0-9_]{1,64})?$")
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024

_JSON_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "number": (int, float), "integer": (int,),
                                            "boolean": (bool,), "array": (list,), "object": (dict,)}


def sign(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def check_secret_env(name: Any) -> str:
    """The variable a webhook's secret comes from. Raises ValueError for one outside PONO_WEBHOOK_SECRET[_*]."""
    if not isinstance(name, str) or not SECRET_ENV.match(name):
        raise ValueError(f"secret_env must be {DEFAULT_SECRET_ENV} or start with {DEFAULT_SECRET_ENV}_ "
                         f"(upper-case letters, digits, _), not {name!r}")
    return name


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


async def read_capped(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, or ValueError once it passes `limit` bytes (announced or actually sent)."""
    if response.content_length is not None and response.content_length > limit:
        raise ValueError(f"webhook answer is {response.content_length} bytes, over the {limit}-byte limit")
    body = bytearray()
    async for chunk in response.content.iter_chunked(16384):
        body += chunk
        if len(body) > limit:
            raise ValueError(f"webhook answer is over the {limit}-byte limit")
    return bytes(body)


def webhook_tool(spec: dict[str, Any], allowed_hosts: list[str],
                 max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES) -> Tool:
    """A Tool that POSTs (or PUTs/GETs) `{"call_id", "persona", "tool", "arguments"}` to `spec["url"]`.

    `spec`: a persona's webhook entry (validated by `specs.parse_tool_specs`). `allowed_hosts`:
    PONO_WEBHOOK_ALLOWED_HOSTS (see `netguard`). Each run returns the answer's JSON (or `{"text": ...}`),
    retries 5xx, 429 and network failures with backoff within `timeout_s`, and raises (an error result for
    the LLM) on a refused host or address, a bad secret variable, a 3xx or 4xx, or an oversized answer.
    """
    name, url = spec["name"], spec["url"]
    method = spec.get("method", "POST").upper()
    schema = spec.get("parameters") or {"type": "object", "properties": {}}
    timeout_s = float(spec.get("timeout_s", 8.0))
    secret_env = spec.get("secret_env", DEFAULT_SECRET_ENV)
    host = urlsplit(url).hostname or ""
    policy = HostPolicy(allowed_hosts)

    async def run(args: dict[str, Any], ctx: ToolContext) -> Any:
        policy.check_host(host)
        check_arguments(schema, args)
        secret = os.environ.get(check_secret_env(secret_env))
        if not secret:
            raise RuntimeError(f"the webhook secret {secret_env} is not set")
        body = json.dumps({"call_id": ctx.call_id, "persona": ctx.persona, "tool": name, "arguments": args}).encode()
        deadline = time.monotonic() + timeout_s
        delay = 0.2
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy), use_dns_cache=False)
        async with aiohttp.ClientSession(connector=connector) as http:
            while True:
                timestamp = str(int(time.time()))
                headers = {"Content-Type": "application/json", "X-Pono-Timestamp": timestamp,
                           "X-Pono-Signature": sign(secret.encode(), timestamp, body)}
                remaining = deadline - time.monotonic()
                try:
                    async with http.request(method, url, data=body, headers=headers, allow_redirects=False,
                                            timeout=aiohttp.ClientTimeout(total=max(0.1, remaining))) as r:
                        if 300 <= r.status < 400:
                            raise RuntimeError(f"webhook answered {r.status} (a redirect, which is not followed)")
                        if r.status < 400:
                            text = (await read_capped(r, max_response_bytes)).decode(errors="replace")
                            try:
                                return json.loads(text)
                            except ValueError:
                                return {"text": text[:2000]}
                        if r.status < 500 and r.status != 429:
                            detail = (await r.content.read(200)).decode(errors="replace")
                            raise RuntimeError(f"webhook answered {r.status}: {detail}")
                        failure = f"webhook answered {r.status}"
                except TimeoutError:
                    failure = f"webhook timed out after {timeout_s:g} s"
                except aiohttp.ClientError as exc:
                    refused = refusal_in(exc)
                    if refused is not None:
                        raise refused from None
                    failure = f"webhook unreachable: {type(exc).__name__}"
                # 5xx, 429 or no answer: retry with backoff while the tool's time lasts.
                if time.monotonic() + delay >= deadline:
                    raise RuntimeError(f"{failure}; gave up after retries")
                await asyncio.sleep(delay)
                delay *= 2

    return Tool(name, spec.get("description", name), schema, run, timeout_s=timeout_s + 0.5)
