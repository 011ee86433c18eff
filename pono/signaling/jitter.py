"""The receive jitter buffer of a WebRTC call's audio: every packet out as soon as its turn comes.

aiortc's audio buffer (`JitterBuffer(capacity=16, prefetch=4)`, aiortc 1.16) holds four packets before it lets
one go, which is 80 ms of every caller's words reaching the VAD late, and when a packet is lost it waits
until sixteen have piled up behind the gap (320 ms), then lets out one packet per packet received, so the
caller is heard about 300 ms late for the rest of the call (aiortc issue #543, open since 2021).

`AudioJitterBuffer` keeps aiortc's interface (`add(packet) -> (pli, frame)`) and:
- lets a packet out when it arrives, if it is the next in sequence: one RTP packet is one audio frame for
  Opus (RFC 7587 §4.2) and G.711 (RFC 3551 §4.5.14), so there is nothing to assemble or wait for;
- waits for a missing packet only while `max_wait` later ones arrive (reordering), then counts it lost and
  lets a stand-in take its turn: for Opus a frame of length 0, which libopus conceals (PLC), so the caller
  is heard without a hole or a jump in time (other codecs: the packet is skipped);
- lets out every packet that was waiting in one frame (up to 120 ms of Opus; the rest joins the next), so a
  gap costs `max_wait` packets of delay once and never stays: Opus frames are joined into one multi-frame
  Opus packet (RFC 6716 §3.2.5, code 3, which the decoder decodes frame by frame as if they came apart),
  G.711 and G.722 samples are simply concatenated;
- drops a packet that comes after its turn was given up or more than once; follows a new numbering (a new
  SSRC at once; a jump far ahead or back once a second packet confirms it, RFC 3550 A.1), so a stray packet
  cannot mute the caller;
- never holds more than `max_wait` packets behind a gap, nor more than `capacity` let out but not yet joined,
  whatever the sender does: past it the oldest are let go.

`use_for_received_audio(pc)` puts one on each audio receiver of a negotiated RTCPeerConnection.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from aiortc import RTCPeerConnection, RTCRtpReceiver
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.sdp import SessionDescription

from pono.signaling import opus_packets
from pono.signaling.phone.rtp import MAX_DROPOUT, MAX_MISORDER

_RECEIVER_BUFFER = "_RTCRtpReceiver__jitter_buffer"  # where aiortc 1.16's RTCRtpReceiver.__init__ keeps its own
_SEQ = 0x10000  # RTP sequence numbers are 16 bits (RFC 3550 §5.1), timestamps 32
_TS = 1 << 32
CONCEAL_MAX_PACKETS = 5  # a longer gap is an outage, not a loss: nothing is made up for it

def join_samples(payloads: list[bytes]) -> list[tuple[int, bytes]]:
    """G.711 (PCMU, PCMA) and G.722 payloads hold samples back to back: joined, they are one longer frame."""
    return [(0, b"".join(payloads))]


@dataclass(frozen=True)
class PayloadFormat:
    """How a codec's payloads are joined, and what stands for a lost one (None: nothing, it is skipped)."""

    join: Callable[[list[bytes]], list[tuple[int, bytes]]]
    conceal: Callable[[bytes], bytes] | None = None


OPUS = PayloadFormat(opus_packets.join_packets, opus_packets.lost_packet)
FORMATS: dict[str, PayloadFormat] = {"opus": OPUS, "pcmu": PayloadFormat(join_samples),
                                     "pcma": PayloadFormat(join_samples), "g722": PayloadFormat(join_samples)}


class AudioJitterBuffer:
    """A receive buffer for one audio stream, in place of aiortc's `JitterBuffer` (same `add`).

    `formats`: each RTP payload type's PayloadFormat (see FORMATS); a type without one is let out a packet at a
    time. A lost packet is concealed with its format's `conceal` from the packet before it, else skipped.
    `max_wait`: how many later packets may arrive while one is missing before it is counted lost (2: 40 ms at
    20 ms per packet); a single packet ahead of a gap is held, not followed, so a stray cannot skip the
    stream, and no more than `max_wait` are ever held behind a gap. `capacity`: the most packets let out but
    not yet joined;
    a packet further ahead or behind than MAX_DROPOUT / MAX_MISORDER starts a new numbering once the next
    packet confirms it. `lost`, `late` and `restarts` count packets given up, packets discarded and
    numberings followed.
    """

    def __init__(self, formats: dict[int, PayloadFormat] | None = None, *, max_wait: int = 2,
                 capacity: int = 16) -> None:
        if not 1 <= max_wait < capacity:
            raise ValueError(f"max_wait must be in [1, capacity), got {max_wait} (capacity {capacity})")
        self.capacity = capacity
        self.max_wait = max_wait
        self.formats = formats or {}
        self.lost = self.late = self.restarts = 0
        self._ssrc: int | None = None
        self._next: int | None = None  # the sequence number whose turn it is
        self._held: dict[int, RtpPacket] = {}
        self._stray: RtpPacket | None = None  # far from the numbering: a new one if the next packet follows it
        self._last: RtpPacket | None = None  # the last packet let out, which a lost one is concealed from
        self._waiting: list[RtpPacket] = []  # their turn has come; more than one frame could hold

    def _ahead(self, sequence_number: int) -> int:
        assert self._next is not None
        return (sequence_number - self._next) % _SEQ

    def _restart(self, packet: RtpPacket) -> None:
        self.lost += len(self._held)  # older than anything to come: their turn will not come
        self._held.clear()
        self._ssrc, self._next, self._stray = packet.ssrc, packet.sequence_number, None
        self.restarts += 1

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        """Take one received packet (its payload depacketised into `packet._data`, as aiortc's receiver does).

        Returns (False, frame): aiortc's shape, whose first item asks for a picture loss indication, never
        wanted for audio. `frame` holds every packet whose turn has come, joined, or None when none has.
        """
        seq = packet.sequence_number
        if self._next is None or packet.ssrc != self._ssrc:
            self._restart(packet)  # the first packet, or a new source whose numbering is its own
        ahead = self._ahead(seq)
        if MAX_DROPOUT < ahead < _SEQ - MAX_MISORDER:
            # Far from the numbering (RFC 3550 A.1): one stray packet is dropped; a second that follows it
            # means the sender renumbered (a restart, a long outage), and the stream goes on from there.
            stray, self._stray = self._stray, packet
            if stray is None or seq != (stray.sequence_number + 1) % _SEQ:
                self.late += 1
                return False, None
            self._restart(stray)
            self._held[stray.sequence_number] = stray
            ahead = self._ahead(seq)
        self._stray = None
        if ahead > MAX_DROPOUT or seq in self._held:
            self.late += 1  # its turn passed (or a duplicate): what came after it has been let out already
            return False, None
        self._held[seq] = packet  # fewer than max_wait were held, all behind a gap: the gap is given up below
        if self._next not in self._held:
            if len(self._held) < self.max_wait:
                return False, None
            first = min(self._held, key=self._ahead)
            self.lost += self._ahead(first)
            self._conceal(first)
        return False, self._take_ready()

    def _conceal(self, first: int) -> None:
        """The packets from `_next` up to `first` are lost: stand-ins take their turn where the format has one
        and the gap is short (a long one is an outage: nothing to conceal, the stream goes on from `first`)."""
        assert self._next is not None
        previous = self._waiting[-1] if self._waiting else self._last
        payload_format = self.formats.get(previous.payload_type) if previous is not None else None
        conceal = payload_format.conceal if payload_format is not None else None
        missing = self._ahead(first)
        if previous is None or conceal is None or missing > CONCEAL_MAX_PACKETS:
            self._next = first
            return
        packets = (first - previous.sequence_number) % _SEQ
        step = ((self._held[first].timestamp - previous.timestamp) % _TS) // max(1, packets)
        data = conceal(previous._data)  # type: ignore[attr-defined]  # the same stand-in for each
        for k in range(missing):
            seq = (self._next + k) % _SEQ
            stand_in = RtpPacket(payload_type=previous.payload_type, sequence_number=seq, ssrc=previous.ssrc,
                                 timestamp=(previous.timestamp + step * ((seq - previous.sequence_number) % _SEQ))
                                 % _TS)
            stand_in._data = data  # type: ignore[attr-defined]
            self._held[seq] = stand_in

    def _take_ready(self) -> JitterFrame | None:
        assert self._next is not None
        while self._next in self._held:
            packet = self._held.pop(self._next)
            self._next = (self._next + 1) % _SEQ
            if packet._data:  # type: ignore[attr-defined]  # b"" carries no audio, and would flush the decoder
                self._waiting.append(packet)
        if len(self._waiting) > self.capacity:  # a sender whose packets cannot be joined: never fall behind
            self.lost += len(self._waiting) - self.capacity
            del self._waiting[:len(self._waiting) - self.capacity]
        if not self._waiting:
            return None
        # The packets that have waited, and those just come, of the first one's payload type: joined as far as
        # the codec allows (120 ms for Opus). What does not fit waits for the next packet, and is joined then.
        first = self._waiting[0]
        payload_format = self.formats.get(first.payload_type)
        if payload_format is None or len(self._waiting) == 1:
            # One packet waiting (every packet of a steady stream), or a payload type with no format: let out as
            # it came, without parsing it or building lists for it (join_packets gives one packet back as is).
            taken, data = 1, first._data  # type: ignore[attr-defined]
        else:
            run = list(itertools.takewhile(lambda p: p.payload_type == first.payload_type, self._waiting))
            joined = payload_format.join([p._data for p in run])  # type: ignore[attr-defined]
            taken, data = (joined[1][0] if len(joined) > 1 else len(run)), joined[0][1]
        self._last = self._waiting[taken - 1]
        del self._waiting[:taken]
        return JitterFrame(data=data, timestamp=first.timestamp)


def _receiver_formats(pc: RTCPeerConnection) -> dict[str, dict[int, PayloadFormat]]:
    """For each negotiated audio media section (by mid), its payload types' formats, from the local description."""
    joins: dict[str, dict[int, PayloadFormat]] = {}
    if pc.localDescription is None:
        return joins
    for media in SessionDescription.parse(pc.localDescription.sdp).media:
        if media.kind != "audio" or media.rtp.muxId is None:
            continue
        joins[media.rtp.muxId] = {
            codec.payloadType: FORMATS[codec.mimeType.split("/")[-1].lower()]
            for codec in media.rtp.codecs
            if codec.payloadType is not None and codec.mimeType.split("/")[-1].lower() in FORMATS
        }
    return joins


def use_for_received_audio(pc: RTCPeerConnection) -> int:
    """Put an AudioJitterBuffer on each audio receiver of `pc`, after setLocalDescription and before media flows.

    Returns how many receivers got one. Raises RuntimeError when aiortc's receiver no longer keeps its buffer
    where aiortc 1.16 does (the pinned version): a silent fallback would bring the 80 ms back unseen.
    """
    joins = _receiver_formats(pc)
    count = 0
    for transceiver in pc.getTransceivers():
        if transceiver.kind != "audio" or transceiver.mid not in joins:
            continue
        receiver: RTCRtpReceiver = transceiver.receiver
        if not hasattr(receiver, _RECEIVER_BUFFER):
            raise RuntimeError("aiortc's RTCRtpReceiver has no jitter buffer where 1.16 keeps it: "
                               "check pono/signaling/jitter.py against the installed aiortc")
        setattr(receiver, _RECEIVER_BUFFER, AudioJitterBuffer(joins[transceiver.mid]))
        count += 1
    return count


def received_audio_buffers(pc: RTCPeerConnection) -> list[AudioJitterBuffer]:
    """The AudioJitterBuffers use_for_received_audio put on `pc`'s audio receivers (for their loss counts)."""
    found = (getattr(t.receiver, _RECEIVER_BUFFER, None) for t in pc.getTransceivers() if t.kind == "audio")
    return [jitter for jitter in found if isinstance(jitter, AudioJitterBuffer)]
