"""Small pieces several test files share: a server on stores of its own, a database of its own, a text call,
reading a call back through the API, a settings change for new calls, a hand-built PDF, and, for the job
worker tests, a webhook target with two workers, a webhook workflow, a run waited for, and a payment made once
over two tries."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import numpy as np
import pytest
from aiohttp.web_protocol import RequestHandler
from conftest import RunningServer, make_settings, start_server
from servers import PostgresProcess, ValkeyProcess

from pono.context import SERVICES
from pono.jobs.definition import Workflow
from pono.storage.db import Database
from pono.storage.users import create_api_key, create_user
from pono.storage.workflow_runs import get_run, step_runs
from pono.storage.workflows import save_workflow
from pono.testing.caller import Caller
from pono.testing.scripted_llm import ScriptedLLM

if TYPE_CHECKING:
    from jobs_peers import Target
    from playwright.async_api import Page


class _Stoppable(Protocol):
    async def stop(self) -> None: ...


W = TypeVar("W", bound=_Stoppable)


@asynccontextmanager
async def server_on_own_stores(tmp_path_factory: pytest.TempPathFactory, scripted_llm: ScriptedLLM, name: str,
                               **settings: Any) -> AsyncIterator[tuple[RunningServer, PostgresProcess,
                                                                       ValkeyProcess, str]]:
    """A server on its own Postgres and Valkey (which a test may stop and start under it), and an admin token."""
    pg = PostgresProcess(tmp_path_factory.mktemp(f"{name}-pg"))
    valkey = ValkeyProcess(tmp_path_factory.mktemp(f"{name}-valkey"))
    running = await start_server(make_settings(tmp_path_factory.mktemp(name), stt_model="tiny.en",
                                               openai_base_url=scripted_llm.base_url, llm_model="scripted",
                                               database_url=pg.uri, redis_url=valkey.url, **settings))
    pool = running.app[SERVICES].storage.db.pool
    _, token = await create_api_key(pool, await create_user(pool, f"{name}-admin", "admin"), "admin", "t")
    yield running, pg, valkey, token
    await running.runner.cleanup()
    valkey.stop()
    pg.close()


async def empty_database(postgres_url: str) -> str:
    """A fresh database on the tests' Postgres, not migrated: its name."""
    name = f"pono_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(postgres_url)
    try:
        await admin.execute(f"CREATE DATABASE {name}")
    finally:
        await admin.close()
    return name


@asynccontextmanager
async def database_of_its_own(postgres_url: str, max_size: int) -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    """A fresh database on the tests' Postgres, migrated, that no server uses (nor its job worker): (its URL, a
    pool of up to `max_size` connections on it, closed on the way out)."""
    url = urlunsplit(urlsplit(postgres_url)._replace(path=f"/{await empty_database(postgres_url)}"))
    db = Database(url, min_size=1, max_size=max_size)
    await db.connect()  # applies the migrations
    try:
        yield url, db.pool
    finally:
        await db.close()


@asynccontextmanager
async def text_call(url: str, persona: str | None = None) -> AsyncIterator[Caller]:
    """An open call without audio (as `persona` when given), hung up on the way out."""
    caller = Caller(url)
    try:
        await caller.connect(audio=False, persona=persona)
        await caller.wait_open()
        yield caller
    finally:
        await caller.hang_up()


async def console_user(server: RunningServer, admin_token: str, role: str, password: str) -> str:
    """A new user with `role` and `password`, made through POST /api/users (201): its name."""
    name = f"{role}-{uuid.uuid4().hex[:6]}"
    async with aiohttp.ClientSession() as http, http.post(
            f"{server.url}/api/users", json={"name": name, "role": role, "password": password},
            headers={"Authorization": f"Bearer {admin_token}"}) as r:
        assert r.status == 201, await r.text()
    return name


async def console_login(page: Page, url: str, name: str, password: str) -> None:
    """Open the operator console at `url` in `page`, log in, and wait for its live feed. The wait is a function,
    not an expression string, so that it runs under the console's CSP too (no eval)."""
    await page.goto(f"{url}/console")
    await page.fill("#login-name", name)
    await page.fill("#login-password", password)
    await page.click("#login button[type=submit]")
    await page.wait_for_function("() => document.getElementById('feed-status').textContent === 'live'",
                                 timeout=15000)


async def fetch_call(http: aiohttp.ClientSession, url: str, admin_token: str, call_id: str) -> dict[str, Any]:
    """`GET /api/calls/{id}` once; it must answer 200."""
    async with http.get(f"{url}/api/calls/{call_id}", headers={"Authorization": f"Bearer {admin_token}"}) as r:
        assert r.status == 200
        return await r.json()


async def poll_call(server: Any, admin_token: str, call_id: str, done: Callable[[dict[str, Any]], bool],
                    tries: int = 100) -> dict[str, Any]:
    """`GET /api/calls/{id}` every 0.1 s until `done` holds for the answer (writes are batched), or `tries`
    reads were made; the last answer either way."""
    call: dict[str, Any] = {}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
        for _ in range(tries):
            async with http.get(f"{server.url}/api/calls/{call_id}") as r:
                call = await r.json()
            if done(call):
                break
            await asyncio.sleep(0.1)
    return call


async def stored_turns(server: Any, admin_token: str, call_id: str, count: int) -> list[dict[str, Any]]:
    """The call's stored turns, once at least `count` have reached Postgres."""
    return (await poll_call(server, admin_token, call_id, lambda c: len(c.get("turns", [])) >= count)).get("turns", [])


async def stored_end_reason(server: Any, admin_token: str, call_id: str) -> str | None:
    """Why the call ended, once that is stored; None if it never is."""
    call = await poll_call(server, admin_token, call_id, lambda c: bool(c.get("end_reason")))
    return call.get("end_reason") or None


async def stored_findings(server: Any, admin_token: str, call_id: str) -> list[dict[str, object]]:
    """The call's DLP findings, once there are any; [] if none arrive."""
    call = await poll_call(server, admin_token, call_id, lambda c: bool(c.get("dlp_findings")), tries=50)
    return call.get("dlp_findings") or []


@contextmanager
def settings_for_new_calls(server: Any, **values: object) -> Iterator[None]:
    """The shared server's settings changed to `values` for the block (calls opened inside it start with them;
    settings read per request, such as rate limits, apply at once), and afterwards set back to the values found
    here, not to defaults. The server is shared by every test in the process: a test that put back a literal
    (the default it assumed) left a different setting for every later test whenever make_settings or another
    test had chosen another value, and the failure showed up modules later. conftest's
    `settings_are_left_as_found` fails the module that leaves them changed."""
    settings = server.app[SERVICES].settings
    before = {k: getattr(settings, k) for k in values}
    for k, v in values.items():
        setattr(settings, k, v)
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(settings, k, v)


def pdf_file(objects: list[bytes]) -> bytes:
    """A PDF of `objects` (numbered from 1, the first the catalog), with a byte-exact xref table."""
    out, offsets = bytearray(b"%PDF-1.4\n"), []
    for i, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return bytes(out)


@asynccontextmanager
async def target_and_two_workers(worker: Callable[[str], W]) -> AsyncIterator[tuple[Target, W, W]]:
    """A started webhook target (jobs_peers.Target) and two job workers, `worker("first")` and
    `worker("second")`, not started. On the way out the target's held answer is released, then both workers
    (their `stop()`) and the target are stopped."""
    from jobs_peers import Target

    target = Target()
    await target.start()
    first, second = worker("first"), worker("second")
    try:
        yield target, first, second
    finally:
        target.release.set()
        await first.stop()
        await second.stop()
        await target.stop()


async def webhook_workflow(pool: asyncpg.Pool, url: str) -> dict[str, Any]:
    """A saved, enabled workflow run by hand whose one step is a webhook to `url` (120 s timeout)."""
    body = Workflow.model_validate({"name": f"pay-{uuid.uuid4().hex[:6]}", "trigger": {"type": "manual"},
                                    "steps": [{"type": "webhook", "name": "pay", "url": url, "timeout_s": 120}]})
    definition = body.model_dump(mode="json", by_alias=True, exclude_none=True, include={"trigger", "steps"})
    return await save_workflow(pool, None, {"name": body.name, "definition": definition, "trigger_type": "manual",
                                            "enabled": True, "next_fire_at": None}, "test", None)


async def settled_run(pool: asyncpg.Pool, run_id: str, tries: int = 300) -> dict[str, Any] | None:
    """The workflow run, read every 0.1 s until it has succeeded or failed, or `tries` reads were made; the
    last read either way (None if there was no such run)."""
    run = None
    for _ in range(tries):
        run = await get_run(pool, run_id)
        if run is not None and run["status"] in ("succeeded", "failed"):
            break
        await asyncio.sleep(0.1)
    return run


async def paid_once_over_two_tries(target: Target, pool: asyncpg.Pool, run_id: str) -> tuple[str, dict[str, Any]]:
    """Asserts that the run's webhook reached `target` at once/pay twice with one Idempotency-Key, that the
    payment happened once, and that its step succeeded at its second attempt: (the key, the step)."""
    tries = target.sent("once/pay")
    assert len(tries) == 2 and len({t["headers"]["Idempotency-Key"] for t in tries}) == 1
    assert target.side_effects == [tries[0]["headers"]["Idempotency-Key"]]  # the payment happened once
    (step,) = await step_runs(pool, run_id)
    assert step["status"] == "succeeded" and step["attempts"] == 2
    return tries[0]["headers"]["Idempotency-Key"], step


def is_server_task(task: asyncio.Task[Any], server: RunningServer) -> bool:
    """Whether `task` is Pono's: not a connection of another server in this process (the scripted LLM keeps the
    keep-alive connections a reply opened, each an aiohttp RequestHandler task waiting for its next request)."""
    frame = task.get_coro().cr_frame  # type: ignore[union-attr]
    handler = frame.f_locals.get("self") if frame is not None else None
    assert server.runner.server is not None
    return not isinstance(handler, RequestHandler) or handler in server.runner.server.connections


async def server_tasks(server: RunningServer, settled_to: set[asyncio.Task[Any]] | None = None
                       ) -> set[asyncio.Task[Any]]:
    """The running tasks that are Pono's (is_server_task), the caller's own excluded. With `settled_to`, waits up
    to 5 s for those not in it to end (a call's tasks finish a moment after it ends): a leak is a task that stays."""
    for _ in range(50):
        tasks = {t for t in asyncio.all_tasks() if not t.done() and is_server_task(t, server)}
        tasks.discard(asyncio.current_task())  # type: ignore[arg-type]
        if settled_to is None or tasks <= settled_to:
            break
        await asyncio.sleep(0.1)
    return tasks


LINE_SILENCE_S = 0.6


def after_line_silence(pcm16k: np.ndarray) -> np.ndarray:
    """`pcm16k` (16 kHz int16) after LINE_SILENCE_S of silence, as a caller's line has before the first word.

    For a test that compares a live turn's words with an offline transcript of the same clip (opus_round_trip keeps
    0.3 s before it). Spoken at the call's first frames, a clip has no pre-roll to keep: the server had heard 15 frames
    (4 silent) when speech was confirmed, so the turn began 30-90 ms before the first word, and Whisper base heard
    "Is there a pharmacy" as "Isn't that" or "is not" at 8 of 75 such starts (offline, the same round trip), which
    failed CI runs. After this silence the turn begins 248-268 ms before the first word (the lead-in's pre-roll)."""
    return np.concatenate([np.zeros(int(LINE_SILENCE_S * 16000), np.int16), pcm16k])
