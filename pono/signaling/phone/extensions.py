"""What Pono's SIP side implements, as it tells peers (Allow, Accept, Supported), and the Require check.

RFC 3261 §8.2.2.3: a request whose Require names an option tag the UAS does not support is answered 420 (Bad
Extension) with the tags in Unsupported, before anything else happens (no 100, no 180). ACK and CANCEL are
exempt. Pono implements no option tag: not 100rel (reliable provisional responses, RFC 3262), not timer
(RFC 4028: it would have to put Session-Expires in its answers, and refresh when asked to), not replaces
(RFC 3891). `Supported:` from the caller needs nothing from us and is ignored.
"""

from __future__ import annotations

from pono.signaling.phone.message import SipMessage

ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, NOTIFY, INFO"
ACCEPT = "application/sdp, multipart/mixed"  # the body types we read (see body.py)
SUPPORTED: frozenset[str] = frozenset()  # the option tags we honour, lower-case


def option_tags(values: list[str]) -> list[str]:
    """The option tags of some Require / Supported header values ("100rel, timer" → ["100rel", "timer"])."""
    return [tag.strip() for value in values for tag in value.split(",") if tag.strip()]


def unsupported(request: SipMessage) -> list[str]:
    """The option tags a request requires that we do not support, as written, without repeats; [] for ACK and
    CANCEL, whose Require is never checked (RFC 3261 §8.2.2.3)."""
    if request.method in ("ACK", "CANCEL"):
        return []
    missing: list[str] = []
    for tag in option_tags(request.all("require")):
        if tag.lower() not in SUPPORTED and tag not in missing:
            missing.append(tag)
    return missing


def capabilities() -> list[tuple[str, str]]:
    """Allow, Accept and (when we support any option tag) Supported, for 200s to INVITE and OPTIONS."""
    headers = [("allow", ALLOW), ("accept", ACCEPT)]
    return headers + ([("supported", ", ".join(sorted(SUPPORTED)))] if SUPPORTED else [])
