"""Probes and metrics: /api/health (alive), /api/startup (started), /api/ready (can take calls), /metrics."""

from __future__ import annotations

import hmac

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pono.auth import bearer
from pono.context import SERVICES
from pono.http import ApiError
from pono.web.access import authenticate


async def health(request: web.Request) -> web.Response:
    """GET /api/health (public): 200 while the process serves requests."""
    return web.json_response({"status": "alive"})


async def startup(request: web.Request) -> web.Response:
    """GET /api/startup (public): 200 once models and the LLM are loaded; 503 while starting or after a failure."""
    services = request.app[SERVICES]
    if services.startup_error:
        return web.json_response({"status": "failed", "error": services.startup_error}, status=503)
    if not services.startup_complete:
        return web.json_response({"status": "starting"}, status=503)
    return web.json_response({"status": "started"})


async def ready(request: web.Request) -> web.Response:
    """GET /api/ready (public): 200 when every check passes and calls are accepted, else 503 with the checks."""
    services = request.app[SERVICES]
    writer, live = services.storage.writer, services.storage.live
    checks = {
        "models": services.models.loaded.is_set(),
        "llm": services.llm_reachable,
        "database": writer is not None and writer.db_up,
        "redis": live is not None and live.up,
        "accepting_calls": not services.calls.draining and not services.calls.full,
    }
    models = services.models
    if models.worker is not None and models.settings.speech_fallback == "none":  # no worker up: no speech
        checks["speech_worker"] = models.worker.up > 0
    ok = all(checks.values()) and services.startup_complete
    body = {"status": "ready" if ok else "not_ready", "checks": checks, "active_calls": len(services.calls.calls)}
    if services.calls.draining:
        body["status"] = "draining"
    if services.startup_error:
        body["error"] = services.startup_error
    return web.json_response(body, status=200 if ok else 503)


async def metrics_endpoint(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text, for the metrics token or any login or key scoped for metrics (401, 403)."""
    services = request.app[SERVICES]
    token = bearer(request) or ""
    if not hmac.compare_digest(token.encode(), services.metrics_token.encode()):
        principal = await authenticate(request)  # or any login or key scoped for metrics
        if not principal.may("metrics"):
            raise ApiError(403, "this API key is not scoped for metrics")
    return render_metrics(request.app)


def render_metrics(app: web.Application) -> web.Response:
    """The Prometheus exposition of `app`'s metrics, gauges brought up to date first."""
    services = app[SERVICES]
    services.storage.update_gauges()
    body = generate_latest(services.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
