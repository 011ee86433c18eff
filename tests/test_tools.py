"""The tool loop against a scripted LLM, and webhook tools against a real local HTTP target."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from feeds import operator_feed
from helpers import settings_for_new_calls

from pono.agent.embedded import free_port
from pono.agent.tools.mcp_servers import BASIC_ENV, parse_mcp_servers
from pono.agent.tools.mcp_tools import serve_mcp_tools
from pono.agent.tools.registry import ToolContext, ToolOutcome, ToolRegistry
from pono.agent.tools.specs import build_registry, parse_tool_specs
from pono.agent.tools.webhook import webhook_tool
from pono.context import SERVICES
from pono.testing.caller import Caller
from pono.testing.scripted_llm import Script

SECRET = "test-webhook-secret"


class WebhookTarget:
    """A business backend: checks Pono's signature, answers slowly or with errors when told to."""

    def __init__(self) -> None:
        self.received: list[dict[str, object]] = []
        self.delay_s = 0.0
        self.fail_first = 0
        self.app = web.Application()
        self.app.add_routes([web.post("/book", self.book)])
        self.runner = web.AppRunner(self.app, access_log=None)
        self.port = free_port()

    async def start(self) -> None:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def book(self, request: web.Request) -> web.Response:
        body = await request.read()
        timestamp = request.headers["X-Pono-Timestamp"]
        expected = "sha256=" + hmac.new(SECRET.encode(), timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, request.headers["X-Pono-Signature"]):
            return web.json_response({"error": "bad signature"}, status=401)
        self.received.append(json.loads(body))
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.json_response({"error": "try again"}, status=500)
        await asyncio.sleep(self.delay_s)
        args = json.loads(body)["arguments"]
        return web.json_response({"booked": True, "party": args["party_size"], "reference": "B-1042"})


@pytest.fixture
async def target(monkeypatch: pytest.MonkeyPatch, server):
    monkeypatch.setenv("PONO_WEBHOOK_SECRET", SECRET)
    t = WebhookTarget()
    await t.start()
    with settings_for_new_calls(server, webhook_allowed_hosts=["127.0.0.1"]):
        yield t
    await t.runner.cleanup()


def booking_tool(target: WebhookTarget, timeout_s: float = 3.0) -> dict[str, object]:
    return {"type": "webhook", "name": "book_table", "description": "Book a table.",
            "url": f"http://127.0.0.1:{target.port}/book", "timeout_s": timeout_s,
            "parameters": {"type": "object", "required": ["party_size"],
                           "properties": {"party_size": {"type": "integer"}, "time": {"type": "string"}}}}


async def persona(server, admin_token: str, tools: list[object]) -> str:
    name = f"tools-{uuid.uuid4().hex[:6]}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
        async with http.post(f"{server.url}/api/personas", json={"name": name, "system_prompt": "Help.",
                                                                 "tools": tools, "timezone": "Europe/Paris"}) as r:
            assert r.status == 201, await r.text()
    return name


async def text_call(server, persona_name: str) -> Caller:
    caller = Caller(server.url)
    await caller.connect(audio=False, persona=persona_name)
    await caller.wait_open()
    return caller


def tool_messages(request: dict[str, object]) -> list[dict[str, object]]:
    return [m for m in request["messages"] if m["role"] == "tool"]  # type: ignore[index, union-attr]


async def test_one_tool_round_and_storage(server, script: Script, admin_token: str) -> None:
    name = await persona(server, admin_token, ["current_datetime", "end_call"])
    script.responses = [{"tool_calls": [{"name": "current_datetime", "arguments": {}}]}, {"text": "It is noon."}]
    caller = await text_call(server, name)
    try:
        async with operator_feed(server, caller.call_id) as feed:
            caller.send_text("What day is it?")
            final = await caller.wait_for(lambda e: e["type"] == "agent.final", 10)
            result = await feed.wait_for(lambda e: e["type"] == "tool.result")
        assert final["text"] == "It is noon."
        # Tool results are for operators and storage, never the caller's channel.
        assert not [e for e in caller.events if e["type"] in ("tool.call", "tool.result")]
        assert result["name"] == "current_datetime" and result["error"] is None
        assert result["result"]["timezone"] == "Europe/Paris"
        first, second = script.requests[-2:]
        assert {t["function"]["name"] for t in first["tools"]} == {"current_datetime", "end_call"}
        (tool_message,) = tool_messages(second)
        assert json.loads(tool_message["content"])["weekday"] == result["result"]["weekday"]
    finally:
        await caller.hang_up()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
        for _ in range(50):
            async with http.get(f"{server.url}/api/calls/{caller.call_id}") as r:
                stored = await r.json()
            if stored.get("tool_calls"):
                break
            await asyncio.sleep(0.1)
    (row,) = stored["tool_calls"]
    assert row["name"] == "current_datetime" and row["result"]["timezone"] == "Europe/Paris"
    assert row["duration_ms"] >= 0 and row["error"] is None


async def test_parallel_tools_bad_calls_and_webhook_signature(server, script: Script, admin_token: str,
                                                              target: WebhookTarget) -> None:
    name = await persona(server, admin_token, ["current_datetime", booking_tool(target)])
    script.responses = [
        {"tool_calls": [{"name": "book_table", "arguments": {"party_size": 2, "time": "19:00"}},
                        {"name": "current_datetime", "arguments": {}},
                        {"name": "launch_rocket", "arguments": {}},
                        {"name": "book_table", "arguments": {"party_size": "two"}},
                        {"name": "current_datetime", "arguments": "{not json"}]},
        {"text": "Booked for two at seven, reference B-1042."},
    ]
    caller = await text_call(server, name)
    try:
        caller.send_text("Book a table for two at seven")
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 15)
        assert final["text"] == "Booked for two at seven, reference B-1042."
        results = {(m["tool_call_id"]): json.loads(m["content"]) for m in tool_messages(script.requests[-1])}
        assert len(results) == 5
        values = list(results.values())
        assert values[0] == {"booked": True, "party": 2, "reference": "B-1042"}
        assert "weekday" in values[1]
        assert "unknown tool 'launch_rocket'" in values[2]["error"]
        assert "party_size" in values[3]["error"]
        assert "not valid JSON" in values[4]["error"]
        assert len(target.received) == 1 and target.received[0]["arguments"] == {"party_size": 2, "time": "19:00"}
    finally:
        await caller.hang_up()


async def test_webhook_retries_times_out_and_respects_allow_list(server, script: Script, admin_token: str,
                                                                 target: WebhookTarget) -> None:
    name = await persona(server, admin_token, [booking_tool(target, timeout_s=1.0)])
    target.fail_first = 2  # two 500s, then success: retried within the tool's time
    script.responses = [{"tool_calls": [{"name": "book_table", "arguments": {"party_size": 4}}]}, {"text": "Done."}]
    caller = await text_call(server, name)
    try:
        caller.send_text("Table for four")
        await caller.wait_for(lambda e: e["type"] == "agent.final", 10)
        assert json.loads(tool_messages(script.requests[-1])[0]["content"])["booked"] is True
        assert len(target.received) == 3

        target.delay_s = 3.0  # slower than the tool's timeout: an error result, and the turn goes on
        script.responses = [{"tool_calls": [{"name": "book_table", "arguments": {"party_size": 4}}]},
                            {"text": "The booking system is slow, sorry."}]
        caller.send_text("Try again")
        final = await caller.wait_for(lambda e: e["type"] == "agent.final" and "slow" in e["text"], 15)
        assert "timed out" in json.loads(tool_messages(script.requests[-1])[-1]["content"])["error"]
        assert final["interrupted"] is False
    finally:
        await caller.hang_up()
    with settings_for_new_calls(server, webhook_allowed_hosts=["example.com"]):
        script.responses = [{"tool_calls": [{"name": "book_table", "arguments": {"party_size": 4}}]}, {"text": "No."}]
        caller = await text_call(server, name)
        try:
            caller.send_text("Table for four")
            await caller.wait_for(lambda e: e["type"] == "agent.final", 10)
            assert "allow-list" in json.loads(tool_messages(script.requests[-1])[0]["content"])["error"]
        finally:
            await caller.hang_up()


async def test_slow_tool_gets_filler_and_barge_in_never_runs_it_twice(server, script: Script, admin_token: str,
                                                                      target: WebhookTarget) -> None:
    name = await persona(server, admin_token, [booking_tool(target, timeout_s=5.0)])
    target.delay_s = 2.5  # longer than the filler threshold (1.5 s)
    script.responses = [{"tool_calls": [{"name": "book_table", "arguments": {"party_size": 3}}]},
                        {"text": "All set."}]
    caller = await text_call(server, name)
    try:
        caller.send_text("Table for three")
        await caller.wait_for(lambda e: e["type"] == "agent.delta" and "Let me check that" in e["text"], 10)
        # The caller interrupts while the tool is still running.
        script.responses = [{"text": "Sure, anything else?"}]
        caller.send_text("Actually, also a high chair")
        await caller.wait_for(lambda e: e["type"] == "barge_in", 10)
        await caller.wait_for(lambda e: e["type"] == "agent.final" and e["text"] == "Sure, anything else?", 15)
        await asyncio.sleep(0.2)
        assert len(target.received) == 1  # the booking ran once
        # The tool's call and result were committed whole: the next request carries both.
        last = script.requests[-1]["messages"]
        calls = [m for m in last if m["role"] == "assistant" and m.get("tool_calls")]
        assert calls and calls[0]["tool_calls"][0]["function"]["name"] == "book_table"
        assert json.loads(tool_messages(script.requests[-1])[0]["content"])["booked"] is True
    finally:
        await caller.hang_up()


async def test_round_cap(server, script: Script, admin_token: str) -> None:
    name = await persona(server, admin_token, ["current_datetime"])
    loop_call = {"tool_calls": [{"name": "current_datetime", "arguments": {}}]}
    script.responses = [loop_call] * 4 + [{"text": "Enough tools."}]
    caller = await text_call(server, name)
    try:
        async with operator_feed(server, caller.call_id) as feed:
            caller.send_text("Loop forever")
            final = await caller.wait_for(lambda e: e["type"] == "agent.final", 15)
            await feed.wait_for(lambda e: e["type"] == "agent.final")
        assert final["text"] == "Enough tools."
        assert len([e for e in feed.events if e["type"] == "tool.result" and e["error"] is None]) == 3
        assert "round limit" in json.loads(tool_messages(script.requests[-1])[-1]["content"])["error"]
        assert "tools" not in script.requests[-1]  # the last request offers no tools
    finally:
        await caller.hang_up()


async def test_end_call_tool_hangs_up_after_goodbye(server, script: Script, admin_token: str) -> None:
    name = await persona(server, admin_token, ["end_call"])
    script.responses = [{"tool_calls": [{"name": "end_call", "arguments": {"reason": "done"}}]},
                        {"text": "Goodbye!"}]
    caller = await text_call(server, name)
    try:
        caller.send_text("That's all, bye")
        await caller.wait_for(lambda e: e["type"] == "agent.final" and e["text"] == "Goodbye!", 10)
        for _ in range(50):
            if caller.call_id not in server.app[SERVICES].calls.calls:
                break
            await asyncio.sleep(0.1)
        assert caller.call_id not in server.app[SERVICES].calls.calls
    finally:
        await caller.close()


async def test_invalid_tool_specs_are_rejected(server, admin_token: str) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
        for tools, message in ((["teleport"], "unknown built-in"),
                               ([{"type": "webhook", "name": "x", "url": "ftp://x"}], "http(s) url"),
                               ([{"type": "carrier-pigeon"}], "unsupported tool type"),
                               # A persona may not say what program to run, nor sign with any variable.
                               ([{"type": "mcp", "name": "x", "command": "python", "args": ["-c", "1"]}],
                                "PONO_MCP_SERVERS"),
                               ([{"type": "webhook", "name": "x", "url": "https://api.example.com/x",
                                  "secret_env": "OPENAI_API_KEY"}], "secret_env must be")):
            async with http.post(f"{server.url}/api/personas",
                                 json={"name": "bad-tools", "system_prompt": "x", "tools": tools}) as r:
                assert r.status == 422
                assert message in (await r.json())["fields"][0]["message"]


@pytest.fixture
def mcp_servers(monkeypatch: pytest.MonkeyPatch, server):
    """The operator's PONO_MCP_SERVERS for the tests' stdio servers: the SDK-built fixture server, and one
    that exits at once. Set in the environment (which build_registry reads when it is not given them) and
    on the server's settings."""
    fixture = Path(__file__).parent / "fixtures" / "mcp_server.py"
    servers = {"orders": {"command": sys.executable, "args": [str(fixture)]},
               "dead": {"command": sys.executable, "args": ["-c", "raise SystemExit(3)"]}}
    monkeypatch.setenv("PONO_MCP_SERVERS", json.dumps(servers))
    settings = server.app[SERVICES].settings
    monkeypatch.setattr(settings, "mcp_servers", parse_mcp_servers(servers), raising=False)
    return servers


async def test_mcp_server_tools_are_discovered_and_called(server, script: Script, admin_token: str,
                                                          mcp_servers) -> None:
    mcp = {"type": "mcp", "name": "orders", "server": "orders", "timeout_s": 2}
    dead = {"type": "mcp", "name": "dead", "server": "dead"}
    name = await persona(server, admin_token, [mcp, dead])
    caller = await text_call(server, name)
    try:
        # Discovery runs beside the call; wait until the server's tools are offered.
        for _ in range(100):
            call = server.app[SERVICES].calls.calls[caller.call_id]
            if call.toolbox is not None and "orders__lookup_order" in call.toolbox.registry.tools:
                break
            await asyncio.sleep(0.1)
        assert {"orders__lookup_order", "orders__slow_inventory"} <= set(call.toolbox.registry.tools)
        error = await caller.wait_for(lambda e: e["type"] == "error" and e.get("kind") == "mcp", 20)
        assert "dead" in error["message"]
        script.responses = [{"tool_calls": [{"name": "orders__lookup_order", "arguments": {"order_id": "A-17"}},
                                            {"name": "orders__slow_inventory", "arguments": {"item": "chairs"}}]},
                            {"text": "Your order A-17 has shipped."}]
        caller.send_text("Where is my order A-17?")
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 20)
        assert final["text"].endswith("Your order A-17 has shipped.")  # after the slow-tool filler
        offered = {t["function"]["name"] for t in script.requests[-2]["tools"]}
        assert "orders__lookup_order" in offered and not any(n.startswith("dead__") for n in offered)
        results = [json.loads(m["content"]) for m in tool_messages(script.requests[-1])]
        assert results[0]["status"] == "shipped" and results[0]["order_id"] == "A-17"
        assert "timed out" in results[1]["error"]  # a hanging MCP tool: an error result, the call goes on
    finally:
        await caller.hang_up()
    # The stdio server lived as long as the call.
    def servers() -> list[Path]:
        found = []
        for p in Path("/proc").glob("[0-9]*/cmdline"):
            with contextlib.suppress(OSError):  # processes come and go while we look
                if b"mcp_server.py" in p.read_bytes():
                    found.append(p)
        return found

    for _ in range(50):
        running = await asyncio.to_thread(servers)
        if not running:
            break
        await asyncio.sleep(0.1)
    assert not running


async def test_spoken_question_uses_knowledge_webhook_and_mcp(server, script: Script, admin_token: str,
                                                              target: WebhookTarget, audio_dir, mcp_servers) -> None:
    """The issue's end-to-end: a persona with knowledge, a webhook and an MCP tool answers a spoken question."""
    from conftest import espeak

    from pono.agent.knowledge.evaluate import ingest_folder
    from pono.signaling.audio_out import Resampler
    from pono.testing.caller import RATE

    fixtures = Path(__file__).parent / "fixtures"
    collection = f"voice-{uuid.uuid4().hex[:6]}"
    await ingest_folder(server.app[SERVICES].storage.knowledge, fixtures / "knowledge", collection)
    mcp = {"type": "mcp", "name": "orders", "server": "orders"}
    name = f"full-{uuid.uuid4().hex[:6]}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
        async with http.post(f"{server.url}/api/personas", json={
                "name": name, "system_prompt": "Help.", "knowledge_collections": [collection],
                "tools": ["search_knowledge", booking_tool(target), mcp]}) as r:
            assert r.status == 201, await r.text()
    question = espeak("Are dogs allowed at the restaurant?", audio_dir / "dogs.wav")
    caller = Caller(server.url)
    feeds = contextlib.AsyncExitStack()
    try:
        await caller.connect(persona=name)
        await caller.wait_open()
        feed = await feeds.enter_async_context(operator_feed(server, caller.call_id))
        call = server.app[SERVICES].calls.calls[caller.call_id]
        for _ in range(100):
            if "orders__lookup_order" in call.toolbox.registry.tools:
                break
            await asyncio.sleep(0.1)
        script.responses = [
            {"tool_calls": [{"name": "search_knowledge", "arguments": {"query": "dogs allowed"}},
                            {"name": "book_table", "arguments": {"party_size": 2, "time": "Sunday 19:00"}},
                            {"name": "orders__lookup_order", "arguments": {"order_id": "A-17"}}]},
            {"text": "Dogs are welcome on the terrace, and your table on Sunday is booked."}]
        await asyncio.sleep(0.3)
        caller.speak(question)
        heard = await caller.wait_for(lambda e: e["type"] == "transcript.final" and e.get("text"), 30)
        assert "restaurant" in heard["text"].lower()
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 30)
        assert final["text"].endswith("your table on Sunday is booked.")
        used = await feed.wait_for(lambda e: e["type"] == "knowledge.used", 5)
        assert used["documents"][0]["document"] == "policies.txt"
        await feed.wait_for(lambda e: e["type"] == "agent.final", 5)
        results = {e["name"]: e for e in feed.events if e["type"] == "tool.result"}
        assert not [e for e in caller.events if e["type"] in ("tool.result", "knowledge.used")]
        assert set(results) == {"search_knowledge", "book_table", "orders__lookup_order"}
        assert all(r["error"] is None for r in results.values())
        assert len(target.received) == 1
        await asyncio.sleep(1.0)
        audio = caller.recording()
        spoken = await server.app[SERVICES].models.run_stt(Resampler(16000)(audio, RATE))
        assert {"terrace", "booked"} & set(spoken.lower().replace(",", " ").replace(".", " ").split()), spoken
    finally:
        await feeds.aclose()
        await caller.hang_up()


async def test_transfer_to_operator_marks_the_call(server, script: Script, admin_token: str) -> None:
    name = await persona(server, admin_token, ["transfer_to_operator"])
    script.responses = [{"tool_calls": [{"name": "transfer_to_operator", "arguments": {"reason": "billing"}}]},
                        {"text": "I am getting a colleague for you."}]
    caller = await text_call(server, name)
    try:
        async with operator_feed(server, caller.call_id) as feed:
            caller.send_text("I want to talk to a person about my bill")
            await feed.wait_for(lambda e: e["type"] == "call.transfer_requested" and e["reason"] == "billing", 10)
            await caller.wait_for(lambda e: e["type"] == "agent.final", 10)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
            for _ in range(50):
                async with http.get(f"{server.url}/api/calls?state=live") as r:
                    mine = [c for c in (await r.json())["calls"] if c["call_id"] == caller.call_id]
                if mine and mine[0].get("operator_requested"):
                    break
                await asyncio.sleep(0.1)
        assert mine[0]["operator_requested"] == "billing"
    finally:
        await caller.hang_up()


async def test_mcp_server_over_streamable_http(server, script: Script, admin_token: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # MCP URLs pass the tool host allow-list; loopback must be listed as an address.
    monkeypatch.setattr(server.app[SERVICES].settings, "webhook_allowed_hosts", ["127.0.0.1"])
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).parent / "fixtures" / "mcp_server.py"), "--http", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(100):  # until it listens
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        name = await persona(server, admin_token, [{"type": "mcp", "name": "orders",
                                                    "url": f"http://127.0.0.1:{port}/mcp"}])
        caller = await text_call(server, name)
        try:
            call = server.app[SERVICES].calls.calls[caller.call_id]
            for _ in range(100):
                if "orders__lookup_order" in call.toolbox.registry.tools:
                    break
                await asyncio.sleep(0.1)
            script.responses = [{"tool_calls": [{"name": "orders__lookup_order", "arguments": {"order_id": "B-2"}}]},
                                {"text": "Shipped."}]
            caller.send_text("Where is order B-2?")
            await caller.wait_for(lambda e: e["type"] == "agent.final", 15)
            result = json.loads(tool_messages(script.requests[-1])[0]["content"])
            assert result["order_id"] == "B-2" and result["status"] == "shipped"
        finally:
            await caller.hang_up()
    finally:
        process.terminate()
        await process.wait()


# -- the security rules, on the tools themselves (no Pono server) --------------------------------------
class Backend:
    """A real HTTP server on loopback: a business backend, a redirector, or an attacker's sink."""

    def __init__(self, routes: list[web.RouteDef]) -> None:
        self.received: list[bytes] = []
        self.app = web.Application()
        self.app.add_routes(routes)
        self.runner = web.AppRunner(self.app, access_log=None)
        self.port = free_port()

    async def __aenter__(self) -> Backend:
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


def hook_backend() -> Backend:
    """A backend whose POST /hook keeps each body it receives and answers {"ok": true}."""

    async def hook(request: web.Request) -> web.Response:
        backend.received.append(await request.read())
        return web.json_response({"ok": True})

    backend = Backend([web.post("/hook", hook)])
    return backend


def tool_context() -> ToolContext:
    return ToolContext(call_id="call-1", persona="security")


async def run_webhook(spec: dict[str, object], allowed_hosts: list[str]) -> ToolOutcome:
    registry, _ = build_registry([{"type": "webhook", "name": "hook", **spec}], allowed_hosts, mcp_servers={})
    return await registry.call("id-1", "hook", "{}", tool_context())


async def test_webhook_redirect_is_an_error_and_the_signed_body_goes_nowhere_else(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PONO_WEBHOOK_SECRET", SECRET)

    async def sink(request: web.Request) -> web.Response:
        attacker.received.append(await request.read())
        return web.json_response({"stolen": True})

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPPermanentRedirect(f"http://127.0.0.1:{attacker.port}/sink")  # 308: the body is re-sent

    attacker = Backend([web.post("/sink", sink)])
    async with attacker, Backend([web.post("/hook", redirect)]) as backend:
        outcome = await run_webhook({"url": f"http://127.0.0.1:{backend.port}/hook"}, ["127.0.0.1"])
    assert outcome.error is not None and "308" in outcome.error and "redirect" in outcome.error
    assert attacker.received == []


async def test_webhook_to_a_name_that_resolves_to_loopback_needs_the_address_listed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PONO_WEBHOOK_SECRET", SECRET)

    async with hook_backend() as backend:
        url = f"http://localhost:{backend.port}/hook"
        refused = await run_webhook({"url": url}, ["localhost"])  # the name alone: public addresses only
        assert refused.error is not None and "non-public address" in refused.error
        assert backend.received == []
        for addresses in (["localhost", "127.0.0.1", "::1"], ["localhost", "127.0.0.0/8", "::1/128"]):
            allowed = await run_webhook({"url": url}, addresses)
            assert allowed.error is None and allowed.result == {"ok": True}
    assert len(backend.received) == 2


async def test_webhook_answer_over_the_size_cap_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PONO_WEBHOOK_SECRET", SECRET)
    big = b'{"x": "' + b"a" * (70 * 1024) + b'"}'

    async def sized(request: web.Request) -> web.Response:
        return web.Response(body=big, content_type="application/json")

    async def chunked(request: web.Request) -> web.StreamResponse:  # no Content-Length to go by
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(big), 8192):
            await response.write(big[start:start + 8192])
        await response.write_eof()
        return response

    async with Backend([web.post("/sized", sized), web.post("/chunked", chunked)]) as backend:
        for path in ("sized", "chunked"):
            outcome = await run_webhook({"url": f"http://127.0.0.1:{backend.port}/{path}"}, ["127.0.0.1"])
            assert outcome.error is not None and "65536-byte limit" in outcome.error, outcome


async def test_webhook_secret_must_be_a_webhook_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-the-real-key")
    monkeypatch.setenv("PONO_WEBHOOK_SECRET_CRM", SECRET)

    async with hook_backend() as backend:
        url = f"http://127.0.0.1:{backend.port}/hook"
        with pytest.raises(ValueError, match="secret_env must be"):
            parse_tool_specs([{"type": "webhook", "name": "hook", "url": url, "secret_env": "OPENAI_API_KEY"}])
        # A row saved before the rule is left out of the call's tools, and refused at call time anyway.
        registry, _ = build_registry([{"type": "webhook", "name": "hook", "url": url, "secret_env": "OPENAI_API_KEY"}],
                                     ["127.0.0.1"], mcp_servers={})
        assert "hook" not in registry.tools
        stale = webhook_tool({"name": "hook", "url": url, "secret_env": "OPENAI_API_KEY"}, ["127.0.0.1"])
        with pytest.raises(ValueError, match="secret_env must be"):
            await stale.run({}, tool_context())
        assert backend.received == []
        allowed = await run_webhook({"url": url, "secret_env": "PONO_WEBHOOK_SECRET_CRM"}, ["127.0.0.1"])
        assert allowed.error is None and len(backend.received) == 1


ENV_SERVER = '''
import os
from mcp.server.mcpserver import MCPServer
server = MCPServer("env")

@server.tool()
def environment() -> dict:
    """The server's own environment."""
    return {"variables": dict(os.environ)}

server.run("stdio")
'''


async def serve(spec: dict[str, object], registry: ToolRegistry, prefix: str) -> tuple[asyncio.Task[None], list[str]]:
    """Start an MCP entry as a call would; return once its tools are offered or it reported an error."""
    errors: list[str] = []
    task = asyncio.create_task(serve_mcp_tools(spec, registry, errors.append))
    for _ in range(300):
        if errors or any(name.startswith(f"{prefix}__") for name in registry.tools) or task.done():
            break
        await asyncio.sleep(0.05)
    return task, errors


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def test_stdio_mcp_servers_come_from_the_operator_and_get_only_their_variables(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-the-real-key")
    monkeypatch.setenv("DATABASE_URL", "postgresql://pono:secret@db/pono")
    monkeypatch.setenv("ORDERS_TOKEN", "orders-token")
    servers = parse_mcp_servers(json.dumps({"envdump": {
        "command": sys.executable, "args": ["-c", ENV_SERVER],
        "env": {"ORDERS_TOKEN": "$ORDERS_TOKEN", "MODE": "test"}}}))
    with pytest.raises(ValueError, match="PONO_MCP_SERVERS"):
        parse_tool_specs([{"type": "mcp", "name": "evil", "command": "python", "args": ["-c", "print(1)"]}])
    with pytest.raises(ValueError, match="no MCP server 'nope'"):
        parse_tool_specs([{"type": "mcp", "name": "x", "server": "nope"}], known_servers=servers)
    registry, mcp = build_registry([{"type": "mcp", "name": "env", "server": "envdump"},
                                    {"type": "mcp", "name": "evil", "command": sys.executable, "args": ["-c", "1"]},
                                    {"type": "mcp", "name": "ghost", "server": "nope"}], [], mcp_servers=servers)
    tasks = []
    try:
        task, errors = await serve(mcp[0], registry, "env")
        tasks.append(task)
        assert errors == [] and "env__environment" in registry.tools
        outcome = await registry.call("id-1", "env__environment", "{}", tool_context())
        variables = outcome.result["variables"]
        assert variables["ORDERS_TOKEN"] == "orders-token" and variables["MODE"] == "test"
        assert "OPENAI_API_KEY" not in variables and "DATABASE_URL" not in variables
        assert set(variables) <= {"ORDERS_TOKEN", "MODE", "HOME", "LOGNAME", "PATH", "SHELL", "TERM", "USER",
                                  *BASIC_ENV}
        for entry, name in ((mcp[1], "evil"), (mcp[2], "ghost")):  # a legacy command row; an unknown server
            task, errors = await serve(entry, registry, name)
            tasks.append(task)
            assert len(errors) == 1 and f"MCP server {name} is unavailable" in errors[0]
            assert not any(tool.startswith(f"{name}__") for tool in registry.tools)
    finally:
        for task in tasks:
            await stop(task)


async def test_mcp_url_must_pass_the_tool_host_allow_list() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(Path(__file__).parent / "fixtures" / "mcp_server.py"), "--http", str(port),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        await listening(port)
        cases = ((f"http://127.0.0.1:{port}/mcp", [], "not on the tool host allow-list"),
                 (f"http://localhost:{port}/mcp", ["localhost"], "non-public address"),
                 (f"http://127.0.0.1:{port}/mcp", ["127.0.0.1"], None))
        for url, allowed, refusal in cases:
            registry, mcp = build_registry([{"type": "mcp", "name": "orders", "url": url}], allowed, mcp_servers={})
            task, errors = await serve(mcp[0], registry, "orders")
            try:
                if refusal is None:
                    assert errors == [] and "orders__lookup_order" in registry.tools
                    outcome = await registry.call("id-1", "orders__lookup_order", '{"order_id": "C-3"}', tool_context())
                    assert outcome.result["status"] == "shipped"
                else:
                    assert len(errors) == 1 and refusal in errors[0], errors
                    assert "orders__lookup_order" not in registry.tools
            finally:
                await stop(task)
    finally:
        process.terminate()
        await process.wait()


async def listening(port: int) -> None:
    for _ in range(200):
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise AssertionError(f"nothing listens on {port}")
