"""Streaming recognition for one call: 20 ms frames in, partial transcripts while the caller speaks, and the
final transcript of the turn on demand.

Partials follow the LocalAgreement-2 policy of whisper_streaming (Macháček, Dabre and Bojar, "Turning Whisper
into Real-Time Transcription System", 2023): each partial transcribes the window of audio not yet committed;
the words two consecutive hypotheses agree on are committed; once the window is longer than `trim_after_s`,
the audio behind the last fully committed segment is trimmed and its words move to the done text, which
conditions later windows as Whisper's prompt. The window stays bounded, so the work per partial stays bounded
however long the caller talks. A final is the done text plus one transcription of the window, at final
priority (asked again without the prompt when it leaves out what the partials heard there); a window too long for
Whisper (partials were off or dropped) is cut into pieces first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import re
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

import numpy as np
from rapidfuzz.distance import LCSseq

from pono.voice.speech.whisper import MAX_CLIP_S, SAMPLE_RATE, Clip, Hypothesis

Transcribe = Callable[..., Awaitable[Hypothesis | None]]  # (clip, *, final: bool) -> Hypothesis | None
_PROMPT_CHARS = 200  # whisper_streaming conditions on about this much of the committed text
_PIECE_S = 25.0  # a final longer than Whisper's 30 s is transcribed in pieces of at most this long
_MIN_FINAL_S = 0.1  # less audio than this is no word
_RETRY_S = 0.1  # after a dropped partial, wait this much new audio before asking again
# A prompted final that leaves out more than this share (and more than _MISSED_WORDS) of the words the partials heard
# in its window is asked again without the prompt.
_MISSED_SHARE = 0.25
_MISSED_WORDS = 2
_WORD = re.compile(r"[^\w']+")


class Recognizer(Protocol):
    """The streaming recognizer a call talks to, local (`StreamingRecognizer`) or on a speech worker.

    `push` takes 16 kHz int16 frames of the current utterance; `final` returns its transcript so far without
    ending it (a speculative final at a pause may be followed by more speech); `reset` starts a new utterance.
    `partials` says whether partial transcripts are wanted right now."""

    partials: bool

    def push(self, pcm: np.ndarray) -> None: ...

    def final(self) -> Coroutine[Any, Any, str]:
        """The utterance's transcript so far: its audio is taken when this is called, not when awaited."""

    def reset(self) -> None: ...

    def close(self) -> None: ...


def _norm(word: str) -> str:
    return _WORD.sub("", word.lower())


def encoder_window(seconds: float, least_s: float, margin_s: float = 3.0) -> float:
    """Whisper's encoder window for a clip of `seconds`: at least `least_s`, and the clip plus `margin_s`
    rounded up to 5 s, at most 30 s (Whisper's own). The encoder's cost grows with the window, and a clip
    padded to 30 s pays for 30 s. On espeak questions and one-word answers a 20 s window transcribed as well
    as 30 s (tiny.en and base, word error rate equal or lower) at half the cost; 15 s and 10 s made base
    mishear more short answers (`bench/speech.py --fidelity`).
    """
    return float(min(MAX_CLIP_S, max(least_s, 5 * math.ceil((seconds + margin_s) / 5))))


def agreed_prefix(a: list[str], b: list[str]) -> int:
    """How many leading words two hypotheses share, ignoring case and punctuation."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if _norm(x) != _norm(y):
            break
        n += 1
    return n


def words_in_common(a: list[str], b: list[str]) -> int:
    """How many words of `a` are in `b` in the same order, ignoring case and punctuation: the length of their
    longest common subsequence of words (rapidfuzz's LCSseq; a word left out or misheard in `b` does not count)."""
    return int(LCSseq.similarity([_norm(w) for w in a], [_norm(w) for w in b]))


def leaves_out(said: list[str], text: list[str]) -> bool:
    """Whether `text` leaves out more than a quarter, and more than two, of the words `said`: a word or two heard
    differently is no reason to transcribe again."""
    missed = len(said) - words_in_common(said, text)
    return missed > max(_MISSED_WORDS, _MISSED_SHARE * len(said))


class StreamingRecognizer:
    """LocalAgreement-2 streaming over a `transcribe(clip, final=...)` function (a `TranscriptionEngine`).

    `on_partial(text)` gets each new partial (the whole utterance so far); `spawn(coro, name)` runs the
    partial tasks (the call's task set, so they end with the call). Partials are asked for every
    `partial_interval_s` of new audio (0: never) with an encoder window of at least `partial_window_s`."""

    def __init__(self, transcribe: Transcribe, *, language: str = "en", partial_interval_s: float = 1.0,
                 on_partial: Callable[[str], None] | None = None,
                 spawn: Callable[[Any, str], asyncio.Task[Any]] | None = None,
                 partial_window_s: float = 10.0, final_window_s: float = 20.0, trim_after_s: float = 8.0,
                 max_window_s: float = 20.0) -> None:
        self._transcribe = transcribe
        self.language = language
        self.partial_interval_s = partial_interval_s
        self.on_partial = on_partial
        self._spawn = spawn or (lambda coro, name: asyncio.create_task(coro, name=name))
        self.partial_window_s = partial_window_s
        self.final_window_s = final_window_s
        self.trim_after_s = trim_after_s
        self.max_window_s = min(max_window_s, _PIECE_S)
        self.partials = True
        self.partials_done = 0  # partial updates delivered (for tests and benchmarks)
        self._partial_task: asyncio.Task[None] | None = None
        self.reset()

    # -- the utterance ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Start a new utterance: forget the audio and the words of the last one."""
        self._generation = getattr(self, "_generation", 0) + 1
        self._chunks: list[np.ndarray] = []
        self._samples = 0  # in the window
        self._done: list[str] = []  # words whose audio was trimmed away
        self._committed: list[str] = []  # agreed words whose audio is still in the window
        self._previous: list[str] = []  # the last hypothesis's words after the committed ones
        self._since_partial = 0  # samples pushed since the last partial was asked for

    def push(self, pcm: np.ndarray) -> None:
        self._chunks.append(pcm)
        self._samples += pcm.size
        self._since_partial += pcm.size
        if (self.partials and self.on_partial is not None and self.partial_interval_s > 0
                and self._since_partial >= self.partial_interval_s * SAMPLE_RATE
                and (self._partial_task is None or self._partial_task.done())):
            self._since_partial = 0
            self._partial_task = self._spawn(self._partial(), "stt-partial")

    def _window(self) -> np.ndarray:
        if len(self._chunks) != 1:
            self._chunks = [np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.int16)]
        return self._chunks[0]

    def _prompt(self, words: list[str]) -> str:
        return " ".join(words)[-_PROMPT_CHARS:]

    @property
    def window_s(self) -> float:
        """Seconds of audio not yet trimmed (bounded by `max_window_s` while partials run)."""
        return self._samples / SAMPLE_RATE

    # -- partials ---------------------------------------------------------------------------------
    async def _partial(self) -> None:
        generation, audio = self._generation, self._window()
        clip = Clip(audio, self._prompt(self._done), timestamps=True, language=self.language,
                    window_s=encoder_window(audio.size / SAMPLE_RATE, self.partial_window_s, margin_s=0.5))
        hypothesis = await self._transcribe(clip, final=False)
        if generation != self._generation:
            return  # a new utterance began meanwhile
        if hypothesis is None:  # dropped: the engine is busy with finals or other calls' partials
            self._since_partial = max(self._since_partial, int((self.partial_interval_s - _RETRY_S) * SAMPLE_RATE))
            return
        self._agree(hypothesis, audio.size)
        self.partials_done += 1
        text = " ".join(self._done + self._committed + self._previous)
        if text and self.on_partial is not None:
            self.on_partial(text)

    def _agree(self, hypothesis: Hypothesis, samples: int) -> None:
        """LocalAgreement-2: commit what this hypothesis and the last agree on; trim the window behind it."""
        words = hypothesis.text.split()
        tail = words[len(self._committed):]
        agreed = agreed_prefix(tail, self._previous)
        self._committed += tail[:agreed]
        self._previous = tail[agreed:]
        seconds = samples / SAMPLE_RATE
        if seconds <= self.trim_after_s:
            return
        cut_s, cut_words = 0.0, 0
        counted = 0
        for segment in hypothesis.segments[:-1]:  # the last segment may be unfinished
            counted += len(segment.text.split())
            if counted > len(self._committed):
                break
            cut_s, cut_words = segment.end_s, counted
        if not cut_words and seconds >= self.max_window_s:
            # Nothing agreed at a segment end in a window this long: commit the finished segments (or, with no
            # timestamps at all, the whole hypothesis) so the window cannot outgrow Whisper's 30 s.
            finished = hypothesis.segments[:-1] or hypothesis.segments
            cut_s = finished[-1].end_s if finished and finished[-1].end_s > 0 else seconds
            cut_words = sum(len(s.text.split()) for s in finished) if finished else len(words)
            self._committed = words[:max(cut_words, len(self._committed))]
            self._previous = words[len(self._committed):]
        if cut_words and cut_s > 0:
            self._done += self._committed[:cut_words]
            self._committed = self._committed[cut_words:]
            self._trim(int(cut_s * SAMPLE_RATE))

    def _trim(self, samples: int) -> None:
        window = self._window()
        samples = min(samples, window.size)
        self._chunks = [window[samples:]]
        self._samples = window.size - samples

    # -- finals -----------------------------------------------------------------------------------
    def final(self) -> Coroutine[Any, Any, str]:
        """The transcript of the utterance so far, at final priority. The audio is taken now, so a `reset` or
        more `push`es right after do not change it; the utterance goes on (see `reset`)."""
        return self._final(list(self._done), self._window(), list(self._committed), list(self._previous))

    async def _final(self, words: list[str], audio: np.ndarray, agreed: list[str], previous: list[str]) -> str:
        # What the last partial heard in the window, agreed words first; its last word may be cut off mid-way.
        heard = agreed + previous[:-1]
        while audio.size > MAX_CLIP_S * SAMPLE_RATE:
            piece = audio[:int(_PIECE_S * SAMPLE_RATE)]
            hypothesis = await self._final_of(Clip(piece, self._prompt(words), timestamps=True,
                                                   language=self.language))
            finished = hypothesis.segments[:-1]
            if finished and finished[-1].end_s >= 5.0:  # cut between segments, not inside a word
                cut = int(finished[-1].end_s * SAMPLE_RATE)
                words += " ".join(s.text for s in finished).split()
            else:
                cut = piece.size
                words += hypothesis.text.split()
            audio = audio[cut:]
            agreed = heard = []  # the partials' words were of the window's start, which is cut now
        if audio.size < _MIN_FINAL_S * SAMPLE_RATE:  # nothing (left) to hear: no Whisper call for a click
            return " ".join(words)
        clip = Clip(audio, self._prompt(words), language=self.language,
                    window_s=encoder_window(audio.size / SAMPLE_RATE, self.final_window_s))
        last = (await self._final_of(clip)).text.split()
        if clip.prompt and (leaves_out(agreed, last) or leaves_out(heard, last)):
            last = await self._without_prompt(clip, last, heard)
        return " ".join(words + last)

    async def _without_prompt(self, clip: Clip, prompted: list[str], heard: list[str]) -> list[str]:
        """The window again without the prompt, kept if it holds more of the words the last partial `heard` in the
        window; else the prompted one. Asked when the prompted final leaves out the words the partials agreed on
        (the window's start) or those the last one heard (see `leaves_out`).

        Conditioned on the done text, Whisper sometimes gives the prompt's last words again or skips a sentence
        instead of the window ("...return the arm." as the whole of 15 s of speech that began "I would like you to
        arrange the collection for me"): 3 of 8 finals of a 60 s monologue under load lost 20-40 words so, and the
        same audio without the prompt lost none. Radford et al. (2022, §4.5) likewise drop the previous text when
        a decode fails. The prompt stays first choice: without it the cut-off first words are misheard more ("this
        number" as "December")."""
        bare = (await self._final_of(dataclasses.replace(clip, prompt=""))).text.split()
        return bare if words_in_common(heard, bare) > words_in_common(heard, prompted) else prompted

    async def _final_of(self, clip: Clip) -> Hypothesis:
        hypothesis = await self._transcribe(clip, final=True)
        assert hypothesis is not None  # finals are never dropped
        return hypothesis

    def close(self) -> None:
        """Stop partials and let go of the audio and the callbacks (a closed stream holds nothing)."""
        if self._partial_task is not None:
            self._partial_task.cancel()
        self.reset()
        self.on_partial = None
