"""A scripted SIP phone for benchmarks and tests: INVITE/ACK/BYE over UDP, PCMU RTP paced every 20 ms.

It sends what it is told to say and comfort silence otherwise, records every RTP packet it receives with its
arrival time, and answers the requests Pono sends it (BYE with 200 OK, REFER with 202 Accepted)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from pono.signaling.audio_out import Resampler
from pono.signaling.phone import g711
from pono.signaling.phone.message import SipMessage, parse, response
from pono.signaling.phone.rtp import RtpPacket

FRAME = 160  # 20 ms at 8 kHz


@dataclass
class Received:
    arrived: float  # time.monotonic()
    sequence: int
    payload: bytes


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

    def __post_init__(self) -> None:
        self.call_id = secrets.token_hex(8)
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

    # -- SIP ---------------------------------------------------------------------------------------
    async def call(self, timeout: float = 10, ack: bool = True) -> int:
        """INVITE and ACK (unless told not to). The final status (200 when answered)."""
        loop = asyncio.get_running_loop()
        self._sip = _Udp(self._on_sip)
        await loop.create_datagram_endpoint(lambda: self._sip, local_addr=("127.0.0.1", 0))
        self._rtp = _Udp(self._on_rtp)
        await loop.create_datagram_endpoint(lambda: self._rtp, local_addr=("127.0.0.1", 0))
        self.sip_port = self._sip.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        self.rtp_port = self._rtp.transport.get_extra_info("sockname")[1]  # type: ignore[union-attr]
        invite = self._request("INVITE", self._sdp("sendrecv"))
        invite.headers[0:0] = self.invite_headers
        answer = self.answer = await self._transaction(invite, timeout)
        if answer.status != 200:
            return answer.status or 0
        self.remote_tag = re.search(r"tag=([^;>\s]+)", answer.get("to") or "").group(1)  # type: ignore[union-attr]
        self._learn_media(answer.body.decode())
        if ack:
            self.ack()
        self._sender = asyncio.create_task(self._send_rtp())
        return 200

    def ack(self) -> None:
        self._send(self._request("ACK", cseq=self.cseq))

    async def hold(self, held: bool = True) -> SipMessage:
        """A re-INVITE putting the call on hold (a=sendonly), or taking it off."""
        self.cseq += 1
        answer = await self._transaction(self._request("INVITE", self._sdp("sendonly" if held else "sendrecv")), 5)
        self.ack()
        return answer

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

    def _sdp(self, direction: str) -> bytes:
        return ("v=0\r\no=caller 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
                f"m=audio {self.advertised_rtp_port or self.rtp_port} RTP/AVP 0 101\r\na=rtpmap:0 PCMU/8000\r\n"
                f"a=rtpmap:101 telephone-event/8000\r\na=ptime:20\r\na={direction}\r\n").encode()

    def _learn_media(self, sdp: str) -> None:
        address = re.search(r"c=IN IP4 (\S+)", sdp)
        port = re.search(r"m=audio (\d+)", sdp)
        if address and port:
            self.remote_rtp = (address.group(1), int(port.group(1)))

    def _request(self, method: str, body: bytes = b"", cseq: int | None = None,
                 content_type: str = "application/sdp") -> SipMessage:
        to = f"<sip:{self.callee}@{self.server[0]}:{self.server[1]}>"
        headers = [("via", f"SIP/2.0/UDP 127.0.0.1:{self.sip_port};branch=z9hG4bK{secrets.token_hex(6)};rport"),
                   ("max-forwards", "70"), ("from", f"<sip:{self.caller}@127.0.0.1:{self.sip_port}>;tag={self.tag}"),
                   ("to", to + (f";tag={self.remote_tag}" if self.remote_tag else "")), ("call-id", self.call_id),
                   ("cseq", f"{cseq or self.cseq} {method}"), ("contact", f"<sip:caller@127.0.0.1:{self.sip_port}>")]
        if body:
            headers.append(("content-type", content_type))
        return SipMessage(method=method, uri=f"sip:{self.callee}@{self.server[0]}:{self.server[1]}",
                          headers=headers, body=body)

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
            frame, self._outgoing = self._outgoing[:FRAME], self._outgoing[FRAME:]
            if frame.size < FRAME:
                frame = np.concatenate([frame, np.zeros(FRAME - frame.size, np.int16)])
            if self.remote_rtp is not None and self._rtp.transport is not None and not self.muted:
                packet = RtpPacket(0, sequence, timestamp, ssrc, g711.encode(frame, "PCMU"))
                self._rtp.transport.sendto(packet.to_bytes(), self.remote_rtp)
            if self._speaking and self._outgoing.size == 0:
                self._speaking = False
                self.speech_ended_at = time.monotonic()
                self.speech_sent.set()
            sequence, timestamp, sent = sequence + 1, timestamp + FRAME, sent + 1
            await asyncio.sleep(max(0.0, started + sent * 0.02 - time.monotonic()))

    def _on_rtp(self, data: bytes, addr: tuple[str, int]) -> None:
        packet = RtpPacket.parse(data)
        if packet is not None and packet.payload_type == 0:
            self.received.append(Received(time.monotonic(), packet.sequence, packet.payload))

    def first_sound_after(self, moment: float, threshold: int = 1000) -> float | None:
        """When the first audible packet arrived after `moment` (monotonic)."""
        for packet in self.received:
            if packet.arrived > moment and np.abs(g711.decode(packet.payload, "PCMU")).max() > threshold:
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
