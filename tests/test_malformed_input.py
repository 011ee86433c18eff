"""Malformed outside input gets a clear refusal, never a 500 or a dead task: absurdly deep JSON on every endpoint and
socket that parses JSON, NUL characters (which Postgres text cannot hold), lone surrogates."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import re
import uuid

import aiohttp
import pytest
import yarl
from conftest import RunningServer
from test_call_inputs import stored_turns
from test_voice_call import open_call

from pono.agent.tools.registry import ToolContext, ToolRegistry, python_tool
from pono.context import SERVICES
from pono.signaling import api as signaling_api
from pono.storage.control import control_channel
from pono.testing.scripted_llm import Script
from pono.web import routes as web_routes

MISSING = str(uuid.uuid4())
_PLACEHOLDERS = {"call_id": MISSING, "persona_id": MISSING, "number": "+15550100", "collection": "deep",
                 "user_id": MISSING, "key_id": MISSING, "workflow_id": MISSING, "run_id": MISSING}
DEEP_LIST = "[" * 100_000 + "]" * 100_000  # 200 kB, under the body limit: the parser sees all of it
DEEP_OBJECT = '{"a":' * 40_000 + "1" + "}" * 40_000  # 240 kB


def json_endpoints() -> list[tuple[str, str]]:
    """(method, path) of every route that takes a body: the web routes and call set-up, ids filled in."""
    found = []
    for route in [*web_routes.routes(), *signaling_api.routes()]:
        if isinstance(route, aiohttp.web.RouteDef) and route.method in ("POST", "PUT", "PATCH"):
            path = re.sub(r"\{(\w+)\}", lambda m: _PLACEHOLDERS[m.group(1)], route.path)
            found.append((route.method, path))
    return found


ENDPOINTS = json_endpoints()


def test_the_table_covers_every_endpoint_that_reads_a_body() -> None:
    assert len(ENDPOINTS) >= 12 and ("POST", "/api/calls") in ENDPOINTS and ("POST", "/api/call-tokens") in ENDPOINTS


@pytest.mark.parametrize("body", [DEEP_LIST, DEEP_OBJECT], ids=["list", "object"])
@pytest.mark.parametrize(("method", "path"), ENDPOINTS, ids=[f"{m} {p}" for m, p in ENDPOINTS])
async def test_deep_json_is_a_400_everywhere(server: RunningServer, admin_token: str, method: str, path: str,
                                             body: str) -> None:
    async with aiohttp.ClientSession(server.url) as http:
        token = admin_token
        if path == "/api/calls":  # call set-up takes a call token, not a login
            async with http.post("/api/call-tokens") as r:
                token = (await r.json())["token"]
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        async with http.request(method, path, data=body.encode(), headers=headers) as r:
            text = await r.text()
            if path == "/api/call-tokens":  # it reads no body, so none can hurt it
                assert r.status == 201, text
            elif path.endswith(("/retry", "/cancel")):  # they read no body either: the run named does not exist
                assert r.status == 404, text
            else:
                assert r.status == 400, text
                assert "JSON" in text


def _ws(server: RunningServer, path: str) -> str:
    return server.url.replace("http://", "ws://") + path


async def _closed_with(ws: aiohttp.ClientWebSocketResponse) -> aiohttp.WSMessage:
    while (msg := await ws.receive(timeout=10)).type is aiohttp.WSMsgType.TEXT:
        pass
    return msg


async def test_deep_json_on_the_sockets_closes_them_with_a_reason(server: RunningServer, admin_token: str) -> None:
    deep = "[" * 10_000 + "]" * 10_000  # under both sockets' message limits
    async with aiohttp.ClientSession() as http:
        console = await http.ws_connect(_ws(server, "/api/console/ws"))
        await console.send_str(deep)  # as the first (auth) message
        msg = await _closed_with(console)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 4401 and msg.extra
        console = await http.ws_connect(_ws(server, "/api/console/ws"))
        await console.send_str(json.dumps({"type": "auth", "token": admin_token}))
        await console.send_str(deep)  # once authenticated
        msg = await _closed_with(console)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1003 and "JSON" in msg.extra
        stream = await http.ws_connect(_ws(server, "/api/phone/twilio?token=provider-secret"))
        await stream.send_str(deep)
        msg = await _closed_with(stream)
        assert msg.type is aiohttp.WSMsgType.CLOSE and msg.data == 1003 and "JSON" in msg.extra
        async with http.get(f"{server.url}/api/health") as r:
            assert r.status == 200


async def test_deep_json_on_the_control_bus_is_dropped_and_logged(server: RunningServer,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Another replica (or anything that can publish to Redis) sends garbage: it is dropped with a warning and
    counted as malformed, and the bus goes on listening."""
    services = server.app[SERVICES]
    live = services.storage.live
    registry = services.metrics.registry

    def malformed() -> float:
        return registry.get_sample_value("pono_control_refused_total", {"reason": "malformed"}) or 0.0

    before = malformed()
    caplog.set_level(logging.WARNING, logger="pono.storage.control")
    await live.redis.publish(control_channel(live.replica), "[" * 10_000 + "]" * 10_000)
    for _ in range(200):
        if malformed() > before:
            break
        await asyncio.sleep(0.05)
    assert malformed() == before + 1
    assert any(r.name == "pono.storage.control" and "malformed" in r.getMessage() for r in caplog.records)
    assert not services.control._task.done()


async def test_deep_json_in_a_cursor_is_a_422(server: RunningServer, admin_token: str) -> None:
    cursor = base64.urlsafe_b64encode(("[" * 2_000 + "]" * 2_000).encode()).decode()
    async with aiohttp.ClientSession(server.url, headers={"Authorization": f"Bearer {admin_token}"}) as http:
        async with http.get("/api/calls", params={"cursor": cursor}) as r:
            assert r.status == 422, await r.text()


# Postgres text cannot hold U+0000, and UTF-8 cannot hold a lone surrogate.
async def test_nul_in_a_url_is_a_400(server: RunningServer, admin_token: str) -> None:
    paths = ["/api/calls?q=a%00b", "/api/calls?persona=a%00b", "/api/calls/a%00b", "/api/audit?action=a%00b",
             "/api/knowledge/kb/search?q=a%00b", "/api/personas/a%00b", "/api/call-tokens?persona=a%00b"]
    async with aiohttp.ClientSession(server.url, headers={"Authorization": f"Bearer {admin_token}"}) as http:
        for path in paths:
            async with http.request("POST" if "call-tokens" in path else "GET", yarl.URL(path, encoded=True)) as r:
                assert r.status == 400 and "NUL" in await r.text(), (path, r.status)


async def test_nul_and_lone_surrogates_in_json_bodies_are_repaired_at_the_edge(server: RunningServer,
                                                                              admin_token: str) -> None:
    name = f"nul-{uuid.uuid4().hex[:6]}"
    persona = '{"name": "' + name + '", "system_prompt": "be kind\\u0000\\ud800", "greeting": "hi\\u0000"}'
    document = '{"source": "odd.md", "text": "caf\\u00e9 \\u0000 and \\udc80 half a pair"}'
    headers = {"Authorization": f"Bearer {admin_token}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession(server.url, headers=headers) as http:
        async with http.post("/api/personas", data=persona) as r:
            assert r.status == 201, await r.text()
            created = await r.json()
            assert (created["system_prompt"], created["greeting"]) == ("be kind\ufffd\ufffd", "hi\ufffd")
        async with http.post(f"/api/knowledge/nul-{uuid.uuid4().hex[:6]}/documents", data=document) as r:
            assert r.status == 201, await r.text()
        async with http.post(f"/api/knowledge/nul-{uuid.uuid4().hex[:6]}/documents?source=nul.txt",
                             data=b"a NUL \x00 byte in a text file", headers={"Content-Type": "text/plain"}) as r:
            assert r.status == 201, await r.text()
        for odd in ('{"source": "t.md", "text": "x", "title": {"a": 1}}', "[1]", '"text"', "{not json"):
            async with http.post(f"/api/knowledge/nul-{uuid.uuid4().hex[:6]}/documents", data=odd) as r:
                assert r.status in (400, 422), (odd, await r.text())
        async with http.post("/api/auth/login", data='{"name": "a\\u0000", "password": "b\\u0000\\ud800"}') as r:
            assert r.status == 401, await r.text()


async def test_deep_tool_arguments_from_the_llm_are_a_tool_error() -> None:
    """The LLM's tool-call arguments are outside JSON too: a deep one is an error the model is told, not a
    RecursionError out of the turn."""

    async def echo(word: str) -> str:
        return word

    registry = ToolRegistry([python_tool(echo)])
    outcome = await registry.call("id-1", "echo", "[" * 10_000 + "]" * 10_000, ToolContext("call-1", "p"))
    assert outcome.error is not None and "JSON" in outcome.error
    assert (await registry.call("id-2", "echo", '{"word": "ok"}', ToolContext("call-1", "p"))).result == "ok"


async def test_numbers_in_the_query_are_ascii_digits(server: RunningServer, admin_token: str) -> None:
    """str.isdigit() says yes to "²", which int() refuses: a check with it once let a 500 through."""
    async with aiohttp.ClientSession(server.url, headers={"Authorization": f"Bearer {admin_token}"}) as http:
        for path, params in (("/api/calls", {"limit": "\u00b2"}), ("/api/personas", {"limit": "\u00b2"}),
                             ("/api/audit", {"limit": "\u00b2"}), ("/api/calls", {"limit": "\u0661\u0660"}),
                             ("/api/knowledge/kb/search", {"q": "hours", "k": "\u00b2"})):
            async with http.get(path, params=params) as r:
                assert r.status == 422, (path, params, r.status, await r.text())


async def test_nul_said_over_the_data_channel_is_kept(server: RunningServer, script: Script, admin_token: str) -> None:
    """A caller's text with U+0000 once reached the writer as it was; Postgres refused the row and the writer
    dropped the turn. It is repaired at the edge like a lone surrogate, and stored."""
    script.reply = "Noted."
    caller = await open_call(server, audio=False)
    try:
        caller.send_raw('{"type": "text", "text": "my code is 12\\u000034"}')
        await caller.wait_for(lambda e: e["type"] == "agent.final", 20)
    finally:
        await caller.hang_up()
    turns = await stored_turns(server, admin_token, caller.call_id, 2)
    assert [t["text"] for t in turns if t["role"] == "user"] == ["my code is 12\ufffd34"]


async def test_review_findings_are_clear_4xx(server: RunningServer, admin_token: str) -> None:
    """A new user's review: bytes that are not UTF-8 in a bearer token, NaN and Infinity in JSON (which Postgres
    jsonb refuses), an MCP server the operator never configured, and a drain that is not a boolean."""
    url = yarl.URL(server.url)
    for path in ("/api/personas", "/metrics", "/api/auth/me"):  # raw bytes: no client would send them for us
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
                     + b"Authorization: Bearer pono_\xff\xfe\r\n\r\n")
        status = await reader.readline()
        writer.close()
        assert status.split()[1] == b"401", (path, status)
    async with aiohttp.ClientSession(server.url) as http:
        auth = {"Authorization": f"Bearer {admin_token}"}
        for body in ('{"name": "nan1", "system_prompt": "x", "llm_params": {"temperature": NaN}}',
                     '{"name": "inf1", "system_prompt": "x", "llm_params": {"temperature": 1e999}}',
                     '{"name": "inf2", "system_prompt": "x", "dlp_policy": {"before_llm": -Infinity}}'):
            async with http.post("/api/personas", data=body, headers={**auth, "Content-Type": "application/json"}) \
                    as r:
                assert r.status == 400 and "JSON" in await r.text(), (body, r.status)
        async with http.post("/api/personas", json={"name": f"mcp-{uuid.uuid4().hex[:6]}", "system_prompt": "x",
                                                    "tools": [{"type": "mcp", "name": "crm", "server": "nope"}]},
                             headers=auth) as r:
            assert r.status == 422 and "PONO_MCP_SERVERS" in await r.text()
        async with http.post("/api/admin/drain", json={"drain": "yes"}, headers=auth) as r:
            assert r.status == 422
        async with http.get("/api/ready") as r:
            assert (await r.json())["status"] != "draining"


async def test_a_body_that_does_not_match_its_content_encoding_is_a_400(server: RunningServer) -> None:
    """A plain body sent as gzip was a 500 with two tracebacks in the log, before any login."""
    async with aiohttp.ClientSession(server.url) as http:
        for body in (b'{"name": "x", "password": "y"}',):
            async with http.post("/api/auth/login", data=body, headers={"Content-Type": "application/json",
                                                                        "Content-Encoding": "gzip"}) as r:
                assert r.status == 400, await r.text()
                assert "decoded" in (await r.json())["error"]
