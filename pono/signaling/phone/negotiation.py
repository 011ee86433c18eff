"""Offer/answer in SIP dialogs: RFC 3264 as RFC 3261 carries it (§13.2.1, §13.3.1, §14).

Usually the INVITE (or re-INVITE) carries the caller's offer and our 2xx the answer. An INVITE without one (a
delayed offer, common with PBXes) gets our offer in the 2xx, and the caller's answer comes in the ACK. Either
way the SDP is found in the body by body.py and its media address judged by sdp_policy.
"""

from __future__ import annotations

from pono.signaling.phone.body import UnsupportedBody, session_description
from pono.signaling.phone.extensions import ACCEPT
from pono.signaling.phone.message import SipMessage
from pono.signaling.phone.sdp import Offer, SdpError, parse_offer
from pono.signaling.phone.sdp_policy import MediaPolicy

Destination = tuple[str, int] | None  # (IP literal, port) to send RTP to; None: the legacy 0.0.0.0 hold


def offer_in(request: SipMessage, policy: MediaPolicy, our_address: str) -> tuple[Offer, Destination] | None:
    """The offer an INVITE or re-INVITE carries and where its media goes, or None when it carries none (we
    then offer in the 2xx). `our_address` is the media address our SDP will carry.
    Raises UnsupportedBody (→ 415) for a body we cannot read, SdpError (→ 488) for an offer we cannot take."""
    sdp = session_description(request)
    if sdp is None:
        return None
    offer = parse_offer(sdp)
    return offer, policy.destination(offer, our_address)


def answer_in(ack: SipMessage, policy: MediaPolicy, our_address: str) -> tuple[Offer, Destination]:
    """The answer an ACK carries to the offer our 2xx made, and where its media goes.

    Raises SdpError saying why there is no usable one: no answer at all (the session cannot be set up, RFC 3261
    §13.3.1.4), a body we cannot read, no codec of ours (PCMU, PCMA), or a media address sdp_policy refuses."""
    try:
        sdp = session_description(ack)
    except UnsupportedBody as exc:
        raise SdpError(f"the ACK's body is unreadable: {exc}") from None
    if sdp is None:
        raise SdpError("the ACK carries no answer to our offer")
    answer = parse_offer(sdp)
    return answer, policy.destination(answer, our_address)


def quoted(text: str) -> str:
    """`text` as a SIP quoted-string (RFC 3261 §25.1), for Warning and Reason headers."""
    return '"' + text.replace("\\", "/").replace('"', "'")[:200] + '"'


def refusal(exc: SdpError | UnsupportedBody) -> tuple[int, str, list[tuple[str, str]]]:
    """The response refusing an offer: (status, reason phrase, headers). 415 with Accept for a body we cannot
    read (RFC 3261 §8.2.3); 488 for an offer we cannot take (§13.3.1.1); either with the reason in a
    Warning (§20.43, code 304 or 399)."""
    if isinstance(exc, UnsupportedBody):
        return 415, "Unsupported Media Type", [("accept", ACCEPT), ("warning", f"399 pono {quoted(str(exc))}")]
    return 488, "Not Acceptable Here", [("warning", f"304 pono {quoted(str(exc))}")]


def bye_reason(exc: SdpError) -> tuple[str, str]:
    """The Reason header (RFC 3326) of a BYE ending a call whose answer was unusable."""
    return "reason", f"SIP;cause=488;text={quoted(str(exc))}"
