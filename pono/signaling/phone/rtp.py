"""RTP for phone calls: packets, a bounded reordering jitter buffer, RFC 4733 DTMF, and a UDP session that
plays out received audio every 20 ms and sends paced audio (comfort silence when there is nothing to say)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pono.signaling.audio_out import PacedAudioTrack
from pono.signaling.phone import g711
from pono.signaling.phone.sdp import Offer

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!BBHII")
DTMF_EVENTS = "0123456789*#ABCD"
COMFORT_NOISE = 13  # RFC 3389 payload type


@dataclass(frozen=True, slots=True)
class RtpPacket:
    payload_type: int
    sequence: int
    timestamp: int
    ssrc: int
    payload: bytes
    marker: bool = False

    @classmethod
    def parse(cls, data: bytes) -> RtpPacket | None:
        if len(data) < 12:
            return None
        first, second, sequence, timestamp, ssrc = _HEADER.unpack_from(data)
        if first >> 6 != 2:
            return None
        offset = 12 + 4 * (first & 0x0F)
        if first & 0x10:  # header extension
            if len(data) < offset + 4:
                return None
            offset += 4 + 4 * struct.unpack_from("!H", data, offset + 2)[0]
        end = len(data)
        if first & 0x20 and end > offset:  # padding: the last byte says how much
            end -= data[-1]
        if end < offset:
            return None
        return cls(second & 0x7F, sequence, timestamp, ssrc, bytes(data[offset:end]), bool(second & 0x80))

    def to_bytes(self) -> bytes:
        return _HEADER.pack(0x80, (0x80 if self.marker else 0) | self.payload_type, self.sequence & 0xFFFF,
                            self.timestamp & 0xFFFFFFFF, self.ssrc) + self.payload


def _seq_delta(a: int, b: int) -> int:
    """a - b in 16-bit sequence space, between -32768 and 32767."""
    return (a - b + 0x8000) % 0x10000 - 0x8000


MAX_DROPOUT = 3000  # RFC 3550 A.1: a jump ahead bigger than this is not loss but a new numbering
MAX_MISORDER = 100  # … and a packet further behind than this is not late but a new numbering


class JitterBuffer:
    """Reorders packets by sequence number and hands them out in order, one per playout tick (`tick`).

    It waits for `depth` packets before starting, holds at most `capacity` (the oldest go when it overflows),
    drops packets that arrive after their turn has passed, and reports a gap (None) for a lost one. A gap
    with `depth` or more packets held behind it (what it waits for before it starts) is skipped whole, as
    one None however many sequence numbers it spans (all counted as lost), and playback that starts again
    after the buffer ran empty starts at the oldest packet held: a sequence jump (a long outage, a B2BUA
    that keeps the SSRC) or an outage is never played out as a second of silence per 50 missing numbers.

    It drains: when a tick finds it holding more than `drain_above` packets (2 × depth), that tick hands out
    everything beyond `depth` at once, in order, none dropped (a gap among them: one None). Played one per
    tick while one arrives per tick, a backlog never shrinks: after a network stall (300 ms of nothing, then
    15 packets in one burst) or against a phone whose clock runs a little fast, the caller would be heard
    that much late, up to `capacity` (500 ms), for the rest of the call. A delay from a burst must cost once
    and never stay (as in the WebRTC path, pono/signaling/jitter.py). RFC 3550 has no word on it; without
    time-stretching (playing the backlog a little faster, as adaptive playout does) handing it out at once is
    what a playout buffer can do, and the call loop takes frames faster than real time (PhoneTransport
    queues them; the VAD and recognizer run on each as it comes).

    It resynchronises (starts afresh on the new stream) when the SSRC changes, and, as RFC 3550 A.1 does,
    when two consecutive packets both lie more than MAX_DROPOUT ahead of or MAX_MISORDER behind the expected
    sequence number: what a B2BUA re-INVITE, a transfer or hold/resume does to the stream. The first of those
    two is played too, and what was still held of the old stream is counted lost (as pono/signaling/jitter.py
    does for WebRTC).
    """

    def __init__(self, depth: int = 3, capacity: int = 25) -> None:
        self.depth = depth
        self.capacity = capacity
        self.drain_above = 2 * depth  # a tick finding more than this held hands out all but `depth`
        self._packets: dict[int, RtpPacket] = {}
        self._next: int | None = None
        self._started = False
        self._ssrc: int | None = None
        self._stray: RtpPacket | None = None  # far from the numbering: a new one if the next packet follows it
        self.late = self.lost = self.overflow = self.resyncs = self.stray = self.drained = 0

    def __len__(self) -> int:
        return len(self._packets)

    def _restart(self) -> None:
        self.lost += len(self._packets)  # of the old numbering: their turn will not come
        self._packets.clear()
        self._next, self._started, self._stray = None, False, None
        self.resyncs += 1

    def put(self, packet: RtpPacket) -> bool:
        """Take a packet; True when it will be played (False: late, or a stray awaiting confirmation)."""
        if self._ssrc is not None and packet.ssrc != self._ssrc:
            self._restart()  # a new source: its numbering has nothing to do with the old one's
        self._ssrc = packet.ssrc
        if self._next is not None:
            delta = _seq_delta(packet.sequence, self._next)
            if delta > MAX_DROPOUT or delta < -MAX_MISORDER:
                stray, self._stray = self._stray, packet
                if stray is None or packet.sequence != (stray.sequence + 1) & 0xFFFF:
                    self.stray += 1
                    return False
                self._restart()  # two in a row in the new numbering: follow it, from the first of them
                self._packets[stray.sequence] = stray
                self._next = stray.sequence
            elif delta < 0:
                self.late += 1
                return False
        self._stray = None
        self._packets[packet.sequence] = packet
        if self._next is None or (not self._started and _seq_delta(packet.sequence, self._next) < 0):
            self._next = packet.sequence
        while len(self._packets) > self.capacity:  # bounded: skip ahead to the oldest we still hold
            assert self._next is not None
            oldest = min(self._packets, key=lambda s: _seq_delta(s, self._next or 0))
            if oldest == self._next:
                del self._packets[oldest]
                self._next = (oldest + 1) & 0xFFFF
            else:
                self._next = oldest
            self.overflow += 1
        return True

    def pop(self) -> RtpPacket | None:
        """The next packet in order, or None: still filling, empty, or this one was lost."""
        if self._next is None or not self._packets:
            self._started = False if not self._packets else self._started
            return None
        if not self._started:
            if len(self._packets) < self.depth:
                return None
            self._started = True
            # (Re)starting, after the buffer ran empty: from the oldest packet held. The time of what never
            # came has passed already (the ticks played silence while nothing was held); filling it in again
            # from the sequence number expected back then would add that much silence (and delay) twice.
            self._skip_to_oldest()
        packet = self._packets.pop(self._next, None)
        if packet is not None:
            self._next = (self._next + 1) & 0xFFFF
        elif len(self._packets) >= self.depth:
            # As many packets held behind this gap as the buffer waits for before it starts: whatever is
            # missing is not coming in time. One frame of silence for the whole gap, not one per missing
            # number (a jump of 1000 would be 20 s of silence, 25 frames a tick while draining). A gap with
            # fewer behind it (a lost packet or two in a steady stream) takes one turn per missing number.
            self._skip_to_oldest()
        else:
            self.lost += 1
            self._next = (self._next + 1) & 0xFFFF
        return packet

    def _skip_to_oldest(self) -> None:
        """Move the next expected sequence number on to the oldest packet held; the ones between are lost."""
        expected = self._next
        assert expected is not None and self._packets
        oldest = min(self._packets, key=lambda s: _seq_delta(s, expected))
        self.lost += max(0, _seq_delta(oldest, expected))
        self._next = oldest

    def tick(self) -> list[RtpPacket | None]:
        """What one playout tick plays: the next packet (None: still filling, empty, or lost), and when more
        than `drain_above` are held, every one after it down to `depth` (a gap among them, however wide:
        one None, see `pop`). At most `capacity` per tick."""
        out = [self.pop()]
        if len(self._packets) > self.drain_above:
            self.drained += 1
            while len(self._packets) > self.depth and len(out) < self.capacity:
                out.append(self.pop())
        return out


class DtmfReceiver:
    """RFC 4733 telephone-events: one digit per event, however many packets (and end retransmits) carry it."""

    def __init__(self) -> None:
        self._seen: set[int] = set()

    def digit(self, packet: RtpPacket) -> str | None:
        if len(packet.payload) < 4 or packet.payload[0] >= len(DTMF_EVENTS):
            return None
        if packet.timestamp in self._seen:
            return None
        if len(self._seen) > 256:
            self._seen.clear()
        self._seen.add(packet.timestamp)  # all packets of one event share its start timestamp
        return DTMF_EVENTS[packet.payload[0]]


@dataclass
class MediaStats:
    received: int = 0
    sent: int = 0
    ignored_sources: int = 0


class RtpSession(asyncio.DatagramProtocol):
    """One call's media: receive (jitter buffer → 8 kHz PCM every 20 ms) and send (paced, G.711).

    `remote`: the (IP literal, port) the SDP named, already checked by sdp_policy; None while the caller
    holds the call with an unspecified address, or before its answer came (nothing is sent, nothing accepted).
    A new offer or answer in the dialog changes the codec, payload types and direction (`apply`)."""

    def __init__(self, codec: str, payload_type: int, dtmf_type: int | None, remote: tuple[str, int] | None,
                 on_audio: Callable[[np.ndarray], None], on_dtmf: Callable[[str], None],
                 media_timeout_s: float = 0.0,
                 on_media_timeout: Callable[[], None] | None = None) -> None:
        self.codec = codec
        self.payload_type = payload_type
        self.dtmf_type = dtmf_type
        self.remote = remote
        self.on_audio = on_audio
        self.on_dtmf = on_dtmf
        self.buffer = JitterBuffer()
        self.dtmf = DtmfReceiver()
        self.out = PacedAudioTrack(rate=8000)
        self.stats = MediaStats()
        self.sending = remote is not None  # False while the peer holds the call
        self.media_timeout_s = media_timeout_s
        self.on_media_timeout = on_media_timeout
        self.last_heard = time.monotonic()
        self._latched = False
        self._transport: asyncio.DatagramTransport | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._codecs = {payload_type: codec}  # how to decode what we accept: the codec in use, and the one
        self._old_type: int | None = None  # before a re-negotiation until the new one is heard (see `apply`)
        self._ssrc = random.getrandbits(32)
        self._seq = random.getrandbits(16)
        self._ts = random.getrandbits(32)

    @property
    def local_port(self) -> int:
        assert self._transport is not None
        return int(self._transport.get_extra_info("sockname")[1])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._playout(), name="rtp-playout"),
                       asyncio.create_task(self._send(), name="rtp-send")]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        # Symmetric RTP: media is accepted from the signalled host only, and we answer to wherever it
        # really comes from (a NAT may have changed the port). Anything else is ignored.
        if self.remote is None or addr[0] != self.remote[0] or (self._latched and addr != self.remote):
            self.stats.ignored_sources += 1
            return
        packet = RtpPacket.parse(data)
        if packet is None:
            return
        if not self._latched:
            self.remote, self._latched = addr, True
        self.stats.received += 1
        # Only media we use keeps the line alive for the media timeout: packets the jitter buffer throws away
        # (a stream it cannot follow) or payload types nobody negotiated do not.
        if packet.payload_type == self.dtmf_type:
            self.last_heard = time.monotonic()
            digit = self.dtmf.digit(packet)
            if digit is not None:
                self.on_dtmf(digit)
        elif packet.payload_type == self.payload_type or packet.payload_type == self._old_type:
            if packet.payload_type == self.payload_type and self._old_type is not None:
                self._old_type = None  # the new codec is heard: the old one is over
            if self.buffer.put(packet):
                self.last_heard = time.monotonic()
        elif packet.payload_type == COMFORT_NOISE:
            self.last_heard = time.monotonic()  # RFC 3389: the caller is silent, the line is alive

    def apply(self, session: Offer, remote: tuple[str, int] | None) -> None:
        """Follow a new offer or answer in the dialog (RFC 3264 §8): its codec and payload types both ways
        (what we send switches at once), where to send (`remote`, checked by sdp_policy; None: the legacy
        0.0.0.0 hold), and whether to send at all (not while the peer holds: sendonly or inactive). Packets in
        the codec used before are still played until the new one is heard (§8.3.2: an offerer may go on
        sending the old format until it has our answer)."""
        if (session.payload_type, session.codec) != (self.payload_type, self.codec):
            self._old_type = self.payload_type if session.payload_type != self.payload_type else None
            self._codecs = {self.payload_type: self.codec, session.payload_type: session.codec}
            self.codec, self.payload_type = session.codec, session.payload_type
        self.dtmf_type = session.dtmf_type
        held = session.direction in ("sendonly", "inactive") or remote is None
        self.sending = not held  # on hold: stop sending, keep the call
        self.last_heard = time.monotonic()  # a held phone may fall silent; the media clock restarts
        if remote is not None and not held:
            self.retarget(remote)

    def retarget(self, remote: tuple[str, int]) -> None:
        """A re-INVITE moved the caller's media (checked by sdp_policy): send there, and latch afresh."""
        if remote != self.remote:
            self.remote, self._latched = remote, False

    async def _playout(self) -> None:
        start = time.monotonic()
        ticks = 0
        silence = np.zeros(160, np.int16)
        while True:
            ticks += 1
            await asyncio.sleep(max(0.0, start + ticks * 0.02 - time.monotonic()))
            for packet in self.buffer.tick():  # one packet, or a backlog drained at once (JitterBuffer)
                if packet is not None:
                    self.on_audio(g711.decode(packet.payload, self._codecs.get(packet.payload_type, self.codec)))
                elif self.stats.received:
                    # Lost, late, or the far end stopped sending (silence suppression, a muted phone): the
                    # call's timeline goes on, so the turn detector hears silence rather than a line gone dead.
                    self.on_audio(silence)
            if (self.media_timeout_s and self.sending and self.on_media_timeout is not None
                    and time.monotonic() - self.last_heard > self.media_timeout_s):
                callback, self.on_media_timeout = self.on_media_timeout, None
                callback()  # once: a phone that vanished without a BYE

    async def _send(self) -> None:
        while True:
            frame = await self.out.recv()  # paced by the wall clock; silence when nothing is queued
            samples = frame.to_ndarray().reshape(-1)
            if self._transport is not None and self.sending and self.remote is not None:
                packet = RtpPacket(self.payload_type, self._seq, self._ts, self._ssrc, g711.encode(samples, self.codec))
                self._transport.sendto(packet.to_bytes(), self.remote)
            self._seq = (self._seq + 1) & 0xFFFF
            self._ts = (self._ts + 160) & 0xFFFFFFFF
            self.stats.sent += 1

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.out.stop()
        if self._transport is not None:
            self._transport.close()


class NoMediaPort(RuntimeError):
    """Every port of the configured RTP range is taken."""


def port_range(spec: str | None) -> range | None:
    """ "10000-20000" → the even ports in it (RTP's convention, RTCP would take the odd one); None → any port."""
    if not spec:
        return None
    low, sep, high = spec.partition("-")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit() or not 0 < int(low) < int(high) < 65536:
        raise ValueError(f"PONO_SIP_RTP_PORTS must look like 10000-20000, not {spec!r}")
    return range(int(low) + int(low) % 2, int(high) + 1, 2)


async def bind_rtp(factory: Callable[[], RtpSession], host: str, ports: range | None) -> RtpSession:
    """A media socket: any free port, or the first free one of the range, starting at a random place."""
    loop = asyncio.get_running_loop()
    if ports is None:
        return (await loop.create_datagram_endpoint(factory, local_addr=(host, 0)))[1]
    start = random.randrange(len(ports))
    for i in range(len(ports)):
        try:
            port = ports[(start + i) % len(ports)]
            return (await loop.create_datagram_endpoint(factory, local_addr=(host, port)))[1]
        except OSError:
            continue
    raise NoMediaPort(f"no free RTP port in {ports.start}-{ports.stop - 1}")
