"""Listen-in: a transport wrapper that copies both sides of a call's audio to whoever listens.

The call loop sees an ordinary transport; taps see the caller's 16 kHz frames as they arrive and the
agent's audio as it is queued, and hear the queue dropped on barge-in.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

import numpy as np

from pono.transport import Transport, TransportWrapper


class AudioTap(Protocol):
    def caller_audio(self, frame: np.ndarray) -> None: ...

    def agent_audio(self, pcm: np.ndarray, sample_rate: int) -> None: ...

    def agent_cleared(self) -> None: ...


class TappedTransport(TransportWrapper):
    """`inner`, with its caller audio, agent audio and clears copied to `taps`."""

    def __init__(self, inner: Transport) -> None:
        super().__init__(inner)
        self.taps: set[AudioTap] = set()

    async def audio_frames(self) -> AsyncIterator[np.ndarray]:  # type: ignore[override]
        async for frame in self.inner.audio_frames():
            for tap in list(self.taps):
                tap.caller_audio(frame)
            yield frame

    async def send_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        for tap in list(self.taps):
            tap.agent_audio(pcm, sample_rate)
        await self.inner.send_audio(pcm, sample_rate)

    def clear(self) -> None:
        for tap in list(self.taps):
            tap.agent_cleared()
        self.inner.clear()
