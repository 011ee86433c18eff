"""From a turn's transcript to the stretches of its audio to replace.

What is replaced: every DLP finding of the call's policy, plus every run of eight or more digits (written or
spoken, separators allowed) and every placeholder left by an earlier redaction ("[CREDIT_CARD]"). A transcript
of a card number read aloud is often a digit off, which no checksum recognises, and the audio must not keep
it. Each finding is mapped to the words it overlaps (word timestamps from `pono.voice.speech.alignment`) and
padded; with no word timestamps, the whole stretch of the turn is replaced.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pono.agent.dlp.engine import DlpPolicy
from pono.agent.dlp.spoken import normalize
from pono.voice.speech.alignment import Word

_DIGIT_RUN = re.compile(r"\d(?:[\s.,-]{0,2}\d){7,}")
_PLACEHOLDER = re.compile(r"\[[A-Z_]+(?: ending \d+)?\]")
PAD_S = 0.2  # around a redacted span: word edges from alignment are approximate
REACH_S = 1.0  # at most this much further, towards the neighbouring words (see time_span)


@dataclass(frozen=True)
class TextSpan:
    """Characters `start`..`end` of a turn's text that hold `entity_type`; `recognizer` says what found it."""

    entity_type: str
    start: int
    end: int
    recognizer: str


def sensitive_spans(text: str, policy: DlpPolicy) -> list[TextSpan]:
    """What to remove from the audio of `text`, in text order, without overlaps. Blocking (DLP): a thread."""
    found = [TextSpan(m.entity_type, m.start, m.end, m.recognizer) for m in policy.detect(text)]
    normalized = normalize(text)
    for m in _DIGIT_RUN.finditer(normalized.text):
        start, end = normalized.span(m.start(), m.end())
        found.append(TextSpan("DIGIT_RUN", start, end, "digit_run"))
    found.extend(TextSpan("REDACTED", m.start(), m.end(), "placeholder") for m in _PLACEHOLDER.finditer(text))
    kept: list[TextSpan] = []
    for span in sorted(found, key=lambda s: (s.entity_type == "DIGIT_RUN", s.start)):  # typed findings first
        if all(span.end <= k.start or span.start >= k.end for k in kept):
            kept.append(span)
    return sorted(kept, key=lambda s: s.start)


def time_span(span: TextSpan, words: list[Word] | None, length_s: float) -> tuple[float, float]:
    """Seconds (from the clip's start) covering `span`'s words, within 0..`length_s`; the whole clip when `words`
    is None or no word overlaps the span.

    Word edges from alignment are approximate, and with a small model (tiny.en) they are late by more than a
    pad: the word before a card number was stretched over its first digit ("is" 1.96-2.86 s where "four"
    began at 2.2 s), which stayed audible. So each edge reaches out to the neighbouring kept word: back to
    where that word ends, or to where it would end at a slow speaking rate (`_plausible_s`) if that is
    earlier; forward likewise to where the next word starts. Then PAD_S more, and at most REACH_S beyond the
    padded edge of the span's own words. A neighbour's last sound may be lost; a digit is not kept."""
    if words:
        hit = [w for w in words if w.end > span.start and w.start < span.end]
        if hit:
            start, end = min(w.start_s for w in hit), max(w.end_s for w in hit)
            spoken = [w for w in words if any(c.isalnum() for c in w.text)]
            before = [w for w in spoken if w.end <= span.start]
            after = [w for w in spoken if w.start >= span.end]
            reach_back, reach_on = start, end
            if before:
                prev = before[-1]
                reach_back = min(start, prev.end_s, prev.start_s + _plausible_s(prev))
            if after:
                nxt = after[0]
                reach_on = max(end, nxt.start_s, nxt.end_s - _plausible_s(nxt))
            start = max(reach_back, start - REACH_S) - PAD_S
            end = min(reach_on, end + REACH_S) + PAD_S
            return max(0.0, start), min(length_s, end)
    return 0.0, length_s


def _plausible_s(word: Word) -> float:
    """How long `word` takes said slowly (ten characters a second, plus a little): an aligned word longer than
    this holds some of its neighbour. Slower speech loses a bit of the neighbour to the tone, no more."""
    return 0.05 + 0.1 * len(word.text)
