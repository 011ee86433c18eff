"""Personas while Postgres is down: the last-known copy of each persona decides, never a guess.

A server on its own Postgres and Valkey (so stopping them does not touch the session's shared servers)."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from conftest import RunningServer
from helpers import server_on_own_stores, text_call
from servers import PostgresProcess, ValkeyProcess

from pono.agent.personas import PersonaUnavailable
from pono.context import SERVICES
from pono.testing.scripted_llm import Script, ScriptedLLM


@pytest.fixture(scope="module")
async def outage(tmp_path_factory: pytest.TempPathFactory, scripted_llm: ScriptedLLM) \
        -> AsyncIterator[tuple[RunningServer, PostgresProcess, ValkeyProcess, str]]:
    async with server_on_own_stores(tmp_path_factory, scripted_llm, "outage") as stack:
        yield stack


async def _token(http: aiohttp.ClientSession, url: str, persona: str | None) -> tuple[int, dict[str, Any]]:
    async with http.post(f"{url}/api/call-tokens", params={"persona": persona} if persona else None) as r:
        return r.status, await r.json()


async def test_personas_fail_closed_while_postgres_is_down(outage, script: Script) -> None:
    server, pg, valkey, token = outage
    admin = {"Authorization": f"Bearer {token}"}
    closed, sommelier = f"internal-{uuid.uuid4().hex[:6]}", f"tea-{uuid.uuid4().hex[:6]}"
    created: dict[str, dict[str, Any]] = {}
    async with aiohttp.ClientSession() as http:
        for name, extra in ((closed, {"call_tokens_enabled": False}),
                            (sommelier, {"system_prompt": "You are a tea sommelier."})):
            async with http.post(f"{server.url}/api/personas", headers=admin,
                                 json={"name": name, "system_prompt": "Be brief.", **extra}) as r:
                assert r.status == 201, await r.text()
                created[name] = await r.json()
        async with http.put(f"{server.url}/api/phone-numbers/+15550100", headers=admin,
                            json={"persona": sommelier}) as r:
            assert r.status == 200
        calls = server.app[SERVICES].calls
        # Redis is not trusted to keep the copies honest: one written there by anyone but a replica is ignored.
        raw = aioredis.from_url(valkey.url)
        try:
            forged = {**created[closed], "call_tokens_enabled": True}
            await raw.hset("pono:personas:known", forged["id"], json.dumps(forged))
        finally:
            await raw.aclose()

        await pg.astop()
        try:
            # Changed through the API before the outage: the copy in Redis decides.
            assert (await _token(http, server.url, closed))[0] == 403
            status, body = await _token(http, server.url, f"nobody-{uuid.uuid4().hex[:4]}")
            assert status == 503 and "cannot be verified" in body["error"], body
            assert (await _token(http, server.url, None))[0] == 201  # the default, as configured
            script.reply = "Oolong, certainly."
            async with text_call(server.url, sommelier) as caller:
                caller.send_text("What do you recommend?")
                await caller.wait_for(lambda e: e["type"] == "agent.final", 15)
                assert script.requests[-1]["messages"][0]["content"] == "You are a tea sommelier."
            assert (await calls.persona_for_number("+1 555 0100")).name == sommelier
            with pytest.raises(PersonaUnavailable):
                await calls.persona_for_number("+15550199")  # never seen: not guessed to be the default

            # Redis away too: this replica's own copies still decide.
            await valkey.astop()
            try:
                assert (await _token(http, server.url, closed))[0] == 403
                assert (await _token(http, server.url, f"nobody-{uuid.uuid4().hex[:4]}"))[0] == 503
            finally:
                await valkey.astart()
        finally:
            await pg.astart()
        # Back: the database decides again.
        assert (await _token(http, server.url, sommelier))[0] == 201
