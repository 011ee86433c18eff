"""`pono speech-worker`: one process's STT and TTS models, served to many app servers (see protocol.py).

The worker is a `SpeechModels` of its own (the same settings as the app: PONO_STT_MODEL, PONO_STT_DEVICE,
PONO_STT_BATCH_WINDOW_MS, PONO_STT_MAX_BATCH, PONO_TTS…), so every stream's finals and partials meet in one
`TranscriptionEngine` and are batched across calls and app servers. Each `/v1/stt` stream is a
`StreamingRecognizer` (stream.py). SIGTERM drains: /ready says 503, streams are told to move at their next
utterance, and whatever is still open after DRAIN_S is closed (the app finishes that turn on its own models).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import signal
import time
from collections.abc import AsyncIterator

from aiohttp import WSCloseCode, web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from pono.http import ApiError, errors_as_json, read_json_model
from pono.logs import own
from pono.settings import Settings
from pono.voice.models import SpeechModels
from pono.voice.sentences import split_all
from pono.voice.speech.engine import BatchStats
from pono.voice.worker import protocol as p
from pono.voice.worker.stream import SttStream

log = logging.getLogger(__name__)

DRAIN_S = 40.0  # after SIGTERM, streams may stay this long (k8s: preStop 10 s + this < the 60 s grace period)
# aiohttp refuses a message as large as its limit: the worker's has headroom over the protocol's largest.
_MAX_MSG_SIZE = p.MAX_MESSAGE_BYTES + 64 * 1024
_SECONDS = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class WorkerMetrics:
    """The worker's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.queue_depth = Gauge("pono_worker_queue_depth", "Clips waiting for Whisper", registry=r)
        self.batch_size = Histogram("pono_worker_batch_size", "Clips per Whisper batch", ["kind"],
                                    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r)
        self.model_seconds = Histogram("pono_worker_model_seconds", "Seconds per Whisper batch or TTS request",
                                       ["model"], buckets=_SECONDS, registry=r)
        self.streams_open = Gauge("pono_worker_streams_open", "Open /v1/stt streams", registry=r)
        self.transcriptions = Counter("pono_worker_transcriptions_total", "Transcripts sent, by kind",
                                      ["kind"], registry=r)
        self.tts_abandoned = Counter("pono_worker_tts_abandoned_total",
                                     "TTS requests whose client went away before the last sentence", registry=r)

    def batched(self, stats: BatchStats) -> None:
        """TranscriptionEngine.on_batch: one batch's size and seconds."""
        self.batch_size.labels(stats.kind).observe(stats.size)
        self.model_seconds.labels("stt").observe(stats.seconds)


class SpeechWorker:
    """The worker's state: its models, metrics, open streams and whether it drains. `token` is the bearer
    token every client must present."""

    def __init__(self, settings: Settings, token: str) -> None:
        if not token:
            raise ValueError("the speech worker needs PONO_SPEECH_WORKER_TOKEN")
        self.token = token.encode()
        self.models = SpeechModels(settings.model_copy(update={"speech_worker_url": None}))
        self.metrics = WorkerMetrics()
        self.models.on_batch = self.metrics.batched
        self.streams: set[web.WebSocketResponse] = set()
        self.draining = False
        self.no_streams = asyncio.Event()
        self.no_streams.set()
        self.load_failed = asyncio.Event()
        self.metrics.streams_open.set_function(lambda: len(self.streams))
        self.metrics.queue_depth.set_function(lambda: self.queue_depth)

    @property
    def ready(self) -> bool:
        return self.models.loaded.is_set() and not self.draining

    @property
    def queue_depth(self) -> int:
        stt = self.models.stt
        return 0 if stt is None else stt.queue_depth + stt.running

    def voice(self, name: str | None) -> str | None:
        """The voice a TTS request names, checked before anything loads: None for the default voice; raises
        ApiError 422 for a voice this worker's TTS does not have (hibari's own list; piper speaks only its
        default here), so client names never reach a loader, the log or the voice library's places."""
        settings = self.models.settings
        if settings.tts == "hibari":
            from hibari.voices import DEFAULT, VOICES

            if not name or name == (settings.tts_voice or DEFAULT):
                return None
            if name in VOICES:
                return name
            raise ApiError(422, f"unknown voice: this worker's TTS has {', '.join(sorted(VOICES))}")
        if not name or name == settings.tts_voice:
            return None
        raise ApiError(422, "unknown voice: this worker's TTS (piper) speaks its default voice only")

    def authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        token = header[7:].strip() if header[:7].lower() == "bearer " else ""
        return hmac.compare_digest(token.encode("utf-8", "replace"), self.token)

    async def drain(self, timeout_s: float = DRAIN_S) -> None:
        """Stop taking streams, tell the open ones to move, and close what is left after `timeout_s`."""
        self.draining = True
        for ws in list(self.streams):
            with contextlib.suppress(Exception):
                await ws.send_json(p.message("draining"))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.no_streams.wait(), timeout_s)
        await self.close_streams()

    async def close_streams(self) -> None:
        for ws in list(self.streams):
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"worker stopping")


WORKER = web.AppKey("worker", SpeechWorker)


def _guard(request: web.Request) -> SpeechWorker:
    worker = request.app[WORKER]
    if not worker.authorized(request):
        raise ApiError(401, "a valid speech worker token is required", headers={"WWW-Authenticate": "Bearer"})
    return worker


async def stt(request: web.Request) -> web.StreamResponse:
    """GET /v1/stt: a WebSocket stream of recognition (protocol.py). 401 without the token, 426 without the
    upgrade, 503 when not ready."""
    worker = _guard(request)
    ws = web.WebSocketResponse(max_msg_size=_MAX_MSG_SIZE, heartbeat=20.0)
    if not ws.can_prepare(request).ok:
        raise ApiError(426, f"{p.STT_PATH} is a WebSocket: send the upgrade (Connection: Upgrade, Upgrade: "
                            "websocket)", headers={"Upgrade": "websocket"})
    if not worker.ready:
        raise ApiError(503, "draining" if worker.draining else "models are loading")
    await ws.prepare(request)
    worker.streams.add(ws)
    worker.no_streams.clear()
    try:
        await SttStream(ws, worker).run()
    finally:
        worker.streams.discard(ws)
        if not worker.streams:
            worker.no_streams.set()
    return ws


async def tts(request: web.Request) -> web.StreamResponse:
    """POST /v1/tts {"text", "voice"}: the speech sentence by sentence, each sent as one HTTP chunk as soon as
    it is synthesized (protocol.py); the answer begins with the first sentence's audio. A client that went
    away stops it at the next sentence (counted, logged at debug level): the TTS thread is shared."""
    worker = _guard(request)
    if not worker.ready:
        raise ApiError(503, "draining" if worker.draining else "models are loading")
    body = await read_json_model(request, p.TtsRequest)
    voice = worker.voice(body.voice)
    response = web.StreamResponse(headers={"Content-Type": "application/octet-stream",
                                           p.SAMPLE_RATE_HEADER: str(worker.models.tts_rate)})
    response.enable_chunked_encoding()
    started = time.perf_counter()
    try:
        for sentence in split_all(body.text):
            if request.transport is None or request.transport.is_closing():
                raise ConnectionResetError
            audio = b"".join(c.astype("<i2").tobytes() for c in await worker.models.run_tts(sentence, voice))
            if not response.prepared:
                await response.prepare(request)
            if audio:
                await response.write(audio)
        if not response.prepared:  # nothing to say (the text was only markup)
            await response.prepare(request)
        await response.write_eof()
    except ConnectionResetError:  # aiohttp's ClientConnectionResetError too
        worker.metrics.tts_abandoned.inc()
        log.debug("a TTS client went away before the last sentence")
    finally:
        worker.metrics.model_seconds.labels("tts").observe(time.perf_counter() - started)
    return response


async def health(request: web.Request) -> web.Response:
    """GET /health (public): 200 while the process serves requests."""
    return web.json_response({"status": "alive"})


async def ready(request: web.Request) -> web.Response:
    """GET /ready (public, for probes): 200 once the models are loaded, 503 while loading, after a failed load
    or while draining. With a token: 401 for a wrong one (the app's polls find out at once), and the load for
    the right one."""
    worker = request.app[WORKER]
    token = "Authorization" in request.headers
    if token:
        _guard(request)
    if not worker.ready:
        status = "draining" if worker.draining else "failed" if worker.models.load_error else "loading"
        return web.json_response({"status": status}, status=503)
    if not token:
        return web.json_response({"status": "ready"})
    return web.json_response({"status": "ready", "streams": len(worker.streams), "queue_depth": worker.queue_depth,
                              "tts_sample_rate": worker.models.tts_rate})


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics (token): the worker's Prometheus text."""
    worker = _guard(request)
    return web.Response(body=generate_latest(worker.metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(worker: SpeechWorker) -> web.Application:
    """The worker's aiohttp application; its models load in the background once it starts."""
    app = web.Application(client_max_size=p.MAX_TTS_BODY, middlewares=[errors_as_json])
    app[WORKER] = worker

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        loading = asyncio.create_task(worker.models.load(), name="load-models")
        loading.add_done_callback(lambda t: t.cancelled() or t.exception() is None or worker.load_failed.set())
        yield
        loading.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await loading
        worker.models.close()

    async def on_shutdown(app: web.Application) -> None:
        await worker.close_streams()

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(on_shutdown)
    app.add_routes([web.get(p.STT_PATH, stt), web.post(p.TTS_PATH, tts), web.get("/health", health),
                    web.get("/ready", ready), web.get("/metrics", metrics)])
    return app


async def serve(settings: Settings) -> None:
    """Run the worker on PONO_HOST:PONO_SPEECH_WORKER_PORT until SIGTERM/SIGINT (drain, then stop; a second
    signal stops at once). Raises SystemExit(1) when it cannot listen or its models fail to load."""
    token = settings.speech_worker_token.get_secret_value() if settings.speech_worker_token else ""
    worker = SpeechWorker(settings, token)
    runner = web.AppRunner(build_app(worker), handle_signals=False, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.host, settings.speech_worker_port).start()
    except OSError as exc:
        await runner.cleanup()
        log.error("cannot listen on %s:%s: %s", own(settings.host), settings.speech_worker_port, own(exc.strerror))
        raise SystemExit(1) from None
    log.info("speech worker listening on http://%s:%s", own(settings.host), settings.speech_worker_port)
    stop = asyncio.Event()
    drains: list[asyncio.Task[None]] = []

    async def drain_then_stop() -> None:
        try:
            await worker.drain()
        finally:
            stop.set()

    def on_signal() -> None:
        if drains:
            stop.set()
        else:
            log.info("draining the speech worker (up to %.0f s); signal again to stop now", DRAIN_S)
            drains.append(asyncio.create_task(drain_then_stop(), name="drain"))

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    waits = [asyncio.create_task(stop.wait()), asyncio.create_task(worker.load_failed.wait())]
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for task in (*drains, *waits):
        task.cancel()
    await runner.cleanup()
    if worker.models.load_error:
        raise SystemExit(1)

