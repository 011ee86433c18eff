"""The write queue: records leave the call loop through an in-memory queue; a writer task batches them
into Postgres. While Postgres is unreachable they go to the journal, and are replayed in order when it
returns. The call loop only ever does a `put_nowait`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from itertools import groupby
from typing import Any

import asyncpg

from pono.events import CallEvent
from pono.storage.db import CONNECTION_ERRORS, Database
from pono.storage.jobs import enqueue_records
from pono.storage.journal import Journal
from pono.storage.records import CallRecorder, Record

log = logging.getLogger(__name__)

# Redaction of a batch of records before they are written or journaled: (records, call id → that call's DLP
# policy) → the records to keep, texts redacted and findings added. Blocking: it runs in a worker thread.
# A policy is opaque here; calls with none get the redactor's default. The composition root passes
# pono.agent.dlp.apply.redact_records.
RedactRecords = Callable[[list[Record], dict[str, Any]], list[Record]]

_SQL = {
    "call_started": (
        "INSERT INTO calls (id, transport, persona, caller, replica, started_at)"
        " VALUES ($1, $2, $3, $4, $5, to_timestamp($6)) ON CONFLICT (id) DO NOTHING"
    ),
    "turn": (
        "INSERT INTO turns (call_id, idx, role, text, source, started_at, ended_at, interrupted, latency, truncated)"
        " VALUES ($1, $2, $3, $4, $5, to_timestamp($6), to_timestamp($7), $8, $9::jsonb, $10)"
        " ON CONFLICT (call_id, idx) DO NOTHING"
    ),
    "turn_text": "UPDATE turns SET text = $3 WHERE call_id = $1 AND idx = $2",
    "call_ended": (
        "UPDATE calls SET ended_at = to_timestamp($2), end_reason = $3 WHERE id = $1 AND ended_at IS NULL"
    ),
    "tool_call": (
        "INSERT INTO tool_calls (call_id, turn_idx, tool_call_id, name, arguments, result, duration_ms, error)"
        " VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7, $8) ON CONFLICT (call_id, tool_call_id) DO NOTHING"
    ),
    "dlp_finding": (
        "INSERT INTO dlp_findings (call_id, turn_idx, entity_type, span_start, span_end, action, recognizer)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)"
        " ON CONFLICT (call_id, turn_idx, span_start, entity_type, channel) DO NOTHING"
    ),
    # A span of a recording replaced because its words held personal data (pono.voice.recording).
    "audio_redaction": (
        "INSERT INTO dlp_findings (call_id, turn_idx, entity_type, span_start, span_end, action, recognizer,"
        " channel, audio_start_ms, audio_end_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
        " ON CONFLICT (call_id, turn_idx, span_start, entity_type, channel) DO NOTHING"
    ),
    # A recording: written when it starts (status 'recording'), and again when its file is complete.
    "recording": (
        "INSERT INTO recordings (call_id, storage_key, codec, duration_s, size_bytes, sha256, status,"
        " retention_days, started_at, completed_at)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, to_timestamp($9), to_timestamp($10)) ON CONFLICT (call_id)"
        " DO UPDATE SET storage_key = EXCLUDED.storage_key, codec = EXCLUDED.codec, duration_s = EXCLUDED.duration_s,"
        " size_bytes = EXCLUDED.size_bytes, sha256 = EXCLUDED.sha256, status = EXCLUDED.status,"
        " completed_at = EXCLUDED.completed_at"
    ),
}


def _args(r: Record) -> tuple[object, ...]:
    kind = r["kind"]
    if kind == "call_started":
        return (r["call_id"], r["transport"], r["persona"], r["caller"], r["replica"], r["at"])
    if kind == "turn":
        return (r["call_id"], r["turn"], r["role"], r["text"], r["source"], r["started_at"], r["ended_at"],
                r["interrupted"], json.dumps(r["latency"]), r.get("truncated", False))
    if kind == "call_ended":
        return (r["call_id"], r["at"], r["reason"])
    if kind == "turn_text":
        return (r["call_id"], r["turn"], r["text"])
    if kind == "tool_call":
        return (r["call_id"], r["turn"], r["tool_call_id"], r["name"], json.dumps(r["arguments"]),
                None if r["result"] is None else json.dumps(r["result"], default=str), r["duration_ms"], r["error"])
    if kind == "dlp_finding":
        return (r["call_id"], r["turn"], r["entity_type"], r["start"], r["end"], r["action"], r["recognizer"])
    if kind == "audio_redaction":
        return (r["call_id"], r["turn"], r["entity_type"], r["start"], r["end"], r["action"], r["recognizer"],
                r["channel"], r["start_ms"], r["end_ms"])
    if kind == "recording":
        return (r["call_id"], r["storage_key"], r["codec"], r.get("duration_s"), r.get("size"), r.get("sha256"),
                r["status"], r.get("retention_days"), r["started_at"], r.get("completed_at"))
    raise ValueError(f"unknown record kind {kind!r}")


class Writer:
    """Batches call records into Postgres, journaling them while it is away; every record is redacted first.

    `redact` is run on each batch in a worker thread (see RedactRecords); `on_error(kind)` counts failures
    ("db_unreachable", "db_write_rejected").
    """

    def __init__(self, db: Database, journal: Journal, *, redact: RedactRecords, batch_max: int = 500,
                 linger_s: float = 0.02, on_error: Callable[[str], None] | None = None) -> None:
        self.db = db
        self.journal = journal
        self.redact = redact
        self.batch_max = batch_max
        self.linger_s = linger_s
        self.on_error = on_error or (lambda kind: None)
        self.queue: asyncio.Queue[Record] = asyncio.Queue()
        self._in_flight: list[Record] = []  # taken from the queue, not yet written
        self.policies: dict[str, Any] = {}  # per call, from its persona: opaque, handed to `redact`
        # Start journaled if an earlier run left writes behind (a crash, or an outage at shutdown).
        self.db_up = not journal.has_pending()
        self.written = 0
        self._task: asyncio.Task[None] | None = None
        self._recovery: asyncio.Task[None] | None = None

    # -- the call loop's side -----------------------------------------------------------------
    def observer(self, call_id: str, replica: str, caller: str | None = None,
                 policy: Any = None) -> Callable[[CallEvent], None]:
        """An observer for one call's event stream that queues its records (never blocks).
        `policy` is the call's DLP policy for `redact`; None: the redactor's default."""
        recorder = CallRecorder(replica, caller)
        if policy is not None:
            self.policies[call_id] = policy

        def observe(event: CallEvent) -> None:
            rec = recorder(event)
            for one in rec if isinstance(rec, list) else [] if rec is None else [rec]:
                self.queue.put_nowait(one)

        return observe

    def put(self, record: Record) -> None:
        """Queue one record that is not a call event: {"key", "kind" ("recording", "audio_redaction"),
        "call_id", "turn", ...} (see `_args`). Never blocks."""
        self.queue.put_nowait(record)

    # -- the writer task ----------------------------------------------------------------------
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="db-writer")
        if not self.db_up:
            self._start_recovery()

    async def _run(self) -> None:
        while True:
            batch = await self._next_batch()
            await self._handle(batch)
            self._in_flight = []

    async def _next_batch(self) -> list[Record]:
        # The batch being gathered or written is kept where close() finds it: a shutdown that cancels the
        # writer mid-batch writes it again (every write is idempotent), never loses it.
        batch = self._in_flight = [await self.queue.get()]
        deadline = time.monotonic() + self.linger_s
        while len(batch) < self.batch_max:
            try:
                batch.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except TimeoutError:
                    break
        return batch

    async def _handle(self, batch: list[Record]) -> None:
        # Personal data never reaches Postgres or the journal on disk: redact first, off the event loop.
        batch = await asyncio.to_thread(self.redact, batch, self.policies)
        for rec in batch:
            if rec["kind"] == "call_ended":
                self.policies.pop(rec["call_id"], None)
        if not self.db_up:  # keep order: nothing overtakes what is already journaled
            await asyncio.to_thread(self.journal.append, batch)
            if self.db_up:  # recovery finished while this batch was being appended: replay it too
                self.db_up = False
                self._start_recovery()
            return
        try:
            await self._write(batch)
        except CONNECTION_ERRORS as exc:
            log.warning("Postgres unreachable (%s): journaling writes until it returns", type(exc).__name__)
            self.on_error("db_unreachable")
            self.db_up = False
            await asyncio.to_thread(self.journal.append, batch)
            self._start_recovery()

    async def _write(self, batch: list[Record]) -> None:
        try:
            async with self.db.pool.acquire() as conn, conn.transaction():
                await self._execute(conn, batch)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, CONNECTION_ERRORS):
                raise
            # One bad record must not block the rest: write them one by one and drop the bad one.
            log.error("a write batch failed (%s); retrying its records one by one", type(exc).__name__)
            for rec in batch:
                try:
                    async with self.db.pool.acquire() as conn:
                        await self._execute(conn, [rec])
                except asyncpg.PostgresError as one:
                    if isinstance(one, CONNECTION_ERRORS):
                        raise
                    log.error("dropping write %s: %s", rec["key"], type(one).__name__)
                    self.on_error("db_write_rejected")

    async def _execute(self, conn: asyncpg.Connection, batch: list[Record]) -> None:
        # Consecutive records of one kind go in one executemany; order between kinds is kept.
        for kind, group in groupby(batch, key=lambda r: r["kind"]):
            if kind == "job":  # a post-call job, enqueued in the same transaction (pono.storage.jobs)
                await enqueue_records(conn, list(group))
            else:
                await conn.executemany(_SQL[kind], [_args(r) for r in group])
        self.written += len(batch)

    # -- recovery -----------------------------------------------------------------------------
    def _start_recovery(self) -> None:
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._recover(), name="db-journal-replay")

    async def _recover(self, interval_s: float = 1.0) -> None:
        while True:
            try:
                replayed = await self.replay()
                # Everything journaled has landed. Writes queued meanwhile were journaled too; once the
                # pending file is empty, direct writes resume.
                if not self.journal.has_pending():
                    self.db_up = True
                    log.info("Postgres is back: %d journaled writes replayed", replayed)
                    return
            except CONNECTION_ERRORS:
                pass
            except Exception:
                log.exception("journal replay failed; will retry")
            await asyncio.sleep(interval_s)

    async def replay(self) -> int:
        """Apply every journaled write, oldest first; a file is removed only after all of it landed."""
        count = 0
        for path in await asyncio.to_thread(self.journal.rotate):
            records = await asyncio.to_thread(Journal.read, path)
            for i in range(0, len(records), self.batch_max):
                await self._write(records[i:i + self.batch_max])
            count += len(records)
            path.unlink()
        return count

    # -- shutdown -----------------------------------------------------------------------------
    async def close(self) -> None:
        """Flush what is queued to Postgres, or to the journal if Postgres is down."""
        for task in (self._task, self._recovery):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        pending: list[Record] = list(self._in_flight)
        self._in_flight = []
        while not self.queue.empty():
            pending.append(self.queue.get_nowait())
        if pending:
            await self._handle(pending)
            if not self.db_up:
                log.warning("shut down with %d writes journaled for the next start", len(pending))

    @property
    def depth(self) -> int:
        return self.queue.qsize()
