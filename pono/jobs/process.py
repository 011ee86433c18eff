"""`pono jobs`: a job worker as a process of its own, beside app servers run with PONO_JOBS_IN_PROCESS=false.

It uses DATABASE_URL (or the embedded Postgres in the data dir, like `pono serve`), OPENAI_BASE_URL for
summaries, PONO_SMTP_* for e-mail, and stops on SIGTERM or SIGINT after draining (see pono.jobs.worker).
With PONO_METRICS_PORT set it serves /metrics (pono_jobs_*) there without a token, as `pono serve` does.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pono.agent.llm import LLMClient
from pono.jobs.worker import JobWorker
from pono.metrics import Metrics
from pono.settings import Settings
from pono.storage.db import Database, StorageError
from pono.storage.embedded import EmbeddedPostgres

log = logging.getLogger(__name__)


def llm_for_jobs(settings: Settings, metrics: Metrics) -> LLMClient | None:
    """The LLM summarize steps use in a worker process: OPENAI_BASE_URL (and its fallback), or None when unset
    (the bundled model runs only inside `pono serve`)."""
    if not settings.openai_base_url:
        return None
    fallback_key = settings.llm_fallback_api_key
    return LLMClient(settings.openai_base_url, settings.openai_api_key.get_secret_value(), settings.llm_model,
                     timeout_s=max(settings.llm_timeout_s, 30.0), retries=settings.llm_retries,
                     fallback_url=settings.llm_fallback_url, fallback_model=settings.llm_fallback_model,
                     fallback_api_key=fallback_key.get_secret_value() if fallback_key else None,
                     requests_counter=metrics.llm_requests)


async def _metrics_site(metrics: Metrics, settings: Settings) -> web.AppRunner:
    async def render(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.add_routes([web.get("/metrics", render)])
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.host, settings.metrics_port).start()
    return runner


async def serve_jobs(settings: Settings) -> None:
    """Run a worker until SIGTERM/SIGINT (a second one stops at once, releasing running jobs). Raises
    StorageError when Postgres cannot be used."""
    embedded = None
    if settings.database_url is not None:
        dsn = settings.database_url.get_secret_value()
    else:
        embedded = EmbeddedPostgres(settings.data_dir)
        dsn = await embedded.start()
    # pgqueuer keeps one connection for LISTEN; the rest serve the jobs and their heartbeats.
    db = Database(dsn, min_size=1, max_size=settings.jobs_concurrency + 4, attempts=settings.db_connect_attempts)
    metrics = Metrics()
    llm = llm_for_jobs(settings, metrics)
    metrics_runner = None
    try:
        await db.connect()
        if settings.metrics_port:
            metrics_runner = await _metrics_site(metrics, settings)
        worker = JobWorker(db.pool, dsn, settings, metrics, llm)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def on_signal() -> None:
            if stop.is_set():
                log.info("second signal: releasing running jobs now")
                worker.release_now()
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, on_signal)
        log.info("job worker started (concurrency %d)", settings.jobs_concurrency)
        await worker.run(stop)
    finally:
        if metrics_runner is not None:
            await metrics_runner.cleanup()
        if llm is not None:
            await llm.close()
        await db.close()
        if embedded is not None:
            await embedded.stop()


__all__ = ["StorageError", "llm_for_jobs", "serve_jobs"]
