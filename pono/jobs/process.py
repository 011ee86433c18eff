"""`pono jobs`: a job worker as a process of its own, beside app servers run with PONO_JOBS_IN_PROCESS=false.

It uses DATABASE_URL (or the embedded Postgres in the data dir, like `pono serve`), OPENAI_BASE_URL for
summaries, PONO_SMTP_* for e-mail, and stops on SIGTERM or SIGINT after draining (see pono.jobs.worker).
With PONO_METRICS_PORT set it serves /metrics (pono_jobs_*) there without a token, as `pono serve` does; with
PONO_JOBS_HEALTH_PORT set, its probes /health and /ready (pono.jobs.health), from before it connects to Postgres
until it has drained (the two may be one port).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pono.agent.llm import LLMClient
from pono.jobs import health
from pono.jobs.worker import JobWorker
from pono.metrics import Metrics
from pono.settings import Settings
from pono.storage.db import StorageError, open_database

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


def _metrics_routes(metrics: Metrics) -> list[web.RouteDef]:
    async def render(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    return [web.get("/metrics", render)]


async def _site(host: str, port: int, routes: list[web.RouteDef]) -> web.AppRunner:
    app = web.Application()
    app.add_routes(routes)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner


async def serve_jobs(settings: Settings) -> None:
    """Run a worker until SIGTERM/SIGINT (a second one stops at once, releasing running jobs). Raises
    StorageError when Postgres cannot be used."""
    metrics = Metrics()
    llm = llm_for_jobs(settings, metrics)
    sites: list[web.AppRunner] = []
    built: list[JobWorker] = []
    shared_port = settings.jobs_health_port is not None and settings.jobs_health_port == settings.metrics_port
    try:
        if settings.jobs_health_port is not None:  # first: /health answers while Postgres is being reached
            routes = health.routes(lambda: built[0] if built else None)
            sites.append(await _site(settings.host, settings.jobs_health_port,
                                     routes + (_metrics_routes(metrics) if shared_port else [])))
        # pgqueuer keeps one connection for LISTEN; the rest serve the jobs and their heartbeats.
        async with open_database(settings, max_size=settings.jobs_concurrency + 4) as db:
            if settings.metrics_port and not shared_port:
                sites.append(await _site(settings.host, settings.metrics_port, _metrics_routes(metrics)))
            worker = JobWorker(db.pool, db.dsn, settings, metrics, llm)
            built.append(worker)
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
        for site in sites:
            await site.cleanup()
        if llm is not None:
            await llm.close()


__all__ = ["StorageError", "llm_for_jobs", "serve_jobs"]
