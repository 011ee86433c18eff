"""A job worker: pgqueuer's queue and scheduler on Pono's Postgres, running workflow runs, post-call triggers,
schedule ticks, the retention purge and the nightly report. `pono serve` runs one in-process (unless
PONO_JOBS_IN_PROCESS=false); `pono jobs` runs one as a process of its own (pono.jobs.process).

Up to PONO_JOBS_CONCURRENCY jobs run at once. A job's worker beats every PONO_JOBS_HEARTBEAT_S / 2; a job
whose worker went silent for PONO_JOBS_HEARTBEAT_S (killed, frozen) is picked again by another. A job that
raises is retried by pgqueuer with exponential backoff (up to 5 tries). When told to stop, the worker takes
no new jobs and lets running ones finish for PONO_JOBS_DRAIN_TIMEOUT_S; those still running then are handed
back to the queue (requeued at once), not lost. If Postgres goes away the worker restarts itself every few
seconds until it is back. If only the queue's LISTEN connection does (a short Postgres restart, a failover: the
polling reconnects, the LISTEN does not), the worker notices it because NOTIFY probes go unheard
(LISTENER_MISSES in a row) and restarts the queue, logging why at WARNING; jobs running then finish first (they
are neither cancelled nor run twice). One unheard probe is not enough: pgqueuer 1.6 sends its first probe
while it is still setting up its LISTEN, and on a loaded machine the NOTIFY can commit first and is lost, so
pgqueuer's own restart-on-first-miss (shutdown_on_listener_failure) restarted healthy workers ~10 s after
starting. `readiness()` says whether it takes jobs now (`pono jobs` serves it as /ready).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pgqueuer
from pgqueuer import PgQueuer
from pgqueuer.errors import FailingListenerError
from pgqueuer.executors import DatabaseRetryEntrypointExecutor
from pgqueuer.models import Job, Schedule

from pono.agent.llm import LLMClient
from pono.jobs.runner import WorkflowRunner
from pono.jobs.triggers import fire_due_schedules, on_call_ended
from pono.metrics import Metrics
from pono.settings import Settings
from pono.storage.jobs import CALL_ENDED, purge_job_log, queue_gauges
from pono.storage.recordings import RecordingStore
from pono.storage.reports import daily_report
from pono.storage.retention import purge
from pono.storage.workflow_runs import RUN_WORKFLOW, finish_run

log = logging.getLogger(__name__)

NOOP = "noop"  # a job that does nothing: the benchmark's, and a probe
MAX_ATTEMPTS = 5  # a job that raises is tried again with backoff until it has been retried this often
LISTENER_PROBE_S = 5.0  # how often the worker checks that the queue's LISTEN connection hears a NOTIFY
LISTENER_TIMEOUT_S = 10.0  # a NOTIFY not heard within this long is a miss
LISTENER_MISSES = 2  # misses in a row that restart the queue (~30 s to notice a dead LISTEN connection)
RESTART_DELAY_S = 2.0


class JobWorker:
    """Runs jobs from the queue on `pool` (whose database `dsn` names) until `run`'s stop event is set.
    `llm` serves summarize steps (None: they fail, saying so), giving way to live calls while `llm_busy()`
    (pono.jobs.llm); `metrics` gets pono_jobs_* (the queue gauges every `gauge_interval_s`)."""

    def __init__(self, pool: asyncpg.Pool, dsn: str, settings: Settings, metrics: Metrics, llm: LLMClient | None, *,
                 gauge_interval_s: float = 5.0, llm_busy: Callable[[], bool] | None = None,
                 listener_probe_s: float = LISTENER_PROBE_S, listener_timeout_s: float = LISTENER_TIMEOUT_S,
                 listener_misses: int = LISTENER_MISSES) -> None:
        self.pool = pool
        self.dsn = dsn  # the queue gets pools of its own on the same database
        self.settings = settings
        self.metrics = metrics
        self.runner = WorkflowRunner(pool, settings, llm, llm_busy)
        self.gauge_interval_s = gauge_interval_s
        self._release = asyncio.Event()  # set when the drain time is up: running jobs go back to the queue
        self._pgq: PgQueuer | None = None  # the queue manager running now (None: starting, restarting, stopped)
        self._cycle = asyncio.Event()  # set: the running queue stops (draining, or restarting: see _restart_queue)
        self._restart_reason: str | None = None
        self.listener_probe_s = listener_probe_s
        self.listener_timeout_s = listener_timeout_s
        self.listener_misses = max(1, listener_misses)
        self.draining = False  # told to stop: no new jobs

    def build(self, queue_pool: asyncpg.Pool) -> PgQueuer:
        """A PgQueuer on `queue_pool` with every entrypoint and schedule registered (a fresh one for each
        (re)start); the jobs themselves use the worker's pool."""
        pgq = PgQueuer.from_asyncpg_pool(queue_pool)
        retrying = functools.partial(DatabaseRetryEntrypointExecutor, max_attempts=MAX_ATTEMPTS,
                                     initial_delay=timedelta(seconds=1), max_delay=timedelta(minutes=1))

        @pgq.entrypoint(RUN_WORKFLOW, executor_factory=retrying)
        async def run_workflow(job: Job) -> None:
            payload = _payload(job)
            try:
                await self._guarded(RUN_WORKFLOW,
                                    lambda: self.runner.run(payload["run_id"], int(payload["execution"])))
            except Exception as exc:
                if job.attempts >= MAX_ATTEMPTS:  # pgqueuer gives up on it now: so does the run's history
                    with contextlib.suppress(Exception):
                        await finish_run(self.pool, payload["run_id"], "failed",
                                         f"the worker failed {MAX_ATTEMPTS + 1} times: {type(exc).__name__}")
                raise

        @pgq.entrypoint(CALL_ENDED, executor_factory=retrying)
        async def call_ended(job: Job) -> None:
            await self._guarded(CALL_ENDED, lambda: on_call_ended(self.pool, _payload(job)["call_id"]))

        @pgq.entrypoint(NOOP)
        async def noop(job: Job) -> None:
            self.metrics.jobs_total.labels(NOOP, "succeeded").inc()

        @pgq.schedule("workflow.schedules", "* * * * *")
        async def schedules(schedule: Schedule) -> None:
            await self._guarded("workflow.schedules", lambda: fire_due_schedules(self.pool))

        @pgq.schedule("pono.purge", self.settings.jobs_purge_cron)
        async def purge_job(schedule: Schedule) -> None:
            await self._guarded("pono.purge", self._purge)

        @pgq.schedule("pono.report", self.settings.jobs_report_cron)
        async def report_job(schedule: Schedule) -> None:
            await self._guarded("pono.report", self._report)

        return pgq

    async def _purge(self) -> None:
        """The retention purge (workflow runs past retention included), and pgqueuer's own log."""
        result = await purge(self.pool, self.settings.retention_days, RecordingStore.from_settings(self.settings))
        await purge_job_log(self.pool, self.settings.retention_days)
        if result.failed:
            raise RuntimeError(f"retention purge failed for {sorted(result.failed)}")

    async def _report(self) -> None:
        day = (datetime.now(UTC) - timedelta(days=1)).date()
        body = await daily_report(self.pool, day)
        log.info("nightly report %s: %s", day, json.dumps(body))

    async def _guarded(self, kind: str, work: Callable[[], Awaitable[Any]]) -> None:
        """Run one job's work, counted and timed; if the drain time runs out first, cancel it and hand the
        job back to the queue (pgqueuer requeues it at once) instead of losing it."""
        started = time.perf_counter()
        task = asyncio.ensure_future(work())
        release = asyncio.ensure_future(self._release.wait())
        try:
            await asyncio.wait({task, release}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            release.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            self.metrics.jobs_total.labels(kind, "released").inc()
            raise pgqueuer.RetryRequested(delay=timedelta(0), reason="the worker is stopping")
        self.metrics.job_seconds.labels(kind).observe(time.perf_counter() - started)
        outcome = "failed" if task.exception() is not None else task.result()
        self.metrics.jobs_total.labels(kind, outcome if outcome in ("failed", "cancelled") else "succeeded").inc()
        task.result()  # re-raises: pgqueuer retries the job with backoff

    async def readiness(self, timeout_s: float = 2.0) -> str | None:
        """None while this worker takes jobs: not draining, the jobs' pool answers, and the queue's LISTEN
        connection round-trips a NOTIFY within `timeout_s` (pgqueuer's own listener probe); else why not."""
        if self.draining:
            return "draining: taking no new jobs"
        pgq = self._pgq
        if pgq is None:
            return "the queue is not running (starting, or restarting after a database error)"
        try:
            async with asyncio.timeout(timeout_s):
                await self.pool.fetchval("SELECT 1")
        except Exception as exc:  # asyncpg's errors, OSError, TimeoutError: Postgres is away
            return f"Postgres does not answer ({type(exc).__name__})"
        try:
            async with asyncio.timeout(timeout_s + 1):
                await pgq.qm.listener_healthy(timeout=timedelta(seconds=timeout_s))
        except Exception as exc:
            return f"the queue's listener does not answer ({type(exc).__name__})"
        return None

    def release_now(self) -> None:
        """Hand running jobs back to the queue now instead of at the end of the drain time."""
        self._release.set()

    async def _watch_listener(self) -> None:
        """Every `listener_probe_s`, round-trip a NOTIFY through the running queue's LISTEN connection; after
        `listener_misses` unheard in a row on the same queue, restart it. A NOTIFY whose sending fails (Postgres
        away: an error at once) is no miss: the queue's polling fails then and pgqueuer restarts it itself. One
        whose sending hangs past the probe's own timeout (+5 s) is one."""
        misses, watched = 0, None
        while True:
            await asyncio.sleep(self.listener_probe_s)
            pgq = self._pgq
            if pgq is None or self.draining or self._cycle.is_set():
                continue
            if pgq is not watched:  # a fresh (re)start
                misses, watched = 0, pgq
            try:
                async with asyncio.timeout(self.listener_timeout_s + 5):
                    await pgq.qm.listener_healthy(timeout=timedelta(seconds=self.listener_timeout_s))
            except (FailingListenerError, TimeoutError) as exc:
                if pgq is not self._pgq:  # restarted meanwhile
                    continue
                misses += 1
                what = "went unheard" if isinstance(exc, FailingListenerError) else "could not be sent"
                if misses < self.listener_misses:
                    log.info("job queue: a NOTIFY probe %s within %.0f s (%d in a row; restarting at %d)",
                             what, self.listener_timeout_s, misses, self.listener_misses)
                    continue
                self._restart_queue(pgq, f"{misses} NOTIFY probes in a row {what} within "
                                         f"{self.listener_timeout_s:.0f} s each: its LISTEN connection is gone")
            except Exception as exc:  # asyncpg's errors, OSError: Postgres is away
                log.debug("job queue: NOTIFY probe not sent: %s", type(exc).__name__)
            else:
                misses = 0

    def _restart_queue(self, pgq: PgQueuer, reason: str) -> None:
        """Stop the running queue `pgq` (its running jobs and schedules finish first, however long they take: none
        is cancelled nor handed back) and start a fresh one, with a fresh LISTEN connection, RESTART_DELAY_S
        later. Nothing to do when it is stopping already (drained, or restarted while the probe ran)."""
        if self.draining or self._cycle.is_set():
            return
        self._restart_reason = reason
        log.warning("job queue restarting: %s; %d running job(s) finish first", reason, len(pgq.qm.job_context))
        self._cycle.set()

    async def _watch_queue(self) -> None:
        while True:
            try:
                gauges = await queue_gauges(self.pool)
                self.metrics.jobs_queued.set(gauges.depth)
                self.metrics.jobs_oldest_s.set(gauges.oldest_age_s)
            except Exception as exc:  # Postgres away: the gauges keep their last values
                log.debug("queue gauges unavailable: %s", type(exc).__name__)
            await asyncio.sleep(self.gauge_interval_s)

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set, then drain (see the module's docstring) and return."""
        concurrency = self.settings.jobs_concurrency
        batch = max(1, concurrency // 2)  # pgqueuer wants room for two batches

        @contextlib.asynccontextmanager
        async def factory() -> AsyncIterator[PgQueuer]:
            # A pool of its own for each (re)start: after an outage pgqueuer may leave its LISTEN connection
            # checked out, and that must not eat into the pool calls and jobs use.
            queue_pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=concurrency + 3, timeout=5)
            try:
                self._pgq = self.build(queue_pool)
                yield self._pgq
            finally:
                self._pgq = None
                queue_pool.terminate()

        async def drain() -> None:
            await stop.wait()
            self.draining = True
            log.info("job worker draining (up to %.0f s)", self.settings.jobs_drain_timeout_s)
            self._cycle.set()
            await asyncio.sleep(self.settings.jobs_drain_timeout_s)
            self._release.set()

        self._cycle = asyncio.Event()
        watchers = [asyncio.create_task(drain(), name="jobs-drain"),
                    asyncio.create_task(self._watch_queue(), name="jobs-gauges"),
                    asyncio.create_task(self._watch_listener(), name="jobs-listener")]
        try:
            while True:
                self._restart_reason = None
                # pgqueuer restarts the queue itself after errors (Postgres away). Not on its own listener probe
                # (shutdown_on_listener_failure): it restarts on the first miss, and its first probe races its
                # LISTEN (see the module's docstring); _watch_listener restarts it through self._cycle instead.
                await pgqueuer.run(factory, batch_size=batch, max_concurrent_tasks=max(concurrency, 2 * batch),
                                   heartbeat_timeout=timedelta(seconds=self.settings.jobs_heartbeat_s),
                                   dequeue_timeout=timedelta(seconds=10), restart_on_failure=True,
                                   restart_delay=timedelta(seconds=RESTART_DELAY_S), shutdown=self._cycle,
                                   shutdown_on_listener_failure=False)
                if self.draining or self._restart_reason is None:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RESTART_DELAY_S)
                if stop.is_set():  # told to stop during the delay (draining is set once stop is)
                    break
                self._cycle = asyncio.Event()
                log.info("job queue starting again")
        finally:
            for task in watchers:
                task.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            await self.runner.close()
        log.info("job worker stopped")


def _payload(job: Job) -> dict[str, Any]:
    value = json.loads(job.payload or b"{}")
    if not isinstance(value, dict):
        raise ValueError(f"job {job.id} has a payload that is not a JSON object")
    return value
