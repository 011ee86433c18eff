"""A SIP user agent server (RFC 3261) on UDP, optionally TCP: answers calls from a PBX or trunk.

INVITE (100, 180, 200 with SDP, retransmitted until ACK), ACK, BYE both ways, CANCEL (487), OPTIONS,
re-INVITE (hold, session refresh), NOTIFY for our REFER, INFO DTMF. Responses go back where the request came
from and in-dialog requests follow the Record-Route set, so it works behind a proxy. Malformed messages get
400 when they can be answered at all, and are dropped with a log line when not.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
import secrets
import time
from collections.abc import Awaitable, Callable

from pono.agent.personas import Persona
from pono.calls import CallManager
from pono.events import CallEvent, EventType
from pono.settings import Settings
from pono.signaling.phone.dialog import T1, T2, Dialog, Send
from pono.signaling.phone.digest import DigestAuth
from pono.signaling.phone.message import SipMessage, SipParseError, parse, response, tag, uri_user
from pono.signaling.phone.rtp import NoMediaPort, RtpSession, bind_rtp, port_range
from pono.signaling.phone.sdp import SdpError, answer, parse_offer
from pono.signaling.phone.transport import PhoneTransport

log = logging.getLogger(__name__)

ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, NOTIFY, INFO"
PersonaLookup = Callable[[str], Awaitable[Persona]]


class SipServer:
    def __init__(self, settings: Settings, calls: CallManager, lookup: PersonaLookup) -> None:
        self.settings = settings
        self.calls = calls
        self.lookup = lookup
        self.host = settings.sip_host or settings.host
        self.dialogs: dict[str, Dialog] = {}
        self._cache: dict[tuple[str, str], tuple[float, bytes]] = {}  # server transactions: last response
        self._pending: dict[str, asyncio.Future[SipMessage]] = {}  # our client transactions, by branch
        self._tasks: set[asyncio.Task[object]] = set()
        self._rtp_ports = port_range(settings.sip_rtp_ports)  # a bad range fails the start, loudly
        self._allowed = [ipaddress.ip_network(n, strict=False) for n in settings.sip_allowed_sources]
        password = settings.sip_auth_password
        self._auth = DigestAuth(settings.sip_auth_user, password.get_secret_value()) \
            if settings.sip_auth_user and password else None
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
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
            self._tcp = await asyncio.start_server(self._tcp_connection, self.host, self.port)
        log.info("SIP listening on %s:%s (udp%s)", self.host, self.port, ", tcp" if self._tcp else "")

    async def _tcp_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        addr = writer.get_extra_info("peername")[:2]
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                if not head.strip():
                    continue  # keep-alive
                found = re.search(rb"\r\n(?:content-length|l)\s*:\s*(\d+)", head, re.IGNORECASE)
                body = await reader.readexactly(int(found.group(1))) if found else b""
                self._spawn(self._handle(head + body, addr, writer.write))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()

    def _spawn(self, coro: Awaitable[object]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def public_address(self) -> str:
        return self.settings.sip_public_address or (self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1")

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
            self._bad_request(data, exc, addr, send)
            return
        if self._allowed and not any(ipaddress.ip_address(addr[0]) in n for n in self._allowed):
            if msg.is_request and msg.method != "ACK":
                send(response(msg, 403, "Forbidden").to_bytes())
            log.warning("SIP from %s refused: not in PONO_SIP_ALLOWED_SOURCES", addr[0])
            return
        if not msg.is_request:
            future = self._pending.get(msg.branch)
            if future is not None and not future.done() and (msg.status or 0) >= 200:
                future.set_result(msg)
            return
        key = (msg.branch, msg.method or "")
        cached = self._cache.get(key)
        if cached is not None and msg.method != "ACK":
            send(cached[1])  # a retransmitted request: the same answer again
            return
        handler = getattr(self, f"_on_{(msg.method or '').lower()}", None)
        if handler is None:
            self._reply(msg, send, 405, "Method Not Allowed", headers=[("allow", ALLOW)])
            return
        await handler(msg, addr, send)

    def _bad_request(self, data: bytes, exc: Exception, addr: tuple[str, int], send: Send) -> None:
        text = data[:4096].decode("utf-8", "replace")
        needed = {h: re.search(rf"^{h}\s*:\s*(.+?)\r?$", text, re.IGNORECASE | re.MULTILINE)
                  for h in ("via", "from", "to", "call-id", "cseq")}
        if text.split(" ", 1)[0].isupper() and "SIP/2.0" in text.split("\n", 1)[0] and all(needed.values()):
            request = SipMessage(method="X", uri="x", headers=[(h, m.group(1)) for h, m in needed.items() if m])
            send(response(request, 400, f"Bad Request ({exc})"[:120]).to_bytes())
            log.info("SIP 400 to %s: %s", addr[0], exc)
        else:
            log.warning("SIP message from %s dropped: %s", addr[0], exc)

    def _reply(self, request: SipMessage, send: Send, status: int, reason: str, to_tag: str | None = None,
               headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> bytes:
        out = response(request, status, reason, to_tag, headers, body).to_bytes()
        send(out)
        if status >= 200:
            now = time.monotonic()
            self._cache[(request.branch, request.method or "")] = (now, out)
            if len(self._cache) > 2000:  # transactions live 32 s
                self._cache = {k: v for k, v in self._cache.items() if now - v[0] < 32}
        return out

    # -- INVITE ---------------------------------------------------------------------------------
    async def _on_invite(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        if tag(msg.get("to")):
            await self._reinvite(msg, send)
            return
        if msg.call_id in self.dialogs:
            return  # a retransmission while we are still working on it
        if self._auth is not None and not self._auth.check(msg.get("authorization"), "INVITE"):
            self._reply(msg, send, 401, "Unauthorized", headers=[("www-authenticate", self._auth.challenge())])
            return
        active = sum(1 for d in self.dialogs.values() if d.state != "ended")
        if active >= self.settings.sip_max_calls or self.calls.full or self.calls.draining:
            self._reply(msg, send, 486, "Busy Here")
            return
        if not self.calls.models.loaded.is_set():
            self._reply(msg, send, 503, "Service Unavailable", headers=[("retry-after", "5")])
            return
        try:
            if (msg.get("content-type") or "").split(";")[0].strip().lower() != "application/sdp":
                raise SdpError("an SDP offer is required")
            offer = parse_offer(msg.body.decode("utf-8", "replace"))
        except SdpError as exc:
            self._reply(msg, send, 488, "Not Acceptable Here", headers=[("warning", f'304 pono "{exc}"')])
            return
        dialog = Dialog(msg.call_id, msg, send, offer=offer)
        self.dialogs[msg.call_id] = dialog
        send(response(msg, 100, "Trying").to_bytes())
        send(response(msg, 180, "Ringing", dialog.local_tag).to_bytes())
        try:
            await self._answer(dialog, msg, send)
        except NoMediaPort as exc:
            log.warning("SIP call %s refused: %s", msg.call_id, exc)
            self._reply(msg, send, 503, "Service Unavailable", dialog.local_tag, headers=[("retry-after", "5")])
            await self._drop(dialog)
        except Exception:
            log.exception("SIP call %s could not be answered", msg.call_id)
            if dialog.final is None:
                self._reply(msg, send, 500, "Server Internal Error", dialog.local_tag)
            await self._drop(dialog)

    async def _answer(self, dialog: Dialog, msg: SipMessage, send: Send) -> None:
        assert dialog.offer is not None
        if self.settings.sip_ring_ms:
            await asyncio.sleep(self.settings.sip_ring_ms / 1000)
        persona = await self.lookup(uri_user(msg.uri or ""))
        transport: PhoneTransport | None = None
        offer = dialog.offer
        rtp = await bind_rtp(
            lambda: RtpSession(offer.codec, offer.payload_type, offer.dtmf_type, (offer.address, offer.port),
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
        caller = uri_user(msg.get("from") or "") or None
        call = self.calls.start(msg.call_id, transport, persona=persona, caller=caller)
        call.events.subscribe(lambda event: self._on_call_event(dialog, event))
        self._spawn(self._until_acked(dialog))

    async def _media_timed_out(self, dialog: Dialog) -> None:
        log.warning("SIP call %s: no RTP for %s s; hanging up", dialog.call_id, self.settings.sip_media_timeout_s)
        if (call := self.calls.calls.get(dialog.call_id)) is not None:
            call.end_reason = "media_timeout"
        if dialog.transport is not None:
            await dialog.transport.close()

    def _contact(self) -> list[tuple[str, str]]:
        return [("contact", f"<sip:pono@{self.public_address}:{self.port}>"), ("allow", ALLOW),
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

    async def _reinvite(self, msg: SipMessage, send: Send) -> None:
        dialog = self.dialogs.get(msg.call_id)
        if dialog is None or dialog.state == "ended" or dialog.rtp is None:
            self._reply(msg, send, 481, "Call/Transaction Does Not Exist")
            return
        offer = dialog.offer
        if msg.body:
            try:
                offer = parse_offer(msg.body.decode("utf-8", "replace"))
            except SdpError as exc:
                self._reply(msg, send, 488, "Not Acceptable Here", headers=[("warning", f'304 pono "{exc}"')])
                return
        assert offer is not None
        held = offer.direction in ("sendonly", "inactive") or offer.address == "0.0.0.0"
        dialog.rtp.sending = not held  # on hold: stop sending, keep the call
        dialog.rtp.last_heard = time.monotonic()  # a held phone may fall silent; the media clock restarts
        if not held and offer.address != "0.0.0.0":
            dialog.rtp.remote = (offer.address, offer.port)
        dialog.offer, dialog.sdp_version = offer, dialog.sdp_version + 1
        dialog.acked.clear()
        body = answer(offer, self.public_address, dialog.rtp.local_port, dialog.sdp_version).encode()
        dialog.final = self._reply(msg, send, 200, "OK", dialog.local_tag, headers=self._contact(), body=body)
        self._spawn(self._until_acked(dialog))

    # -- other requests -------------------------------------------------------------------------
    async def _on_ack(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        dialog = self.dialogs.get(msg.call_id)
        if dialog is not None:
            dialog.acked.set()
            if dialog.cancelled:
                await self._drop(dialog)

    async def _on_cancel(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        dialog = self.dialogs.get(msg.call_id)
        if dialog is None or dialog.invite.branch != msg.branch:
            self._reply(msg, send, 481, "Call/Transaction Does Not Exist")
            return
        self._reply(msg, send, 200, "OK")
        if dialog.final is None:  # not answered yet: the INVITE ends with 487
            dialog.cancelled = True
            dialog.final = self._reply(dialog.invite, dialog.send, 487, "Request Terminated", dialog.local_tag)
            self._spawn(self._until_acked(dialog))

    async def _on_bye(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        dialog = self.dialogs.get(msg.call_id)
        if dialog is None or dialog.state == "ended":
            self._reply(msg, send, 481, "Call/Transaction Does Not Exist")
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
        dialog = self.dialogs.get(msg.call_id)
        self._reply(msg, send, 200 if dialog else 481, "OK" if dialog else "Call/Transaction Does Not Exist")
        if dialog is not None and re.match(rb"SIP/2\.0 2\d\d", msg.body.strip()) and dialog.transport is not None:
            if (call := self.calls.calls.get(dialog.call_id)) is not None:
                call.end_reason = "transferred"
            await dialog.transport.close()  # the operator has the caller: we leave

    async def _on_info(self, msg: SipMessage, addr: tuple[str, int], send: Send) -> None:
        dialog = self.dialogs.get(msg.call_id)
        self._reply(msg, send, 200 if dialog else 481, "OK" if dialog else "Call/Transaction Does Not Exist")
        found = re.search(rb"Signal\s*=\s*([0-9*#A-D])", msg.body)
        if dialog is not None and dialog.transport is not None and found:
            dialog.transport.receive_dtmf(found.group(1).decode())

    # -- requests we send -----------------------------------------------------------------------
    def _on_call_event(self, dialog: Dialog, event: CallEvent) -> None:
        if event.type is EventType.TRANSFER:
            if self.settings.sip_operator_uri:
                self._spawn(self._request(dialog, "REFER", [
                    ("refer-to", f"<{self.settings.sip_operator_uri}>"),
                    ("referred-by", f"<sip:pono@{self.public_address}:{self.port}>")]))
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
        """An in-dialog request (timer E retransmits over UDP, timer F gives up at 64·T1)."""
        dialog.cseq += 1
        invite = dialog.invite
        branch = "z9hG4bK" + secrets.token_hex(8)
        from_ours = f"{invite.get('to')};tag={dialog.local_tag}" if ";tag=" not in (invite.get("to") or "") \
            else invite.get("to") or ""
        headers = [("via", f"SIP/2.0/UDP {self.public_address}:{self.port};branch={branch};rport"),
                   ("max-forwards", "70"), ("from", from_ours), ("to", invite.get("from") or ""),
                   ("call-id", dialog.call_id), ("cseq", f"{dialog.cseq} {method}"),
                   *[("route", r) for r in invite.all("record-route")],
                   ("contact", f"<sip:pono@{self.public_address}:{self.port}>"), *(extra or [])]
        data = SipMessage(method=method, uri=dialog.remote_uri, headers=headers).to_bytes()
        future: asyncio.Future[SipMessage] = asyncio.get_running_loop().create_future()
        self._pending[branch] = future
        interval, deadline = T1, time.monotonic() + 64 * T1
        try:
            while time.monotonic() < deadline:
                dialog.send(data)
                with contextlib.suppress(TimeoutError):
                    return await asyncio.wait_for(asyncio.shield(future), interval)
                interval = min(interval * 2, T2)
            log.warning("SIP %s on call %s got no answer", method, dialog.call_id)
            return None
        finally:
            self._pending.pop(branch, None)

    async def _drop(self, dialog: Dialog) -> None:
        dialog.state = "ended"
        if self.dialogs.get(dialog.call_id) is dialog:
            del self.dialogs[dialog.call_id]
        if dialog.rtp is not None:
            await dialog.rtp.close()
            dialog.rtp = None
