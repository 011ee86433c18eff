"""The aiohttp application: services, start-up and shutdown; the web routes (pono.web.routes) and signaling's."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import sys
from collections.abc import AsyncIterator, Callable

import asyncpg
from aiohttp import web

from pono.agent.dlp.apply import redact_event, redact_records
from pono.agent.embedded import EmbeddedLLM, free_port
from pono.agent.knowledge.base import KnowledgeBase, RemoteEmbedder
from pono.agent.llm import LLMClient
from pono.auth import TokenSigner, load_secret
from pono.calls import CallManager
from pono.context import SERVICES, Services
from pono.http import add_security_headers, errors_as_json
from pono.jobs.worker import JobWorker
from pono.metrics import Metrics
from pono.operators import OperatorDesk
from pono.settings import Settings
from pono.signaling import api as signaling_api
from pono.signaling.ice import restrict_host_addresses
from pono.signaling.operator_media import OperatorMedia
from pono.signaling.phone.server import SipServer
from pono.signaling.phone.twilio import routes as twilio_routes
from pono.signaling.services import SIGNALING
from pono.storage.control import ControlBus
from pono.storage.logins import Logins
from pono.storage.service import Storage
from pono.storage.users import bootstrap_admin, may_still_act, shared_secret
from pono.storage.verifier import Authenticator
from pono.tracing import CallTracing
from pono.voice.models import SpeechModels
from pono.web import routes as web_routes
from pono.web.access import rate_limit_by_ip

log = logging.getLogger(__name__)

EMBEDDED_LLM = web.AppKey("embedded_llm", EmbeddedLLM)
METRICS_ONLY = web.AppKey("metrics_of", web.Application)


def build_app(settings: Settings) -> web.Application:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    try:  # it holds secrets (signing keys, the Valkey password, the metrics token) and the write journal
        settings.data_dir.chmod(0o700)
    except OSError as exc:
        log.warning("cannot make the data dir private (%s): check its permissions", exc.strerror)
    restrict_host_addresses(settings.ice_interfaces)

    embedded: EmbeddedLLM | None = None
    base_url = settings.openai_base_url
    fallback_url, fallback_model = settings.llm_fallback_url, settings.llm_fallback_model
    if settings.embedded_llm:
        embedded = EmbeddedLLM(settings.data_dir, settings.llm_model, settings.llm_threads)
        embedded.port = free_port()
        base_url = embedded.base_url
    elif settings.llm_fallback_embedded and not fallback_url:
        # A remote primary, with the bundled SmolLM2 started beside it as the fallback.
        fallback_model = fallback_model or "smollm2"
        embedded = EmbeddedLLM(settings.data_dir, fallback_model, settings.llm_threads)
        embedded.port = free_port()
        fallback_url = embedded.base_url
    assert base_url is not None
    metrics = Metrics()
    fallback_key = settings.llm_fallback_api_key
    llm = LLMClient(
        base_url, settings.openai_api_key.get_secret_value(), settings.llm_model,
        timeout_s=settings.llm_timeout_s, max_tokens=settings.llm_max_tokens, temperature=settings.llm_temperature,
        retries=settings.llm_retries, fallback_url=fallback_url, fallback_model=fallback_model,
        fallback_api_key=fallback_key.get_secret_value() if fallback_key else None,
        breaker_failures=settings.llm_breaker_failures, breaker_reset_s=settings.llm_breaker_reset_s,
        requests_counter=metrics.llm_requests,
    )
    models = SpeechModels(settings)
    models.on_fallback = lambda kind: metrics.worker_fallbacks.labels(kind).inc()
    if models.worker is not None:
        metrics.workers_up.set_function(lambda: models.worker.up if models.worker else 0)
    metrics_token = settings.metrics_token.get_secret_value() if settings.metrics_token else load_secret(
        settings.data_dir / "metrics_token").decode()
    storage = Storage(settings, metrics, redact_records=redact_records, redact_event=redact_event)
    services = Services(
        settings=settings, models=models, llm=llm, metrics=metrics,
        calls=CallManager(settings, models, llm, metrics, storage, CallTracing.from_env()),
        signer=TokenSigner(secrets.token_bytes(32)),  # replaced at start-up by one keyed with the shared secret
        metrics_token=metrics_token, storage=storage, auth=Authenticator(lambda: storage.db.pool),  # type: ignore[union-attr]
    )

    app = web.Application(client_max_size=settings.max_body_bytes, middlewares=[errors_as_json, rate_limit_by_ip])
    app[SERVICES] = services
    app[SIGNALING] = services  # call set-up sees it through pono.signaling.services' Protocols
    if embedded is not None:
        app[EMBEDDED_LLM] = embedded
    app.on_response_prepare.append(add_security_headers)
    app.cleanup_ctx.append(_lifecycle)
    app.add_routes([*web_routes.routes(), *signaling_api.routes(), *twilio_routes()])
    return app


def _knowledge_base(settings: Settings, pool: asyncpg.Pool) -> KnowledgeBase:
    """The knowledge base on the storage pool; embeddings from PONO_EMBEDDINGS_URL when set, else local."""
    remote = None
    if settings.embeddings_url:
        remote = RemoteEmbedder(settings.embeddings_url, settings.openai_api_key.get_secret_value(),
                                settings.embeddings_model)
    return KnowledgeBase(pool, remote=remote)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    embedded = app.get(EMBEDDED_LLM)
    # Storage first and in the foreground: a wrong DATABASE_URL must stop start-up with a clear error.
    try:
        await services.storage.start()
    except BaseException:
        await services.storage.close()
        raise
    assert services.storage.db is not None
    services.storage.knowledge = _knowledge_base(services.settings, services.storage.db.pool)
    await _start_auth(services)
    assert services.storage.live is not None
    desk = OperatorDesk(services.calls, OperatorMedia(services.settings))
    services.control = ControlBus(services.storage.live, desk.execute,
                                  await shared_secret(services.storage.db.pool, "control_bus"),
                                  on_refused=lambda reason: services.metrics.control_refused.labels(reason).inc())
    services.control.start()
    sip: SipServer | None = None
    if services.settings.sip_port is not None or services.settings.sip_host is not None:
        sip = SipServer(services.settings, services.calls, services.calls.persona_for_number,
                        secret=await shared_secret(services.storage.db.pool, "sip_digest"))
        await sip.start()
        services.sip = sip
    services.calls.recordings.recover_later()  # recordings a killed process left unfinished in the data dir
    startup_task = asyncio.create_task(_start(services, embedded), name="startup")
    lag_task = asyncio.create_task(services.metrics.watch_loop_lag(), name="loop-lag")
    llm_probe = asyncio.create_task(_probe_llm(services), name="llm-probe")
    # Post-call workflows and scheduled jobs (the retention purge, the nightly report) on the job queue.
    jobs_stop = asyncio.Event()
    jobs_task = asyncio.create_task(
        JobWorker(services.storage.db.pool, services.storage.db.dsn, services.settings, services.metrics,
                  services.llm, llm_busy=_live_calls_need_llm(services, embedded)).run(jobs_stop),
        name="jobs") if services.settings.jobs_in_process else None
    pool = services.storage.db.pool
    desk_task = asyncio.create_task(desk.watch(lambda who: may_still_act(pool, who, "operator"),
                                               lambda: services.settings.console_reauth_s), name="operator-watch")
    yield
    await services.calls.close_all()
    if jobs_task is not None:  # before storage closes: running jobs finish, or go back to the queue
        jobs_stop.set()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await jobs_task
    if sip is not None:
        await sip.close()
    if services.control is not None:
        await services.control.close()
    for task in (startup_task, lag_task, llm_probe, desk_task):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
    if embedded is not None:
        await embedded.stop()
    await services.llm.close()
    await services.models.aclose()
    if services.calls.tracing is not None:
        await asyncio.to_thread(services.calls.tracing.shutdown)
    await services.storage.close()


def _live_calls_need_llm(services: Services, embedded: EmbeddedLLM | None) -> Callable[[], bool] | None:
    """When the in-process job worker's summaries must give the LLM up to live calls (pono.jobs.llm): with
    PONO_JOBS_LLM_YIELD=auto, where the bundled single-slot model serves the calls (as the primary, or as the
    fallback while the primary's circuit is open); always/never as set. None: summaries never wait."""
    mode = services.settings.jobs_llm_yield
    if mode == "never" or (mode == "auto" and embedded is None):
        return None
    if mode == "auto" and not services.settings.embedded_llm:  # the bundled model is only the fallback
        return lambda: bool(services.calls.calls) and services.llm.breaker.state == "open"
    return lambda: bool(services.calls.calls)


async def _start_auth(services: Services) -> None:
    """Keys shared by every replica on this database, and the first admin on a fresh one."""
    assert services.storage.db is not None
    pool, s = services.storage.db.pool, services.settings
    services.signer = TokenSigner(await shared_secret(pool, "call_tokens"))
    services.storage.persona_cache.use_secret(await shared_secret(pool, "persona_cache"))
    services.auth.logins = Logins(lambda: pool, await shared_secret(pool, "jwt"), s.access_token_ttl_s,
                                  s.refresh_token_ttl_s, s.login_max_age_s)
    first = await bootstrap_admin(pool)
    if first is not None:
        # Printed once, on the console of whoever started the first replica; only its hash is stored.
        print(f"\n  First start: log in to http://{s.host}:{s.port}/console as {first[0]!r} with the one-time"
              f" password {first[1]!r}\n  (it must be changed at the first login, or with:"
              f" pono users passwd --name {first[0]})\n",
              file=sys.stderr, flush=True)


async def _start(services: Services, embedded: EmbeddedLLM | None) -> None:
    try:
        jobs = [services.models.load()]
        if embedded is not None:
            jobs.append(embedded.start())
        await asyncio.gather(*jobs)
        services.llm_reachable = await services.llm.reachable()
        services.startup_complete = True
        log.info("pono is ready")
    except Exception as exc:
        services.startup_error = f"{type(exc).__name__}: {exc}"
        log.error("start-up failed: %s", services.startup_error)


async def _probe_llm(services: Services, interval_s: float = 5.0) -> None:
    while True:
        await asyncio.sleep(interval_s)
        if services.startup_complete:
            services.llm_reachable = await services.llm.reachable()

