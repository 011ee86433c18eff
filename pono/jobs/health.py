"""`pono jobs`' probes, served on PONO_JOBS_HEALTH_PORT (no token: probes come from the kubelet).

- GET /health: 200 while the process's event loop turns. A worker frozen on its loop stops answering it, as
  it stops beating for its jobs (other workers pick them up after PONO_JOBS_HEARTBEAT_S): restart it. It does
  not ask Postgres: a restart cannot bring the database back, and the worker reconnects by itself.
- GET /ready: 200 while the worker takes jobs: Postgres answers on the jobs' pool and the queue's LISTEN
  connection round-trips a NOTIFY. 503 with the reason while it starts, while Postgres or the listener is
  away, and from SIGTERM on (it drains: no new jobs).
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web

from pono.jobs.worker import JobWorker


def routes(worker: Callable[[], JobWorker | None]) -> list[web.RouteDef]:
    """/health and /ready for the worker `worker()` returns (None until it is built: not ready)."""

    async def health(request: web.Request) -> web.Response:
        current = worker()
        return web.json_response({"status": "ok", "draining": bool(current and current.draining)})

    async def ready(request: web.Request) -> web.Response:
        current = worker()
        reason = "starting: connecting to Postgres" if current is None else await current.readiness()
        if reason is not None:
            return web.json_response({"status": "not ready", "reason": reason}, status=503)
        return web.json_response({"status": "ready", "concurrency": current.settings.jobs_concurrency})

    return [web.get("/health", health), web.get("/ready", ready)]
