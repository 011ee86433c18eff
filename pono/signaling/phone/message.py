"""SIP messages (RFC 3261): parse strictly, build simply. Anything malformed raises SipParseError."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

COMPACT = {"v": "via", "f": "from", "t": "to", "i": "call-id", "m": "contact", "l": "content-length",
           "c": "content-type", "k": "supported", "s": "subject", "e": "content-encoding", "r": "refer-to",
           "b": "referred-by", "o": "event"}
MAX_HEADER_BYTES = 16 * 1024  # the start line and headers
MAX_BODY_BYTES = 64 * 1024
MAX_MESSAGE_BYTES = MAX_HEADER_BYTES + 4 + MAX_BODY_BYTES
MAX_ID_CHARS = 256  # Call-ID, tags and branches: real ones are under 100 characters
_REQUEST_LINE = re.compile(r"^([A-Z]+) (\S+) SIP/2\.0$")
_STATUS_LINE = re.compile(r"^SIP/2\.0 (\d{3}) (.*)$")
REQUIRED = ("via", "from", "to", "call-id", "cseq")


class SipParseError(ValueError):
    """A malformed or oversized message; `status` is the response it deserves when it can be answered."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


@dataclass
class SipMessage:
    method: str | None = None  # requests
    uri: str | None = None
    status: int | None = None  # responses
    reason: str = ""
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""

    @property
    def is_request(self) -> bool:
        return self.method is not None

    def all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for k, v in self.headers if k == name]

    def get(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def set(self, name: str, value: str) -> None:
        name = name.lower()
        self.headers = [(k, v) for k, v in self.headers if k != name] + [(name, value)]

    @property
    def cseq(self) -> tuple[int, str]:
        raw = (self.get("cseq") or "").split()
        if len(raw) != 2 or not (raw[0].isascii() and raw[0].isdigit()):
            raise SipParseError("bad CSeq")
        return int(raw[0]), raw[1].upper()

    @property
    def call_id(self) -> str:
        return self.get("call-id") or ""

    @property
    def branch(self) -> str:
        via = self.get("via") or ""
        found = re.search(r";\s*branch=([^;,\s]+)", via)
        return found.group(1) if found else ""

    def to_bytes(self) -> bytes:
        first = f"{self.method} {self.uri} SIP/2.0" if self.is_request else f"SIP/2.0 {self.status} {self.reason}"
        lines = [first] + [f"{_canonical(k)}: {v}" for k, v in self.headers if k != "content-length"]
        lines.append(f"Content-Length: {len(self.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


def _canonical(name: str) -> str:
    special = {"call-id": "Call-ID", "cseq": "CSeq", "www-authenticate": "WWW-Authenticate"}
    return special.get(name, "-".join(part.capitalize() for part in name.split("-")))


def parse(data: bytes) -> SipMessage:
    """One SIP message (RFC 3261 §7) from a datagram or a framed stream message. Raises SipParseError when
    malformed, truncated, or beyond the caps: MAX_HEADER_BYTES of headers, MAX_BODY_BYTES of body,
    MAX_ID_CHARS for the Call-ID, the From/To tags and the Via branch."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise SipParseError("message too large")
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = data.partition(b"\n\n")
        if not sep:
            raise SipParseError("no blank line after the headers (truncated?)")
    if len(head) > MAX_HEADER_BYTES:
        raise SipParseError("header section too large", 513)
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise SipParseError("headers are not UTF-8") from None
    lines = text.replace("\r\n", "\n").split("\n")
    message = SipMessage()
    first = lines[0].strip()
    if m := _REQUEST_LINE.match(first):
        message.method, message.uri = m.group(1), m.group(2)
    elif m := _STATUS_LINE.match(first):
        message.status, message.reason = int(m.group(1)), m.group(2)
    else:
        raise SipParseError(f"bad start line {first[:60]!r}")
    for line in lines[1:]:
        if line[:1] in (" ", "\t") and message.headers:  # folded continuation
            name, value = message.headers[-1]
            message.headers[-1] = (name, value + " " + line.strip())
            continue
        name, colon, value = line.partition(":")
        if not colon or not name.strip() or " " in name.strip():
            raise SipParseError(f"bad header line {line[:60]!r}")
        name = name.strip().lower()
        message.headers.append((COMPACT.get(name, name), value.strip()))
    missing = [h for h in REQUIRED if message.get(h) is None]
    if missing:
        raise SipParseError(f"missing {', '.join(missing)}")
    message.cseq  # noqa: B018 - validates
    if len(message.call_id) > MAX_ID_CHARS or len(message.branch) > MAX_ID_CHARS \
            or any(len(tag(message.get(h)) or "") > MAX_ID_CHARS for h in ("from", "to")):
        raise SipParseError("Call-ID, tag or branch too long")
    length = message.get("content-length")
    if length is not None:
        if not (length.isascii() and length.isdigit()):
            raise SipParseError("bad Content-Length")
        if int(length) > MAX_BODY_BYTES:
            raise SipParseError("body too large", 413)
        if int(length) > len(body):
            raise SipParseError("Content-Length is larger than the body (truncated?)")
        body = body[: int(length)]
    message.body = body
    return message


def response(request: SipMessage, status: int, reason: str, to_tag: str | None = None,
             headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> SipMessage:
    """A response that copies Via, From, To (+ our tag), Call-ID, CSeq and Record-Route from the request."""
    copied = [(k, v) for k, v in request.headers if k in ("via", "from", "call-id", "cseq", "record-route")]
    to = request.get("to") or ""
    if to_tag and ";tag=" not in to:
        to = f"{to};tag={to_tag}"
    out = SipMessage(status=status, reason=reason, headers=[*copied, ("to", to)], body=body)
    out.headers.extend(headers or [])
    return out


def uri_user(uri: str) -> str:
    """The user part of a SIP URI: sip:+15551234@host;params → +15551234."""
    inner = uri.split("<", 1)[-1].split(">", 1)[0]
    inner = re.sub(r"^sips?:", "", inner)
    return inner.split("@", 1)[0] if "@" in inner else ""


def tag(header: str | None) -> str | None:
    found = re.search(r";\s*tag=([^;>\s]+)", header or "")
    return found.group(1) if found else None
