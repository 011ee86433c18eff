"""One process's transcription queue: final transcripts first, partials only when the engine is idle, and
requests that arrive together run as one batch.

Rules (issue 12; Pipecat's system-frame priority is the same idea):
- a final transcript (the end of a caller's turn, or the speculative one at its first pause) goes before every
  partial of every call;
- a partial is dropped, never queued, when the engine is busy: a late partial is worthless, and a queue of them
  is what made finals wait;
- requests that arrive within `batch_window_s` of the first one (or that queued while a batch ran) go to
  Whisper as one batch of at most `max_batch`.
One thread runs Whisper: on a small CPU two Whispers at once are slower than one after the other.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from pono.voice.speech.whisper import BatchedWhisper, Clip, Hypothesis

log = logging.getLogger(__name__)


def default_max_batch(device: str) -> int:
    """Clips per batch when none is configured: 16 on CUDA; 1 on a CPU. On 2 CPU cores a batch of three
    Whisper tiny.en finals took 0.89 s against 3 x 0.33 s one after another: the same work, but every call
    waits for the last (bench/latency.py, 3 concurrent calls: median 1.69 s batched, 1.22 s unbatched)."""
    return 16 if device == "cuda" else 1


@dataclass
class BatchStats:
    """What one batch was: its kind ("final" or "partial"), how many clips, and seconds in Whisper."""

    kind: str
    size: int
    seconds: float


@dataclass
class _Request:
    clip: Clip
    future: asyncio.Future[Hypothesis]
    queued_at: float = field(default_factory=time.monotonic)


class TranscriptionEngine:
    """Async front of a `BatchedWhisper` shared by every call of a process (or of a speech worker).

    `transcribe(clip, final=True)` always answers; `final=False` returns None at once when the engine is busy.
    `on_batch` sees every batch (for metrics). Errors from Whisper reach the awaiting callers."""

    def __init__(self, whisper: BatchedWhisper, *, batch_window_s: float = 0.02, max_batch: int = 8,
                 on_batch: Callable[[BatchStats], None] | None = None) -> None:
        self.whisper = whisper
        self.batch_window_s = max(0.0, batch_window_s)
        self.max_batch = max(1, max_batch)
        self.on_batch = on_batch
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="stt")
        self._finals: deque[_Request] = deque()
        self._partials: list[_Request] = []
        self._runner: asyncio.Task[None] | None = None
        self.running = 0  # clips in Whisper now
        self.dropped_partials = 0

    @property
    def queue_depth(self) -> int:
        """Clips waiting for Whisper (finals queued plus partials collected)."""
        return len(self._finals) + len(self._partials)

    @property
    def busy(self) -> bool:
        return self.running > 0 or bool(self._finals)

    async def transcribe(self, clip: Clip, *, final: bool = True) -> Hypothesis | None:
        """Transcribe one clip. A partial (`final=False`) is None when it was dropped."""
        loop = asyncio.get_running_loop()
        if not final and (self.busy or len(self._partials) >= self.max_batch):
            self.dropped_partials += 1
            return None
        request = _Request(clip, loop.create_future())
        (self._finals.append if final else self._partials.append)(request)
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="stt-engine")
        return await request.future  # a caller that gives up cancels it, and the batch skips it

    async def _run(self) -> None:
        if self.batch_window_s:
            await asyncio.sleep(self.batch_window_s)  # let calls that need a transcript now join this batch
        while self._finals or self._partials:
            if self._finals:
                batch = [self._finals.popleft() for _ in range(min(self.max_batch, len(self._finals)))]
                kind = "final"
            else:
                batch, self._partials = self._partials[:self.max_batch], self._partials[self.max_batch:]
                kind = "partial"
            batch = [r for r in batch if not r.future.done()]  # a caller that hung up no longer waits
            for window in sorted({r.clip.window_s for r in batch}):
                await self._run_batch(kind, [r for r in batch if r.clip.window_s == window])

    async def _run_batch(self, kind: str, batch: list[_Request]) -> None:
        started = time.perf_counter()
        self.running = len(batch)
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._pool, self.whisper.transcribe_batch, [r.clip for r in batch])
        except Exception as exc:
            if len(batch) > 1:  # one bad clip (a language Whisper lacks) must not fail other calls' clips
                self.running = 0
                for r in batch:
                    await self._run_batch(kind, [r])
                return
            log.error("whisper failed on a clip: %s", type(exc).__name__)
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        finally:
            self.running = 0
        for r, hypothesis in zip(batch, results, strict=True):
            if not r.future.done():
                r.future.set_result(hypothesis)
        if self.on_batch is not None:
            self.on_batch(BatchStats(kind, len(batch), time.perf_counter() - started))

    def close(self) -> None:
        for r in [*self._finals, *self._partials]:
            if not r.future.done():
                r.future.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)
