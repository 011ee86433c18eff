"""A deploy never drops a call: on SIGTERM `pono serve` takes no new calls, lets live ones finish (or says
goodbye at PONO_DRAIN_TIMEOUT_S), stores everything, and exits 0. Each test runs its own `pono serve`."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import aiohttp
import pytest
from helpers import fetch_call
from servers import PonoProcess

from pono.calls import DRAIN_GOODBYE
from pono.testing.caller import Caller
from pono.testing.scripted_llm import Script, ScriptedLLM


def replica(tmp: Path, scripted_llm: ScriptedLLM, postgres_url: str, redis_url: str, **env: str) -> PonoProcess:
    return PonoProcess(tmp, DATABASE_URL=postgres_url, REDIS_URL=redis_url, OPENAI_BASE_URL=scripted_llm.base_url,
                       PONO_LLM_MODEL="scripted", PONO_REPLICA_ID=f"drain-{uuid.uuid4().hex[:6]}", **env)


async def ready_status(http: aiohttp.ClientSession, url: str) -> int:
    async with http.get(f"{url}/api/ready") as r:
        return r.status


async def call_then_sigterm(process: PonoProcess, caller: Caller, question: str) -> None:
    """Open a call on the replica, have one question answered, then send the replica SIGTERM."""
    assert process.process is not None
    await caller.connect()
    await caller.wait_open()
    caller.send_text(question)
    await caller.wait_for(lambda e: e["type"] == "agent.final", 20)
    process.process.send_signal(signal.SIGTERM)


async def test_sigterm_lets_the_live_call_finish_then_exits_cleanly(
        server, tmp_path_factory: pytest.TempPathFactory, scripted_llm: ScriptedLLM, script: Script,
        postgres_url: str, redis_url: str, admin_token: str) -> None:
    process = replica(tmp_path_factory.mktemp("drain"), scripted_llm, postgres_url, redis_url)
    await process.start()
    assert process.process is not None
    script.reply = "We are open until ten tonight."
    caller = Caller(process.url)
    try:
        await call_then_sigterm(process, caller, "How late are you open?")
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                if await ready_status(http, process.url) == 503:
                    break
                await asyncio.sleep(0.01)
            assert await ready_status(http, process.url) == 503
            # A new caller is turned away, with a time to come back.
            newcomer = Caller(process.url)
            with pytest.raises(RuntimeError, match="503"):
                await newcomer.connect(audio=False)
            await newcomer.close()
        # The live call goes on: its next question is answered, spoken, and stored.
        caller.send_text("And tomorrow?")
        answer = await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] > 1, 20)
        assert answer["text"] == script.reply and not answer["interrupted"]
        await asyncio.sleep(0.5)
        assert len(caller.recording()) > 0
        assert process.process.returncode is None  # still serving its call
    finally:
        await caller.hang_up()
    assert await asyncio.wait_for(process.process.wait(), 60) == 0
    async with aiohttp.ClientSession() as http:
        turns = (await fetch_call(http, server.url, admin_token, caller.call_id))["turns"]
    assert [t["role"] for t in turns] == ["user", "agent", "user", "agent"]


async def test_calls_still_live_at_the_drain_timeout_hear_a_goodbye(
        server, tmp_path_factory: pytest.TempPathFactory, scripted_llm: ScriptedLLM, script: Script,
        postgres_url: str, redis_url: str, admin_token: str) -> None:
    process = replica(tmp_path_factory.mktemp("drain-timeout"), scripted_llm, postgres_url, redis_url,
                      PONO_DRAIN_TIMEOUT_S="3")
    await process.start()
    assert process.process is not None
    script.reply = "Sure."
    caller = Caller(process.url)
    try:
        await call_then_sigterm(process, caller, "Hello")
        goodbye = await caller.wait_for(lambda e: e["type"] == "agent.final" and e["text"] == DRAIN_GOODBYE, 30)
        assert goodbye["interrupted"] is False
        assert await asyncio.wait_for(process.process.wait(), 60) == 0
    finally:
        await caller.close()
    async with aiohttp.ClientSession() as http:
        stored = await fetch_call(http, server.url, admin_token, caller.call_id)
    turns = stored["turns"]
    assert turns[-1]["text"] == DRAIN_GOODBYE and stored["end_reason"] == "drain_timeout"


async def test_an_admin_can_drain_a_replica_and_take_it_back(
        tmp_path_factory: pytest.TempPathFactory, scripted_llm: ScriptedLLM, postgres_url: str, redis_url: str,
        admin_token: str) -> None:
    process = replica(tmp_path_factory.mktemp("drain-api"), scripted_llm, postgres_url, redis_url)
    await process.start()
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
            async with http.post(f"{process.url}/api/admin/drain", json={"drain": True}) as r:
                assert r.status == 200 and (await r.json())["draining"] is True
            async with http.get(f"{process.url}/api/ready") as r:
                assert r.status == 503 and (await r.json())["status"] == "draining"
            async with http.post(f"{process.url}/api/admin/drain", json={"drain": False}) as r:
                assert r.status == 200 and (await r.json())["draining"] is False
            assert await ready_status(http, process.url) == 200
    finally:
        await process.stop()
