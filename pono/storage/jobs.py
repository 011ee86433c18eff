"""The job queue: pgqueuer's tables in Pono's Postgres (installed at migration time), enqueueing, and its gauges.

Jobs are at least once: a job whose worker dies is picked again once its heartbeat is stale, so each job's
handler must be idempotent (pono.jobs makes them so with keys). A job record in the write queue
(`job_record`) is enqueued in the same transaction as the call's other writes, or journaled with them while
Postgres is away, and a dedupe key keeps a replay from enqueueing it twice while it is still waiting.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg
from pgqueuer.adapters.drivers.asyncpg import AsyncpgDriver
from pgqueuer.queries import Queries

log = logging.getLogger(__name__)

CALL_ENDED = "workflow.call_ended"  # the job every ended call makes: payload {"call_id"}


async def install_queue(conn: asyncpg.Connection) -> None:
    """Create pgqueuer's tables, types and triggers when missing, else bring them up to this pgqueuer's
    schema. Run on one connection under the migration lock."""
    queries = Queries(AsyncpgDriver(conn))
    if not await queries.schema_is_installed():
        await queries.install()
        log.info("installed the job queue (pgqueuer)")
    else:
        plan = await queries.apply_upgrade()
        if plan.statements:
            log.info("upgraded the job queue (%d statements)", len(plan.statements))


def job_record(entrypoint: str, key: str, **payload: Any) -> dict[str, Any]:
    """A write-queue record that enqueues one job: `key` is both the record's idempotency key and the job's
    dedupe key; `payload` must be JSON-serialisable."""
    return {"key": key, "kind": "job", "entrypoint": entrypoint, "payload": payload, "call_id": payload.get("call_id"),
            "turn": None}


async def enqueue(db: asyncpg.Pool | asyncpg.Connection, entrypoint: str, payload: dict[str, Any],
                  dedupe_key: str | None = None) -> int | None:
    """Enqueue one job (JSON `payload`); inside a transaction when `db` is a connection in one. Returns the job
    id, or None when a job with `dedupe_key` is still queued or running. Raises asyncpg errors."""
    ids = await enqueue_many(db, [(entrypoint, payload, dedupe_key)])
    return ids[0]


async def enqueue_many(db: asyncpg.Pool | asyncpg.Connection,
                       jobs: list[tuple[str, dict[str, Any], str | None]]) -> list[int | None]:
    """Enqueue (entrypoint, payload, dedupe key) jobs in one statement; None where a job was deduplicated."""
    if not jobs:
        return []
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            return await enqueue_many(conn, jobs)
    queries = Queries(AsyncpgDriver(db))
    count = len(jobs)  # pgqueuer's batch form wants every argument as a list of the same length
    ids = await queries.enqueue([j[0] for j in jobs], [json.dumps(j[1]).encode() for j in jobs], [0] * count,
                                [None] * count, dedupe_key=[j[2] for j in jobs], on_conflict="skip")
    return [None if i is None else int(i) for i in ids]


async def enqueue_records(conn: asyncpg.Connection, records: list[dict[str, Any]]) -> None:
    """The writer's side of `job_record`: enqueue each on `conn` (the batch's transaction)."""
    await enqueue_many(conn, [(r["entrypoint"], r["payload"], r["key"]) for r in records])


@dataclass(frozen=True)
class QueueGauges:
    """What is waiting: `depth` jobs queued (ready or deferred), the oldest created `oldest_age_s` seconds ago
    (0 when none)."""

    depth: int
    oldest_age_s: float


async def queue_gauges(pool: asyncpg.Pool) -> QueueGauges:
    """The queue's depth and the age of its oldest queued job. Raises asyncpg errors."""
    ages = await Queries.from_asyncpg_pool(pool).queue_age()
    depth = sum(a.queued_count for a in ages)
    return QueueGauges(depth, max((a.oldest_age_seconds for a in ages), default=0.0))


async def purge_job_log(pool: asyncpg.Pool, retention_days: int, log_days: float = 1.0) -> int:
    """Delete pgqueuer's log rows older than `log_days` (its own bookkeeping of each job's states, tracebacks
    included: Pono's history is workflow_runs) and its per-second statistics older than `retention_days`. The
    rows removed. Raises asyncpg errors."""
    removed = 0
    for sql, arg in (("DELETE FROM pgqueuer_log WHERE created < now() - make_interval(secs => $1)", log_days * 86400),
                     ("DELETE FROM pgqueuer_statistics WHERE created < now() - make_interval(days => $1)",
                      retention_days)):
        status = await pool.execute(sql, arg)
        removed += int(status.split()[-1])
    return removed
