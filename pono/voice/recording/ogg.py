"""Stereo Opus in Ogg, written as the call goes (PyAV/libopus): never the whole call in memory.

The muxer closes an Ogg page every `page_s` and each write is flushed to the file, so a process killed
mid-call leaves a file that decodes up to its last page. Blocking: call every method from one worker thread.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np

RATE = 16_000
CODEC = "opus"
BITRATE = 32_000  # both channels together: speech, not music


class OggOpusWriter:
    """Writes 16 kHz stereo int16 [n, 2] chunks to `path` (created, with its folder). Raises OSError when the
    file cannot be created, av.error.FFmpegError when libopus is missing."""

    def __init__(self, path: Path, *, page_s: float = 0.5) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file: BinaryIO = path.open("wb")
        self._container = av.open(self._file, mode="w", format="ogg",
                                  options={"page_duration": str(int(page_s * 1_000_000))})
        self._stream = self._container.add_stream("libopus", rate=RATE, layout="stereo")
        self._stream.bit_rate = BITRATE
        self.samples = 0  # per channel, written so far
        self.closed = False

    def write(self, stereo: np.ndarray) -> None:
        """Encode one chunk ([n, 2] int16) and flush what the muxer has paged to disk."""
        if self.closed or not len(stereo):
            return
        frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(stereo, np.int16).reshape(1, -1), format="s16",
                                           layout="stereo")
        frame.sample_rate = RATE
        frame.pts = self.samples
        self.samples += len(stereo)
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        self._file.flush()

    def close(self) -> None:
        """Flush the encoder, write the last page and close the file. Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            for packet in self._stream.encode(None):
                self._container.mux(packet)
            self._container.close()
        finally:
            self._file.close()

    @property
    def duration_s(self) -> float:
        return self.samples / RATE


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, SHA-256 hex) of a file, read in 1 MiB pieces. Blocking."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
            size += len(block)
    return size, digest.hexdigest()


def salvage(path: Path) -> float:
    """Make a recording whose writer was killed a clean prefix: cut off a trailing partial Ogg page, and return
    the seconds of audio its complete pages hold (the last granule position, 48 kHz in Ogg Opus, less the
    pre-skip). Reads page headers only. Blocking. Raises OSError; a file that is no Ogg at all gives 0.0."""
    size = path.stat().st_size
    good = granule = pre_skip = 0
    with path.open("r+b") as f:
        while True:
            f.seek(good)
            head = f.read(27)
            if len(head) < 27 or head[:4] != b"OggS":
                break
            table = f.read(head[26])
            end = good + 27 + len(table) + sum(table)
            if len(table) < head[26] or end > size:
                break
            if good == 0:
                first = f.read(19)  # OpusHead: magic, version, channels, pre-skip (u16 LE), ...
                pre_skip = int.from_bytes(first[10:12], "little") if first[:8] == b"OpusHead" else 0
            position = int.from_bytes(head[6:14], "little", signed=True)
            if position >= 0:  # -1: no packet ends on this page
                granule = position
            good = end
        if good < size:
            f.truncate(good)
    return max(0, granule - pre_skip) / 48_000
