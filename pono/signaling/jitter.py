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
- drops a packet that comes after its turn was given up, and starts again from a packet far ahead of what
  it holds (a sender that jumped its sequence).

Joining Opus frames is done here: libopus' repacketizer (which does it) is not exposed by PyAV, and no
maintained Python binding offers it; the framing is a dozen lines of RFC 6716 §3.2.

`use_for_received_audio(pc)` puts one on each audio receiver of a negotiated RTCPeerConnection.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable
from dataclasses import dataclass

from aiortc import RTCPeerConnection, RTCRtpReceiver
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtp import RtpPacket
from aiortc.sdp import SessionDescription

log = logging.getLogger(__name__)

_RECEIVER_BUFFER = "_RTCRtpReceiver__jitter_buffer"  # where aiortc 1.16's RTCRtpReceiver.__init__ keeps its own
_SEQ = 0x10000  # RTP sequence numbers are 16 bits (RFC 3550 §5.1)
_HALF = 0x8000
OPUS_MAX_PACKET_MS = 120.0  # RFC 6716 §3.2.5: a code 3 packet holds at most 120 ms of audio
_SILK_MS = (10.0, 20.0, 40.0, 60.0)
_HYBRID_MS = (10.0, 20.0)
_CELT_MS = (2.5, 5.0, 10.0, 20.0)

Join = Callable[[list[bytes]], list[tuple[int, bytes]]]


def opus_frame_ms(toc: int) -> float:
    """The duration of each frame in an Opus packet with TOC byte `toc`, from its configuration number
    (RFC 6716 §3.1, Table 2): SILK-only 0-11, Hybrid 12-15, CELT-only 16-31."""
    config = toc >> 3
    if config < 12:
        return _SILK_MS[config % 4]
    if config < 16:
        return _HYBRID_MS[config % 2]
    return _CELT_MS[config % 4]


def _opus_length(length: int) -> bytes:
    # RFC 6716 §3.2.1: below 252 one byte; else two, the first in 252..255, length = 4 * second + first.
    if length < 252:
        return bytes([length])
    first = 252 + (length & 3)
    return bytes([first, (length - first) >> 2])


def join_opus(payloads: list[bytes]) -> list[tuple[int, bytes]]:
    """Join consecutive single-frame Opus packets into as few packets as RFC 6716 allows.

    `payloads`: Opus packets in sequence order. Runs of code 0 packets (one frame each, RFC 6716 §3.2.2) with
    the same configuration and channel count (the TOC byte's upper six bits) are joined into code 3 packets
    (§3.2.5: VBR, no padding) of at most 120 ms; any other packet is passed as it is. Returns the packets
    to decode, in order, each with the index in `payloads` of its first frame. Decoding them gives exactly
    the samples of decoding the input one by one.
    """
    out: list[tuple[int, bytes]] = []
    run: list[bytes] = []
    run_start = 0

    def flush() -> None:
        if len(run) == 1:
            out.append((run_start, run[0]))
        elif run:
            header = bytes([(run[0][0] & 0xFC) | 3, 0x80 | len(run)])
            lengths = b"".join(_opus_length(len(p) - 1) for p in run[:-1])
            out.append((run_start, header + lengths + b"".join(p[1:] for p in run)))
        run.clear()

    for index, payload in enumerate(payloads):
        joinable = len(payload) >= 1 and payload[0] & 3 == 0
        if run and not (joinable and payload[0] >> 2 == run[0][0] >> 2
                        and (len(run) + 1) * opus_frame_ms(payload[0]) <= OPUS_MAX_PACKET_MS):
            flush()
        if not run:
            run_start = index
        run.append(payload)
        if not joinable:
            flush()
    flush()
    return out


def join_samples(payloads: list[bytes]) -> list[tuple[int, bytes]]:
    """G.711 (PCMU, PCMA) and G.722 payloads hold samples back to back: joined, they are one longer frame."""
    return [(0, b"".join(payloads))]


def _one_by_one(payloads: list[bytes]) -> list[tuple[int, bytes]]:
    return list(enumerate(payloads))


def opus_lost_frame(previous: bytes) -> bytes:
    """An Opus packet that stands for one lost after `previous`: its TOC byte alone, a frame of length 0
    (RFC 6716 §3.2.2), which libopus decodes by concealment (PLC) for the frame's duration. The caller is then
    heard without a hole the length of the loss or a jump in time: the recording's lanes stay aligned, the
    speech recogniser hears speech go on."""
    return bytes([previous[0] & 0xFC])


@dataclass(frozen=True)
class PayloadFormat:
    """How a codec's payloads are joined, and what stands for a lost one (None: nothing, it is skipped)."""

    join: Join
    conceal: Callable[[bytes], bytes] | None = None


OPUS = PayloadFormat(join_opus, opus_lost_frame)
FORMATS: dict[str, PayloadFormat] = {"opus": OPUS, "pcmu": PayloadFormat(join_samples),
                                     "pcma": PayloadFormat(join_samples), "g722": PayloadFormat(join_samples)}
_ONE_BY_ONE = PayloadFormat(_one_by_one)


class AudioJitterBuffer:
    """A receive buffer for one audio stream, in place of aiortc's `JitterBuffer` (same `add`).

    `formats`: each RTP payload type's PayloadFormat (see FORMATS); a type without one is let out a packet at a
    time. A lost packet is concealed with its format's `conceal` from the packet before it, else skipped.
    `max_wait`: how many later packets may arrive while one is missing before it is counted lost (2: 40 ms at
    20 ms per packet). `capacity`: how far ahead of the next expected packet one may be before the buffer
    starts again from it. `lost` and `late` count packets given up and packets discarded.
    """

    def __init__(self, formats: dict[int, PayloadFormat] | None = None, *, max_wait: int = 2,
                 capacity: int = 16) -> None:
        if not 1 <= max_wait < capacity:
            raise ValueError(f"max_wait must be in [1, capacity), got {max_wait} (capacity {capacity})")
        self.capacity = capacity
        self.max_wait = max_wait
        self.formats = formats or {}
        self.lost = 0
        self.late = 0
        self._next: int | None = None  # the sequence number whose turn it is
        self._held: dict[int, RtpPacket] = {}
        self._last: RtpPacket | None = None  # the last packet let out, which a lost one is concealed from
        self._waiting: list[RtpPacket] = []  # their turn has come; more than one frame could hold

    def _ahead(self, sequence_number: int) -> int:
        assert self._next is not None
        return (sequence_number - self._next) % _SEQ

    def add(self, packet: RtpPacket) -> tuple[bool, JitterFrame | None]:
        """Take one received packet (its payload depacketised into `packet._data`, as aiortc's receiver does).

        Returns (False, frame): aiortc's shape, whose first item asks for a picture loss indication, never
        wanted for audio. `frame` holds every packet whose turn has come, joined, or None when none has.
        """
        seq = packet.sequence_number
        if self._next is None:
            self._next = seq
        ahead = self._ahead(seq)
        if ahead >= _HALF or seq in self._held:
            self.late += 1  # its turn passed (or a duplicate): what came after it has been let out already
            return False, None
        if ahead >= self.capacity:
            self.lost += len(self._held)  # the sender jumped ahead; what is held is older than anything to come
            self._held.clear()
            self._next = seq
        self._held[seq] = packet
        if self._next not in self._held:
            if len(self._held) < self.max_wait:
                return False, None
            first = min(self._held, key=self._ahead)
            self.lost += self._ahead(first)
            self._conceal(first)
        return False, self._take_ready()

    def _conceal(self, first: int) -> None:
        """The packets from `_next` up to `first` are lost: stand-ins take their turn where the format has one."""
        assert self._next is not None
        previous = self._waiting[-1] if self._waiting else self._last
        conceal = self.formats.get(previous.payload_type, _ONE_BY_ONE).conceal if previous is not None else None
        if previous is not None and conceal is not None:
            step = (self._held[first].timestamp - previous.timestamp) // max(1, (first - previous.sequence_number)
                                                                              % _SEQ)
            for k in range(self._ahead(first)):
                seq = (self._next + k) % _SEQ
                stand_in = RtpPacket(payload_type=previous.payload_type, sequence_number=seq,
                                     timestamp=(previous.timestamp + step * ((seq - previous.sequence_number) % _SEQ))
                                     % (1 << 32))
                stand_in._data = conceal(previous._data)  # type: ignore[attr-defined]
                self._held[seq] = stand_in
        else:
            self._next = first

    def _take_ready(self) -> JitterFrame | None:
        assert self._next is not None
        while self._next in self._held:
            packet = self._held.pop(self._next)
            self._next = (self._next + 1) % _SEQ
            if packet._data:  # type: ignore[attr-defined]  # b"" carries no audio, and would flush the decoder
                self._waiting.append(packet)
        if not self._waiting:
            return None
        # The packets that have waited, and those just come, of the first one's payload type: joined as far as
        # the codec allows (120 ms for Opus). What does not fit waits for the next packet, and is joined then.
        kind = self._waiting[0].payload_type
        run = list(itertools.takewhile(lambda p: p.payload_type == kind, self._waiting))
        joined = self.formats.get(kind, _ONE_BY_ONE).join([p._data for p in run])  # type: ignore[attr-defined]
        taken = joined[1][0] if len(joined) > 1 else len(run)
        self._last = run[taken - 1]
        del self._waiting[:taken]
        return JitterFrame(data=joined[0][1], timestamp=run[0].timestamp)


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
