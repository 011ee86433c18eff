"""A SIP user agent server (RFC 3261) on UDP, optionally TCP: answers calls from a PBX or trunk.

INVITE (100, 180, 200 with SDP, retransmitted until ACK), ACK, BYE both ways, CANCEL (487), OPTIONS,
re-INVITE (hold, session refresh), NOTIFY for our REFER, INFO DTMF. Responses go back where the request came
from and in-dialog requests follow the Record-Route set, so it works behind a proxy. Malformed messages get
400 when they can be answered at all, and are dropped with a log line when not.

In-dialog requests must match a dialog by Call-ID and both tags (RFC 3261 §12.2.2) and come from the
dialog's peer or the nearest proxy of its route set (else 481 / 403); with digest authentication on, a
re-INVITE is challenged like the INVITE. Every call gets Pono's own call id; the SIP Call-ID stays on the
dialog. Offered media addresses go through sdp_policy before anything is sent to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import time
from collections.abc import Awaitable, Callable

from pono.agent.personas import Persona
from pono.events import CallEvent, EventType
from pono.settings import Settings
from pono.signaling.phone.calls import CallHost
from pono.signaling.phone.dialog import T1, T2, Dialog, Dialogs, Send
from pono.signaling.phone.digest import DigestAuth
from pono.signaling.phone.message import SipMessage, SipParseError, parse, response, tag, uri_user
from pono.signaling.phone.rtp import NoMediaPort, RtpSession, bind_rtp, port_range
from pono.signaling.phone.sdp import Offer, SdpError, answer, parse_offer
from pono.signaling.phone.sdp_policy import MediaPolicy
from pono.signaling.phone.tcp import SipTcpListener
from pono.signaling.phone.transactions import Transactions, bad_request
from pono.signaling.phone.transport import PhoneTransport

log = logging.getLogger(__name__)

ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, NOTIFY, INFO"
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
        log.info("SIP listening on %s:%s (udp%s)", self.host, self.port, ", tcp" if self._tcp else "")

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
        handler = getattr(self, f"_on_{(msg.method or '').lower()}", None)
        if handler is None:
            self._reply(msg, send, 405, "Method Not Allowed", headers=[("allow", ALLOW)])
            return
        await handler(msg, addr, send)

    def _refuse_offer(self, msg: SipMessage, send: Send, exc: SdpError, to_tag: str | None = None) -> None:
        log.info("SIP offer in Call-ID %s refused: %s", msg.call_id[:80], exc)
        self._reply(msg, send, 488, "Not Acceptable Here", to_tag, headers=[("warning", f'304 pono "{exc}"')])

    def _authorised(self, msg: SipMessage, send: Send, to_tag: str | None = None) -> bool:
        """Digest authentication when configured (RFC 3261 §22.2): False after answering 401."""
        if self._auth is None:
            return True
        refusal = self._auth.verify(msg.get("authorization"), msg.method or "", msg.uri or "")
        if refusal is None:
            return True
        if msg.get("authorization"):
            log.warning("SIP %s from Call-ID %s not authenticated: %s", msg.method, msg.call_id[:80], refusal)
        self._reply(msg, send, 401, "Unauthorized", to_tag,
                    headers=[("www-authenticate", self._auth.challenge(stale=refusal == "stale"))])
        return False

    def _in_dialog(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> Dialog | None:
        """The live dialog an in-dialog request belongs to; None after answering 481 or 403."""
        dialog = self.dialogs.matching(msg)
        if dialog is None or dialog.state == "ended":
            self._reply(msg, send, 481, "Call/Transaction Does Not Exist")
            return None
        if not dialog.trusts(addr):
            log.warning("SIP %s for call %s from %s refused: not the dialog's peer or route", msg.method,
                        dialog.call_id, addr[0])
            self._reply(msg, send, 403, "Forbidden")
            return None
        return dialog

    def _offer(self, msg: SipMessage) -> tuple[Offer, tuple[str, int] | None]:
        """The SDP offer of an (re-)INVITE and where its media goes (None: held). Raises SdpError."""
        if (msg.get("content-type") or "").split(";")[0].strip().lower() != "application/sdp":
            raise SdpError("an SDP offer is required")
        offer = parse_offer(msg.body.decode("utf-8", "replace"))
        return offer, self.media_policy.destination(offer, self.public_address)

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
        active = sum(1 for d in self.dialogs.values() if d.state != "ended")
        if active >= self.settings.sip_max_calls or self.calls.full or self.calls.draining:
            self._reply(msg, send, 486, "Busy Here")
            return
        if not self.calls.models.loaded.is_set():
            self._reply(msg, send, 503, "Service Unavailable", headers=[("retry-after", "5")])
            return
        try:
            offer, destination = self._offer(msg)
        except SdpError as exc:
            self._refuse_offer(msg, send, exc)
            return
        dialog = Dialog(self.calls.new_call_id(), msg.call_id, msg, send, peer=addr, offer=offer)
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
        except Exception:
            log.exception("SIP call %s could not be answered", dialog.call_id)
            if dialog.final is None:
                self._reply(msg, send, 500, "Server Internal Error", dialog.local_tag)
            await self._drop(dialog)

    async def _answer(self, dialog: Dialog, msg: SipMessage, send: Send, destination: tuple[str, int] | None) \
            -> None:
        assert dialog.offer is not None
        if self.settings.sip_ring_ms:
            await asyncio.sleep(self.settings.sip_ring_ms / 1000)
        persona = await self.lookup(uri_user(msg.uri or "")[:64])
        transport: PhoneTransport | None = None
        offer = dialog.offer
        rtp = await bind_rtp(
            lambda: RtpSession(offer.codec, offer.payload_type, offer.dtmf_type, destination,
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
        body = answer(offer, self.public_address, rtp.local_port, dialog.sdp_version).encode()
        dialog.final = self._reply(msg, send, 200, "OK", dialog.local_tag, headers=self._contact(), body=body)
        rtp.start()
        caller = uri_user(msg.get("from") or "")[:64] or None
        call = self.calls.start(dialog.call_id, transport, persona=persona, caller=caller)
        call.events.subscribe(lambda event: self._on_call_event(dialog, event))
        self._spawn(self._until_acked(dialog))

    async def _media_timed_out(self, dialog: Dialog) -> None:
        log.warning("SIP call %s: no RTP for %s s; hanging up", dialog.call_id, self.settings.sip_media_timeout_s)
        if (call := self.calls.calls.get(dialog.call_id)) is not None:
            call.end_reason = "media_timeout"
        if dialog.transport is not None:
            await dialog.transport.close()

    def _contact(self) -> list[tuple[str, str]]:
        return [("contact", f"<sip:pono@{self._hostport}>"), ("allow", ALLOW),
                ("supported", "replaces, timer"), ("content-type", "application/sdp")]

    async def _until_acked(self, dialog: Dialog) -> None:
        """Timer G: resend the final response (T1, 2T1 … T2) until the ACK; timer H: give up after 64·T1."""
        interval, deadline = T1, time.monotonic() + 64 * T1
        while not dialog.acked.is_set() and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(dialog.acked.wait(), interval)
            if not dialog.acked.is_set() and dialog.final is not None:
                dialog.send(dialog.final)
            interval = min(interval * 2, T2)
        if not dialog.acked.is_set():
            log.warning("SIP call %s: no ACK for the answer; hanging up", dialog.call_id)
            if dialog.transport is not None:
                await dialog.transport.close()
            else:
                await self._drop(dialog)
        elif dialog.state == "early":
            dialog.state = "confirmed"

    async def _reinvite(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        dialog = self._in_dialog(msg, addr, send)
        if dialog is None or not self._authorised(msg, send):
            return
        if dialog.rtp is None:
            self._reply(msg, send, 481, "Call/Transaction Does Not Exist")
            return
        offer, destination = dialog.offer, dialog.rtp.remote
        if msg.body:
            try:  # a refused offer leaves the session as it was (RFC 3261 §14.2)
                offer, destination = self._offer(msg)
            except SdpError as exc:
                self._refuse_offer(msg, send, exc, dialog.local_tag)
                return
        assert offer is not None
        held = offer.direction in ("sendonly", "inactive") or destination is None
        dialog.rtp.sending = not held  # on hold: stop sending, keep the call
        dialog.rtp.last_heard = time.monotonic()  # a held phone may fall silent; the media clock restarts
        if destination is not None and not held:
            dialog.rtp.retarget(destination)
        dialog.offer, dialog.sdp_version = offer, dialog.sdp_version + 1
        dialog.acked.clear()
        body = answer(offer, self.public_address, dialog.rtp.local_port, dialog.sdp_version).encode()
        dialog.final = self._reply(msg, send, 200, "OK", dialog.local_tag, headers=self._contact(), body=body)
        self._spawn(self._until_acked(dialog))

    # -- other requests -------------------------------------------------------------------------
    async def _on_ack(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        dialog = self.dialogs.matching(msg)
        if dialog is not None and dialog.trusts(addr):
            dialog.acked.set()
            if dialog.cancelled:
                await self._drop(dialog)

    async def _on_cancel(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        dialog = self.dialogs.creating(msg)
        if dialog is None or dialog.invite.branch != msg.branch or not dialog.trusts(addr):
            self._reply(msg, send, 481, "Call/Transaction Does Not Exist")
            return
        self._reply(msg, send, 200, "OK")
        if dialog.final is None:  # not answered yet: the INVITE ends with 487
            dialog.cancelled = True
            dialog.final = self._reply(dialog.invite, dialog.send, 487, "Request Terminated", dialog.local_tag)
            self._spawn(self._until_acked(dialog))

    async def _on_bye(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        dialog = self._in_dialog(msg, addr, send)
        if dialog is None:
            return
        self._reply(msg, send, 200, "OK")
        dialog.state = "ended"
        dialog.acked.set()
        if dialog.transport is not None:
            if (call := self.calls.calls.get(dialog.call_id)) is not None:
                call.end_reason = "caller_hangup"
            dialog.transport.ended()  # the call loop ends, and its close() frees the media
        else:
            await self._drop(dialog)

    async def _on_options(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        self._reply(msg, send, 200, "OK", headers=[("allow", ALLOW), ("accept", "application/sdp"),
                                                    ("supported", "replaces, timer")])

    async def _on_notify(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        dialog = self._in_dialog(msg, addr, send)
        if dialog is None:
            return
        self._reply(msg, send, 200, "OK")
        if re.match(rb"SIP/2\.0 2\d\d", msg.body.strip()) and dialog.transport is not None:
            if (call := self.calls.calls.get(dialog.call_id)) is not None:
                call.end_reason = "transferred"
            await dialog.transport.close()  # the operator has the caller: we leave

    async def _on_info(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        dialog = self._in_dialog(msg, addr, send)
        if dialog is None:
            return
        self._reply(msg, send, 200, "OK")
        found = re.search(rb"Signal\s*=\s*([0-9*#A-D])", msg.body)
        if dialog.transport is not None and found:
            dialog.transport.receive_dtmf(found.group(1).decode())

    # -- requests we send -----------------------------------------------------------------------
    def _on_call_event(self, dialog: Dialog, event: CallEvent) -> None:
        if event.type is EventType.TRANSFER:
            if self.settings.sip_operator_uri:
                self._spawn(self._request(dialog, "REFER", [
                    ("refer-to", f"<{self.settings.sip_operator_uri}>"),
                    ("referred-by", f"<sip:pono@{self._hostport}>")]))
            else:
                log.warning("transfer asked on SIP call %s, but PONO_SIP_OPERATOR_URI is not set", dialog.call_id)

    async def _hang_up(self, dialog: Dialog) -> None:
        """The call ended on our side (end_call, an operator, shutdown): BYE, unless the caller left first."""
        if dialog.state != "ended":
            dialog.state = "ended"
            await self._request(dialog, "BYE")
        await self._drop(dialog)

    async def _request(self, dialog: Dialog, method: str, extra: list[tuple[str, str]] | None = None) \
            -> SipMessage | None:
        """An in-dialog request of ours, retransmitted until answered (see Transactions.request)."""
        branch, data = dialog.request(method, self._hostport, extra or [])
        return await self.transactions.request(dialog.send, data, branch, f"{method} on call {dialog.call_id}")

    async def _drop(self, dialog: Dialog) -> None:
        dialog.state = "ended"
        self.dialogs.remove(dialog)
        if dialog.rtp is not None:
            await dialog.rtp.close()
            dialog.rtp = None
