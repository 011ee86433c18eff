"""The one-command default: no OPENAI_BASE_URL, so the bundled SmolLM2 is served by llama.cpp, and a fresh
embedded database gets a first admin whose one-time password is printed once."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
from conftest import make_settings, start_server

from pono.agent.conversation import APOLOGY
from pono.app import EMBEDDED_LLM
from pono.context import SERVICES
from pono.testing.caller import Caller


async def test_embedded_smollm2_answers(tmp_path, capfd: pytest.CaptureFixture[str]) -> None:
    settings = make_settings(tmp_path, stt_model="tiny.en", llm_timeout_s=30.0)
    assert settings.embedded_llm
    server = await start_server(settings)
    try:
        printed = capfd.readouterr().err
        found = re.search(r"/console as 'admin' with the one-time password '([^']+)'", printed)
        assert found, printed
        async with aiohttp.ClientSession() as http, http.post(
                f"{server.url}/api/auth/login", json={"name": "admin", "password": found.group(1)}) as r:
            assert r.status == 200 and (await r.json())["user"]["role"] == "admin"
        stored = await server.app[SERVICES].storage.db.pool.fetchval(
            "SELECT password_hash FROM users WHERE name = 'admin'")
        assert stored.startswith("$argon2id$") and found.group(1) not in stored
        embedded = server.app[EMBEDDED_LLM]
        assert server.app[SERVICES].llm.base_url == embedded.base_url
        caller = Caller(server.url)
        try:
            await caller.connect(audio=False)
            await caller.wait_open()
            caller.send_text("What is the capital of France?")
            final = await caller.wait_for(lambda e: e["type"] == "agent.final", 60)
            assert final["text"] and final["text"] != APOLOGY
            assert not [e for e in caller.events if e["type"] == "error"]
        finally:
            await caller.hang_up()
        # A caller who interrupts a long answer gets a whole answer to the new question.
        caller = Caller(server.url)
        try:
            await caller.connect(audio=False)
            await caller.wait_open()
            caller.send_text("Tell me a long story about the sea.")
            await caller.wait_for(lambda e: e["type"] == "agent.delta", 60)
            caller.send_text("Actually, what time is it?")
            second = await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] >= 3, 90)
            assert second["text"] and not second.get("truncated") and not second["interrupted"]
            assert not [e for e in caller.events if e["type"] == "error"]
        finally:
            await caller.hang_up()
        # Two callers at once on the one embedded model: neither answer is cut short by the other's request.
        callers = [Caller(server.url), Caller(server.url)]
        try:
            for c in callers:
                await c.connect(audio=False)
                await c.wait_open()
            for c, question in zip(callers, ("Name three colours.", "Name three animals."), strict=True):
                c.send_text(question)
            finals = await asyncio.gather(*(c.wait_for(lambda e: e["type"] == "agent.final", 90) for c in callers))
            assert all(f["text"] and not f.get("truncated") for f in finals)
            assert not [e for c in callers for e in c.events if e["type"] == "error"]
        finally:
            await asyncio.gather(*(c.hang_up() for c in callers), return_exceptions=True)
        process = embedded.process
        assert process is not None and process.returncode is None
    finally:
        await server.runner.cleanup()
    # Shutdown stops the llama.cpp child process.
    assert process.returncode is not None
