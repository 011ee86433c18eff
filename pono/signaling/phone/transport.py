"""Phone audio behind the transport interface: the line's own rate in and out (8 kHz for G.711; a media
stream in L16 may be 16 kHz or more), resampled once each way."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np

from pono.signaling.audio_out import PacedAudioTrack, Resampler
from pono.transport import FRAME_SAMPLES, SAMPLE_RATE

_INBOUND_FRAMES = 250  # 5 s: if the call loop stalls longer, the oldest audio goes


class PhoneTransport:
    """The shared half of SIP and media-stream calls: frames in, a paced queue out, DTMF as messages.

    `out` is paced at the line's rate (`out.rate`: 8000 for G.711), which is also the rate receive_audio takes.
    `on_clear` tells the provider to drop what it buffered (Twilio's `clear`); `on_close` ends the call on the
    wire (SIP BYE, closing the websocket)."""

    def __init__(self, kind: str, out: PacedAudioTrack, on_close: Callable[[], Awaitable[None]],
                 on_clear: Callable[[], None] | None = None) -> None:
        self.kind = kind
        self.out = out
        self._on_close = on_close
        self._on_clear = on_clear
        self._frames: asyncio.Queue[np.ndarray | None] = asyncio.Queue(_INBOUND_FRAMES)
        self._texts: asyncio.Queue[str | None] = asyncio.Queue(100)
        self._up = Resampler(SAMPLE_RATE)
        self.rate = out.rate  # the line's sample rate, both ways
        self._down = Resampler(out.rate)
        self._pending = np.zeros(0, np.int16)
        self._closed = asyncio.Event()
        self._closing: asyncio.Future[None] | None = None

    # -- fed by the wire --------------------------------------------------------------------------
    def receive_audio(self, pcm: np.ndarray) -> None:
        """int16 mono samples heard on the line, at its rate (`rate`)."""
        self._pending = np.concatenate([self._pending, self._up(pcm, self.rate)])
        while self._pending.size >= FRAME_SAMPLES:
            frame, self._pending = self._pending[:FRAME_SAMPLES], self._pending[FRAME_SAMPLES:]
            if self._frames.full():
                self._frames.get_nowait()
            self._frames.put_nowait(frame)

    def receive_dtmf(self, digit: str) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self._texts.put_nowait(json.dumps({"type": "dtmf", "digit": digit}))

    def ended(self) -> None:
        """The far end hung up."""
        self._closed.set()
        for queue in (self._frames, self._texts):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)

    # -- the transport interface ------------------------------------------------------------------
    @property
    def has_audio(self) -> bool:
        return True

    async def audio_frames(self) -> AsyncIterator[np.ndarray]:
        while (frame := await self._frames.get()) is not None:
            yield frame

    async def send_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        if not self._closed.is_set():
            await self.out.push(self._down(pcm, sample_rate))

    def clear(self) -> None:
        self.out.clear()
        self._down.reset()
        if self._on_clear is not None:
            self._on_clear()

    @property
    def played_s(self) -> float:
        return self.out.played_s

    @property
    def queued_s(self) -> float:
        return self.out.queued_s

    async def text_messages(self) -> AsyncIterator[str]:
        while (text := await self._texts.get()) is not None:
            yield text

    def send_text(self, message: dict[str, Any]) -> None:
        pass  # a phone has no data channel; operators and storage see the same events anyway

    async def closed(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        # Once, whoever ended it. The wire-side teardown (BYE, freeing the media) runs as its own task:
        # the end_call tool's task that asked for it is cancelled as soon as the call loop sees the end.
        if self._closing is None:
            self.ended()
            self._closing = asyncio.ensure_future(self._on_close())
        await asyncio.shield(self._closing)
