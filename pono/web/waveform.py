"""A recording's waveform for the console: the Ogg Opus file decoded with PyAV, reduced to min/max peaks per
channel, so a browser draws an hour-long call without decoding it. Blocking: call `file_peaks` in a worker
thread. Memory stays bounded however long the call: audio is reduced a second at a time to 10 ms windows
(a 1-hour call keeps 360,000 of them, about 6 MB), and those to the buckets asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

log = logging.getLogger(__name__)

CHANNELS = ("caller", "agent")  # left, right (pono.voice.recording.timeline)
WINDOW_S = 0.01  # the finest resolution kept while decoding


@dataclass(frozen=True)
class Peaks:
    """`buckets` equal slices of `duration_s` seconds of audio; `low[c][i]`, `high[c][i]`: the least and greatest
    sample (-1..1) of channel c (0 caller, 1 agent) in slice i. `sample_rate`: the decoded rate (Hz)."""

    duration_s: float
    sample_rate: int
    low: np.ndarray  # float32 [2, buckets]
    high: np.ndarray  # float32 [2, buckets]

    @property
    def buckets(self) -> int:
        return int(self.low.shape[1])


def _as_float(frame: av.AudioFrame) -> np.ndarray:
    """One decoded frame as float32 [channels, samples] in -1..1 (planar or packed, float or integer)."""
    data = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if not frame.format.is_planar:
        data = data.reshape(-1, channels).T
    if data.dtype.kind == "i":
        data = data.astype(np.float32) / float(np.iinfo(data.dtype).max + 1)
    return data.astype(np.float32, copy=False)


def _stereo(data: np.ndarray) -> np.ndarray:
    """[2, n]: the first two channels; a mono recording gets a silent agent channel."""
    if data.shape[0] >= 2:
        return data[:2]
    return np.vstack([data[0], np.zeros_like(data[0])])


class _Windows:
    """Min/max of each channel per `size`-sample window, fed decoded audio in pieces of any length."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.pending: list[np.ndarray] = []
        self.pending_n = 0
        self.low: list[np.ndarray] = []
        self.high: list[np.ndarray] = []
        self.samples = 0

    def add(self, data: np.ndarray) -> None:
        self.pending.append(data)
        self.pending_n += data.shape[1]
        self.samples += data.shape[1]
        if self.pending_n >= 100 * self.size:  # about a second at a time
            self._reduce(final=False)

    def _reduce(self, *, final: bool) -> None:
        if not self.pending:
            return
        block = np.concatenate(self.pending, axis=1) if len(self.pending) > 1 else self.pending[0]
        whole = block.shape[1] // self.size * self.size
        if whole:
            shaped = block[:, :whole].reshape(2, -1, self.size)
            self.low.append(shaped.min(axis=2))
            self.high.append(shaped.max(axis=2))
        rest = block[:, whole:]
        if final and rest.shape[1]:
            self.low.append(rest.min(axis=1, keepdims=True))
            self.high.append(rest.max(axis=1, keepdims=True))
            rest = rest[:, :0]
        self.pending, self.pending_n = ([rest], rest.shape[1]) if rest.shape[1] else ([], 0)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        self._reduce(final=True)
        if not self.low:
            return np.zeros((2, 0), np.float32), np.zeros((2, 0), np.float32)
        return np.concatenate(self.low, axis=1), np.concatenate(self.high, axis=1)


def reduce_peaks(low: np.ndarray, high: np.ndarray, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Fine min/max windows ([2, n] each) merged into `buckets` equal runs of windows ([2, min(n, buckets)]:
    never more buckets than windows)."""
    n = low.shape[1]
    if n <= buckets:
        return low, high
    edges = np.linspace(0, n, buckets + 1).astype(np.int64)[:-1]  # strictly increasing, as n > buckets
    return np.minimum.reduceat(low, edges, axis=1), np.maximum.reduceat(high, edges, axis=1)


def file_peaks(path: Path, buckets: int) -> Peaks:
    """The peaks of the recording at `path` in at most `buckets` slices (fewer for audio under `buckets` × 10 ms).

    A file cut short (a crashed server's, or one still being written) gives the peaks of what decodes. Raises
    av.error.FFmpegError (or OSError) when the file cannot be opened, ValueError when it holds no audio. An empty
    file (a call whose media never flowed is recorded as nothing) has no peaks and lasts 0 s."""
    if path.stat().st_size == 0:
        empty = np.zeros((2, 0), np.float32)
        return Peaks(0.0, 48_000, empty, empty)
    with av.open(str(path)) as container:
        if not container.streams.audio:
            raise ValueError("the file holds no audio stream")
        stream = container.streams.audio[0]
        rate = int(stream.codec_context.sample_rate or stream.rate or 48_000)
        windows = _Windows(max(1, int(rate * WINDOW_S)))
        try:
            for frame in container.decode(stream):
                if frame.sample_rate and frame.sample_rate != rate:
                    raise ValueError(f"the sample rate changed mid-file ({rate} → {frame.sample_rate} Hz)")
                windows.add(_stereo(_as_float(frame)))
        except (av.error.FFmpegError, EOFError) as exc:  # a truncated tail: keep what decoded
            log.info("recording %s decodes only partly: %s", path.name, type(exc).__name__)
    low, high = reduce_peaks(*windows.finish(), buckets)
    return Peaks(windows.samples / rate, rate, low, high)
