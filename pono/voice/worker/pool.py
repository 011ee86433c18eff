"""The app's view of its speech workers (PONO_SPEECH_WORKER_URL): which are up, which is least loaded, and
TTS requests to them.

Every POLL_S each worker's /ready is read with the token (a worker that refuses it is not up, and says so
in the log once): a ready worker's load is its open streams plus its queue depth, to which the streams this
process opened since that poll are added, so a burst of new calls does not all land on the worker that looked
idlest. A worker that fails (a refused connection, a stalled final or TTS answer) is out of the running until
a poll finds it ready again and its backoff (1 s, doubling to 30 s) has passed. A worker going down (found by
a poll or by a request), and coming back, is logged once each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Literal

import aiohttp
import numpy as np

from pono.logs import own
from pono.voice.worker import protocol as p

log = logging.getLogger(__name__)

POLL_S = 3.0
_BACKOFF_MAX_S = 30.0
_TTS_PER_WORKER = 32  # TTS requests at once to one worker (its TTS speaks one sentence at a time anyway)
_TTS_STALLS = 6  # a TTS answer, once begun, ends within this many PONO_SPEECH_WORKER_STALL_S
Connections = Literal["streams", "tts", "polls"]


class WorkerUnavailable(Exception):
    """A worker could not serve a request: unreachable, closed, stalled or answering an error."""


class _VoiceRefused(Exception):
    """The worker's TTS has no such voice (422)."""


@dataclass
class Worker:
    """One speech worker as the app sees it. `url` is its http(s) base URL."""

    url: str
    ready: bool = False
    load: int = 0  # streams + queue depth at the last poll
    opened: int = 0  # streams this process opened since the last poll
    failures: int = 0  # in a row
    down_until: float = 0.0  # monotonic; no new work before this
    tts_rate: int | None = None
    polled_up: bool | None = None  # what the last poll found (None: not polled yet)
    down_logged: bool = False  # its going down was logged, and its coming back is not yet
    refused_logged: bool = False  # it refused our token, and that was logged

    @property
    def ws_url(self) -> str:
        return "ws" + self.url[4:] + p.STT_PATH


def parse_urls(value: str) -> list[str]:
    """PONO_SPEECH_WORKER_URL: comma-separated http(s) base URLs. Raises ValueError for anything else."""
    urls = [u.strip().rstrip("/") for u in value.split(",") if u.strip()]
    if not urls or any(not u.startswith(("http://", "https://")) for u in urls):
        raise ValueError(f"PONO_SPEECH_WORKER_URL must list http(s):// base URLs, got {value!r}")
    return urls


class WorkerPool:
    """The workers of `urls` for this process, shared by every call. `token` is PONO_SPEECH_WORKER_TOKEN;
    `stall_s` bounds a connection, a final's answer and the start of a TTS answer. `start()` (in a running
    loop) reads every /ready once and keeps polling; `close()` stops.

    Streams, TTS requests and polls each have connections of their own: the calls' streams (one each, held
    for the call) are not limited, so they can never leave a poll or a TTS request waiting for a connection;
    TTS requests share `_TTS_PER_WORKER` connections per worker, and polls their own."""

    def __init__(self, urls: str, token: str, *, stall_s: float = 5.0, poll_s: float = POLL_S) -> None:
        if not token:
            raise ValueError("PONO_SPEECH_WORKER_URL is set but PONO_SPEECH_WORKER_TOKEN is not")
        self.workers = [Worker(url) for url in parse_urls(urls)]
        self.headers = {"Authorization": f"Bearer {token}"}
        self.stall_s = stall_s
        self.poll_s = poll_s
        self.any_ready = asyncio.Event()
        self._sessions: dict[Connections, aiohttp.ClientSession] = {}
        self._voices_refused: set[str] = set()  # logged once each (a few persona voices)
        self._poller: asyncio.Task[None] | None = None
        self._closing: asyncio.Task[None] | None = None

    def session(self, kind: Connections) -> aiohttp.ClientSession:
        """The connections for `kind` of traffic (made on first use, in the running loop)."""
        session = self._sessions.get(kind)
        if session is None:
            connector = aiohttp.TCPConnector(limit=0, limit_per_host={"streams": 0, "tts": _TTS_PER_WORKER,
                                                                      "polls": 2}[kind])
            session = self._sessions[kind] = aiohttp.ClientSession(headers=self.headers, connector=connector)
        return session

    async def start(self) -> None:
        """Poll every worker once, say where speech goes, and keep polling."""
        await self.poll()
        log.info("speech on worker(s) %s: %d of %d up", own(", ".join(w.url for w in self.workers)), self.up,
                 len(self.workers))
        self._poller = asyncio.create_task(self._poll_forever(), name="speech-worker-poll")

    async def wait_ready(self, log_every_s: float = 10.0) -> None:
        """Until a poll finds a worker up (PONO_SPEECH_FALLBACK=none at start-up), with a warning naming the
        workers every `log_every_s` meanwhile."""
        while True:
            try:
                async with asyncio.timeout(log_every_s):
                    await self.any_ready.wait()
                    return
            except TimeoutError:
                log.warning("no speech worker is up yet (%s); with PONO_SPEECH_FALLBACK=none the server waits for "
                            "one", own(", ".join(w.url for w in self.workers)))

    def close_soon(self) -> None:
        """Stop polling and start closing the connections (from synchronous code in the running loop)."""
        if self._poller is not None:
            self._poller.cancel()
        if self._sessions and self._closing is None:
            sessions = list(self._sessions.values())
            with contextlib.suppress(RuntimeError):  # no running loop: nothing left to close them in
                self._closing = asyncio.get_running_loop().create_task(self._close_sessions(sessions))

    @staticmethod
    async def _close_sessions(sessions: list[aiohttp.ClientSession]) -> None:
        await asyncio.gather(*(s.close() for s in sessions))

    async def close(self) -> None:
        """Stop polling and close the connections."""
        self.close_soon()
        if self._closing is not None:
            await self._closing

    @property
    def tts_rate(self) -> int | None:
        """The sample rate the workers' TTS answers in (from /ready), once one was seen."""
        return next((w.tts_rate for w in self.workers if w.tts_rate), None)

    # -- choosing ---------------------------------------------------------------------------------
    def pick(self) -> Worker | None:
        """The least loaded worker that is ready and not backing off, or None."""
        now = time.monotonic()
        up = [w for w in self.workers if w.ready and now >= w.down_until]
        return min(up, key=lambda w: w.load + w.opened) if up else None

    @property
    def up(self) -> int:
        """How many workers new turns would go to now."""
        now = time.monotonic()
        return sum(1 for w in self.workers if w.ready and now >= w.down_until)

    def failed(self, worker: Worker, reason: str) -> None:
        """`worker` failed a request: out of the running for a backoff, and until a poll finds it ready."""
        if worker.ready:
            log.warning("speech worker %s failed (%s): calls use %s until it is back", own(worker.url), reason,
                        self._instead(worker))
            worker.down_logged = True
        worker.ready = False
        worker.failures += 1
        worker.down_until = time.monotonic() + min(_BACKOFF_MAX_S, 2.0 ** (worker.failures - 1))

    def succeeded(self, worker: Worker) -> None:
        worker.failures = 0

    def _instead(self, worker: Worker) -> str:
        return "another worker" if any(w.ready and w is not worker for w in self.workers) else "the fallback"

    # -- polling ----------------------------------------------------------------------------------
    async def poll(self) -> None:
        await asyncio.gather(*(self._poll(w) for w in self.workers))
        if any(w.ready for w in self.workers):
            self.any_ready.set()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.poll()

    async def _poll(self, worker: Worker) -> None:
        """Read `worker`'s /ready (with the token): up or not, its load and TTS rate; log a change once."""
        refused = False
        try:
            async with self.session("polls").get(worker.url + "/ready", timeout=aiohttp.ClientTimeout(total=2.0)) as r:
                body = await r.json() if r.status in (200, 503) else {}
            ready, refused = r.status == 200, r.status == 401
            why = f"/ready answered {r.status} {str(body.get('status', ''))[:20]}".strip()
            load = int(body.get("streams", 0)) + int(body.get("queue_depth", 0))
            worker.tts_rate = int(body.get("tts_sample_rate") or 0) or worker.tts_rate
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError, TypeError, AttributeError) as exc:
            ready, load, why = False, 0, type(exc).__name__
        if refused and not worker.refused_logged:
            log.error("speech worker %s refused PONO_SPEECH_WORKER_TOKEN: set the token the worker has; calls use "
                      "%s meanwhile", own(worker.url), self._instead(worker))
            worker.refused_logged = worker.down_logged = True
        elif not ready and not worker.down_logged and worker.polled_up is not False:
            log.warning("speech worker %s is down (%s): calls use %s until it is back", own(worker.url), own(why),
                        self._instead(worker))
            worker.down_logged = True
        elif ready and worker.down_logged:
            log.info("speech worker %s is back", own(worker.url))
            worker.down_logged = worker.refused_logged = False
        worker.ready, worker.load, worker.opened, worker.polled_up = ready, load, 0, ready

    # -- requests ---------------------------------------------------------------------------------
    async def connect_stt(self, worker: Worker) -> aiohttp.ClientWebSocketResponse:
        """A /v1/stt WebSocket to `worker`. Raises WorkerUnavailable."""
        worker.opened += 1
        try:
            async with asyncio.timeout(self.stall_s):
                return await self.session("streams").ws_connect(worker.ws_url, max_msg_size=p.MAX_MESSAGE_BYTES,
                                                     heartbeat=20.0)
        except aiohttp.WSServerHandshakeError as exc:
            refused = "it refused PONO_SPEECH_WORKER_TOKEN" if exc.status == 401 else f"upgrade answered {exc.status}"
            raise WorkerUnavailable(refused) from exc
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise WorkerUnavailable(_why(exc)) from exc

    async def synthesize(self, worker: Worker, text: str, voice: str | None, rate: int) -> list[np.ndarray]:
        """Speech for `text` from `worker`, one int16 array per piece at `rate` Hz (resampled if the worker
        speaks at another rate). A voice the worker does not have speaks with its default voice, as one the
        local models cannot load does. Raises WorkerUnavailable when the answer has not begun within
        `stall_s` (a connection to wait for included), when it pauses that long, or when it has not ended
        within `_TTS_STALLS` × `stall_s`."""
        try:
            return await self._synthesize(worker, text, voice, rate)
        except _VoiceRefused:
            if voice not in self._voices_refused and len(self._voices_refused) < 32:
                self._voices_refused.add(str(voice))
                log.warning("speech worker %s has no TTS voice %r: the default voice speaks instead",
                            own(worker.url), voice)
            return await self._synthesize(worker, text, None, rate)

    async def _synthesize(self, worker: Worker, text: str, voice: str | None, rate: int) -> list[np.ndarray]:
        timeout = aiohttp.ClientTimeout(total=None, sock_read=self.stall_s)  # a pause between pieces
        loop = asyncio.get_running_loop()
        pieces: list[np.ndarray] = []
        try:
            async with asyncio.timeout(self.stall_s) as deadline, self.session("tts").post(
                    worker.url + p.TTS_PATH, json={"text": text[:p.MAX_TTS_CHARS], "voice": voice},
                    timeout=timeout) as r:
                deadline.reschedule(loop.time() + (_TTS_STALLS - 1) * self.stall_s)  # begun: the rest
                if r.status == 422 and voice is not None:
                    raise _VoiceRefused
                if r.status != 200:
                    raise WorkerUnavailable("it refused PONO_SPEECH_WORKER_TOKEN" if r.status == 401
                                            else f"TTS answered {r.status}")
                source_rate = int(r.headers.get(p.SAMPLE_RATE_HEADER, "0"))
                buffer = bytearray()
                async for data, end_of_chunk in r.content.iter_chunks():
                    buffer += data
                    if end_of_chunk and len(buffer) >= 2:
                        cut = len(buffer) - len(buffer) % 2
                        pieces.append(np.frombuffer(bytes(buffer[:cut]), "<i2").astype(np.int16))
                        del buffer[:cut]
        except TimeoutError as exc:  # the deadline, or a pause (aiohttp's ServerTimeoutError)
            raise WorkerUnavailable(f"TTS stalled ({_why(exc)})") from exc
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise WorkerUnavailable(_why(exc)) from exc
        self.succeeded(worker)
        if source_rate <= 0:
            raise WorkerUnavailable("TTS answer without a sample rate")
        return pieces if source_rate == rate else [resample(c, source_rate, rate) for c in pieces]


def _why(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def resample(pcm: np.ndarray, source: int, target: int) -> np.ndarray:
    """Mono int16 `pcm` from `source` to `target` Hz (PyAV's resampler)."""
    import av

    resampler = av.AudioResampler(format="s16", layout="mono", rate=target)
    frame = av.AudioFrame.from_ndarray(pcm.astype(np.int16).reshape(1, -1), format="s16", layout="mono")
    frame.sample_rate = source
    frames = [*resampler.resample(frame), *resampler.resample(None)]
    return np.concatenate([f.to_ndarray().reshape(-1) for f in frames]) if frames else np.zeros(0, np.int16)
