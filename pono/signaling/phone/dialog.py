"""One SIP dialog (a call) as the server holds it, and the RFC 3261 timers its transactions use."""

from __future__ import annotations

import asyncio
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field

from pono.signaling.phone.message import SipMessage
from pono.signaling.phone.rtp import RtpSession
from pono.signaling.phone.sdp import Offer
from pono.signaling.phone.transport import PhoneTransport

T1, T2 = 0.5, 4.0  # RFC 3261 round-trip estimate and the cap on retransmit intervals (s)
Send = Callable[[bytes], None]


@dataclass
class Dialog:
    call_id: str
    invite: SipMessage
    send: Send
    local_tag: str = field(default_factory=lambda: secrets.token_hex(6))
    state: str = "early"  # early → confirmed → ended
    cseq: int = 0
    sdp_version: int = 1
    offer: Offer | None = None
    rtp: RtpSession | None = None
    transport: PhoneTransport | None = None
    final: bytes | None = None  # the INVITE's final response, resent until ACK
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: bool = False

    @property
    def remote_uri(self) -> str:
        contact = self.invite.get("contact") or self.invite.get("from") or ""
        found = re.search(r"<([^>]+)>", contact)
        return found.group(1) if found else contact.split(";")[0].strip()
