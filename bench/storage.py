"""Storage throughput and the cost the call loop pays for persistence, against a real Postgres.

    .venv/bin/python bench/storage.py [--turns 20000] [--journal 10000]

Uses DATABASE_URL when set, else starts an embedded Postgres in a temporary folder. Prints:
- turns persisted per second through the write queue (batched inserts, idempotent);
- the latency the call loop sees per persisted event (emit → record → queue), p50 and p99;
- the time to replay a journal of N entries (what a restart after an outage pays).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from pono.agent.dlp.apply import redact_records
from pono.events import EventStream, EventType
from pono.settings import Settings
from pono.storage.db import open_database
from pono.storage.journal import Journal
from pono.storage.records import record
from pono.storage.writer import Writer


def turn_records(call_id: str, n: int) -> list[dict[str, object]]:
    now = time.time()
    recs = [record("call_started", call_id, None, transport="bench", persona=None, caller=None, replica="bench",
                   at=now)]
    for i in range(n):
        recs.append(record("turn", call_id, i, role="user" if i % 2 == 0 else "agent",
                           text=f"turn {i} of a benchmark call, about as long as a spoken sentence is.",
                           source="bench", started_at=now, ended_at=now, interrupted=False,
                           latency={"llm_first_token": 0.1}))
    return recs


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=20_000)
    ap.add_argument("--journal", type=int, default=10_000)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pono-storage-bench-"))
    settings = Settings(data_dir=workdir)  # DATABASE_URL when set, else an embedded Postgres in workdir
    async with open_database(settings, max_size=4) as db:
        # 1. Throughput: a call's events, through the observer, the queue and the batching writer.
        writer = Writer(db, Journal(workdir / "journal"), redact=redact_records)
        writer.start()
        events = EventStream(uuid.uuid4().hex)
        events.subscribe(writer.observer(events.call_id, "bench"))
        emit_ns: list[int] = []
        started = time.perf_counter()
        events.emit(EventType.CALL_STARTED, transport="bench", has_audio=False, persona=None)
        for i in range(args.turns):
            t0 = time.perf_counter_ns()
            if i % 2 == 0:
                events.emit(EventType.TRANSCRIPT_FINAL, i, text=f"user turn {i}", source="text")
            else:
                events.emit(EventType.AGENT_FINAL, i, text=f"agent turn {i}, a reply of a sentence.",
                            interrupted=False)
            emit_ns.append(time.perf_counter_ns() - t0)
            if i % 500 == 0:
                await asyncio.sleep(0)  # a real call loop yields between events; let the writer run
        while writer.written < args.turns + 1:  # noqa: ASYNC110 (a benchmark polls the counter)
            await asyncio.sleep(0.005)
        elapsed = time.perf_counter() - started
        await writer.close()
        stored = await db.pool.fetchval("SELECT count(*) FROM turns WHERE call_id = $1", events.call_id)
        assert stored == args.turns, (stored, args.turns)
        emit_us = sorted(ns / 1000 for ns in emit_ns)

        # 2. Replay: a journal left by an outage, applied when Postgres returns.
        journal = Journal(workdir / "replay-journal")
        journal.append(turn_records(uuid.uuid4().hex, args.journal - 1))
        replayer = Writer(db, journal, redact=redact_records)
        replay_started = time.perf_counter()
        replayed = await replayer.replay()
        replay_s = time.perf_counter() - replay_started
        assert replayed == args.journal and not journal.has_pending()

    print(f"Pono storage ({'embedded Postgres 18' if settings.database_url is None else 'DATABASE_URL'})")
    print(f"  turns persisted per second through the write queue: {args.turns / elapsed:,.0f} "
          f"({args.turns} turns in {elapsed:.2f} s)")
    print(f"  call-loop latency per persisted event: p50 {statistics.median(emit_us):.1f} µs, "
          f"p99 {emit_us[int(0.99 * (len(emit_us) - 1))]:.1f} µs")
    print(f"  replay of a {args.journal:,}-entry journal: {replay_s:.2f} s")


if __name__ == "__main__":
    asyncio.run(main())
