"""Opus packet framing (RFC 6716 §3): split packets into their frames, join frames into one packet, and the
packet that stands for a lost one.

The receive jitter buffer (pono.signaling.jitter) joins the packets that waited behind a gap into one, so they
reach the decoder together; libopus decodes a multi-frame packet frame by frame, exactly as if they had come
apart. libopus has this (its repacketizer), but PyAV does not expose it and no maintained Python binding
offers it, so the framing is written here, checked against libopus' decoder in tests/test_jitter_buffer.py.
"""

from __future__ import annotations

MAX_PACKET_MS = 120.0  # §3.2.5: a packet holds at most 120 ms of audio
MAX_FRAMES = 48  # §3.2.5: M, the frame count, is at most 48
MAX_FRAME_BYTES = 1275  # §3.2.1 (R2): no frame is longer
_SILK_MS = (10.0, 20.0, 40.0, 60.0)
_HYBRID_MS = (10.0, 20.0)
_CELT_MS = (2.5, 5.0, 10.0, 20.0)


def frame_ms(toc: int) -> float:
    """The duration of each frame in a packet with TOC byte `toc`, from its configuration number (§3.1,
    Table 2): SILK-only 0-11, Hybrid 12-15, CELT-only 16-31."""
    config = toc >> 3
    if config < 12:
        return _SILK_MS[config % 4]
    if config < 16:
        return _HYBRID_MS[config % 2]
    return _CELT_MS[config % 4]


def _read_length(data: bytes, pos: int, end: int) -> tuple[int, int] | None:
    # §3.2.1: one byte below 252; else two, the first in 252..255, length = 4 * second + first.
    if pos >= end:
        return None
    first = data[pos]
    if first < 252:
        return first, pos + 1
    if pos + 1 >= end:
        return None
    return first + 4 * data[pos + 1], pos + 2


def _length_bytes(length: int) -> bytes:
    if length < 252:
        return bytes([length])
    first = 252 + (length & 3)
    return bytes([first, (length - first) >> 2])


def split(packet: bytes) -> list[bytes] | None:
    """The frames of an Opus packet (§3.2.2-3.2.5: codes 0 to 3, padding included), each without the TOC byte;
    a frame of length 0 is a lost or DTX frame. None when the packet breaks a rule of §3.4 (R1-R7): empty, a
    frame over 1275 bytes, lengths past the end, more than 120 ms or 48 frames, code 3 with no frames."""
    if not packet:
        return None
    code, end = packet[0] & 3, len(packet)
    if code == 0:
        frames = [packet[1:]]
    elif code == 1:
        if (end - 1) % 2:
            return None
        half = (end - 1) // 2
        frames = [packet[1:1 + half], packet[1 + half:]]
    elif code == 2:
        read = _read_length(packet, 1, end)
        if read is None or read[1] + read[0] > end:
            return None
        length, pos = read
        frames = [packet[pos:pos + length], packet[pos + length:]]
    else:
        if end < 2:
            return None
        vbr, padded, count = packet[1] & 0x80, packet[1] & 0x40, packet[1] & 0x3F
        if count == 0 or count > MAX_FRAMES or count * frame_ms(packet[0]) > MAX_PACKET_MS:
            return None
        pos, padding = 2, 0
        while padded:
            if pos >= end:
                return None
            size = packet[pos]
            pos += 1
            padding += 254 if size == 255 else size  # 255: 254 bytes of padding and another size byte
            padded = size == 255
        end -= padding
        if end < pos:
            return None
        if vbr:
            lengths = []
            for _ in range(count - 1):
                read = _read_length(packet, pos, end)
                if read is None:
                    return None
                lengths.append(read[0])
                pos = read[1]
            lengths.append(end - pos - sum(lengths))
            if lengths[-1] < 0:
                return None
        else:
            if (end - pos) % count:
                return None
            lengths = [(end - pos) // count] * count
        frames = []
        for length in lengths:
            frames.append(packet[pos:pos + length])
            pos += length
    if any(len(f) > MAX_FRAME_BYTES for f in frames):
        return None
    return frames


def join(toc: int, frames: list[bytes]) -> bytes:
    """One packet of `frames` (each at most 1275 bytes, at most 48 of them and 120 ms together) with the
    configuration of `toc`: code 0 for one frame, else code 3 with VBR lengths and no padding (§3.2.5)."""
    if len(frames) == 1:
        return bytes([toc & 0xFC]) + frames[0]
    lengths = b"".join(_length_bytes(len(f)) for f in frames[:-1])
    return bytes([(toc & 0xFC) | 3, 0x80 | len(frames)]) + lengths + b"".join(frames)


def join_packets(payloads: list[bytes]) -> list[tuple[int, bytes]]:
    """Join consecutive Opus packets into as few packets as RFC 6716 allows.

    `payloads`: Opus packets in sequence order. Runs of packets with the same configuration and channel count
    (the TOC byte's upper six bits) are joined, frame by frame, into packets of at most 120 ms and 48 frames;
    a packet that breaks §3.4's rules is passed on alone, as it is (the decoder may refuse it; it must not take
    good packets with it). Returns the packets to decode, in order, each with the index in `payloads` of its
    first packet. Decoding them gives exactly the samples of decoding the input one by one.
    """
    out: list[tuple[int, bytes]] = []
    run: list[bytes] = []  # the frames joined so far
    run_start, run_toc, run_packets = 0, 0, 0

    def flush() -> None:
        nonlocal run_packets
        if run_packets == 1:
            out.append((run_start, payloads[run_start]))  # one packet: as it came
        elif run_packets:
            out.append((run_start, join(run_toc, run)))
        run.clear()
        run_packets = 0

    for index, payload in enumerate(payloads):
        frames = split(payload)
        if frames is None:
            flush()
            out.append((index, payload))
            continue
        fits = (run_packets and payload[0] >> 2 == run_toc >> 2 and len(run) + len(frames) <= MAX_FRAMES
                and (len(run) + len(frames)) * frame_ms(payload[0]) <= MAX_PACKET_MS)
        if not fits:
            flush()
            run_start, run_toc = index, payload[0]
        run.extend(frames)
        run_packets += 1
    flush()
    return out


def lost_packet(previous: bytes) -> bytes:
    """The packet that stands for one lost after `previous`: as many frames of length 0 as `previous` held, in
    its configuration (§3.2.1: a zero-length frame), which libopus decodes by concealment (PLC) for their
    duration. The caller is heard without a hole or a jump in time: the recording's lanes stay aligned, the
    speech recogniser hears speech go on. A malformed `previous` gives one frame."""
    frames = split(previous) or [b""]
    if len(frames) == 1:
        return bytes([previous[0] & 0xFC])
    return bytes([(previous[0] & 0xFC) | 3, len(frames)])  # code 3, CBR: every frame 0 bytes
