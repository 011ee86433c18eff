"""Telling a real interruption from a backchannel or a cough, and resuming after a false one.

While the agent speaks, a caller's "mhm", "yeah, okay" or a cough is not a request to stop. Speech that lasts
long enough to be an interruption pauses the agent's audio at once (`PausableOutput.pause`) while the call's
recognizer hears it: words beyond acknowledgements make it a real interruption (the reply is cut where it
paused); no words, or only acknowledgements, within `FALSE_INTERRUPTION_S` resume the audio where it stopped.
This is LiveKit Agents' false-interruption resume, decided with the words the STT hears as Pipecat's
minimum-words interruption strategy does, not with duration alone.
"""

from __future__ import annotations

import asyncio
import re
from collections import deque
from typing import Any

import numpy as np

from pono.transport import Transport

FALSE_INTERRUPTION_S = 1.5  # no words within this long: the agent goes on
# What a listener says to show they are listening, not to take the turn.
BACKCHANNELS = frozenset({
    "mhm", "mmhmm", "mhmm", "mm", "hmm", "hm", "uh", "uhuh", "uhhuh", "huh", "um", "uhm", "ah", "aah", "ahh",
    "oh", "ooh", "aha", "yeah", "yes", "yep", "yup", "ok", "okay", "right", "sure", "alright", "cool", "great",
    "i", "see", "got", "it", "gotcha", "true", "exactly", "indeed", "nice", "wow",
})
_WORD = re.compile(r"[a-z]+")
_REPEATS = re.compile(r"(.)\1{2,}")  # "ahhhh", "mmmm": a held sound is one word
_MAX_BACKCHANNEL_WORDS = 4


def is_backchannel(text: str) -> bool:
    """Whether a transcript holds no words, or only a short acknowledgement ("mhm", "yeah okay", "I see")."""
    words = [_REPEATS.sub(r"\1\1", w) for w in _WORD.findall(text.lower().replace("-", ""))]
    return len(words) <= _MAX_BACKCHANNEL_WORDS and all(w in BACKCHANNELS for w in words)


class PausableOutput:
    """A call's transport whose outbound audio can pause and resume where it stopped.

    `pause()` drops what the transport has queued but keeps it (the audio after the playout position);
    `resume()` sends that again first, then lets waiting `send_audio` calls go on; `clear()` ends a pause
    and drops everything. The playout clock stays true: `played_s` is the transport's, and `queued_s`
    counts the held audio, so positions taken before a pause are where that audio plays after it.
    Everything else is the transport's own."""

    def __init__(self, transport: Transport, keep_s: float = 8.0) -> None:
        self._transport = transport
        self._keep_s = keep_s
        self._sent: deque[tuple[float, np.ndarray, int]] = deque()  # (start on the playout clock, pcm, rate)
        self._held: list[tuple[np.ndarray, int]] = []
        self._held_s = 0.0
        self._resumed = asyncio.Event()
        self._resumed.set()
        self._pushing: asyncio.Future[None] | None = None  # the transport push under way
        self._stopped: asyncio.Future[None] | None = None  # the push a pause or a clear cancelled
        self._generation = 0  # one more at each clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    @property
    def paused(self) -> bool:
        return not self._resumed.is_set()

    @property
    def held_s(self) -> float:
        """Seconds of audio a pause holds for `resume`."""
        return self._held_s

    @property
    def has_audio(self) -> bool:
        return self._transport.has_audio

    @property
    def played_s(self) -> float:
        return self._transport.played_s

    @property
    def queued_s(self) -> float:
        return self._transport.queued_s + self._held_s

    async def send_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Queue audio for playout; waits while paused (and while the transport's queue is full)."""
        generation = self._generation
        await self._resumed.wait()
        if generation != self._generation:
            return  # cleared meanwhile: this audio belongs to what was interrupted
        await self._send(pcm, sample_rate)

    async def _send(self, pcm: np.ndarray, sample_rate: int) -> None:
        t = self._transport
        self._sent.append((t.played_s + t.queued_s, pcm, sample_rate))
        while self._sent and self._sent[0][0] + self._sent[0][1].size / self._sent[0][2] < t.played_s - self._keep_s:
            self._sent.popleft()
        # A push waits for room frame by frame: a pause must stop one under way, or it goes on filling the
        # queue after the pause cleared it.
        push = self._pushing = asyncio.ensure_future(t.send_audio(pcm, sample_rate))
        try:
            await push
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if self._stopped is push and task is not None and not task.cancelling():
                # Stopped by pause(), which keeps the chunk's unplayed rest for resume(), or by clear().
                await self._resumed.wait()
                return
            raise
        finally:
            if self._pushing is push:
                self._pushing = None

    def pause(self) -> None:
        """Stop the audio now; what was queued and unplayed is kept for `resume`."""
        if self.paused:
            return
        self._resumed.clear()
        played = self._transport.played_s
        if self._pushing is not None:
            self._stopped = self._pushing
            self._pushing.cancel()
        self._transport.clear()
        for start, pcm, rate in self._sent:
            if start + pcm.size / rate <= played:
                continue
            rest = pcm[max(0, round((played - start) * rate)):]
            if rest.size:
                self._held.append((rest, rate))
                self._held_s += rest.size / rate
        self._sent.clear()

    async def resume(self) -> float:
        """Play the held audio, then let the reply go on. Returns the seconds of audio resumed."""
        held, self._held = self._held, []
        resumed_s = sum(pcm.size / rate for pcm, rate in held)
        try:
            for pcm, rate in held:
                self._held_s = max(0.0, self._held_s - pcm.size / rate)
                await self._send(pcm, rate)
        finally:
            self._held_s = 0.0
            self._resumed.set()
        return resumed_s

    def clear(self) -> None:
        """Drop everything queued or held, and end any pause. A push under way stops, and audio whose send
        was waiting is dropped: it belongs to what was interrupted."""
        self._generation += 1
        if self._pushing is not None:
            self._stopped = self._pushing
            self._pushing.cancel()
        self._held, self._held_s = [], 0.0
        self._sent.clear()
        self._transport.clear()
        self._resumed.set()
