"""A call's streaming recognizer on a speech worker, with the local models as its fallback.

`WorkerRecognizer` implements `pono.voice.speech.recognizer.Recognizer` over one `/v1/stt` stream (a `_Link`),
opened when the call starts. It keeps the audio of the utterance in flight (bounded by PONO_MAX_UTTERANCE_S),
so when the worker dies (the connection fails or closes) or stalls (a final not answered within
PONO_SPEECH_WORKER_STALL_S) nothing is lost: the utterance moves to a local `StreamingRecognizer` fed with
that audio, and every final in flight is transcribed locally from its own copy. New utterances go to a worker
again once one is up (a new stream opened at `reset`, never waited for: audio queues while it connects). With
no local models (PONO_SPEECH_FALLBACK=none) such a turn's transcript is empty and `on_error` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
import numpy as np

from pono.logs import own
from pono.voice.speech.recognizer import Recognizer
from pono.voice.worker import protocol as p
from pono.voice.worker.pool import Worker, WorkerPool, WorkerUnavailable

log = logging.getLogger(__name__)

LocalFactory = Callable[..., Recognizer]  # (partial_interval_s=..., on_partial=...) -> a local recognizer
UNAVAILABLE = "speech recognition is unavailable: this turn has no transcript"
_MAX_QUEUED = 3000  # messages (about 60 s of 20 ms frames) waiting for a worker that stopped reading
_TASKS: set[asyncio.Task[Any]] = set()  # links closing after their recognizer let them go


class _Link:
    """One /v1/stt stream. Messages queue from the start and go out in order once connected; `lost(link,
    reason)` is called once if the stream fails before `close()`."""

    def __init__(self, pool: WorkerPool, worker: Worker, start: dict[str, Any],
                 on_partial: Callable[[_Link, str, int], None], lost: Callable[[_Link, str], None]) -> None:
        self.pool, self.worker = pool, worker
        self._on_partial, self._lost = on_partial, lost
        self.queue: asyncio.Queue[str | bytes | None] = asyncio.Queue()
        self.finals: dict[int, asyncio.Future[str]] = {}
        self._ids = 0
        self.utterance = 0  # resets sent
        self.alive = True  # not lost, not closed
        self.draining = False  # the worker asked us to move at the next utterance
        self.send(start)
        self.task = asyncio.create_task(self._run(), name="speech-worker-stream")
        _TASKS.add(self.task)
        self.task.add_done_callback(_TASKS.discard)

    def send(self, message: dict[str, Any]) -> None:
        self._put(json.dumps(message))

    def send_audio(self, pcm: np.ndarray) -> None:
        data = pcm.astype("<i2", copy=False).tobytes()
        for at in range(0, len(data), p.AUDIO_PIECE_BYTES):
            self._put(data[at:at + p.AUDIO_PIECE_BYTES])

    def _put(self, item: str | bytes) -> None:
        if not self.alive:
            return
        if self.queue.qsize() >= _MAX_QUEUED:
            self.fail("the worker stopped reading")
            return
        self.queue.put_nowait(item)

    def final(self) -> asyncio.Future[str]:
        """Ask for the transcript of the audio sent so far; the future fails with WorkerUnavailable."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        if not self.alive:
            future.set_exception(WorkerUnavailable("stream closed"))
            return future
        if len(self.finals) >= p.MAX_FINALS_IN_FLIGHT:  # the worker would refuse it: transcribed locally
            future.set_exception(WorkerUnavailable("too many finals in flight"))
            return future
        self._ids += 1
        self.finals[self._ids] = future
        future.add_done_callback(lambda f, i=self._ids: (self.finals.pop(i, None), f.cancelled() or f.exception()))
        self.send(p.message("final", id=self._ids))
        return future

    def reset(self) -> None:
        self.utterance += 1
        self.send(p.message("reset"))

    def fail(self, reason: str) -> None:
        """The stream is lost: pending finals fail, the worker backs off, the recognizer falls back."""
        if not self.alive:
            return
        self.pool.failed(self.worker, reason)
        self._end(reason)
        self._lost(self, reason)

    def close(self, *, wait_finals: bool) -> None:
        """Let the stream go: with `wait_finals`, after the finals in flight are answered (or stall)."""
        if not self.alive:
            return
        if wait_finals and self.finals:
            self.queue.put_nowait(None)  # the writer waits for the finals, then closes
            self.alive = False
            return
        self._end("closed")

    def _end(self, reason: str) -> None:
        self.alive = False
        for future in list(self.finals.values()):
            if not future.done():
                future.set_exception(WorkerUnavailable(reason))
        if asyncio.current_task() is not self.task:
            self.task.cancel()

    async def _run(self) -> None:
        ws: aiohttp.ClientWebSocketResponse | None = None
        try:
            ws = await self.pool.connect_stt(self.worker)
            reader = asyncio.create_task(self._read(ws))
            try:
                while (item := await self.queue.get()) is not None:
                    await (ws.send_str(item) if isinstance(item, str) else ws.send_bytes(item))
                if self.finals:  # closing: the answers in flight still count
                    await asyncio.wait(list(self.finals.values()), timeout=self.pool.stall_s)
            finally:
                reader.cancel()
        except WorkerUnavailable as exc:
            self.fail(str(exc))
        except (aiohttp.ClientError, OSError) as exc:
            self.fail(f"send failed: {type(exc).__name__}")
        finally:
            if ws is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(ws.close()), 1.0)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.pool.succeeded(self.worker)
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            try:
                data = json.loads(msg.data)
                kind = data["type"]
            except (ValueError, KeyError, TypeError):
                continue
            if kind == "final":
                future = self.finals.get(data.get("id"))
                if future is not None and not future.done():
                    future.set_result(str(data.get("text", "")))
            elif kind == "partial":
                self._on_partial(self, str(data.get("text", "")), int(data.get("utterance", -1)))
            elif kind == "draining":
                self.draining = True
                self.worker.ready = False  # no new streams there; the next poll confirms
            elif kind == "error" and data.get("id") in self.finals:
                self.finals[data["id"]].set_exception(WorkerUnavailable(str(data.get("message"))))
            elif kind == "error":
                log.warning("speech worker %s: %s", own(self.worker.url), str(data.get("message"))[:200])
        self.fail(f"stream closed ({ws.close_code})")


class WorkerRecognizer:
    """A `Recognizer` on the speech workers of `pool`, for one call.

    `local(partial_interval_s=..., on_partial=...)` makes a local recognizer (None: no local models);
    `on_fallback("stt")` counts each fall-back of a turn in flight; `on_error(message)` is told when a turn
    has no transcript because no worker nor local model could make one. Audio: 16 kHz int16 frames."""

    def __init__(self, pool: WorkerPool, *, language: str = "en", partial_interval_s: float = 1.0,
                 on_partial: Callable[[str], None] | None = None, local: LocalFactory | None = None,
                 on_fallback: Callable[[str], None] | None = None, on_error: Callable[[str], None] | None = None,
                 max_utterance_s: float = 120.0) -> None:
        self.pool = pool
        self.language = language
        self.partial_interval_s = partial_interval_s
        self.on_partial = on_partial
        self._local_factory = local
        self.on_fallback = on_fallback
        self.on_error = on_error
        self._max_samples = int((max_utterance_s + 5.0) * p.SAMPLE_RATE)
        self._partials = True
        self._audio: list[np.ndarray] = []
        self._samples = 0
        self._local: Recognizer | None = None
        self._on_local = False  # this utterance is recognized locally (or not at all)
        self._link: _Link | None = None
        if not self._open():
            self._use_local()

    @property
    def partials(self) -> bool:
        return self._partials

    @partials.setter
    def partials(self, enabled: bool) -> None:
        if enabled != self._partials and self._link is not None:
            self._link.send(p.message("partials", enabled=enabled))
        self._partials = enabled
        if self._local is not None:
            self._local.partials = enabled

    @property
    def on_worker(self) -> bool:
        """Whether the utterance in flight goes to a worker."""
        return not self._on_local

    def _open(self) -> bool:
        worker = self.pool.pick()
        if worker is None:
            return False
        start = p.message("start", language=self.language, partial_interval_s=self.partial_interval_s)
        self._link = _Link(self.pool, worker, start, self._worker_partial, self._lost)
        if not self._partials:
            self._link.send(p.message("partials", enabled=False))
        return True

    # -- the utterance ----------------------------------------------------------------------------
    def push(self, pcm: np.ndarray) -> None:
        if self._samples + pcm.size <= self._max_samples:  # the call cuts a turn well before this
            self._audio.append(pcm)
            self._samples += pcm.size
        if self._on_local:
            if self._local is not None:
                self._local.push(pcm)
        elif self._link is not None:
            self._link.send_audio(pcm)

    def reset(self) -> None:
        self._audio, self._samples = [], 0
        if self._local is not None:
            self._local.reset()
        link = self._link
        if link is not None and link.alive and not link.draining:
            link.reset()
            self._on_local = False
            return
        if link is not None:  # the worker drains: this stream ends once its finals are answered
            self._link = None
            link.close(wait_finals=True)
        if self._open():
            self._on_local = False
        else:
            self._use_local()

    def _use_local(self) -> None:
        """The utterance in flight runs on the local models (or on none)."""
        self._on_local = True
        if self._local is None and self._local_factory is not None:
            self._local = self._local_factory(partial_interval_s=self.partial_interval_s, on_partial=self.on_partial)
            self._local.partials = self._partials

    def final(self) -> Coroutine[Any, Any, str]:
        """The utterance's transcript so far; the audio is taken now (see `Recognizer.final`)."""
        audio = self._snapshot()
        if self._on_local:
            return self._local.final() if self._local is not None else self._unavailable()
        assert self._link is not None
        return self._await(self._link, self._link.final(), audio)

    async def _await(self, link: _Link, answer: asyncio.Future[str], audio: np.ndarray) -> str:
        try:
            return await asyncio.wait_for(answer, self.pool.stall_s)
        except TimeoutError:
            link.fail(f"no final within {self.pool.stall_s:.0f} s")
        except WorkerUnavailable:
            pass  # the link has fallen back already
        return await self._transcribe_locally(audio)

    async def _transcribe_locally(self, audio: np.ndarray) -> str:
        if self._local_factory is None:
            return await self._unavailable()
        recognizer = self._local_factory(partial_interval_s=0.0, on_partial=None)
        try:
            recognizer.push(audio)
            return await recognizer.final()
        finally:
            recognizer.close()

    async def _unavailable(self) -> str:
        if self.on_error is not None:
            self.on_error(UNAVAILABLE)
        return ""

    def _snapshot(self) -> np.ndarray:
        if len(self._audio) != 1:
            self._audio = [np.concatenate(self._audio) if self._audio else np.zeros(0, np.int16)]
        return self._audio[0]

    # -- the worker's side ------------------------------------------------------------------------
    def _worker_partial(self, link: _Link, text: str, utterance: int) -> None:
        if (link is self._link and utterance == link.utterance and not self._on_local and self._partials
                and text and self.on_partial is not None):
            self.on_partial(text)

    def _lost(self, link: _Link, reason: str) -> None:
        """A stream failed: the utterance in flight goes on locally with the audio kept so far."""
        if link is not self._link:
            return
        self._link = None
        if self._on_local:
            return
        if self.on_fallback is not None:
            self.on_fallback("stt")
        log.info("speech worker %s lost mid-turn (%s): the turn goes on %s", own(link.worker.url), reason,
                 "locally" if self._local_factory else "without a transcript")
        self._use_local()
        if self._local is not None:
            self._local.reset()
            self._local.partials = self._partials
            if self._samples:
                self._local.push(self._snapshot())

    def close(self) -> None:
        if self._link is not None:
            self._link.close(wait_finals=False)
            self._link = None
        if self._local is not None:
            self._local.close()
