"""The languages Whisper knows, and the code Pono gives it for a persona's language tag."""

from __future__ import annotations

import re

from faster_whisper.tokenizer import _LANGUAGE_CODES  # Whisper's own list (its tokenizer's language tokens)

WHISPER_LANGUAGES = frozenset(_LANGUAGE_CODES)
_TAG = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*")


def whisper_language(tag: str) -> str:
    """Whisper's code for a BCP 47-ish language tag: "en-US", "EN_us" and "en" are all "en".

    Raises ValueError naming the tag when Whisper has no such language (so a persona is refused at save, and
    one bad clip never reaches a batch of other calls' clips)."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise ValueError(f"{str(tag)[:20]!r} is not a language tag such as 'en' or 'en-US'")
    code = re.split(r"[-_]", tag)[0].lower()
    if code not in WHISPER_LANGUAGES:
        raise ValueError(f"speech recognition has no language {code!r} (from {tag!r})")
    return code
