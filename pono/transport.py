"""The transport interface: the one seam between a way in (WebRTC, SIP, a phone provider) and the call loop.

Audio in is 16 kHz mono int16 in 20 ms frames (320 samples). Audio out is int16 PCM at any rate; the
transport resamples, queues (bounded) and paces it by the wall clock, and can drop what is queued.
Nothing in `pono.voice` knows which transport it talks to.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Protocol, runtime_checkable

import numpy as np

SAMPLE_RATE = 16_000
FRAME_MS = 20
FRAME_SAMPLES = SAMPLE_RATE * FRAME_MS // 1000


@runtime_checkable
class Transport(Protocol):
    kind: str  # "webrtc", "sip", "twilio", ...

    @property
    def has_audio(self) -> bool:
        """Whether audio we send reaches the caller (False for a text-only call, or audio the caller only
        sends or has set inactive). Read it each time: it may change during a call."""
        ...

    def audio_frames(self) -> AsyncIterator[np.ndarray]:
        """Inbound 20 ms frames of 16 kHz mono int16; ends when the caller's audio ends."""
        ...

    async def send_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Queue int16 mono PCM for playout; waits while the bounded queue is full."""
        ...

    def clear(self) -> None:
        """Drop every queued, unplayed sample now."""
        ...

    @property
    def played_s(self) -> float:
        """Seconds of outbound audio actually sent to the caller since the call began."""
        ...

    @property
    def queued_s(self) -> float:
        """Seconds of outbound audio waiting in the queue."""
        ...

    def text_messages(self) -> AsyncIterator[str]:
        """Inbound text messages (raw strings) from the caller."""
        ...

    def send_text(self, message: dict[str, Any]) -> None:
        """Send one JSON message to the caller without waiting; dropped if the channel is closed."""
        ...

    async def closed(self) -> None:
        """Return when the caller has gone (hang-up, failure)."""
        ...

    async def close(self) -> None:
        """Hang up and free everything the transport holds. Safe to call twice."""
        ...


class TransportWrapper:
    """A transport that is another one (`inner`) in every respect, for wrappers to override a part of it: a
    listen-in tap (`pono.voice.tap`), a pausable output (`pono.voice.interruptions`)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.kind = inner.kind

    @property
    def has_audio(self) -> bool:
        return self.inner.has_audio

    def audio_frames(self) -> AsyncIterator[np.ndarray]:
        return self.inner.audio_frames()

    async def send_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        await self.inner.send_audio(pcm, sample_rate)

    def clear(self) -> None:
        self.inner.clear()

    @property
    def played_s(self) -> float:
        return self.inner.played_s

    @property
    def queued_s(self) -> float:
        return self.inner.queued_s

    def text_messages(self) -> AsyncIterator[str]:
        return self.inner.text_messages()

    def send_text(self, message: dict[str, Any]) -> None:
        self.inner.send_text(message)

    async def closed(self) -> None:
        await self.inner.closed()

    async def close(self) -> None:
        await self.inner.close()
