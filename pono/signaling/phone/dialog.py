"""SIP dialogs (calls) as the server holds them, how requests are matched to them (RFC 3261 §12), and the
RFC 3261 timers their transactions use."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from pono.signaling.phone.message import SipMessage, tag
from pono.signaling.phone.rtp import RtpSession
from pono.signaling.phone.sdp import Offer
from pono.signaling.phone.transport import PhoneTransport

log = logging.getLogger(__name__)

T1, T2 = 0.5, 4.0  # RFC 3261 round-trip estimate and the cap on retransmit intervals (s)
Send = Callable[[bytes], None]


@dataclass
class Dialog:
    """One call. `call_id` is Pono's own (uuid hex, what storage and the console know); `sip_call_id` the
    Call-ID header the caller chose, used only on the wire. The dialog ID (RFC 3261 §12) is
    (sip_call_id, local_tag, remote_tag). `peer` is where the INVITE came from (host, port)."""

    call_id: str
    sip_call_id: str
    invite: SipMessage
    send: Send
    peer: tuple[str, int] = ("", 0)
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
    awaiting_answer: int | None = None  # the CSeq of the (re-)INVITE whose 2xx carried our offer, until its ACK
    begin: Callable[[], None] | None = None  # starts the call, once a delayed offer's answer came in the ACK
    reserved: bool = False  # holds one of PONO_MAX_CALLS from the INVITE until the call starts or the dialog goes

    async def until_acked(self, give_up: Callable[[], Awaitable[None]]) -> None:
        """Timer G: resend the final response (T1, 2T1 … T2) until the ACK; timer H: after 64·T1 without one,
        `give_up` (hang up). The early dialog is confirmed by the ACK."""
        interval, deadline = T1, time.monotonic() + 64 * T1
        while not self.acked.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.acked.wait(), interval)
            if not self.acked.is_set() and self.final is not None:
                self.send(self.final)
            interval = min(interval * 2, T2)
        if not self.acked.is_set():
            log.warning("SIP call %s: no ACK for the answer; hanging up", self.call_id)
            await give_up()
        elif self.state == "early":
            self.state = "confirmed"

    @property
    def remote_tag(self) -> str:
        return tag(self.invite.get("from")) or ""

    @property
    def remote_uri(self) -> str:
        contact = self.invite.get("contact") or self.invite.get("from") or ""
        found = re.search(r"<([^>]+)>", contact)
        return found.group(1) if found else contact.split(";")[0].strip()

    def request(self, method: str, hostport: str, extra: list[tuple[str, str]]) -> tuple[str, bytes]:
        """Our next in-dialog request (RFC 3261 §12.2.1.1): to the remote target, along the route set, with
        the next CSeq and a fresh branch. `hostport` is ours, for Via and Contact. Returns (branch, bytes)."""
        self.cseq += 1
        invite = self.invite
        branch = "z9hG4bK" + secrets.token_hex(8)
        to = invite.get("to") or ""
        from_ours = f"{to};tag={self.local_tag}" if ";tag=" not in to else to
        headers = [("via", f"SIP/2.0/UDP {hostport};branch={branch};rport"),
                   ("max-forwards", "70"), ("from", from_ours), ("to", invite.get("from") or ""),
                   ("call-id", self.sip_call_id), ("cseq", f"{self.cseq} {method}"),
                   *[("route", r) for r in invite.all("record-route")],
                   ("contact", f"<sip:pono@{hostport}>"), *extra]
        return branch, SipMessage(method=method, uri=self.remote_uri, headers=headers).to_bytes()

    def trusted_sources(self) -> set[str]:
        """The hosts in-dialog requests may come from: the INVITE's source, the nearest proxy of the route
        set (the top Record-Route) or, without a route set, the remote target (Contact). IP literals only:
        nothing is resolved."""
        hosts = {self.peer[0]}
        routes = self.invite.all("record-route")
        uri = (re.search(r"<([^>]+)>", routes[0]).group(1) if routes and "<" in routes[0]  # type: ignore[union-attr]
               else routes[0].split(",")[0]) if routes else self.remote_uri
        found = re.match(r"^sips?:(?:[^@]*@)?(\[[0-9a-fA-F:.]+\]|[^:;>?]+)", uri.strip())
        if found:
            host = found.group(1).strip("[]")
            try:
                hosts.add(str(ipaddress.ip_address(host)))
            except ValueError:
                pass
        return hosts

    def trusts(self, addr: tuple[str, int]) -> bool:
        """Whether a request from `addr` (host, port) may act on this dialog (see trusted_sources)."""
        try:
            host = ipaddress.ip_address(addr[0])
        except ValueError:
            return False
        if host.version == 6 and host.ipv4_mapped is not None:
            host = host.ipv4_mapped
        return str(host) in self.trusted_sources()


class Dialogs:
    """The server's dialogs, by Pono's call id, found for a request as RFC 3261 §12 says: by Call-ID and
    both tags once established, by Call-ID and From tag for the INVITE that creates one (and its CANCEL
    and ACK)."""

    def __init__(self) -> None:
        self._by_call_id: dict[str, Dialog] = {}
        self._by_sip: dict[tuple[str, str], Dialog] = {}  # (Call-ID, remote tag)

    def __len__(self) -> int:
        return len(self._by_call_id)

    def __bool__(self) -> bool:
        return bool(self._by_call_id)

    def __getitem__(self, call_id: str) -> Dialog:
        return self._by_call_id[call_id]

    def __contains__(self, call_id: object) -> bool:
        return call_id in self._by_call_id

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_call_id)

    def get(self, call_id: str) -> Dialog | None:
        return self._by_call_id.get(call_id)

    def values(self) -> list[Dialog]:
        return list(self._by_call_id.values())

    def add(self, dialog: Dialog) -> None:
        self._by_call_id[dialog.call_id] = dialog
        self._by_sip[(dialog.sip_call_id, dialog.remote_tag)] = dialog

    def remove(self, dialog: Dialog) -> None:
        if self._by_call_id.get(dialog.call_id) is dialog:
            del self._by_call_id[dialog.call_id]
        if self._by_sip.get((dialog.sip_call_id, dialog.remote_tag)) is dialog:
            del self._by_sip[(dialog.sip_call_id, dialog.remote_tag)]

    def creating(self, msg: SipMessage) -> Dialog | None:
        """The dialog an out-of-dialog request (no To tag: INVITE, its CANCEL or ACK of a non-2xx) belongs to."""
        return self._by_sip.get((msg.call_id, tag(msg.get("from")) or ""))

    def matching(self, msg: SipMessage) -> Dialog | None:
        """The dialog of an in-dialog request: Call-ID, From tag = remote tag and To tag = our local tag."""
        dialog = self.creating(msg)
        if dialog is None or tag(msg.get("to")) != dialog.local_tag:
            return None
        return dialog
