"""`pono jobs` worker processes on a database of their own: a worker killed mid-job (SIGKILL) has its job picked
up by another, and the side effect happens once thanks to the idempotency key; SIGTERM drains a running job.
Also: calls' ends journaled together enqueue one post-call job each, however often the journal is replayed."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from helpers import database_of_its_own, paid_once_over_two_tries, settled_run, target_and_two_workers, webhook_workflow

from pono.agent.dlp.apply import redact_records
from pono.events import CallEvent, EventType
from pono.jobs.triggers import run_by_hand
from pono.storage.db import Database
from pono.storage.journal import Journal
from pono.storage.records import CallRecorder
from pono.storage.writer import Writer
from pono.testing.job_worker import JobWorkerProcess as Worker


@pytest.fixture
async def database(postgres_url: str) -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    """A fresh, migrated database of its own (no server's worker watches its queue): (its URL, a pool)."""
    async with database_of_its_own(postgres_url, max_size=4) as found:
        yield found


async def _finished(pool: asyncpg.Pool, run_id: str, tries: int = 600) -> dict:
    run = await settled_run(pool, run_id, tries)
    if run is None or run["status"] not in ("succeeded", "failed"):
        raise AssertionError(f"run {run_id} did not finish: {run}")
    return run


async def test_killed_worker_job_is_picked_up_and_acts_once_and_sigterm_drains(
        database: tuple[str, asyncpg.Pool], tmp_path: Path) -> None:
    url, pool = database
    async with target_and_two_workers(lambda name: Worker(url, tmp_path, name)) as (target, first, second):
        target.hold_first = True  # the receiver acts, then holds the answer: the worker dies waiting for it
        workflow = await webhook_workflow(pool, f"{target.url}/once/pay")
        run_id = await run_by_hand(pool, workflow, None, {})
        await first.start()
        await asyncio.wait_for(target.held.wait(), 60)
        assert first.process is not None
        first.process.kill()  # SIGKILL, mid-job
        await first.process.wait()
        target.release.set()

        await second.start()  # picks the job up once the first worker's heartbeat is stale
        run = await _finished(pool, run_id)
        assert run["status"] == "succeeded" and run["attempts"] == 2  # started by both workers
        key, step = await paid_once_over_two_tries(target, pool, run_id)
        assert step["output"] == {"response": {"done": key}}

        # SIGTERM while a job runs: the worker takes no new job, lets this one finish, and exits cleanly.
        target.hold_first, target.held, target.release = True, asyncio.Event(), asyncio.Event()
        slow = await run_by_hand(pool, await webhook_workflow(pool, f"{target.url}/once/slow"), None, {})
        await asyncio.wait_for(target.held.wait(), 60)
        assert second.process is not None
        second.process.terminate()
        await second.wait_logged("job worker draining")
        target.release.set()
        assert await asyncio.wait_for(second.process.wait(), 60) == 0
        assert (await _finished(pool, slow, tries=10))["status"] == "succeeded"


async def test_calls_ending_together_enqueue_one_trigger_each_even_when_replayed(
        database: tuple[str, asyncpg.Pool], tmp_path: Path) -> None:
    url, pool = database
    db = Database(url, min_size=1, max_size=2)
    await db.connect()
    writer = Writer(db, Journal(tmp_path / "journal"), redact=redact_records)
    calls = [uuid.uuid4().hex for _ in range(3)]
    records = []
    for call_id in calls:  # what three calls' ends journal while Postgres is away
        recorder = CallRecorder("replica")
        for kind in (EventType.CALL_STARTED, EventType.CALL_ENDED):
            made = recorder(CallEvent(kind, call_id, None, {"transport": "webrtc", "reason": "hangup"}))
            records += made if isinstance(made, list) else [made]
    try:
        for _ in range(2):  # a journal replayed twice (a crash mid-replay) enqueues nothing twice
            writer.journal.append(records)
            assert await writer.replay() == len(records)
    finally:
        await db.close()
    queued = await pool.fetch("SELECT payload FROM pgqueuer WHERE entrypoint = 'workflow.call_ended'")
    assert sorted(json.loads(r["payload"])["call_id"] for r in queued) == sorted(calls)
