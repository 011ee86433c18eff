"""Persona-supplied regular expressions, compiled with RE2: matching takes time linear in the text.

Python's `re` backtracks: a persona pattern like `(\\d+)+#` took 1.36 s on one 24-digit utterance, holding
the GIL, which froze every call on the replica. RE2 (`google-re2`, module `re2`) has no backtracking, so it
refuses what needs it: backreferences (`\\1`) and lookarounds (`(?=`, `(?!`, `(?<=`, `(?<!`). Those patterns
are refused when the persona is saved, with RE2's reason.
"""

from __future__ import annotations

from typing import Any

import re2

MAX_PATTERN_CHARS = 1000
MAX_PROGRAM_BYTES = 1 << 20  # RE2's memory budget for one compiled pattern (its default is 8 MiB)


def _options() -> Any:
    options = re2.Options()
    options.log_errors = False  # RE2 would print each refusal on stderr; the caller gets it as ValueError
    options.max_mem = MAX_PROGRAM_BYTES
    return options


def compile_pattern(pattern: str) -> Any:
    """A compiled RE2 pattern (`.finditer(text)` yields matches with `.start()`/`.end()` in characters).

    `pattern`: Perl-like syntax (`\\d`, `\\b`, `(?i)`, classes, counted repeats). Raises ValueError naming the
    problem for a pattern that is not a string, is longer than MAX_PATTERN_CHARS, or that RE2 can't compile
    (a syntax error, a backreference, a lookaround, or a program over MAX_PROGRAM_BYTES).
    """
    if not isinstance(pattern, str):
        raise ValueError("a pattern must be a string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"a pattern may have at most {MAX_PATTERN_CHARS} characters")
    try:
        return re2.compile(pattern, _options())
    except re2.error as exc:
        reason = exc.args[0].decode(errors="replace") if exc.args and isinstance(exc.args[0], bytes) else str(exc)
        raise ValueError(f"{reason} (patterns run on RE2: no backreferences or lookarounds)") from None
