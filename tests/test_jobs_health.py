"""`pono jobs` as Kubernetes runs it (k8s/base/jobs.yaml): real worker processes, their probes on
PONO_JOBS_HEALTH_PORT, and SIGTERM.

- /health answers from start to exit, Postgres or not; /ready only while the worker takes jobs: 503 while it
  connects, while Postgres is away (it comes back by itself), and from SIGTERM on.
- SIGTERM with a job that outlasts PONO_JOBS_DRAIN_TIMEOUT_S: the worker hands the job back to the queue and
  exits 0 soon after the drain time (the pod's grace period is sized on this), and another worker finishes it,
  the side effect happening once (the idempotency key).
- The queue's LISTEN connection dies while a job's side effect is in flight: the worker notices (its NOTIFY
  probes go unheard), says so at WARNING without a traceback, lets the job finish (once: it keeps beating, so a
  second worker does not take it), then takes jobs again on a fresh LISTEN. One unheard probe restarts nothing
  (pgqueuer's first probe races its LISTEN: on a loaded machine it restarted healthy workers 10 s after start).
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import asyncpg
import pytest
from conftest import make_settings
from helpers import database_of_its_own, paid_once_over_two_tries, settled_run, target_and_two_workers, webhook_workflow
from pgqueuer.errors import FailingListenerError
from servers import PostgresProcess

from pono.jobs.triggers import run_by_hand
from pono.jobs.worker import JobWorker
from pono.metrics import Metrics
from pono.storage.workflow_runs import RUN_WORKFLOW, get_run, step_runs
from pono.testing.job_worker import JobWorkerProcess

DRAIN_S = 3.0


def worker_process(url: str, folder: Path, name: str, **env: str) -> JobWorkerProcess:
    """`python -m pono jobs` with its probes on a port of its own, draining for DRAIN_S."""
    return JobWorkerProcess(url, folder, name, PONO_JOBS_DRAIN_TIMEOUT_S=str(DRAIN_S), **env)


@pytest.fixture
async def database(postgres_url: str) -> AsyncIterator[tuple[str, asyncpg.Pool]]:
    """A fresh, migrated database of its own (no other worker watches its queue): (its URL, a pool)."""
    async with database_of_its_own(postgres_url, max_size=4) as found:
        yield found


async def test_ready_only_while_taking_jobs_and_alive_throughout(tmp_path: Path) -> None:
    pg = PostgresProcess(tmp_path / "pg")
    await pg.astop()  # the worker starts before its database is up
    # /metrics on the probes' port: the two may be one (pono.jobs.process).
    worker = worker_process(pg.uri, tmp_path, "probes", PONO_DB_CONNECT_ATTEMPTS="30")
    worker.env["PONO_METRICS_PORT"] = str(worker.port)
    try:
        await worker.start()
        await worker.until("/health", 200, 30)
        status, body = await worker.probe("/ready")
        assert status == 503 and body["reason"].startswith("starting"), (status, body)

        await pg.astart()
        assert (await worker.until("/ready", 200, 60))["status"] == "ready"
        async with aiohttp.ClientSession() as http, http.get(worker.url + "/metrics") as r:
            assert r.status == 200 and "pono_jobs_queue_depth" in await r.text()

        await pg.astop()  # an outage: not ready (no job can be taken), yet alive (a restart would not help)
        body = await worker.until("/ready", 503, 30)
        assert "Postgres" in body["reason"] or "queue" in body["reason"], body
        assert (await worker.probe("/health"))[0] == 200

        await pg.astart()  # it comes back without a restart
        await worker.until("/ready", 200, 60)

        assert worker.process is not None
        worker.process.send_signal(signal.SIGTERM)
        body = await worker.until("/ready", 503, 5)
        assert body["reason"].startswith("draining"), body
        assert await asyncio.wait_for(worker.process.wait(), 30) == 0  # nothing running: it stops at once
    finally:
        await worker.stop()
        pg.close()


async def test_sigterm_past_the_drain_time_hands_the_job_to_another_worker(
        database: tuple[str, asyncpg.Pool], tmp_path: Path) -> None:
    url, pool = database
    async with target_and_two_workers(lambda name: worker_process(url, tmp_path, name)) as (target, first, second):
        target.hold_first = True  # the receiver acts, then holds its answer past the drain time
        run_id = await run_by_hand(pool, await webhook_workflow(pool, f"{target.url}/once/pay"), None, {})
        await first.start()
        await asyncio.wait_for(target.held.wait(), 60)
        assert (await first.probe("/ready"))[0] == 200  # busy is still ready: it takes more jobs

        assert first.process is not None
        stopped_at = time.monotonic()
        first.process.send_signal(signal.SIGTERM)
        assert (await first.until("/ready", 503, 2))["reason"].startswith("draining")
        assert (await first.probe("/health"))[0] == 200  # draining is alive: no restart mid-drain
        assert await asyncio.wait_for(first.process.wait(), DRAIN_S + 30) == 0
        took = time.monotonic() - stopped_at
        # k8s/base/jobs.yaml: terminationGracePeriodSeconds >= PONO_JOBS_DRAIN_TIMEOUT_S + 30.
        assert DRAIN_S <= took < DRAIN_S + 15, took
        run = await get_run(pool, run_id)
        assert run is not None and run["status"] == "running", run  # not failed, not lost: back in the queue
        queued = await pool.fetch("SELECT status FROM pgqueuer WHERE entrypoint = $1", RUN_WORKFLOW)
        assert [r["status"] for r in queued] == ["queued"], queued

        await second.start()  # takes the job at once: nothing to wait for, no heartbeat to go stale
        run = await settled_run(pool, run_id)
        assert run is not None and run["status"] == "succeeded", (run, second.tail())
        await paid_once_over_two_tries(target, pool, run_id)


async def test_the_listen_connection_lost_mid_job_restarts_the_queue_after_the_job(
        database: tuple[str, asyncpg.Pool], tmp_path: Path) -> None:
    url, pool = database
    listening = ("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND query ILIKE 'LISTEN %'"
                 " AND pid <> pg_backend_pid()")
    async with target_and_two_workers(lambda name: worker_process(url, tmp_path, name)) as (target, first, second):
        target.hold_first = True  # the receiver acts, then holds its answer: the job is mid side effect
        workflow = await webhook_workflow(pool, f"{target.url}/once/pay")
        run_id = await run_by_hand(pool, workflow, None, {})
        await first.start()
        await asyncio.wait_for(target.held.wait(), 60)
        await first.until("/ready", 200, 30)
        (listener,) = await pool.fetch(listening)  # the first worker's LISTEN connection, as a failover drops it
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", listener["pid"])
        await second.start()  # would take the job if the first one stopped beating for it
        await second.until("/ready", 200, 60)

        await first.wait_logged("job queue restarting", 60)  # two NOTIFY probes unheard, 5 s apart, 10 s each: ~30 s
        log = first.tail(None)  # the whole log: no traceback anywhere
        assert "LISTEN connection is gone; 1 running job(s) finish first" in log and "[warning" in log, log
        assert "Traceback" not in log and "FailingListenerError" not in log, log
        await asyncio.sleep(5)  # past the 2 s heartbeat timeout: the job is still the first worker's alone
        assert len(target.sent("once/pay")) == 1
        assert (await first.probe("/ready"))[0] == 503  # restarting: it takes no job meanwhile

        target.release.set()
        run = await settled_run(pool, run_id)
        assert run is not None and run["status"] == "succeeded", (run, first.tail())
        (step,) = await step_runs(pool, run_id)
        assert step["status"] == "succeeded" and step["attempts"] == 1  # finished, neither cancelled nor retried
        assert len(target.sent("once/pay")) == 1 and len(target.side_effects) == 1

        await second.stop()
        await first.until("/ready", 200, 30)  # a fresh queue, on a fresh LISTEN connection
        assert "job queue starting again" in first.tail()
        assert len(await pool.fetch(listening)) == 1
        again = await run_by_hand(pool, workflow, None, {})
        run = await settled_run(pool, again)
        assert run is not None and run["status"] == "succeeded", (run, first.tail())
        await asyncio.sleep(3)  # past the heartbeat timeout: no job left behind to be taken again
        assert await pool.fetchval("SELECT count(*) FROM pgqueuer") == 0
        assert len(target.sent("once/pay")) == 2 and len(target.side_effects) == 2  # one per run


class _Listener:
    """A queue manager's listener probe that answers as planned: "miss" (FailingListenerError), "away" (the
    NOTIFY could not be sent: OSError), else heard."""

    def __init__(self, plan: list[str], then: Any = None) -> None:
        self.plan = plan
        self.probes = 0
        self.then = then  # called after the first probe
        self.job_context: dict[int, Any] = {}  # the jobs running

    async def listener_healthy(self, timeout: timedelta) -> None:
        self.probes += 1
        outcome = self.plan.pop(0) if self.plan else "heard"
        if self.then is not None:
            self.then(self)
            self.then = None
        if outcome == "miss":
            raise FailingListenerError
        if outcome == "away":
            raise OSError("connection refused")


async def test_one_unheard_listener_probe_does_not_restart_the_queue(tmp_path: Path) -> None:
    async def watch(plan: list[str], restart_after_first: bool = False) -> JobWorker:
        worker = JobWorker(cast(asyncpg.Pool, None), "", make_settings(tmp_path), Metrics(), None,
                           listener_probe_s=0.01, listener_timeout_s=0.05, listener_misses=2)
        probed: list[_Listener] = []

        def restart(old: _Listener) -> None:  # the queue restarted (Postgres was away) during the first probe
            probed.append(_Listener(old.plan))
            worker._pgq = cast(Any, SimpleNamespace(qm=probed[-1]))

        probed.append(_Listener(plan, restart if restart_after_first else None))
        worker._pgq = cast(Any, SimpleNamespace(qm=probed[0]))
        task = asyncio.create_task(worker._watch_listener())
        try:
            for _ in range(300):
                if worker._cycle.is_set() or sum(p.probes for p in probed) >= 8:
                    break
                await asyncio.sleep(0.01)
        finally:
            task.cancel()
        assert sum(p.probes for p in probed) >= 2
        return worker

    for plan in (["miss", "heard", "miss", "heard", "miss"], ["miss", "away", "heard", "miss"]):
        assert not (await watch(plan))._cycle.is_set(), plan
    # Misses count per queue: one on the queue before a restart and one on the fresh queue restart nothing.
    assert not (await watch(["miss", "miss"], restart_after_first=True))._cycle.is_set()
    restarted = await watch(["heard", "miss", "miss"])
    assert restarted._cycle.is_set()
    assert restarted._restart_reason is not None and "2 NOTIFY probes in a row" in restarted._restart_reason
