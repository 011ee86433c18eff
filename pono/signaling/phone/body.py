"""The session description in a SIP message body (RFC 3261 §7.4, §20.11; RFC 5621 for multipart bodies).

Carriers send SDP beside other parts: ISUP (RFC 3204), a PIDF-LO location (RFC 6442). Python's `email`
package reads the MIME structure (boundaries, nested multiparts, Content-Transfer-Encoding), so nothing here
splits on boundaries by hand.

Rules: a body of type application/sdp is the SDP. A multipart/* body's SDP is its first application/sdp part;
other parts are ignored unless they say `handling=required` in their Content-Disposition, which we cannot honour
(→ 415). A body of any other type is no offer when it is marked `handling=optional`, and 415 otherwise. No body
at all is no offer (a delayed offer, RFC 3261 §13.3.1).
"""

from __future__ import annotations

import email.policy
from email.message import Message
from email.parser import BytesParser

from pono.signaling.phone.message import SipMessage

_PARSER = BytesParser(policy=email.policy.compat32)


class UnsupportedBody(ValueError):
    """A body we cannot read and may not ignore (→ 415 Unsupported Media Type with Accept, RFC 3261 §8.2.3)."""


def _handling(part: Message) -> str | None:
    value = part.get_param("handling", header="content-disposition")
    return value.strip().lower() if isinstance(value, str) else None


def session_description(msg: SipMessage) -> str | None:
    """The SDP a message carries (text, decoded as UTF-8 with replacement), or None when it carries none: no
    body, or only parts marked handling=optional. Raises UnsupportedBody for a body without Content-Type, a
    multipart body without a usable boundary, or a part we do not understand that is required."""
    if not msg.body.strip():
        return None
    content_type = msg.get("content-type")
    if not content_type:
        raise UnsupportedBody("a body without a Content-Type")
    head = f"Content-Type: {content_type}\r\n"
    if disposition := msg.get("content-disposition"):
        head += f"Content-Disposition: {disposition}\r\n"
    document = _PARSER.parsebytes(head.encode("utf-8", "replace") + b"\r\n" + msg.body)
    if document.get_content_maintype() == "multipart" and not document.is_multipart():
        raise UnsupportedBody("a multipart body without its boundary")
    found: str | None = None
    for part in document.walk():
        if part.is_multipart():
            continue
        kind = part.get_content_type()
        if kind == "application/sdp":
            if found is None:
                payload = part.get_payload(decode=True)
                found = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""
            continue
        optional = _handling(part) == "optional" or (part is not document and _handling(part) != "required")
        if not optional:
            raise UnsupportedBody(f"body part {kind[:60]} must be handled (handling=required), and is not"
                                  if part is not document else f"the body is {kind[:60]}, not SDP")
    return found
