"""The job queue and post-call workflows, against a real Postgres, a real SMTP server and a scripted LLM.

    .venv/bin/python bench/jobs.py [--latency-jobs 300] [--noop-jobs 3000] [--calls 10] [--ttft 0.2]

Needs the test install (scripts/install.sh --test: aiosmtpd for the SMTP server). Uses DATABASE_URL when set,
else starts an embedded Postgres in a temporary folder. One in-process worker
(pono.jobs.worker.JobWorker, PONO_JOBS_CONCURRENCY as configured, default 4) runs everything. Prints:
- enqueue → job start, p50 and p99 (jobs enqueued one at a time, 10 ms apart, onto an idle worker);
- no-op jobs per second (a backlog enqueued in one statement, drained by the worker);
- call end → e-mail delivered, p50 and p99: a call's events go through the storage writer (as a call's do),
  its end enqueues the post-call job, and a workflow (summarize with an LLM whose first token takes --ttft,
  then e-mail) delivers to an aiosmtpd server.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from pgqueuer import PgQueuer
from pgqueuer.models import Job

from pono.agent.dlp.apply import redact_records
from pono.agent.llm import LLMClient
from pono.events import EventStream, EventType
from pono.jobs.definition import Workflow
from pono.jobs.worker import JobWorker
from pono.metrics import Metrics
from pono.settings import Settings
from pono.storage.db import Database, open_database
from pono.storage.jobs import enqueue_many
from pono.storage.journal import Journal
from pono.storage.workflows import save_workflow
from pono.storage.writer import Writer
from pono.testing.scripted_llm import Script, ScriptedLLM

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
try:
    from jobs_peers import Mailbox  # the tests' real SMTP server (aiosmtpd, a dev extra)
except ImportError as exc:  # a plain install has no aiosmtpd: say what to install instead of a traceback
    sys.exit(f"bench/jobs.py needs the test install for its SMTP server ({exc.name} is missing): run "
             "scripts/install.sh --test (or .venv/bin/pip install -e '.[dev]')")

LATENCY = "bench.latency"
NOOP_BENCH = "bench.noop"  # as pono's own no-op job, and counted


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class BenchWorker(JobWorker):
    """The worker as Pono runs it, plus entrypoints that note when each job started, and count no-ops."""

    def expect(self, count: int) -> asyncio.Event:
        """An event set once `count` more bench jobs (latency or no-op) have started."""
        self.started: dict[str, float] = getattr(self, "started", {})
        self.count, self.target, self.reached = 0, count, asyncio.Event()
        return self.reached

    def _seen(self) -> None:
        self.count += 1
        if self.count >= self.target:
            self.reached.set()

    def build(self, queue_pool):  # type: ignore[no-untyped-def]
        pgq: PgQueuer = super().build(queue_pool)

        @pgq.entrypoint(LATENCY)
        async def latency(job: Job) -> None:
            self.started[(job.payload or b"").decode()] = time.perf_counter()
            self._seen()

        @pgq.entrypoint(NOOP_BENCH)
        async def noop(job: Job) -> None:
            self._seen()

        return pgq


class TimedMailbox(Mailbox):
    """The SMTP server, noting when each message arrived (in its own thread) and waking the benchmark."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self.loop = loop
        self.arrived: dict[str, float] = {}
        self.wake = asyncio.Event()

    async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
        answer = await super().handle_DATA(server, session, envelope)
        self.arrived[str(self.messages[-1]["Subject"])] = time.perf_counter()
        self.loop.call_soon_threadsafe(self.wake.set)
        return answer


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latency-jobs", type=int, default=300)
    ap.add_argument("--noop-jobs", type=int, default=3000)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--ttft", type=float, default=0.2, help="the scripted LLM's time to first token (s)")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="pono-jobs-bench-"))
    mailbox, llm_server = TimedMailbox(asyncio.get_running_loop()), ScriptedLLM(Script(
        reply='{"summary": "The caller booked a table for two.", "action_items": [], "disposition": "resolved"}',
        first_token_s=args.ttft, token_interval_s=0.0))
    await mailbox.start()
    await llm_server.start()
    # DATABASE_URL when set, else an embedded Postgres in the data dir.
    settings = Settings(data_dir=workdir / "data", smtp_host="127.0.0.1", smtp_port=mailbox.port,
                        jobs_drain_timeout_s=5)
    metrics = Metrics()
    llm = LLMClient(llm_server.base_url, "none", "scripted", timeout_s=10)
    async with open_database(settings, max_size=10) as db:
        worker = BenchWorker(db.pool, db.dsn, settings, metrics, llm)
        stop = asyncio.Event()
        task = asyncio.create_task(worker.run(stop))
        try:
            await asyncio.sleep(1.0)  # the worker is listening
            # 1. Enqueue → start, one job at a time onto an idle worker.
            enqueued: dict[str, float] = {}
            all_started = worker.expect(args.latency_jobs)
            for _ in range(args.latency_jobs):
                key = uuid.uuid4().hex
                enqueued[key] = time.perf_counter()
                await _enqueue_raw(db, key)
                await asyncio.sleep(0.01)
            await all_started.wait()
            waits = [(worker.started[k] - t) * 1000 for k, t in enqueued.items()]
            print(f"enqueue → start: p50 {statistics.median(waits):.1f} ms, p99 {pct(waits, 0.99):.1f} ms"
                  f" ({len(waits)} jobs)")

            # 2. No-op throughput: a backlog drained.
            drained = worker.expect(args.noop_jobs)
            t0 = time.perf_counter()
            for i in range(0, args.noop_jobs, 1000):
                await enqueue_many(db.pool, [(NOOP_BENCH, {}, None)] * min(1000, args.noop_jobs - i))
            await drained.wait()
            elapsed = time.perf_counter() - t0
            print(f"no-op jobs: {args.noop_jobs / elapsed:.0f} per second ({args.noop_jobs} in {elapsed:.1f} s,"
                  f" concurrency {settings.jobs_concurrency})")

            # 3. Call end → e-mail delivered.
            body = Workflow.model_validate({"name": "bench-follow-up", "trigger": {"type": "call.ended"}, "steps": [
                {"type": "summarize"},
                {"type": "email", "to": "ops@example.com", "subject": "Call {{call.id}}", "body": "{{summary}}"}]})
            definition = body.model_dump(mode="json", by_alias=True, exclude_none=True, include={"trigger", "steps"})
            await save_workflow(db.pool, None, {"name": f"{body.name}-{uuid.uuid4().hex[:6]}", "definition": definition,
                                                "trigger_type": "call.ended", "enabled": True, "next_fire_at": None},
                                "bench", None)
            writer = Writer(db, Journal(workdir / "journal"), redact=redact_records)
            writer.start()
            delivered: list[float] = []
            for _ in range(args.calls):
                call_id = uuid.uuid4().hex
                events = EventStream(call_id)
                events.subscribe(writer.observer(call_id, "bench"))
                events.emit(EventType.CALL_STARTED, transport="bench", persona=None)
                events.emit(EventType.TRANSCRIPT_FINAL, 0, text="A table for two at seven, please.", source="text")
                events.emit(EventType.AGENT_FINAL, 0, text="Booked: two at seven.")
                subject = f"Call {call_id}"
                t0 = time.perf_counter()
                events.emit(EventType.CALL_ENDED, reason="hangup")
                while subject not in mailbox.arrived:
                    mailbox.wake.clear()
                    await mailbox.wake.wait()
                delivered.append((mailbox.arrived[subject] - t0) * 1000)
            await writer.close()
            print(f"call end → e-mail delivered (LLM first token {args.ttft * 1000:.0f} ms): p50"
                  f" {statistics.median(delivered):.0f} ms, p99 {pct(delivered, 0.99):.0f} ms ({len(delivered)} calls)")
        finally:
            stop.set()
            await task
            await llm.close()
            await llm_server.stop()
            await mailbox.stop()


async def _enqueue_raw(db: Database, key: str) -> None:
    """A latency job whose payload is its key (raw bytes, as pgqueuer hands it over)."""
    from pgqueuer.queries import Queries

    await Queries.from_asyncpg_pool(db.pool).enqueue(LATENCY, key.encode())


if __name__ == "__main__":
    asyncio.run(main())
