"""Turn-taking from VAD probabilities: a small state machine that knows nothing about audio or models."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Signal(Enum):
    START = "start"  # speech confirmed: it lasted min_speech_ms
    PAUSE = "pause"  # first silent chunk after confirmed speech (the earliest end-of-speech guess)
    RESUME = "resume"  # speech came back before the hangover ran out
    END = "end"  # silence lasted the hangover: the caller's turn is over
    SEGMENT = "segment"  # the utterance reached max_utterance_ms: cut here, the caller's turn goes on


@dataclass
class TurnConfig:
    threshold: float = 0.5
    min_speech_ms: int = 200
    hangover_ms: int = 450
    max_utterance_ms: int = 20_000
    chunk_ms: float = 32.0

    @property
    def off_threshold(self) -> float:
        # Hysteresis: speech must drop clearly below the threshold to count as silence.
        return max(0.05, self.threshold - 0.15)


class TurnDetector:
    def __init__(self, config: TurnConfig) -> None:
        self.config = config
        self.reset()

    def reset(self) -> None:
        self.in_speech = False
        self.voiced_ms = 0.0  # voiced time of the current (candidate or confirmed) utterance
        self.silence_ms = 0.0
        self.utterance_ms = 0.0

    def update(self, prob: float) -> Signal | None:
        c = self.config
        voiced = prob >= c.threshold or (self.in_speech and self.silence_ms == 0 and prob >= c.off_threshold)
        if self.in_speech:
            self.utterance_ms += c.chunk_ms
        if voiced:
            self.voiced_ms += c.chunk_ms
            was_pausing = self.silence_ms > 0
            self.silence_ms = 0.0
            if not self.in_speech and self.voiced_ms >= c.min_speech_ms:
                self.in_speech = True
                self.utterance_ms = self.voiced_ms
                return Signal.START
            if self.in_speech and self.utterance_ms >= c.max_utterance_ms:
                self.utterance_ms = 0.0
                return Signal.SEGMENT
            if self.in_speech and was_pausing:
                return Signal.RESUME
            return None
        if not self.in_speech:
            # A candidate that goes quiet before min_speech_ms is a click or a breath: forget it.
            self.silence_ms += c.chunk_ms
            if self.silence_ms >= 2 * c.chunk_ms:
                self.voiced_ms = 0.0
                self.silence_ms = 0.0
            return None
        self.silence_ms += c.chunk_ms
        if self.silence_ms >= c.hangover_ms:
            self.reset()
            return Signal.END
        if self.utterance_ms >= c.max_utterance_ms:
            self.utterance_ms = 0.0
            return Signal.SEGMENT
        if self.silence_ms == c.chunk_ms:
            return Signal.PAUSE
        return None
