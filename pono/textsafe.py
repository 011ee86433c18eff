"""Text from outside, made safe to keep: lone UTF-16 surrogates (valid in JSON's \\uXXXX escapes, invalid
in UTF-8) and NUL (valid in JSON as \\u0000, refused by Postgres text) become U+FFFD at the edge, so they can't
break an LLM request, a log line or a Postgres row later.

Every input that carries text goes through here: the data channel, HTTP JSON bodies, Twilio parameters,
SIP headers.
"""

from __future__ import annotations

import json
import re
from typing import Any

_UNKEEPABLE = re.compile("[\x00\ud800-\udfff]")


def repair_text(text: str) -> str:
    """`text` with each lone surrogate and NUL replaced by U+FFFD; unchanged (same object) when it had none."""
    return _UNKEEPABLE.sub("\ufffd", text) if _UNKEEPABLE.search(text) else text


def repair(value: Any) -> Any:
    """Repair every string in a JSON value (keys too), recursively. Other values pass through."""
    if isinstance(value, str):
        return repair_text(value)
    if isinstance(value, list):
        return [repair(v) for v in value]
    if isinstance(value, dict):
        return {repair_text(k) if isinstance(k, str) else k: repair(v) for k, v in value.items()}
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def loads(raw: str | bytes) -> Any:
    """`json.loads`, then `repair`. Raises ValueError (json.JSONDecodeError) for malformed JSON, NaN, Infinity
    or numbers too large for a float (Postgres jsonb and every other JSON parser refuse them), and
    RecursionError for absurdly deep nesting, like json.loads."""
    return repair(json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float))


def _finite_float(text: str) -> float:
    number = float(text)
    if number in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:20]} is too large for a JSON number")
    return number
