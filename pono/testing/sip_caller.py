"""A scripted SIP phone for benchmarks and tests: INVITE/ACK/BYE over UDP, PCMU RTP paced every 20 ms.

It sends what it is told to say and comfort silence otherwise, records every RTP packet it receives with its
arrival time, and answers the requests Pono sends it (BYE with 200 OK, REFER with 202 Accepted). With
`auth=(user, password)` it answers a 401 challenge with RFC 2617 digest credentials (MD5, qop=auth).

It speaks PCMU or PCMA (`codec`), and sends in whichever codec the latest answer chose. `wrap_offer` changes
the INVITE's body (a multipart body around the SDP, or none at all: a delayed offer, RFC 3261 §13.2.1, whose
answer then goes in the ACK)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pono.signaling.audio_out import Resampler
from pono.signaling.phone import g711
from pono.signaling.phone.digest import parse_fields
from pono.signaling.phone.message import SipMessage, parse, response
from pono.signaling.phone.rtp import RtpPacket

FRAME = 160  # 20 ms at 8 kHz
PAYLOAD_TYPES = {"PCMU": 0, "PCMA": 8}  # RFC 3551 static payload types
CODECS = {pt: name for name, pt in PAYLOAD_TYPES.items()}


@dataclass
class Received:
    arrived: float  # time.monotonic()
    sequence: int
    payload: bytes
    payload_type: int = 0  # 0 PCMU, 8 PCMA


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_datagram(data, addr)


@dataclass
class SipCaller:
    server: tuple[str, int]
    caller: str = "+15550004444"
    callee: str = "agent"
    received: list[Received] = field(default_factory=list)
    requests: list[SipMessage] = field(default_factory=list)  # what Pono sent us (BYE, REFER…)
    speech_ended_at: float | None = None  # monotonic time the last queued speech packet was sent
    # Added to the INVITE, e.g. the Via and Record-Route a proxy on the way would add.
    invite_headers: list[tuple[str, str]] = field(default_factory=list)
    answer: SipMessage | None = None  # the INVITE's final response
    responses: list[SipMessage] = field(default_factory=list)  # every response, retransmissions included
    # The RTP port written into our SDP, when it is not the one we send from (a NAT rewrote it).
    advertised_rtp_port: int | None = None
    # The c= address written into our SDP, when it is not the one we bind (a hostname, 0.0.0.0 for hold…).
    advertised_rtp_address: str | None = None
    extra_media: str = ""  # more m= sections appended to our SDP offer (e.g. a video stream)
    local_host: str = "127.0.0.1"  # the address we bind and advertise (::1 for IPv6)
    call_id: str = ""  # the SIP Call-ID (a random one when empty)
    auth: tuple[str, str] | None = None  # (user, password) to answer digest challenges with
    # Credentials without waiting for a challenge: a WWW-Authenticate value seen earlier (any replica's).
    preemptive_challenge: str | None = None
    auth_uri: str | None = None  # the digest uri to sign, when not the Request-URI (a forger's mistake)
    codec: str = "PCMU"  # what we offer (PCMU or PCMA) and send until an answer chooses
    # The INVITE's body made from our SDP offer: (content type, body); ("", b"") sends no offer at all.
    wrap_offer: Callable[[bytes], tuple[str, bytes]] | None = None
    delayed_offer: bool = False  # the INVITE's body (from wrap_offer) holds no offer: the 200 carries Pono's
    # For a 200 that carries Pono's offer (we sent none): the ACK's body, given that offer (default: our answer).
    ack_answer: Callable[[str], bytes] | None = None

    def __post_init__(self) -> None:
        self.call_id = self.call_id or secrets.token_hex(8)
        self.authorization: str | None = None  # the last Authorization header we sent
        self._nc = 0
        self.tag = secrets.token_hex(4)
        self.cseq = 1
        self._responses: asyncio.Queue[SipMessage] = asyncio.Queue()
        self._outgoing = np.zeros(0, np.int16)
        self._speaking = False
        self.muted = False  # True: send no RTP at all, like a phone that lost its network
        self._sender: asyncio.Task[None] | None = None
        self.remote_tag = ""
        self.remote_rtp: tuple[str, int] | None = None
        self.hung_up = asyncio.Event()
        self.speech_sent = asyncio.Event()  # set when the last queued speech packet went out
        self._restart: tuple[int, bool] | None = None
        self.sent = 0  # RTP packets sent
        self.sending_codec = self.codec  # what the latest answer chose
        self.offer_received: str | None = None  # Pono's offer, when its 200 carried one

    # -- SIP ---------------------------------------------------------------------------------------
    async def call(self, timeout: float = 10, ack: bool = True) -> int:
        """INVITE and ACK (unless told not to). The final status (200 when answered)."""
        loop = asyncio.get_running_loop()
        self._sip = _Udp(self._on_sip)
        await loop.create_datagram_endpoint(lambda: self._sip, local_addr=(self.local_host, 0))
        self._rtp = _Udp(self._on_rtp)
        await loop.create_datagram_endpoint(lambda: self._rtp, local_addr=(self.local_host, 0))
        self.sip_port = self._sip.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        self.rtp_port = self._rtp.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        invite = self._invite()
        if self.preemptive_challenge is not None:
            self._sign(invite, self.preemptive_challenge)
        answer = self.answer = await self._transaction(invite, timeout)
        if answer.status in (401, 407) and self.auth is not None:
            self.ack_failure(invite, answer)
            self.cseq += 1
            invite = self._invite()
            self._sign(invite, answer.get("www-authenticate") or "")
            answer = self.answer = await self._transaction(invite, timeout)
        if answer.status != 200:
            return answer.status or 0
        self.remote_tag = re.search(r"tag=([^;>\s]+)", answer.get("to") or "").group(1)  # type: ignore[union-attr]
        ack_body = b""
        if self.delayed_offer or not invite.body:  # no offer from us: the 200 carries Pono's, the ACK our answer
            self.offer_received = answer.body.decode()
            ack_body = (self.ack_answer or self.answer_to)(self.offer_received)
            self._learn_media(ack_body.decode() if ack_body else "", self.offer_received)
        else:
            self._learn_media(answer.body.decode())
        if ack:
            self.ack(ack_body)
        self._sender = asyncio.create_task(self._send_rtp())
        return 200

    def ack(self, body: bytes = b"") -> None:
        """The ACK of the INVITE's 2xx; `body`: the SDP answer to an offer the 2xx carried."""
        self._send(self._request("ACK", body, cseq=self.cseq))

    def _invite(self) -> SipMessage:
        content_type, body = self.wrap_offer(self._sdp("sendrecv")) if self.wrap_offer is not None \
            else ("application/sdp", self._sdp("sendrecv"))
        invite = self._request("INVITE", body, content_type=content_type or "application/sdp")
        invite.headers[0:0] = self.invite_headers
        return invite

    def answer_to(self, offer: str) -> bytes:
        """Our SDP answer to an offer (RFC 3264 §6): `codec` and telephone-event when offered; b"" when the
        offer has no `codec` (no answer we could give)."""
        line = re.search(r"^m=audio \d+ RTP/AVP ([\d ]+)", offer, re.MULTILINE)
        offered = line.group(1).split() if line else []
        if str(PAYLOAD_TYPES[self.codec]) not in offered:
            return b""
        event = re.search(r"^a=rtpmap:(\d+) telephone-event/8000", offer, re.MULTILINE)
        return self.offer(formats=[PAYLOAD_TYPES[self.codec], *([int(event.group(1))] if event else [])])

    def ack_failure(self, invite: SipMessage, answer: SipMessage) -> None:
        """The ACK of a non-2xx final response: same branch as the INVITE, the response's To (RFC 3261 §17.1.1.3)."""
        ack = SipMessage(method="ACK", uri=invite.uri, headers=[
            ("via", invite.get("via") or ""), ("max-forwards", "70"), ("from", invite.get("from") or ""),
            ("to", answer.get("to") or ""), ("call-id", self.call_id), ("cseq", f"{invite.cseq[0]} ACK")])
        self._send(ack)

    async def hold(self, held: bool = True) -> SipMessage:
        """A re-INVITE putting the call on hold (a=sendonly), or taking it off."""
        return await self.reinvite(self._sdp("sendonly" if held else "sendrecv"))

    async def reinvite(self, sdp: bytes) -> SipMessage:
        """A re-INVITE with this offer, or none (b"": Pono offers in the 200, our answer goes in the ACK),
        answering a digest challenge when we have credentials; its final response, ACKed."""
        self.cseq += 1
        request = self._request("INVITE", sdp)
        answer = await self._transaction(request, 5)
        if answer.status in (401, 407) and self.auth is not None:
            self.ack_failure(request, answer)
            self.cseq += 1
            request = self._request("INVITE", sdp)
            self._sign(request, answer.get("www-authenticate") or "")
            answer = await self._transaction(request, 5)
        if answer.status == 200 and not sdp and answer.body:  # the 200 carries Pono's offer, the ACK our answer
            self.offer_received = answer.body.decode()
            body = (self.ack_answer or self.answer_to)(self.offer_received)
            if body:
                self._learn_media(body.decode(), self.offer_received)
            self.ack(body)
        elif answer.status == 200:
            if answer.body:
                self._learn_media(answer.body.decode())
            self.ack()
        else:
            self.ack_failure(request, answer)
        return answer

    async def info(self, digit: str) -> int:
        """A DTMF digit as SIP INFO (application/dtmf-relay); the final status."""
        self.cseq += 1
        request = self._request("INFO", f"Signal={digit}\r\nDuration=160\r\n".encode(),
                                content_type="application/dtmf-relay")
        return (await self._transaction(request, 5)).status or 0

    def restart_stream(self, sequence_jump: int = 20000, new_ssrc: bool = True) -> None:
        """Go on sending RTP as a new stream would after a B2BUA re-INVITE or a transfer: the sequence
        number jumps by `sequence_jump` (mod 2^16) and, unless told otherwise, the SSRC changes."""
        self._restart = (sequence_jump, new_ssrc)

    def _sign(self, request: SipMessage, challenge: str) -> None:
        """Add RFC 2617 digest credentials (MD5, qop=auth) answering `challenge` to the request."""
        assert self.auth is not None
        fields = parse_fields(challenge.partition(" ")[2])
        user, password = self.auth
        uri = self.auth_uri or request.uri or ""
        self._nc += 1
        nc, cnonce = f"{self._nc:08x}", secrets.token_hex(8)
        md5 = lambda text: hashlib.md5(text.encode(), usedforsecurity=False).hexdigest()  # noqa: E731
        ha1 = md5(f"{user}:{fields['realm']}:{password}")
        digest = md5(f"{ha1}:{fields['nonce']}:{nc}:{cnonce}:auth:{md5(f'{request.method}:{uri}')}")
        self.authorization = (f'Digest username="{user}", realm="{fields["realm"]}", nonce="{fields["nonce"]}", '
                              f'uri="{uri}", response="{digest}", algorithm=MD5, qop=auth, nc={nc}, '
                              f'cnonce="{cnonce}"')
        request.headers.append(("authorization", self.authorization))

    async def notify(self, sipfrag: str) -> int:
        """The transfer's progress (RFC 3515), e.g. "SIP/2.0 200 OK" once the operator answered."""
        self.cseq += 1
        request = self._request("NOTIFY", sipfrag.encode(), content_type="message/sipfrag;version=2.0")
        request.headers += [("event", "refer"), ("subscription-state", "terminated;reason=noresource")]
        answer = await self._transaction(request, 5)
        return answer.status or 0

    async def bye(self) -> int:
        self.cseq += 1
        answer = await self._transaction(self._request("BYE"), 5)
        await self.close()
        return answer.status or 0

    async def close(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sender
        for udp in (self._sip, self._rtp):
            if udp.transport is not None:
                udp.transport.close()

    def offer(self, direction: str = "sendrecv", address: str | None = None, port: int | None = None,
              formats: list[int] | None = None) -> bytes:
        """Our SDP offer: `codec` (or these payload types: 0 PCMU, 8 PCMA, others telephone-event) at
        `address`:`port` (default: where we receive)."""
        address = address or self.advertised_rtp_address or self.local_host
        family = "IP6" if ":" in address else "IP4"
        formats = formats or [PAYLOAD_TYPES[self.codec], 101]
        rtpmaps = "".join(f"a=rtpmap:{pt} {CODECS[pt]}/8000\r\n" if pt in CODECS
                          else f"a=rtpmap:{pt} telephone-event/8000\r\n" for pt in formats)
        return (f"v=0\r\no=caller 1 1 IN {family} {address}\r\ns=-\r\nc=IN {family} {address}\r\nt=0 0\r\n"
                f"m=audio {port or self.advertised_rtp_port or self.rtp_port} RTP/AVP {' '.join(map(str, formats))}\r\n"
                f"{rtpmaps}a=ptime:20\r\na={direction}\r\n{self.extra_media}").encode()

    def _sdp(self, direction: str) -> bytes:
        return self.offer(direction)

    def _learn_media(self, answer: str, offer: str | None = None) -> None:
        """Where Pono's media is (from its SDP: the answer, or its offer) and the codec the answer chose."""
        address = re.search(r"c=IN IP[46] (\S+)", offer or answer)
        port = re.search(r"m=audio (\d+)", offer or answer)
        if address and port:
            self.remote_rtp = (address.group(1), int(port.group(1)))
        chosen = re.search(r"^m=audio \d+ RTP/AVP (\d+)", answer, re.MULTILINE)
        if chosen and int(chosen.group(1)) in CODECS:
            self.sending_codec = CODECS[int(chosen.group(1))]

    def _request(self, method: str, body: bytes = b"", cseq: int | None = None,
                 content_type: str = "application/sdp") -> SipMessage:
        server, me = _hostport(*self.server), _hostport(self.local_host, self.sip_port)
        to = f"<sip:{self.callee}@{server}>"
        headers = [("via", f"SIP/2.0/UDP {me};branch=z9hG4bK{secrets.token_hex(6)};rport"),
                   ("max-forwards", "70"), ("from", f"<sip:{self.caller}@{me}>;tag={self.tag}"),
                   ("to", to + (f";tag={self.remote_tag}" if self.remote_tag else "")), ("call-id", self.call_id),
                   ("cseq", f"{cseq or self.cseq} {method}"), ("contact", f"<sip:caller@{me}>")]
        if body:
            headers.append(("content-type", content_type))
        return SipMessage(method=method, uri=f"sip:{self.callee}@{server}", headers=headers, body=body)

    def request(self, method: str, body: bytes = b"", content_type: str = "application/sdp") -> SipMessage:
        """An in-dialog request as this phone would send it next (the CSeq moves on), for a test to alter
        and send from elsewhere."""
        self.cseq += 1
        return self._request(method, body, content_type=content_type)

    async def _transaction(self, request: SipMessage, timeout: float) -> SipMessage:
        """Send, resend over UDP (0.5 s doubling to 4 s) until the final response to it."""
        method = request.method
        deadline = time.monotonic() + timeout
        interval = 0.5
        self._send(request)
        resend_at = time.monotonic() + interval
        while True:
            wait = min(deadline, resend_at) - time.monotonic()
            if wait <= 0:
                if time.monotonic() >= deadline:
                    raise TimeoutError(f"no final answer to {method}")
                self._send(request)
                interval = min(interval * 2, 4)
                resend_at = time.monotonic() + interval
                continue
            with contextlib.suppress(TimeoutError):
                answer = await asyncio.wait_for(self._responses.get(), wait)
                if answer.cseq == (self.cseq, method) and (answer.status or 0) >= 200:
                    return answer

    def _send(self, message: SipMessage) -> None:
        assert self._sip.transport is not None
        self._sip.transport.sendto(message.to_bytes(), self.server)

    def _on_sip(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            message = parse(data)
        except ValueError:
            return
        if message.is_request:
            self.requests.append(message)
            status, reason = (202, "Accepted") if message.method == "REFER" else (200, "OK")
            self._sip.transport.sendto(response(message, status, reason).to_bytes(), addr)  # type: ignore[union-attr]
            if message.method == "BYE":
                self.hung_up.set()
        else:
            self.responses.append(message)
            self._responses.put_nowait(message)

    # -- RTP ---------------------------------------------------------------------------------------
    def say(self, pcm: np.ndarray, rate: int) -> None:
        self._outgoing = np.concatenate([self._outgoing, Resampler(8000)(pcm, rate)])
        self._speaking = True
        self.speech_sent.clear()

    async def _send_rtp(self) -> None:
        sequence, timestamp, ssrc = random.randint(0, 65535), random.randint(0, 2**31), random.getrandbits(32)
        started = time.monotonic()
        sent = 0
        while True:
            if self._restart is not None:
                (jump, new_ssrc), self._restart = self._restart, None
                sequence = (sequence + jump) & 0xFFFF
                ssrc = random.getrandbits(32) if new_ssrc else ssrc
            frame, self._outgoing = self._outgoing[:FRAME], self._outgoing[FRAME:]
            if frame.size < FRAME:
                frame = np.concatenate([frame, np.zeros(FRAME - frame.size, np.int16)])
            if self.remote_rtp is not None and self._rtp.transport is not None and not self.muted:
                codec = self.sending_codec
                packet = RtpPacket(PAYLOAD_TYPES[codec], sequence & 0xFFFF, timestamp, ssrc, g711.encode(frame, codec))
                self._rtp.transport.sendto(packet.to_bytes(), self.remote_rtp)
                self.sent += 1
            if self._speaking and self._outgoing.size == 0:
                self._speaking = False
                self.speech_ended_at = time.monotonic()
                self.speech_sent.set()
            sequence, timestamp, sent = sequence + 1, timestamp + FRAME, sent + 1
            await asyncio.sleep(max(0.0, started + sent * 0.02 - time.monotonic()))

    def _on_rtp(self, data: bytes, addr: tuple[str, int]) -> None:
        packet = RtpPacket.parse(data)
        if packet is not None and packet.payload_type in CODECS:
            self.received.append(Received(time.monotonic(), packet.sequence, packet.payload, packet.payload_type))

    def first_sound_after(self, moment: float, threshold: int = 1000) -> float | None:
        """When the first audible packet arrived after `moment` (monotonic)."""
        for packet in self.received:
            if packet.arrived > moment and \
                    np.abs(g711.decode(packet.payload, CODECS[packet.payload_type])).max() > threshold:
                return packet.arrived
        return None

    def arrival_lateness_ms(self, skip_s: float = 0.0) -> list[float]:
        """How late each packet arrived against a 20 ms grid anchored on the earliest arrival (jitter),
        leaving out the first `skip_s` seconds of the call."""
        packets = [p for p in self.received if p.arrived >= self.received[0].arrived + skip_s] \
            if self.received else []
        if len(packets) < 2:
            return []
        first = packets[0]
        offsets = [p.arrived - first.arrived - 0.02 * ((p.sequence - first.sequence) & 0xFFFF) for p in packets]
        base = min(offsets)
        return [1000 * (o - base) for o in offsets]


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
