"""The tool loop against a scripted LLM, and webhook tools against a real local HTTP target."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import uuid

import aiohttp
import pytest
from aiohttp import web

from pono.agent.embedded import free_port
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
    settings = server.app[SERVICES].settings
    settings.webhook_allowed_hosts = ["127.0.0.1"]
    yield t
    settings.webhook_allowed_hosts = []
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
        caller.send_text("What day is it?")
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 10)
        assert final["text"] == "It is noon."
        result = next(e for e in caller.events if e["type"] == "tool.result")
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
    server.app[SERVICES].settings.webhook_allowed_hosts = ["example.com"]
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
        caller.send_text("Loop forever")
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 15)
        assert final["text"] == "Enough tools."
        assert len([e for e in caller.events if e["type"] == "tool.result" and e["error"] is None]) == 3
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
                               ([{"type": "carrier-pigeon"}], "unsupported tool type")):
            async with http.post(f"{server.url}/api/personas",
                                 json={"name": "bad-tools", "system_prompt": "x", "tools": tools}) as r:
                assert r.status == 422
                assert message in (await r.json())["fields"][0]["message"]


async def test_mcp_server_tools_are_discovered_and_called(server, script: Script, admin_token: str) -> None:
    import sys
    from pathlib import Path

    mcp = {"type": "mcp", "name": "orders", "command": sys.executable,
           "args": [str(Path(__file__).parent / "fixtures" / "mcp_server.py")], "timeout_s": 2}
    dead = {"type": "mcp", "name": "dead", "command": sys.executable, "args": ["-c", "raise SystemExit(3)"]}
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
                                                              target: WebhookTarget, audio_dir) -> None:
    """The issue's end-to-end: a persona with knowledge, a webhook and an MCP tool answers a spoken question."""
    import sys
    from pathlib import Path

    from conftest import espeak

    from pono.agent.knowledge.evaluate import ingest_folder
    from pono.signaling.audio_out import Resampler
    from pono.testing.caller import RATE

    fixtures = Path(__file__).parent / "fixtures"
    collection = f"voice-{uuid.uuid4().hex[:6]}"
    await ingest_folder(server.app[SERVICES].storage.knowledge, fixtures / "knowledge", collection)
    mcp = {"type": "mcp", "name": "orders", "command": sys.executable, "args": [str(fixtures / "mcp_server.py")]}
    name = f"full-{uuid.uuid4().hex[:6]}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
        async with http.post(f"{server.url}/api/personas", json={
                "name": name, "system_prompt": "Help.", "knowledge_collections": [collection],
                "tools": ["search_knowledge", booking_tool(target), mcp]}) as r:
            assert r.status == 201, await r.text()
    question = espeak("Are dogs allowed at the restaurant?", audio_dir / "dogs.wav")
    caller = Caller(server.url)
    try:
        await caller.connect(persona=name)
        await caller.wait_open()
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
        used = await caller.wait_for(lambda e: e["type"] == "knowledge.used", 5)
        assert used["documents"][0]["document"] == "policies.txt"
        results = {e["name"]: e for e in caller.events if e["type"] == "tool.result"}
        assert set(results) == {"search_knowledge", "book_table", "orders__lookup_order"}
        assert all(r["error"] is None for r in results.values())
        assert len(target.received) == 1
        await asyncio.sleep(1.0)
        audio = caller.recording()
        spoken = await server.app[SERVICES].models.run_stt(Resampler(16000)(audio, RATE))
        assert {"terrace", "booked"} & set(spoken.lower().replace(",", " ").replace(".", " ").split()), spoken
    finally:
        await caller.hang_up()


async def test_transfer_to_operator_marks_the_call(server, script: Script, admin_token: str) -> None:
    name = await persona(server, admin_token, ["transfer_to_operator"])
    script.responses = [{"tool_calls": [{"name": "transfer_to_operator", "arguments": {"reason": "billing"}}]},
                        {"text": "I am getting a colleague for you."}]
    caller = await text_call(server, name)
    try:
        caller.send_text("I want to talk to a person about my bill")
        await caller.wait_for(lambda e: e["type"] == "call.transfer_requested" and e["reason"] == "billing", 10)
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


async def test_mcp_server_over_streamable_http(server, script: Script, admin_token: str) -> None:
    import sys
    from pathlib import Path

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
