"""Turn-taking from VAD probabilities: a small state machine that knows nothing about audio or models."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Signal(Enum):
    START = "start"  # speech confirmed: it lasted min_speech_ms
    PAUSE = "pause"  # first silent chunk after confirmed speech (the earliest end-of-speech guess)
    RESUME = "resume"  # speech came back before the hangover ran out
    END = "end"  # silence lasted the hangover: the caller's turn is over
    CHECK = "check"  # silence lasted `check_after_ms` (or `recheck_after_ms`): time to ask the end-of-turn model
    SEGMENT = "segment"  # the utterance reached max_utterance_ms: cut here, the caller's turn goes on


@dataclass
class TurnConfig:
    """Turn-taking in milliseconds. Without the end-of-turn model a turn ends after `hangover_ms` of silence.
    With it (`end_of_turn`), the model is asked after `check_after_ms` of silence: a turn it finds complete
    ends after `short_hangover_ms`. One it does not is asked again after `recheck_after_ms` (0: never), with
    more of the pause to hear: early checks answer sooner but take more complete questions for unfinished ones.
    A turn still unfinished ends after `long_hangover_ms` (the cap), unless the caller speaks again first;
    then the next pause is checked again."""

    threshold: float = 0.5
    min_speech_ms: int = 200
    hangover_ms: int = 450
    max_utterance_ms: int = 20_000
    chunk_ms: float = 32.0
    end_of_turn: bool = False
    end_of_turn_threshold: float = 0.5
    check_after_ms: int = 160
    recheck_after_ms: int = 0
    short_hangover_ms: int = 200
    long_hangover_ms: int = 1500

    def __post_init__(self) -> None:
        # A persona's short hangover over the server's long one (or the reverse) must not make a complete turn wait
        # longer than an incomplete one.
        self.short_hangover_ms = min(self.short_hangover_ms, self.long_hangover_ms)

    @property
    def off_threshold(self) -> float:
        # Hysteresis: speech must drop clearly below the threshold to count as silence.
        return max(0.05, self.threshold - 0.15)


class TurnDetector:
    def __init__(self, config: TurnConfig) -> None:
        self.config = config
        self.model_wanted = True
        self.pauses = 0  # tells a model's answer for an earlier pause apart
        self.reset()

    def reset(self) -> None:
        self.in_speech = False
        self.voiced_ms = 0.0  # voiced time of the current (candidate or confirmed) utterance
        self.silence_ms = 0.0
        self.utterance_ms = 0.0
        self._new_pause()

    def use_model(self, wanted: bool) -> None:
        """Whether this utterance's pauses are the end-of-turn model's to judge. Speech over the agent that is not
        (yet) an interruption is not a turn: it ends on silence alone, `hangover_ms`."""
        self.model_wanted = wanted
        if self.in_speech and self.silence_ms == 0:
            self._new_pause(count=False)

    def _new_pause(self, count: bool = True) -> None:
        c = self.config
        self.hangover_ms = float(c.long_hangover_ms if c.end_of_turn and self.model_wanted else c.hangover_ms)
        self.checks = 0  # end-of-turn checks asked in this pause
        if count:
            self.pauses += 1

    def _check_due(self) -> bool:
        c = self.config
        if self.checks == 0:
            return self.silence_ms >= c.check_after_ms
        return (self.checks == 1 and c.recheck_after_ms > c.check_after_ms and self.silence_ms >= c.recheck_after_ms
                and self.hangover_ms > c.short_hangover_ms)  # not when the first check already found it complete

    def turn_complete(self, pause: int) -> None:
        """The end-of-turn model found the turn complete during pause number `pause`: if the caller is still
        silent in that pause, the turn ends once the silence reaches `short_hangover_ms`."""
        if pause == self.pauses and self.in_speech:
            self.hangover_ms = float(self.config.short_hangover_ms)

    def update(self, prob: float) -> Signal | None:
        c = self.config
        voiced = prob >= c.threshold or (self.in_speech and self.silence_ms == 0 and prob >= c.off_threshold)
        if self.in_speech:
            self.utterance_ms += c.chunk_ms
        if voiced:
            self.voiced_ms += c.chunk_ms
            was_pausing = self.silence_ms > 0
            self.silence_ms = 0.0
            if was_pausing:
                self._new_pause()
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
        if self.silence_ms >= self.hangover_ms:
            self.reset()
            return Signal.END
        if self.silence_ms == c.chunk_ms:  # before CHECK: a check due this early comes one chunk later
            return Signal.PAUSE
        if c.end_of_turn and self.model_wanted and self._check_due():
            self.checks += 1
            return Signal.CHECK
        if self.utterance_ms >= c.max_utterance_ms:
            self.utterance_ms = 0.0
            return Signal.SEGMENT
        return None
