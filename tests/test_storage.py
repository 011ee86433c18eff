"""Storage against real Postgres and Valkey: migrations, the calls and personas API, and outages."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from conftest import RunningServer
from helpers import empty_database, server_on_own_stores
from servers import PonoProcess

from pono.context import SERVICES
from pono.storage.migrate import apply_migrations, migration_files
from pono.storage.users import create_api_key, create_user
from pono.testing.caller import Caller
from pono.testing.scripted_llm import Script, ScriptedLLM


async def test_migrations_from_empty_twice_and_concurrently(postgres_url: str) -> None:
    versions = [v for v, _ in migration_files()]
    name = await empty_database(postgres_url)
    conn = await asyncpg.connect(postgres_url, database=name)
    try:
        assert await apply_migrations(conn) == versions
        assert await apply_migrations(conn) == []
        tables = {r["tablename"] for r in await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname='public'")}
        assert {"personas", "calls", "turns", "tool_calls", "dlp_findings", "documents", "chunks", "users",
                "api_keys", "audit_log", "schema_migrations"} <= tables
        assert await conn.fetchval("SELECT count(*) FROM personas WHERE is_default") == 1
    finally:
        await conn.close()

    name = await empty_database(postgres_url)
    a = await asyncpg.connect(postgres_url, database=name)
    b = await asyncpg.connect(postgres_url, database=name)
    try:
        results = await asyncio.gather(apply_migrations(a), apply_migrations(b))
        assert sorted(results, key=len) == [[], versions]
        assert await a.fetchval("SELECT count(*) FROM schema_migrations") == len(versions)
    finally:
        await a.close()
        await b.close()


async def api(http: aiohttp.ClientSession, method: str, url: str, token: str | None, content_type: str = "",
              **kwargs):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if content_type:
        headers["Content-Type"] = content_type
    async with http.request(method, url, headers=headers, **kwargs) as r:
        body = await r.json() if r.content_type == "application/json" else None
        return r.status, body


async def wait_for_call(http, server_url: str, token: str, call_id: str, turns: int, timeout: float = 20.0):
    for _ in range(int(timeout * 10)):
        status, body = await api(http, "GET", f"{server_url}/api/calls/{call_id}", token)
        if status == 200 and len(body["turns"]) >= turns and body["ended_at"]:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(f"call {call_id} not stored with {turns} turns: {status} {body}")


async def talk(caller: Caller, script: Script, question: str, answer: str) -> None:
    script.reply = answer
    before = sum(1 for e in caller.events if e["type"] == "agent.final")
    caller.send_text(question)
    deadline = asyncio.get_running_loop().time() + 20
    while sum(1 for e in caller.events if e["type"] == "agent.final") <= before:
        assert asyncio.get_running_loop().time() < deadline, "no answer"
        await asyncio.sleep(0.05)


async def test_call_turns_and_latency_in_api(server: RunningServer, script: Script, admin_token: str) -> None:
    caller = Caller(server.url)
    await caller.connect()
    await caller.wait_open()
    try:
        await talk(caller, script, "Do you open on Sundays?", "Yes, from noon until ten.")
        await talk(caller, script, "Can I bring a dog?", "Dogs are welcome on the terrace.")
        async with aiohttp.ClientSession() as http:
            status, live = await api(http, "GET", f"{server.url}/api/calls?state=live", admin_token)
            assert status == 200
            mine = [c for c in live["calls"] if c["call_id"] == caller.call_id]
            assert mine and mine[0]["transport"] == "webrtc"
            assert mine[0]["replica"] == server.app[SERVICES].settings.replica_id
    finally:
        await caller.hang_up()
    async with aiohttp.ClientSession() as http:
        call = await wait_for_call(http, server.url, admin_token, caller.call_id, 4)
        assert call["transport"] == "webrtc" and call["end_reason"] == "caller_hangup"
        assert [(t["index"], t["role"]) for t in call["turns"]] == [(0, "user"), (1, "agent"), (2, "user"),
                                                                    (3, "agent")]
        assert call["turns"][0]["text"] == "Do you open on Sundays?"
        assert call["turns"][3]["text"] == "Dogs are welcome on the terrace."
        marks = call["turns"][1]["latency"]
        assert {"llm_first_token", "first_sentence", "tts_first_audio", "first_audio_sent"} <= set(marks)
        status, ended = await api(http, "GET", f"{server.url}/api/calls?state=ended&limit=200", admin_token)
        assert status == 200 and caller.call_id in [c["id"] for c in ended["calls"]]
        status, live = await api(http, "GET", f"{server.url}/api/calls?state=live", admin_token)
        assert caller.call_id not in [c["call_id"] for c in live["calls"]]


async def test_calls_pagination(server: RunningServer, admin_token: str) -> None:
    async with aiohttp.ClientSession() as http:
        seen: list[str] = []
        cursor = ""
        # Walk every page (the session's database holds every call the suite made so far, often hundreds).
        for _ in range(1000):
            status, page = await api(http, "GET", f"{server.url}/api/calls?limit=3{cursor}", admin_token)
            assert status == 200 and len(page["calls"]) <= 3
            seen += [c["id"] for c in page["calls"]]
            if not page["next_cursor"]:
                break
            cursor = f"&cursor={page['next_cursor']}"
        assert not page["next_cursor"]
        assert len(seen) == len(set(seen)) >= 1
        status, everything = await api(http, "GET", f"{server.url}/api/calls?limit=200", admin_token)
        assert [c["id"] for c in everything["calls"]] == seen[:200]


async def test_personas_api_and_bad_input(server: RunningServer, admin_token: str) -> None:
    pool = server.app[SERVICES].storage.db.pool
    _, viewer = await create_api_key(pool, await create_user(pool, f"viewer-{uuid.uuid4().hex[:6]}", "viewer"),
                                     "viewer", "t")
    base = f"{server.url}/api/personas"
    name = f"concierge-{uuid.uuid4().hex[:6]}"
    body = {"name": name, "system_prompt": "You are a hotel concierge.", "greeting": "Welcome!",
            "turn_taking": {"hangover_ms": 600}}
    async with aiohttp.ClientSession() as http:
        assert (await api(http, "GET", base, None))[0] == 401
        assert (await api(http, "GET", base, "pono_not-a-real-key"))[0] == 401
        assert (await api(http, "POST", base, viewer, json=body))[0] == 403
        status, bad = await api(http, "POST", base, admin_token, json={
            "name": "", "turn_taking": {"hangover_ms": 5}, "language": "zz-ZZ"})
        assert status == 422
        assert {f["field"] for f in bad["fields"]} >= {"name", "system_prompt", "turn_taking.hangover_ms", "language"}
        status, bad = await api(http, "POST", base, admin_token, json={
            "name": "x", "system_prompt": "y", "turn_taking": {"short_hangover_ms": 900, "long_hangover_ms": 800}})
        assert status == 422 and "shorter" in str(bad)
        status, raw = await api(http, "POST", base, admin_token, data=b"{oops",
                                content_type="application/json")
        assert status == 400 and "JSON" in raw["error"]
        status, raw = await api(http, "POST", base, admin_token, data=b"name=x")
        assert status == 415

        status, created = await api(http, "POST", base, admin_token, json=body)
        assert status == 201 and created["name"] == name and created["turn_taking"] == {"hangover_ms": 600}
        pid = created["id"]
        assert (await api(http, "POST", base, admin_token, json=body))[0] == 409
        status, got = await api(http, "GET", f"{base}/{pid}", viewer)
        assert status == 200 and got["greeting"] == "Welcome!"
        status, updated = await api(http, "PUT", f"{base}/{pid}", admin_token, json={**body, "greeting": "Hello"})
        assert status == 200 and updated["greeting"] == "Hello"

        names: list[str] = []
        url = f"{base}?limit=1"
        while url:
            status, page = await api(http, "GET", url, viewer)
            assert status == 200
            names += [p["name"] for p in page["personas"]]
            url = f"{base}?limit=1&cursor={page['next_cursor']}" if page["next_cursor"] else ""
        assert "default" in names and name in names and len(names) == len(set(names))

        status, _ = await api(http, "DELETE", f"{base}/{pid}", admin_token)
        assert status == 204
        assert (await api(http, "GET", f"{base}/{pid}", admin_token))[0] == 404
        assert (await api(http, "GET", f"{base}/not-a-uuid", admin_token))[0] == 404
        assert (await api(http, "GET", f"{base}/{uuid.uuid4()}", admin_token))[0] == 404
        default = next(p for p in (await api(http, "GET", f"{base}?limit=200", admin_token))[1]["personas"]
                       if p["is_default"])
        assert (await api(http, "DELETE", f"{base}/{default['id']}", admin_token))[0] == 409
        assert (await api(http, "GET", f"{server.url}/api/calls/nope", admin_token))[0] == 404
        assert (await api(http, "GET", f"{server.url}/api/calls?limit=0", admin_token))[0] == 422
        assert (await api(http, "GET", f"{server.url}/api/calls?state=maybe", admin_token))[0] == 422
        assert (await api(http, "GET", f"{server.url}/api/calls?cursor=zzz", admin_token))[0] == 422
    audit = await pool.fetch("SELECT action FROM audit_log WHERE target = $1 ORDER BY id", pid)
    assert [a["action"] for a in audit] == ["persona.create", "persona.update", "persona.delete"]


@pytest.fixture(scope="module")
async def fragile(tmp_path_factory: pytest.TempPathFactory, scripted_llm: ScriptedLLM):
    """A server on its own Postgres and Valkey, which the tests stop and start under it."""
    async with server_on_own_stores(tmp_path_factory, scripted_llm, "fragile", registry_ttl_s=3) as stack:
        yield stack


async def ready_checks(url: str) -> dict[str, bool]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/api/ready") as r:
        return (await r.json())["checks"]


async def test_postgres_outage_mid_call_loses_and_duplicates_nothing(fragile, script: Script) -> None:
    server, pg, _valkey, token = fragile
    writer = server.app[SERVICES].storage.writer
    caller = Caller(server.url)
    await caller.connect(audio=False)
    await caller.wait_open()
    try:
        await talk(caller, script, "first question", "first answer")
        await pg.astop()
        await talk(caller, script, "second question", "second answer")  # the call goes on
        await talk(caller, script, "third question", "third answer")
        for _ in range(50):
            if not writer.db_up:
                break
            await asyncio.sleep(0.1)
        assert not writer.db_up and writer.journal.has_pending()
        assert (await ready_checks(server.url))["database"] is False
        await pg.astart()
        for _ in range(100):
            if writer.db_up:
                break
            await asyncio.sleep(0.1)
        assert writer.db_up and not writer.journal.has_pending()
        await talk(caller, script, "fourth question", "fourth answer")
    finally:
        await caller.hang_up()
    async with aiohttp.ClientSession() as http:
        call = await wait_for_call(http, server.url, token, caller.call_id, 8)
    texts = [t["text"] for t in call["turns"]]
    assert texts == ["first question", "first answer", "second question", "second answer", "third question",
                     "third answer", "fourth question", "fourth answer"]
    rows = await server.app[SERVICES].storage.db.pool.fetch(
        "SELECT idx, count(*) AS n FROM turns WHERE call_id = $1 GROUP BY idx", caller.call_id)
    assert sorted((r["idx"], r["n"]) for r in rows) == [(i, 1) for i in range(8)]


async def test_redis_outage_mid_call(fragile, script: Script) -> None:
    server, _pg, valkey, token = fragile
    caller = Caller(server.url)
    await caller.connect(audio=False)
    await caller.wait_open()
    try:
        await talk(caller, script, "hello", "hi there")
        await valkey.astop()
        await talk(caller, script, "are you still there", "yes I am")  # the call goes on without Redis
        for _ in range(100):
            if not (await ready_checks(server.url))["redis"]:
                break
            await asyncio.sleep(0.1)
        assert (await ready_checks(server.url))["redis"] is False
        async with aiohttp.ClientSession() as http:
            status, body = await api(http, "GET", f"{server.url}/api/calls?state=live", token)
            assert status == 503 and "Redis" in body["error"]
        await valkey.astart()  # an empty Valkey: the registry must be rebuilt by heartbeats
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                status, body = await api(http, "GET", f"{server.url}/api/calls?state=live", token)
                if status == 200 and caller.call_id in [c["call_id"] for c in body["calls"]]:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the registry did not reconverge after Redis returned")
        assert (await ready_checks(server.url))["redis"] is True
        await talk(caller, script, "good", "great")
    finally:
        await caller.hang_up()


async def test_second_replica_shows_in_registry(server: RunningServer, scripted_llm: ScriptedLLM, postgres_url: str,
                                                redis_url: str, admin_token: str, tmp_path: Path) -> None:
    replica = PonoProcess(tmp_path / "replica-b", DATABASE_URL=postgres_url, REDIS_URL=redis_url,
                          OPENAI_BASE_URL=scripted_llm.base_url, PONO_LLM_MODEL="scripted",
                          PONO_REPLICA_ID="replica-b")
    await replica.start()
    caller = Caller(replica.url)
    try:
        await caller.connect(audio=False)
        await caller.wait_open()
        async with aiohttp.ClientSession() as http:
            for _ in range(50):
                _, body = await api(http, "GET", f"{server.url}/api/calls?state=live", admin_token)
                mine = [c for c in body["calls"] if c["call_id"] == caller.call_id]
                if mine:
                    break
                await asyncio.sleep(0.1)
            assert mine and mine[0]["replica"] == "replica-b"
        await caller.hang_up()
        async with aiohttp.ClientSession() as http:
            call = await wait_for_call(http, server.url, admin_token, caller.call_id, 0)
            assert call["replica"] == "replica-b"
            for _ in range(50):
                _, body = await api(http, "GET", f"{server.url}/api/calls?state=live", admin_token)
                if caller.call_id not in [c["call_id"] for c in body["calls"]]:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("an ended call stayed in the live registry")
    finally:
        await caller.close()
        await replica.stop()


async def test_crash_replays_journal_on_restart(fragile, scripted_llm: ScriptedLLM, script: Script,
                                                tmp_path: Path) -> None:
    server, pg, valkey, token = fragile
    crashing = PonoProcess(tmp_path / "crashing", DATABASE_URL=pg.uri, REDIS_URL=valkey.url,
                           OPENAI_BASE_URL=scripted_llm.base_url, PONO_LLM_MODEL="scripted")
    await crashing.start()
    caller = Caller(crashing.url)
    try:
        await pg.astop()
        await caller.connect(audio=False)
        await caller.wait_open()
        await talk(caller, script, "remember this", "I will")
        await talk(caller, script, "and this", "noted")
        journal = tmp_path / "crashing" / "journal"

        def journaled() -> int:
            return sum(len(f.read_text().splitlines()) for f in journal.glob("*.jsonl"))

        for _ in range(50):
            if journaled() >= 5:
                break
            await asyncio.sleep(0.1)
        assert journaled() >= 5  # the call row and 4 turns, fsync'd
        await crashing.kill()
    finally:
        await caller.close()
    await pg.astart()
    await crashing.start()  # same data dir: the journal is replayed at start
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                status, call = await api(http, "GET", f"{server.url}/api/calls/{caller.call_id}", token)
                if status == 200 and len(call["turns"]) == 4:
                    break
                await asyncio.sleep(0.1)
        assert [t["text"] for t in call["turns"]] == ["remember this", "I will", "and this", "noted"]
        assert journaled() == 0
    finally:
        await crashing.stop()


async def test_wrong_database_url_exits_with_one_clear_line(tmp_path: Path) -> None:
    process = PonoProcess(tmp_path / "bad-db", DATABASE_URL="postgresql://pono:wrong@127.0.0.1:9/nodb",
                          PONO_DB_CONNECT_ATTEMPTS="2")
    with pytest.raises(RuntimeError, match="exited with 1"):
        await process.start(ready_timeout=60)
    log = (tmp_path / "bad-db" / "server.log").read_text()
    # The address itself is redacted like any IP address in logs; the reason and the target stay readable.
    assert "cannot start: cannot reach Postgres at postgresql://pono@" in log and ":9/nodb after 2 attempts" in log
    assert "Traceback" not in log and "wrong" not in log  # no stack trace, and no password in the log
