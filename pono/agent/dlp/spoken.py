"""Spoken forms → written forms, with a map back to the original offsets.

Transcripts spell numbers and addresses the way people say them: "four one one one …", "john dot smith
at example dot com", "my social is one two three, four five …". Detection runs on the written form; each
character of it remembers where it came from, so findings (and redactions) land on the original words.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

DIGIT_WORDS = {"zero": "0", "oh": "0", "o": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
               "six": "6", "seven": "7", "eight": "8", "nine": "9"}
_REPEAT = {"double": 2, "triple": 3}
_TLDS = "com|org|net|edu|gov|io|co|uk|de|fr|es|it|nl|info|biz|us|ca|au|ai|dev|app|me"

_WORD = re.compile(r"[A-Za-z]+|\d+|[^\sA-Za-z\d]")
# A run of digit words (and digits), allowing commas and dashes between them.
_DIGIT_TOKEN = r"(?:zero|oh|o|one|two|three|four|five|six|seven|eight|nine|double|triple|\d+)"
_DIGIT_RUN = re.compile(rf"\b{_DIGIT_TOKEN}(?:[\s,.-]+{_DIGIT_TOKEN})+\b", re.IGNORECASE)
_SPOKEN_EMAIL = re.compile(
    rf"\b[a-z0-9]+(?:\s+(?:dot|underscore|dash|hyphen)\s+[a-z0-9]+)*\s+at\s+[a-z0-9]+"
    rf"(?:\s+dot\s+[a-z0-9]+)*\s+dot\s+(?:{_TLDS})\b",
    re.IGNORECASE,
)
_EMAIL_WORDS = {"dot": ".", "at": "@", "underscore": "_", "dash": "-", "hyphen": "-"}


@dataclass(frozen=True)
class Normalized:
    text: str
    starts: list[int]  # character i of `text` came from original[starts[i]:ends[i]]
    ends: list[int]
    original: str

    def span(self, start: int, end: int) -> tuple[int, int]:
        """The original span that produced text[start:end], widened to whole words."""
        lo, hi = self.starts[start], self.ends[end - 1]
        while lo > 0 and self.original[lo - 1].isalnum():
            lo -= 1
        while hi < len(self.original) and self.original[hi].isalnum():
            hi += 1
        return lo, hi


def _digit_run(run: str) -> str | None:
    """'four one one one' → '4111'; None when the run holds fewer than 4 spoken digits."""
    out: list[str] = []
    repeat = 1
    spoken = 0
    for token in re.findall(r"[A-Za-z]+|\d+", run):
        low = token.lower()
        if low in _REPEAT:
            repeat = _REPEAT[low]
            continue
        digits = DIGIT_WORDS.get(low, token if token.isdigit() else "")
        if low in DIGIT_WORDS:
            spoken += 1
        out.append(digits * repeat if len(digits) == 1 else digits)
        repeat = 1
    return "".join(out) if spoken >= 4 else None


def normalize(text: str) -> Normalized:
    """Rewrite spoken digit runs and spoken email addresses; everything else is kept as is."""
    replacements: list[tuple[int, int, str]] = []
    for m in _SPOKEN_EMAIL.finditer(text):
        words = re.findall(r"[A-Za-z0-9]+", m.group())
        replacements.append((m.start(), m.end(), "".join(_EMAIL_WORDS.get(w.lower(), w) for w in words)))
    taken = [(s, e) for s, e, _ in replacements]
    for m in _DIGIT_RUN.finditer(text):
        if any(s < m.end() and m.start() < e for s, e in taken):
            continue
        digits = _digit_run(m.group())
        if digits:
            replacements.append((m.start(), m.end(), digits))
    replacements.sort()
    out: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    pos = 0
    for start, end, written in replacements:
        out.append(text[pos:start])
        starts.extend(range(pos, start))
        ends.extend(range(pos + 1, start + 1))
        out.append(written)
        # Spread the written characters over the spoken span, so a part of it maps to a part of the words.
        width, n = end - start, max(len(written), 1)
        starts.extend(start + (i * width) // n for i in range(len(written)))
        ends.extend(start + ((i + 1) * width) // n for i in range(len(written)))
        pos = end
    out.append(text[pos:])
    starts.extend(range(pos, len(text)))
    ends.extend(range(pos + 1, len(text) + 1))
    return Normalized("".join(out), starts, ends, text)
