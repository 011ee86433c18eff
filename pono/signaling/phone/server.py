"""A SIP user agent server (RFC 3261) on UDP, optionally TCP: answers calls from a PBX or trunk.

INVITE (100, 180, 200 with SDP, retransmitted until ACK), ACK, BYE both ways, CANCEL (487), OPTIONS,
re-INVITE (hold, a new codec, session refresh), NOTIFY for our REFER, INFO DTMF. An INVITE without an offer
gets ours in the 200 and the answer is taken from the ACK (negotiation.py); SDP is found in multipart bodies
too (body.py); a Require we do not support gets 420 (extensions.py). Responses go back where the request came
from and in-dialog requests follow the Record-Route set, so it works behind a proxy. Malformed messages get
400 when they can be answered at all, and are dropped with a log line when not.

In-dialog requests must match a dialog by Call-ID and both tags (RFC 3261 §12.2.2) and come from the
dialog's peer or the nearest proxy of its route set (else 481 / 403); with digest authentication on, a
re-INVITE is challenged like the INVITE. Every call gets Pono's own call id; the SIP Call-ID stays on the
dialog. Offered media addresses go through sdp_policy before anything is sent to them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import Awaitable, Callable

from pono.agent.personas import Persona, PersonaUnavailable, UnknownPersona
from pono.events import CallEvent, EventType
from pono.logs import own
from pono.settings import Settings
from pono.signaling.phone.body import UnsupportedBody
from pono.signaling.phone.calls import CallHost
from pono.signaling.phone.dialog import Dialog, Dialogs, Send
from pono.signaling.phone.digest import DigestAuth
from pono.signaling.phone.extensions import ALLOW, capabilities, unsupported
from pono.signaling.phone.in_dialog import InDialogRequests
from pono.signaling.phone.message import SipMessage, SipParseError, parse, response, tag, uri_user
from pono.signaling.phone.negotiation import Destination, answer_in, bye_reason, offer_in, refusal
from pono.signaling.phone.rtp import NoMediaPort, RtpSession, bind_rtp, port_range
from pono.signaling.phone.sdp import OUR_DTMF, SdpError, answer, our_offer
from pono.signaling.phone.sdp_policy import MediaPolicy
from pono.signaling.phone.tcp import SipTcpListener
from pono.signaling.phone.transactions import Transactions, bad_request
from pono.signaling.phone.transport import PhoneTransport

log = logging.getLogger(__name__)

PersonaLookup = Callable[[str], Awaitable[Persona]]


class SipServer:
    """The SIP listener. `calls` runs the calls (CallHost); `lookup(dialed number)` picks the persona
    (default: calls.persona_for_number); `secret` is the key every replica shares for digest nonces
    (pono.storage.users.shared_secret; None: derived from the trunk credentials alone).
    Raises ValueError at construction for a bad PONO_SIP_RTP_PORTS or PONO_SIP_MEDIA_NETWORKS."""

    def __init__(self, settings: Settings, calls: CallHost, lookup: PersonaLookup | None = None,
                 secret: bytes | None = None) -> None:
        self.settings = settings
        self.host = settings.sip_host or settings.host
        # Bad settings fail the start, loudly.
        self._rtp_ports = port_range(settings.sip_rtp_ports)
        self._allowed = [ipaddress.ip_network(n, strict=False) for n in settings.sip_allowed_sources]
        self.media_policy = MediaPolicy.build(settings.sip_media_networks, self.host)
        self.calls = calls
        self.lookup = lookup or calls.persona_for_number
        self.dialogs = Dialogs()  # by Pono's call id
        self.transactions = Transactions()
        self._reply = self.transactions.reply
        self.in_dialog = InDialogRequests(self.dialogs, calls, self._reply, self._drop)
        self._tasks: set[asyncio.Future[object]] = set()
        password = settings.sip_auth_password
        self._auth = DigestAuth(settings.sip_auth_user, password.get_secret_value(), secret) \
            if settings.sip_auth_user and password else None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: SipTcpListener | None = None
        self.port = 0

    # -- sockets --------------------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        server = self

        class Udp(asyncio.DatagramProtocol):
            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                assert server._udp is not None
                server._spawn(server._handle(data, addr, lambda out: server._udp.sendto(out, addr)))  # type: ignore[union-attr]

        self._udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=(self.host, self.settings.sip_port or 5060))
        self.port = self._udp.get_extra_info("sockname")[1]
        if self.settings.sip_tcp:
            self._tcp = SipTcpListener(
                lambda data, addr, send: self._spawn(self._handle(data, addr, send)),
                lambda send: any(d.send is send and d.state != "ended" for d in self.dialogs.values()),
                self.settings.sip_tcp_max_connections, self.settings.sip_tcp_idle_timeout_s)
            await self._tcp.start(self.host, self.port)
        log.info("SIP listening on %s:%s (udp%s)", own(self.host), self.port, ", tcp" if self._tcp else "")

    def _spawn(self, coro: Awaitable[object]) -> asyncio.Future[object]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    @property
    def public_address(self) -> str:
        """The address written into SDP and Contact: PONO_SIP_PUBLIC_ADDRESS, else the bound one."""
        return self.settings.sip_public_address or {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)

    @property
    def _hostport(self) -> str:
        host = self.public_address
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def close(self) -> None:
        for dialog in list(self.dialogs.values()):
            if dialog.transport is not None:
                await dialog.transport.close()
        for task in list(self._tasks):
            task.cancel()
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()

    # -- dispatch -------------------------------------------------------------------------------
    async def _handle(self, data: bytes, addr: tuple[str, int], send: Send) -> None:
        if not data.strip():
            return  # CRLF keep-alive
        try:
            msg = parse(data)
        except SipParseError as exc:
            bad_request(data, exc, addr, send)
            return
        if self._allowed and not any(ipaddress.ip_address(addr[0]) in n for n in self._allowed):
            if msg.is_request and msg.method != "ACK":
                send(response(msg, 403, "Forbidden").to_bytes())
            log.warning("SIP from %s refused: not in PONO_SIP_ALLOWED_SOURCES", addr[0])
            return
        if not msg.is_request:
            self.transactions.answered(msg)
            return
        if (again := self.transactions.retransmission(msg)) is not None:
            send(again)  # a retransmitted request: the same answer again
            return
        method = (msg.method or "").lower()
        handler = getattr(self, f"_on_{method}", None) or self.in_dialog.handlers.get(method)
        if handler is None:
            self._reply(msg, send, 405, "Method Not Allowed", headers=[("allow", ALLOW)])
            return
        if missing := unsupported(msg):  # RFC 3261 §8.2.2.3: before anything else is done or sent
            self._reply(msg, send, 420, "Bad Extension", headers=[("unsupported", ", ".join(missing[:32]))])
            return
        await handler(msg, addr, send)

    def _refuse_offer(self, msg: SipMessage, send: Send, exc: SdpError | UnsupportedBody,
                      to_tag: str | None = None) -> None:
        log.info("SIP offer in Call-ID %s refused: %s", msg.call_id[:80], exc)
        status, reason, headers = refusal(exc)
        self._reply(msg, send, status, reason, to_tag, headers=headers)

    def _authorised(self, msg: SipMessage, send: Send, to_tag: str | None = None) -> bool:
        """Digest authentication when configured (RFC 3261 §22.2): False after answering 401."""
        if self._auth is None:
            return True
        problem = self._auth.verify(msg.get("authorization"), msg.method or "", msg.uri or "")
        if problem is None:
            return True
        if msg.get("authorization"):
            log.warning("SIP %s from Call-ID %s not authenticated: %s", msg.method, msg.call_id[:80], problem)
        self._reply(msg, send, 401, "Unauthorized", to_tag,
                    headers=[("www-authenticate", self._auth.challenge(stale=problem == "stale"))])
        return False

    # -- INVITE ---------------------------------------------------------------------------------
    async def _on_invite(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        if tag(msg.get("to")):
            await self._reinvite(msg, addr, send)
            return
        existing = self.dialogs.creating(msg)
        if existing is not None and existing.state != "ended":
            if existing.invite.branch != msg.branch:  # RFC 3261 §8.2.2.2: a merged request
                self._reply(msg, send, 482, "Loop Detected")
            return  # else a retransmission while we are still working on it
        if not self._authorised(msg, send):
            return
        if self.calls.draining or not self.calls.models.loaded.is_set():  # draining, or still starting
            self._reply(msg, send, 503, "Service Unavailable", headers=[("retry-after", "5")])
            return
        active = sum(1 for d in self.dialogs.values() if d.state != "ended")
        # A place among PONO_MAX_CALLS is held from here (before any await) until the call starts or fails.
        if active >= self.settings.sip_max_calls or not self.calls.reserve():
            self._reply(msg, send, 486, "Busy Here")
            return
        try:
            offered = offer_in(msg, self.media_policy, self.public_address)  # None: we make the offer
        except (SdpError, UnsupportedBody) as exc:
            self.calls.release()
            self._refuse_offer(msg, send, exc)
            return
        offer, destination = offered or (None, None)
        dialog = Dialog(self.calls.new_call_id(), msg.call_id, msg, send, peer=addr, offer=offer, reserved=True)
        self.dialogs.add(dialog)
        log.info("SIP call %s: Call-ID %s from %s", dialog.call_id, msg.call_id[:80], addr[0])
        send(response(msg, 100, "Trying").to_bytes())
        send(response(msg, 180, "Ringing", dialog.local_tag).to_bytes())
        try:
            await self._answer(dialog, msg, send, destination)
        except NoMediaPort as exc:
            log.warning("SIP call %s refused: %s", dialog.call_id, exc)
            self._reply(msg, send, 503, "Service Unavailable", dialog.local_tag, headers=[("retry-after", "5")])
            await self._drop(dialog)
        except PersonaUnavailable:  # Postgres is away and this number's persona was never seen: can't verify it
            log.warning("SIP call %s refused: its persona cannot be verified now", dialog.call_id)
            self._reply(msg, send, 503, "Service Unavailable", dialog.local_tag, headers=[("retry-after", "30")])
            await self._drop(dialog)
        except UnknownPersona:
            log.warning("SIP call %s refused: the dialed number maps to no persona", dialog.call_id)
            self._reply(msg, send, 404, "Not Found", dialog.local_tag)
            await self._drop(dialog)
        except Exception:
            log.exception("SIP call %s could not be answered", dialog.call_id)
            if dialog.final is None:
                self._reply(msg, send, 500, "Server Internal Error", dialog.local_tag)
            await self._drop(dialog)

    async def _answer(self, dialog: Dialog, msg: SipMessage, send: Send, destination: Destination) -> None:
        """The 200: our answer, or our offer when the INVITE had none (the call then starts with the ACK's
        answer, see _take_answer)."""
        if self.settings.sip_ring_ms:
            await asyncio.sleep(self.settings.sip_ring_ms / 1000)
        persona = await self.lookup(uri_user(msg.uri or "")[:64])
        transport: PhoneTransport | None = None
        offer = dialog.offer
        codec = (offer.codec, offer.payload_type, offer.dtmf_type) if offer else ("PCMU", 0, OUR_DTMF)
        rtp = await bind_rtp(
            lambda: RtpSession(*codec, destination,
                               on_audio=lambda pcm: transport.receive_audio(pcm) if transport else None,
                               on_dtmf=lambda digit: transport.receive_dtmf(digit) if transport else None,
                               media_timeout_s=self.settings.sip_media_timeout_s,
                               on_media_timeout=lambda: self._spawn(self._media_timed_out(dialog))),
            self.host, self._rtp_ports)
        dialog.rtp = rtp
        if dialog.cancelled:
            await self._drop(dialog)
            return
        transport = PhoneTransport("sip", rtp.out, on_close=lambda: self._hang_up(dialog))
        dialog.transport = transport
        if offer is None:
            body = our_offer(self.public_address, rtp.local_port, dialog.sdp_version).encode()
            dialog.awaiting_answer = msg.cseq[0]
        else:
            body = answer(offer, self.public_address, rtp.local_port, dialog.sdp_version).encode()
        dialog.final = self._reply(msg, send, 200, "OK", dialog.local_tag, headers=self._contact(), body=body)

        def begin() -> None:
            rtp.start()
            caller = uri_user(msg.get("from") or "")[:64] or None
            call = self.calls.start(dialog.call_id, transport, persona=persona, caller=caller,
                                    reserved=dialog.reserved)
            dialog.reserved = False
            call.events.subscribe(lambda event: self._on_call_event(dialog, event))

        if offer is None:
            dialog.begin = begin
        else:
            begin()
        self._until_acked(dialog)

    async def _media_timed_out(self, dialog: Dialog) -> None:
        log.warning("SIP call %s: no RTP for %s s; hanging up", dialog.call_id, self.settings.sip_media_timeout_s)
        if (call := self.calls.calls.get(dialog.call_id)) is not None:
            call.end_reason = "media_timeout"
        if dialog.transport is not None:
            await dialog.transport.close()

    def _contact(self) -> list[tuple[str, str]]:
        return [("contact", f"<sip:pono@{self._hostport}>"), *capabilities(), ("content-type", "application/sdp")]

    def _until_acked(self, dialog: Dialog) -> None:
        """Resend the final response just sent until the ACK (Dialog.until_acked); without one the call ends
        (closing its transport says BYE)."""
        self._spawn(dialog.until_acked(
            lambda: dialog.transport.close() if dialog.transport is not None else self._drop(dialog)))

    async def _take_answer(self, dialog: Dialog, ack: SipMessage) -> None:
        """The ACK of a 2xx that carried our offer: its answer sets the media up (and starts the call after an
        INVITE without an offer). Without a usable one, a new call cannot work and is hung up with a BYE
        saying why (RFC 3261 §13.3.1.4 leaves it so); a re-INVITE's session stays as it was (§14.2)."""
        dialog.awaiting_answer = None
        try:
            session, destination = answer_in(ack, self.media_policy, self.public_address)
        except SdpError as exc:
            log.warning("SIP call %s: no usable answer in the ACK (%s)", dialog.call_id, exc)
            if dialog.begin is not None:
                dialog.begin = None
                await self._hang_up(dialog, [bye_reason(exc)])
            return
        assert dialog.rtp is not None
        dialog.rtp.apply(session, destination)
        dialog.offer = session
        if dialog.begin is not None:
            begin, dialog.begin = dialog.begin, None
            begin()

    async def _reinvite(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        dialog = self.in_dialog.find(msg, addr, send)
        if dialog is None or not self._authorised(msg, send):
            return
        if dialog.rtp is None:
            self._reply(msg, send, 481, "Call/Transaction Does Not Exist")
            return
        if dialog.awaiting_answer is not None:  # our offer's answer has not come yet (RFC 3261 §14.2)
            self._reply(msg, send, 491, "Request Pending", dialog.local_tag)
            return
        try:  # a refused offer leaves the session as it was (RFC 3261 §14.2)
            offered = offer_in(msg, self.media_policy, self.public_address)
        except (SdpError, UnsupportedBody) as exc:
            self._refuse_offer(msg, send, exc, dialog.local_tag)
            return
        dialog.sdp_version += 1
        if offered is None:  # we offer the session again, the codec in use first; the ACK answers
            body = our_offer(self.public_address, dialog.rtp.local_port, dialog.sdp_version, dialog.rtp.codec)
            dialog.awaiting_answer = msg.cseq[0]
        else:
            dialog.rtp.apply(*offered)
            dialog.offer = offered[0]
            body = answer(offered[0], self.public_address, dialog.rtp.local_port, dialog.sdp_version)
        dialog.acked.clear()
        dialog.final = self._reply(msg, send, 200, "OK", dialog.local_tag, headers=self._contact(),
                                   body=body.encode())
        self._until_acked(dialog)

    # -- other requests -------------------------------------------------------------------------
    async def _on_ack(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        dialog = self.dialogs.matching(msg)
        if dialog is not None and dialog.trusts(addr):
            dialog.acked.set()
            if dialog.cancelled:
                await self._drop(dialog)
            elif dialog.state != "ended" and msg.cseq[0] == dialog.awaiting_answer:
                await self._take_answer(dialog, msg)

    async def _on_cancel(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        dialog = self.dialogs.creating(msg)
        if dialog is None or dialog.invite.branch != msg.branch or not dialog.trusts(addr):
            self._reply(msg, send, 481, "Call/Transaction Does Not Exist")
            return
        self._reply(msg, send, 200, "OK")
        if dialog.final is None:  # not answered yet: the INVITE ends with 487
            dialog.cancelled = True
            dialog.final = self._reply(dialog.invite, dialog.send, 487, "Request Terminated", dialog.local_tag)
            self._until_acked(dialog)

    # -- requests we send -----------------------------------------------------------------------
    def _on_call_event(self, dialog: Dialog, event: CallEvent) -> None:
        if event.type is EventType.TRANSFER:
            if self.settings.sip_operator_uri:
                self._spawn(self._request(dialog, "REFER", [
                    ("refer-to", f"<{self.settings.sip_operator_uri}>"),
                    ("referred-by", f"<sip:pono@{self._hostport}>")]))
            else:
                log.warning("transfer asked on SIP call %s, but PONO_SIP_OPERATOR_URI is not set", dialog.call_id)

    async def _hang_up(self, dialog: Dialog, extra: list[tuple[str, str]] | None = None) -> None:
        """The call ended on our side (end_call, an operator, shutdown, an unusable answer): BYE (with `extra`
        headers, e.g. a Reason), unless the caller left first."""
        if dialog.state != "ended":
            dialog.state = "ended"
            await self._request(dialog, "BYE", extra)
        await self._drop(dialog)

    async def _request(self, dialog: Dialog, method: str, extra: list[tuple[str, str]] | None = None) \
            -> SipMessage | None:
        """An in-dialog request of ours, retransmitted until answered (see Transactions.request)."""
        branch, data = dialog.request(method, self._hostport, extra or [])
        return await self.transactions.request(dialog.send, data, branch, f"{method} on call {dialog.call_id}")

    async def _drop(self, dialog: Dialog) -> None:
        dialog.state = "ended"
        if dialog.reserved:  # the call never started: give its place back
            dialog.reserved = False
            self.calls.release()
        self.dialogs.remove(dialog)
        if dialog.rtp is not None:
            await dialog.rtp.close()
            dialog.rtp = None
