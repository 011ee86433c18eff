"""One `/v1/stt` stream on the speech worker (server.py): the client's messages in, a `StreamingRecognizer`
of the worker's models, its answers out through one writer task (protocol.py says what goes over the wire)."""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any

import numpy as np
from aiohttp import WSCloseCode, WSMsgType, web

from pono.voice.speech.languages import whisper_language
from pono.voice.speech.recognizer import Recognizer
from pono.voice.worker import protocol as p

if TYPE_CHECKING:
    from pono.voice.worker.server import SpeechWorker

log = logging.getLogger(__name__)

_OUT_QUEUE = 256  # messages waiting for a client that does not read: past this the stream is closed


class SttStream:
    """One /v1/stt WebSocket: messages in, a StreamingRecognizer, answers out through one writer task."""

    def __init__(self, ws: web.WebSocketResponse, worker: SpeechWorker) -> None:
        self.ws = ws
        self.worker = worker
        self.out: asyncio.Queue[dict[str, Any]] = asyncio.Queue(_OUT_QUEUE)
        self.tasks: set[asyncio.Task[Any]] = set()
        self.recognizer: Recognizer | None = None
        self.utterance = 0  # resets seen
        self.samples = 0  # in this utterance
        self.too_long = False
        self.closing = False
        self.finals = 0  # in flight

    def send(self, kind: str, **fields: Any) -> None:
        """Queue a message for the client; one that stopped reading has its stream closed."""
        try:
            self.out.put_nowait(p.message(kind, **fields))
        except asyncio.QueueFull:  # the client stopped reading
            if not self.closing:
                self.closing = True
                self.spawn(self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"not reading"), "stt-close")

    def spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        """Run `coro` as one of the stream's tasks (cancelled when it closes)."""
        task = asyncio.create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def run(self) -> None:
        """Serve the stream until the client closes it (or the worker does)."""
        writer = asyncio.create_task(self._write(), name="stt-writer")
        try:
            async for msg in self.ws:
                if msg.type == WSMsgType.TEXT:
                    self._text(msg.data)
                elif msg.type == WSMsgType.BINARY:
                    self._audio(msg.data)
        finally:
            self.close(writer)

    def close(self, writer: asyncio.Task[None]) -> None:
        """Stop the stream's tasks and let go of the recognizer and its audio at once: the recognizer holds
        this stream's callbacks, so a reference to it from here would be a cycle that only the cycle collector
        frees, megabytes of audio later."""
        self.closing = True
        for task in [*self.tasks, writer]:
            task.cancel()
        recognizer, self.recognizer = self.recognizer, None
        if recognizer is not None:
            recognizer.close()

    async def _write(self) -> None:
        try:
            while True:
                message = await self.out.get()
                await self.ws.send_json(message)
        except ConnectionError:  # the client went away: the reader's loop ends too
            log.debug("an STT client went away")

    def _text(self, data: str) -> None:
        try:
            msg = p.parse_client(data)
        except p.ProtocolError as exc:
            self.send("error", message=str(exc))
            return
        if isinstance(msg, p.Start):
            if self.recognizer is not None:
                self.send("error", message="the stream has already started")
                return
            try:  # refused here: the models would log the client's tag and go on in English
                language = whisper_language(msg.language)
            except ValueError as exc:
                self.send("error", message=f"bad start message: {exc}")
                return
            self.recognizer = self.worker.models.recognizer(
                language, partial_interval_s=msg.partial_interval_s, on_partial=self._partial,
                spawn=self.spawn)
            return
        recognizer = self.recognizer
        if recognizer is None:
            self.send("error", message="send a start message first")
        elif isinstance(msg, p.Final):
            self._final(msg.id, recognizer)
        elif isinstance(msg, p.Reset):
            recognizer.reset()
            self.utterance += 1
            self.samples, self.too_long = 0, False
        else:
            recognizer.partials = msg.enabled

    def _audio(self, data: bytes) -> None:
        if self.recognizer is None:
            self.send("error", message="send a start message first")
        elif len(data) % 2:
            self.send("error", message="audio must be 16-bit samples: an odd number of bytes was sent")
        elif self.samples + len(data) // 2 > p.MAX_UTTERANCE_S * p.SAMPLE_RATE:
            if not self.too_long:
                self.too_long = True
                self.send("error", message=f"an utterance is at most {p.MAX_UTTERANCE_S:.0f} s: audio dropped "
                                           "until the next reset")
        elif data:
            self.samples += len(data) // 2
            self.recognizer.push(np.frombuffer(data, "<i2").astype(np.int16, copy=False))

    def _partial(self, text: str) -> None:
        self.worker.metrics.transcriptions.labels("partial").inc()
        self.send("partial", text=text, utterance=self.utterance)

    def _final(self, final_id: int, recognizer: Recognizer) -> None:
        """Final `final_id`: the recognizer's coroutine runs as a task of its own (a task cancelled before it
        starts closes its coroutine; one awaited inside a wrapper that never started was left unawaited), and
        `_answered` sends what it found. At most MAX_FINALS_IN_FLIGHT at once: one stream cannot fill the
        engine's queue ahead of every other call's."""
        if self.finals >= p.MAX_FINALS_IN_FLIGHT:
            self.send("error", id=final_id, message=f"at most {p.MAX_FINALS_IN_FLIGHT} finals in flight per "
                                                    "stream: this one was refused")
            return
        self.finals += 1
        task = self.spawn(recognizer.final(), "stt-final")  # the audio is taken now
        task.add_done_callback(functools.partial(self._answered, final_id))

    def _answered(self, final_id: int, task: asyncio.Task[str]) -> None:
        self.finals -= 1
        if task.cancelled():  # the stream closed
            return
        if (exc := task.exception()) is not None:
            log.error("a final transcript failed: %s", type(exc).__name__)
            self.send("error", id=final_id, message=f"transcription failed: {type(exc).__name__}")
            return
        self.worker.metrics.transcriptions.labels("final").inc()
        self.send("final", id=final_id, text=task.result())
