"""Both sides of a call on one sample clock, held back until redaction has decided what may be kept.

The caller's 16 kHz frames are the clock: each frame that arrives is one slice of the recording, and the agent's
audio is laid beside it as it would have played (queued audio plays in order, a barge-in drops what is
queued). Nothing leaves the timeline younger than `lag` samples, nor inside a *hold*: a stretch of one channel
whose words are still being transcribed and checked for personal data. A resolved hold adds *spans* that are
replaced (tone or silence) as the audio leaves. A hold older than `cap` samples is released with its channel
silenced: audio nobody could check is not kept. Memory is bounded by `cap` (stereo int16: 4 bytes a sample).
Not thread-safe: used from the event loop only (each call costs microseconds per 20 ms frame).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

RATE = 16_000
CALLER, AGENT = 0, 1  # channel index: left, right
TONE_HZ = 1000.0
TONE_LEVEL = 6000  # int16 peak of the tone that replaces a redacted span


@dataclass
class Hold:
    """A stretch of one channel (`start`..`end` samples; `end` None while still growing) kept back until
    `resolved`. `muted`: released unchecked, silenced."""

    channel: int
    start: int
    end: int | None = None
    text: str | None = None
    turn: int | None = None
    resolved: bool = False
    closed_at: int | None = None  # the timeline position when it got its end (for time-outs)


@dataclass(frozen=True)
class Span:
    """Samples `start`..`end` of `channel` to replace, with "tone" or "silence"."""

    channel: int
    start: int
    end: int
    mode: str


class Timeline:
    def __init__(self, *, lag_s: float = 1.5, cap_s: float = 60.0) -> None:
        if not 0 <= lag_s < cap_s:  # a negative lag, or a cap under it, releases audio before it is checked
            raise ValueError(f"the recording's lag ({lag_s} s) must be at least 0 and less than its cap ({cap_s} s)")
        self.lag = int(lag_s * RATE)
        self.cap = int(cap_s * RATE)
        self.pos = 0  # samples of the call so far
        self.released = 0  # samples handed out by `take`
        self._chunks: deque[np.ndarray] = deque()  # stereo [n, 2] int16 from `released` to `pos`
        self._agent: deque[np.ndarray] = deque()  # agent audio queued to play, 16 kHz mono int16
        self.agent_queued = 0
        self.holds: list[Hold] = []
        self.spans: list[Span] = []
        self.muted_samples = 0  # samples of a channel released silenced because no check came in time

    # -- audio in ------------------------------------------------------------------------------
    def caller(self, frame: np.ndarray) -> None:
        """One caller frame (16 kHz mono int16); the agent's queued audio plays beside it."""
        n = len(frame)
        stereo = np.zeros((n, 2), np.int16)
        stereo[:, CALLER] = frame
        filled = 0
        while filled < n and self._agent:
            head = self._agent[0]
            take = min(n - filled, len(head))
            stereo[filled:filled + take, AGENT] = head[:take]
            if take == len(head):
                self._agent.popleft()
            else:
                self._agent[0] = head[take:]
            filled += take
        self.agent_queued -= filled
        self._chunks.append(stereo)
        self.pos += n

    def agent(self, pcm: np.ndarray) -> None:
        """Agent audio queued to play after what is queued (16 kHz mono int16)."""
        if len(pcm):
            self._agent.append(pcm.astype(np.int16, copy=False))
            self.agent_queued += len(pcm)

    def clear_agent(self) -> None:
        """A barge-in or a pause: the agent's queued audio never plays."""
        self._agent.clear()
        self.agent_queued = 0

    def channel(self, channel: int, start: int, end: int) -> np.ndarray:
        """The samples `start`..`end` of one channel still held (mono int16); what was released is gone."""
        start, end = max(start, self.released), min(end, self.pos)
        if end <= start:
            return np.zeros(0, np.int16)
        held = np.concatenate(list(self._chunks)) if len(self._chunks) > 1 else self._chunks[0]
        if len(self._chunks) > 1:
            self._chunks = deque([held])
        return held[start - self.released:end - self.released, channel].copy()

    # -- holds and spans -----------------------------------------------------------------------
    def hold(self, channel: int, start: int) -> Hold:
        hold = Hold(channel, max(start, self.released))
        self.holds.append(hold)
        return hold

    def redact(self, span: Span) -> None:
        self.spans.append(span)

    # -- audio out -----------------------------------------------------------------------------
    def take(self, *, final: bool = False) -> np.ndarray | None:
        """Stereo int16 [n, 2] that may be written now, spans replaced; None when nothing may. `final`: the
        call is over, everything goes (holds still open are silenced)."""
        open_holds = [h for h in self.holds if not h.resolved]
        if final:
            horizon = self.pos
        else:
            horizon = min([self.pos - self.lag, *(h.start for h in open_holds)])
            horizon = max(horizon, self.pos - self.cap)  # a check is overdue: the cap wins, unchecked audio muted
        if horizon <= self.released:
            return None
        begin = self.released
        out = self._pop(horizon - begin)
        for h in open_holds:
            lo, hi = max(h.start, begin), min(h.end if h.end is not None else horizon, horizon)
            if hi > lo:
                out[lo - begin:hi - begin, h.channel] = 0
                self.muted_samples += hi - lo
        for s in self.spans:
            lo, hi = max(s.start, begin), min(s.end, horizon)
            if hi > lo:
                out[lo - begin:hi - begin, s.channel] = _fill(s.mode, lo, hi)
        self.released = horizon
        self.spans = [s for s in self.spans if s.end > horizon]
        self.holds = [h for h in open_holds if not final and (h.end is None or h.end > horizon)]
        for h in self.holds:
            h.start = max(h.start, horizon)
        return out

    def _pop(self, n: int) -> np.ndarray:
        parts: list[np.ndarray] = []
        while n > 0 and self._chunks:
            head = self._chunks[0]
            if len(head) <= n:
                parts.append(self._chunks.popleft())
                n -= len(head)
            else:
                parts.append(head[:n])
                self._chunks[0] = head[n:]
                n = 0
        return np.concatenate(parts).copy() if parts else np.zeros((0, 2), np.int16)


def _fill(mode: str, start: int, end: int) -> np.ndarray:
    """The replacement for samples `start`..`end`: a 1 kHz tone in phase with the call's clock, or zeros."""
    if mode == "silence":
        return np.zeros(end - start, np.int16)
    t = np.arange(start, end) / RATE
    return (np.sin(2 * np.pi * TONE_HZ * t) * TONE_LEVEL).astype(np.int16)
