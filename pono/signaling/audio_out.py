"""Outbound audio for WebRTC: a bounded 48 kHz queue that aiortc pulls from, paced by the wall clock."""

from __future__ import annotations

import asyncio
import fractions
import time
from collections import deque

import av
import numpy as np
from aiortc import MediaStreamTrack

OUT_RATE = 48_000
OUT_FRAME = OUT_RATE // 50  # 20 ms


def int16_frame(pcm: np.ndarray, rate: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm, dtype=np.int16).reshape(1, -1),
                                       format="s16", layout="mono")
    frame.sample_rate = rate
    return frame


class Resampler:
    """PyAV resampling of int16 mono PCM to a fixed rate; rebuilt when the input rate changes."""

    def __init__(self, out_rate: int) -> None:
        self.out_rate = out_rate
        self._in_rate = 0
        self._resampler: av.AudioResampler | None = None

    def __call__(self, pcm: np.ndarray, in_rate: int) -> np.ndarray:
        if in_rate == self.out_rate:
            return pcm.astype(np.int16, copy=False)
        if self._resampler is None or in_rate != self._in_rate:
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=self.out_rate)
            self._in_rate = in_rate
        frames = self._resampler.resample(int16_frame(pcm, in_rate))
        if not frames:
            return np.zeros(0, np.int16)
        return np.concatenate([f.to_ndarray().reshape(-1) for f in frames])

    def reset(self) -> None:
        self._resampler = None


class PacedAudioTrack(MediaStreamTrack):
    """An audio track whose recv() hands out one 20 ms frame per 20 ms of wall clock.

    Silence is sent when nothing is queued, so the caller's jitter buffer stays primed.
    """

    kind = "audio"

    def __init__(self, max_queue_s: float = 4.0, rate: int = OUT_RATE) -> None:
        super().__init__()
        self.rate = rate
        self.frame_samples = rate // 50
        self._time_base = fractions.Fraction(1, rate)
        self._frames: deque[np.ndarray] = deque()
        self._max_frames = int(max_queue_s * 50)
        self._space = asyncio.Event()
        self._space.set()
        self._start: float | None = None
        self._sent = 0  # frames handed to aiortc, silence included
        self.played_frames = 0  # frames of real audio handed to aiortc

    @property
    def queued_s(self) -> float:
        return len(self._frames) * 0.02

    @property
    def played_s(self) -> float:
        return self.played_frames * 0.02

    async def push(self, pcm48: np.ndarray) -> None:
        """Queue int16 samples at the track's rate, waiting while the queue is full.

        The tail is padded to a whole frame: a chunk is a clause of speech, and 20 ms of silence after
        it is inaudible, while holding it back would swallow the end of the last word.
        """
        n = self.frame_samples
        whole = -(-pcm48.size // n)
        padded = np.zeros(whole * n, np.int16)
        padded[: pcm48.size] = pcm48
        for i in range(whole):
            while len(self._frames) >= self._max_frames:
                self._space.clear()
                await self._space.wait()
            self._frames.append(padded[i * n:(i + 1) * n])

    def clear(self) -> None:
        self._frames.clear()
        self._space.set()

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            from aiortc.mediastreams import MediaStreamError

            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            wait = self._start + self._sent * 0.02 - now
            if wait > 0:
                await asyncio.sleep(wait)
            elif wait < -0.2:
                # We fell far behind (a stalled loop): re-anchor instead of bursting catch-up audio.
                self._start = now - self._sent * 0.02
        frame = int16_frame(self._next_samples(), self.rate)
        frame.pts = self._sent * self.frame_samples
        frame.time_base = self._time_base
        self._sent += 1
        return frame

    def _next_samples(self) -> np.ndarray:
        if self._frames:
            self.played_frames += 1
            self._space.set()
            return self._frames.popleft()
        return np.zeros(self.frame_samples, np.int16)
