"""Call tokens across replicas: spent once in Redis, bound to a persona, and a caller's hang-up reaches the replica
that holds the call. Replica B is a second `pono serve` process on the same Postgres and Valkey."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
import redis.asyncio as aioredis
from conftest import RunningServer
from servers import PonoProcess

from pono.context import SERVICES
from pono.testing.caller import Caller
from pono.testing.scripted_llm import ScriptedLLM


@pytest.fixture(scope="module")
async def replica(tmp_path_factory: pytest.TempPathFactory, scripted_llm: ScriptedLLM, postgres_url: str,
                  redis_url: str) -> AsyncIterator[PonoProcess]:
    process = PonoProcess(tmp_path_factory.mktemp("tokens-b"), DATABASE_URL=postgres_url, REDIS_URL=redis_url,
                          OPENAI_BASE_URL=scripted_llm.base_url, PONO_LLM_MODEL="scripted",
                          PONO_REPLICA_ID="tokens-b")
    await process.start()
    yield process
    await process.stop()


async def test_a_token_opens_one_call_on_any_replica(server: RunningServer, replica: PonoProcess) -> None:
    caller = Caller(server.url)
    try:
        await caller.connect(audio=False)
        await caller.wait_open()
        offer = {"sdp": caller.pc.localDescription.sdp, "type": "offer"}
        for url in (replica.url, server.url):
            async with caller.http.post(f"{url}/api/calls", json=offer, headers=caller.auth) as r:
                assert r.status == 409, (url, await r.text())
    finally:
        await caller.hang_up()


async def test_a_token_from_before_redis_forgot_is_refused(server: RunningServer, redis_url: str) -> None:
    """The embedded Valkey keeps no snapshots: restarted, it forgets which tokens were spent. A token issued
    before Redis began keeping marks is refused rather than trusted to be unspent."""
    caller = Caller(server.url)
    raw = aioredis.from_url(redis_url, decode_responses=True)
    try:
        await caller.connect(audio=False)
        claims = server.app[SERVICES].signer.verify(caller.token, "call")
        assert claims is not None
        # What a restart of Redis loses: every spent token, and when it began keeping them.
        await raw.delete(f"pono:call-token:{claims['jti']}", "pono:call-tokens:since")
        offer = {"sdp": caller.pc.localDescription.sdp, "type": "offer"}
        async with caller.http.post(f"{server.url}/api/calls", json=offer, headers=caller.auth) as r:
            assert r.status == 409, await r.text()
        fresh = Caller(server.url)
        try:
            await fresh.connect(audio=False)  # a token issued now opens a call as usual
        finally:
            await fresh.hang_up()
    finally:
        await raw.aclose()
        await caller.hang_up()


async def test_the_caller_hangs_up_through_any_replica(server: RunningServer, replica: PonoProcess,
                                                       admin_token: str) -> None:
    caller, other = Caller(server.url), Caller(server.url)
    try:
        await caller.connect(audio=False)
        await other.connect(audio=False)
        await caller.wait_open()
        # Someone else's token cannot hang it up, here or there: it looks like a call that does not exist.
        for url in (replica.url, server.url):
            async with other.http.delete(f"{url}/api/calls/{caller.call_id}", headers=other.auth) as r:
                assert r.status == 404
        async with caller.http.delete(f"{replica.url}/api/calls/{caller.call_id}", headers=caller.auth) as r:
            assert r.status == 200, await r.text()
            assert (await r.json())["state"] == "ended"
        assert caller.call_id not in server.app[SERVICES].calls.calls  # ended before the answer came back
        for _ in range(50):
            async with caller.http.get(f"{server.url}/api/calls/{caller.call_id}",
                                       headers={"Authorization": f"Bearer {admin_token}"}) as r:
                stored = await r.json()
            if stored.get("ended_at"):
                break
            await asyncio.sleep(0.1)
        assert stored["end_reason"] == "caller_hangup", stored
        async with caller.http.delete(f"{replica.url}/api/calls/{caller.call_id}", headers=caller.auth) as r:
            assert r.status == 404  # over
        assert other.call_id in server.app[SERVICES].calls.calls
    finally:
        await caller.close()
        await other.hang_up()


async def _post_offer(caller: Caller, query: str, persona: str | None) -> int:
    """A token from POST /api/call-tokens{query}, then an offer asking for `persona`; the offer's status."""
    async with caller.http.post(f"{caller.base_url}/api/call-tokens{query}") as r:
        assert r.status == 201, await r.text()
        caller.token = (await r.json())["token"]
    caller.channel = caller.pc.createDataChannel("pono")
    await caller.pc.setLocalDescription(await caller.pc.createOffer())
    body = {"sdp": caller.pc.localDescription.sdp, "type": "offer"}
    async with caller.http.post(f"{caller.base_url}/api/calls", json={**body, "persona": persona} if persona else body,
                                headers=caller.auth) as r:
        if r.status == 201:
            caller.call_id = (await r.json())["call_id"]
        return r.status


async def test_a_token_is_bound_to_its_persona(server: RunningServer, admin_token: str) -> None:
    admin = {"Authorization": f"Bearer {admin_token}"}
    name = f"bound-{uuid.uuid4().hex[:6]}"
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{server.url}/api/personas", headers=admin,
                             json={"name": name, "system_prompt": "Be brief."}) as r:
            assert r.status == 201, await r.text()
            persona_id = (await r.json())["id"]
    calls = server.app[SERVICES].calls.calls
    # A token minted without ?persona= is the default persona's: it cannot open another one (nor get round that
    # persona's own call_tokens_per_minute).
    caller = Caller(server.url)
    try:
        assert await _post_offer(caller, "", name) == 403
    finally:
        await caller.close()
    # One minted for the persona by name opens it, asked by name or id, or not asked at all.
    for asked in (persona_id, None):
        caller = Caller(server.url)
        try:
            assert await _post_offer(caller, f"?persona={name}", asked) == 201
            assert calls[caller.call_id].persona == name
        finally:
            await caller.hang_up()
