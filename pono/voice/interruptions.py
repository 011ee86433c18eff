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

import numpy as np

from pono.transport import Transport, TransportWrapper

FALSE_INTERRUPTION_S = 1.5  # no words within this long: the agent goes on
_PIECE_S = 0.1  # held audio is resumed in pieces this long, so queued_s stays true to within one
# What a listener says to show they are listening, not to take the turn: single words, and phrases that are
# acknowledgements only whole ("I see", "got it"; "I" or "it" alone start a sentence). "Huh?" is not here: it
# asks the agent to say it again.
BACKCHANNEL_WORDS = frozenset({
    "mhm", "mmhm", "mmhmm", "mhmm", "mm", "hmm", "hm", "uhhuh", "uhuh", "um", "uhm", "uh", "ah", "aah", "ahh",
    "oh", "ooh", "aha", "yeah", "yes", "yep", "yup", "ok", "okay", "right", "sure", "alright", "cool", "great",
    "gotcha", "true", "exactly", "indeed", "nice", "wow", "perfect", "thanks", "fine", "good", "ha", "haha", "hehe",
})
# What Whisper writes for a held vowel or a laugh with no word in it (espeak's "Aaaaah" came back as "Ah ah ah", "I",
# "I-I-I-", "A-A-A-" and "Ha ha ha" depending on where the audio started): sounds, counted as acknowledgements are.
# "I" alone is no request, and a caller who goes on ("I think...") is heard again 600 ms on; a single "A", "E" or
# "O" may be an answer or a letter spelled, so only held ones ("A-A-A", "Aaa") are sounds. Not "eh?": it asks.
VOCAL_SOUNDS = frozenset({"i", "ii", "aa", "ee", "oo", "er", "erm", "hah", "heh"})
BACKCHANNEL_PHRASES = frozenset({
    ("i", "see"), ("got", "it"), ("all", "right"), ("thank", "you"), ("uh", "huh"), ("mm", "hm"), ("mhm", "hm"),
    ("i", "know"), ("that's", "right"), ("sounds", "good"), ("makes", "sense"), ("of", "course"),
})
_WORD = re.compile(r"[^\W_]+(?:'[^\W_]+)?")  # letters of any script and digits: "4 5 6" are words
_REPEATS = re.compile(r"(.)\1{2,}")  # a letter held three times or more: "ahhhh", "mmmm", "Nooo"
_MAX_BACKCHANNEL_WORDS = 4
_ACKNOWLEDGING = BACKCHANNEL_WORDS | VOCAL_SOUNDS | {w for phrase in BACKCHANNEL_PHRASES for w in phrase}


def _spelled(word: str, vocabulary: frozenset[str]) -> str:
    """`word` as `vocabulary` spells it when it is one of its words held longer (a held letter once or twice:
    "Nooo" no, "okaaay" okay, "sorrry" sorry, "I-I-I" i); otherwise with each held letter written twice."""
    for form in (word, _REPEATS.sub(r"\1", word)):
        if form in vocabulary:
            return form
    return _REPEATS.sub(r"\1\1", word)


def is_backchannel(text: str) -> bool:
    """Whether a transcript holds no words, or only a short acknowledgement ("mhm", "yeah okay", "I see",
    "Mm-hm", "All right, thank you"): at most `_MAX_BACKCHANNEL_WORDS` words (a word said again at once counts
    once), each an acknowledgement word or part of an acknowledgement phrase; or only vowel sounds ("I",
    "A-A-A-": VOCAL_SOUNDS)."""
    words = [_spelled(w, _ACKNOWLEDGING) for w in _WORD.findall(text.lower().replace("-", ""))]
    words = [w for i, w in enumerate(words) if i == 0 or w != words[i - 1]]  # "ah ah ah ah ah" is one sound
    if len(words) > _MAX_BACKCHANNEL_WORDS:
        return False
    i = 0
    while i < len(words):
        if tuple(words[i:i + 2]) in BACKCHANNEL_PHRASES:
            i += 2
        elif words[i] in BACKCHANNEL_WORDS or words[i] in VOCAL_SOUNDS:
            i += 1
        else:
            return False
    return True


# Words that ask a talking agent to stop. Speech over the agent too short to pause it for (under
# PONO_BARGE_IN_MIN_MS) interrupts only with one of them: anything else that short is more often a noise Whisper
# made a word of than a turn.
STOP_REQUESTS = frozenset({
    "stop", "wait", "no", "nope", "hold", "hang", "sorry", "pardon", "excuse", "hello", "hey", "pause", "quiet",
    "enough", "cancel", "listen", "actually", "but", "what", "operator", "agent", "human", "repeat", "again",
})


def is_stop_request(text: str) -> bool:
    """Whether a short transcript asks the agent to stop ("Stop.", "Wait!", "Sorry?", "Hold on", "Nooo!"): one of
    its words is in STOP_REQUESTS, held letters aside as in `is_backchannel`."""
    return any(_spelled(w, STOP_REQUESTS) in STOP_REQUESTS for w in _WORD.findall(text.lower()))


class PausableOutput(TransportWrapper):
    """A call's transport whose outbound audio can pause and resume where it stopped.

    `pause()` drops what the transport has queued but keeps it (the audio after the playout position);
    `resume()` sends that again first, then lets waiting `send_audio` calls go on; a `pause()` during a resume
    stops it and holds again what it had not played; `clear()` ends a pause and drops everything. The playout
    clock stays true: `played_s` is the transport's, and `queued_s` counts the held audio (to within one
    `_PIECE_S` piece while a resume pushes it), so positions taken before a pause are where that audio plays
    after it. The rest of the transport interface (`pono.transport.Transport`) is the transport's own."""

    def __init__(self, transport: Transport, keep_s: float = 8.0) -> None:
        super().__init__(transport)
        self._keep_s = keep_s
        self._sent: deque[tuple[float, np.ndarray, int]] = deque()  # (start on the playout clock, pcm, rate)
        self._held: deque[tuple[np.ndarray, int]] = deque()  # in playout order, in pieces of at most _PIECE_S
        self._held_s = 0.0
        self._paused = False
        self._resumed = asyncio.Event()  # set while audio may flow: not paused, and no resume pushing held audio
        self._resumed.set()
        self._pushing: asyncio.Future[None] | None = None  # the transport push under way
        self._stopped: asyncio.Future[None] | None = None  # the push a pause or a clear cancelled
        self._generation = 0  # one more at each clear()
        self._resumes = 0  # one more at each resume(): an earlier one that a pause stopped does not go on

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def held_s(self) -> float:
        """Seconds of audio a pause holds for `resume`."""
        return self._held_s

    @property
    def queued_s(self) -> float:
        return self.inner.queued_s + self._held_s

    async def send_audio(self, pcm: np.ndarray, sample_rate: int) -> None:
        """Queue audio for playout; waits while paused (and while the transport's queue is full)."""
        generation = self._generation
        await self._resumed.wait()
        if generation != self._generation:
            return  # cleared meanwhile: this audio belongs to what was interrupted
        await self._send(pcm, sample_rate)

    async def _send(self, pcm: np.ndarray, sample_rate: int, resuming: bool = False) -> None:
        t = self.inner
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
                if not resuming:
                    await self._resumed.wait()
                return
            raise
        finally:
            if self._pushing is push:
                self._pushing = None

    def pause(self) -> None:
        """Stop the audio now; what was queued and unplayed is kept for `resume` (before what a resume under
        way had still to send)."""
        if self._paused:
            return
        self._paused = True
        self._resumed.clear()
        played = self.inner.played_s
        if self._pushing is not None:
            self._stopped = self._pushing
            self._pushing.cancel()
        self.inner.clear()
        unplayed: list[tuple[np.ndarray, int]] = []
        for start, pcm, rate in self._sent:
            if start + pcm.size / rate > played:
                rest = pcm[max(0, round((played - start) * rate)):]
                step = max(1, round(_PIECE_S * rate))
                unplayed.extend((rest[i:i + step], rate) for i in range(0, rest.size, step))
        self._sent.clear()
        self._held.extendleft(reversed(unplayed))
        self._held_s = sum(pcm.size / rate for pcm, rate in self._held)

    async def resume(self) -> float:
        """Play the held audio, then let the reply go on. Returns the seconds of audio resumed (less when a new
        pause stops it; nothing when not paused)."""
        if not self._paused:
            return 0.0
        self._paused = False
        self._resumes += 1
        mine, generation, resumed_s = self._resumes, self._generation, 0.0

        def still_mine() -> bool:  # not paused again, cleared, or taken over by a later resume
            return not self._paused and generation == self._generation and mine == self._resumes

        while self._held and still_mine():
            pcm, rate = self._held.popleft()
            self._held_s = max(0.0, self._held_s - pcm.size / rate)  # it is the transport's queue's from here
            resumed_s += pcm.size / rate
            await self._send(pcm, rate, resuming=True)
        if still_mine():  # a pause meanwhile holds again what this had not played
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
        self._held.clear()
        self._held_s = 0.0
        self._paused = False
        self._sent.clear()
        self.inner.clear()
        self._resumed.set()
