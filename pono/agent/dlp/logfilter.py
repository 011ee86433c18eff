"""Redaction in logs: a filter on every handler, so no log line carries what callers said, or secrets.

The rule is to redact what was filled in, not what the server says about itself:

- The message template of Pono's own loggers ("pono" and "pono.*") is constant text from this code base
  (tests/test_log_redaction.py checks that every logging call in pono/ has a literal template): it is never
  redacted. What is filled into it (the %-arguments: a caller id, a tool's reason, an exception message, an
  address) is. The whole line is scanned, so a recognizer still sees the words around a value, but only
  findings that touch an argument are replaced.
- An argument marked with `own()` is the server's own configuration or state (the address it listens on, a
  configured URL): it cannot carry caller content and is printed as it is.
- Extras (`extra={...}`: a call event's details, which can hold a transfer reason the caller gave) are
  redacted string by string, nested dicts and lists included.
- Third-party loggers may put anything into their templates (a DSN in a driver error, a token in a URL): their
  whole message is scanned and redacted, as it always was.

Exception tracebacks (`exc_info`) are not scanned; transcript text is never logged on purpose.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any

from pono.agent.dlp.engine import DEFAULT_POLICY

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
# One %-conversion of a logging template (printf-style, as LogRecord.getMessage applies it).
_CONVERSION = re.compile(r"%(?:\((?P<key>[^)]*)\))?[#0 +-]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?(?P<type>[a-zA-Z%])")


class Own(str):
    """A logged value that is the server's own configuration or state (see `own`): never redacted."""

    __slots__ = ()


def own(value: object) -> Own:
    """Mark a log argument as the server's own (a listening address, a configured URL), so the log filter
    prints it as it is: `log.info("SIP listening on %s:%s", own(host), port)`."""
    return Own(value)


def _ours(name: str) -> bool:
    return name == "pono" or name.startswith("pono.")


def _pieces(template: str, args: Any) -> list[tuple[str, bool]] | None:
    """The formatted message as (text, is_data) pieces: template text and own() values are not data. None when
    the template cannot be followed piece by piece (then the whole message is treated as data)."""
    pieces: list[tuple[str, bool]] = []
    position, index = 0, 0
    single = args if isinstance(args, Mapping) else None
    try:
        for match in _CONVERSION.finditer(template):
            pieces.append((template[position:match.start()], False))
            position = match.end()
            spec = match.group()
            if match.group("type") == "%":
                pieces.append(("%", False))
            elif "*" in spec:
                return None
            elif match.group("key") is not None and single is not None:
                value = single[match.group("key")]
                pieces.append((re.sub(r"^%\([^)]*\)", "%", spec) % (value,), not isinstance(value, Own)))
            else:
                value = args[index]
                index += 1
                pieces.append((spec % (value,), not isinstance(value, Own)))
    except (TypeError, ValueError, KeyError, IndexError):
        return None
    pieces.append((template[position:], False))
    return pieces


def _redact_data(pieces: list[tuple[str, bool]]) -> str | None:
    """The message with every finding that touches a data piece replaced by [ENTITY]; None when there is none."""
    text = "".join(piece for piece, _ in pieces)
    spans, offset = [], 0
    for piece, is_data in pieces:
        if is_data and piece:
            spans.append((offset, offset + len(piece)))
        offset += len(piece)
    found = [m for m in DEFAULT_POLICY.detect(text) if any(m.start < end and start < m.end for start, end in spans)]
    if not found:
        return None
    out, position = [], 0
    for match in found:  # detect() returns them sorted and not overlapping
        out += [text[position:match.start], f"[{match.entity_type}]"]
        position = match.end
    return "".join(out) + text[position:]


def _redact_value(value: Any) -> Any:
    """An extra with every string in it redacted (new containers: the caller's objects are left alone)."""
    if isinstance(value, Own) or value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return DEFAULT_POLICY.scan(value, "redact").text
    if isinstance(value, Mapping):
        return {k: _redact_value(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_redact_value(v) for v in value]
    text = str(value)
    redacted = DEFAULT_POLICY.scan(text, "redact").text
    return value if redacted == text else redacted


class RedactingFilter(logging.Filter):
    """Redacts a record's filled-in values and extras in place (see the module docstring for the rule)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except (TypeError, ValueError, KeyError):  # a template that does not fit its arguments
            record.msg, record.args = f"(unformattable log message from {record.name})", None
            return True
        pieces = None
        if _ours(record.name) and isinstance(record.msg, str):
            pieces = _pieces(record.msg, record.args) if record.args else [(record.msg, False)]
        if pieces is None or "".join(p for p, _ in pieces) != message:
            pieces = [(message, True)]  # not ours, or not followable: all of it is data
        redacted = _redact_data(pieces)
        if redacted is not None:
            record.msg, record.args = redacted, None
            if "message" in vars(record):  # a handler before this one formatted it already
                record.message = redacted
        for key, value in list(vars(record).items()):
            if key not in _STANDARD and not key.startswith("_"):
                setattr(record, key, _redact_value(value))
        return True


def install_log_redaction() -> None:
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())
