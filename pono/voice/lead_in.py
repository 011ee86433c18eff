"""The caller's audio from before speech is confirmed, kept so an utterance's first word is not clipped."""

from __future__ import annotations

from collections import deque

import numpy as np

from pono.settings import RECORDING_LAG_MIN_S
from pono.transport import FRAME_MS


class LeadIn:
    """The last frames heard while no utterance is under way, and which of them the VAD found voiced.

    `take()` gives what the confirmed utterance starts with: `keep_ms` (the confirming speech and its pre-roll),
    extended back over any voiced frame that ends within `join_ms` of it (and `lead_ms` before that), at most
    `max_ms` in all (or `keep_ms`, when that is longer: a PONO_MIN_SPEECH_MS over 700 ms). A short first word that
    is followed by a gap ("Stop | I need a table") is too short to confirm speech by itself, and was lost when the
    pre-roll did not happen to reach it; a longer pre-roll everywhere instead made Whisper hear phone calls' leading
    noise (a 600 ms pre-roll changed a phone test's transcript). At most 1 s: a recorded call holds the caller's
    audio for redaction from 1 s before speech is confirmed (pono.voice.recording), so a word further back could be
    in a transcript after its audio was written unchecked: `max_ms` is that hold's reach, RECORDING_LAG_MIN_S."""

    def __init__(self, keep_ms: int, join_ms: int = 600, lead_ms: int = 100,
                 max_ms: int = round(RECORDING_LAG_MIN_S * 1000)) -> None:
        self._keep = max(1, keep_ms // FRAME_MS)
        self._join = join_ms // FRAME_MS
        self._lead = lead_ms // FRAME_MS
        self._frames: deque[tuple[np.ndarray, bool]] = deque(maxlen=max(self._keep, max_ms // FRAME_MS))

    def add(self, frame: np.ndarray) -> None:
        self._frames.append((frame, False))

    def mark_voiced(self) -> None:
        """The VAD found the last frame added voiced."""
        if self._frames:
            self._frames[-1] = (self._frames[-1][0], True)

    def take(self) -> list[np.ndarray]:
        """The frames the utterance starts with (see the class), oldest first; forgets all it holds."""
        frames = list(self._frames)
        start = first = max(0, len(frames) - self._keep)  # first: the earliest voiced frame joined so far
        found = True
        while found:
            found = False
            for j in range(first - 1, max(-1, first - 1 - self._join), -1):
                if frames[j][1]:
                    first, found = j, True
                    break
        if first < start:
            start = max(0, first - self._lead)
        self._frames.clear()
        return [frame for frame, _ in frames[start:]]
