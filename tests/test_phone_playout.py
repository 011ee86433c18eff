"""Phone playout after a burst: a backlog in the jitter buffer is drained, not carried for the rest of the call.

Counted in packets and playout ticks, never in milliseconds."""

from __future__ import annotations

import asyncio
import socket

import numpy as np

from pono.signaling.phone import g711
from pono.signaling.phone.rtp import JitterBuffer, RtpPacket, RtpSession, bind_rtp

# µ-law codes 0x00-0x7E decode to distinct non-zero samples (0x7F and 0xFF are both zero): one per packet,
# so each frame played says which packet it came from, and silence (zeros) says it came from none.
_CODES = list(range(0x7F))
_SAMPLE_TO_CODE = {int(g711.decode(bytes([code]), "PCMU")[0]): code for code in _CODES}


def _packet(index: int, ssrc: int = 1234) -> RtpPacket:
    return RtpPacket(0, (60000 + index) & 0xFFFF, index * 160, ssrc, bytes([_CODES[index]]) * 160)


def test_a_burst_is_drained_back_to_depth_and_every_packet_played_once_in_order() -> None:
    """A stall, then 15 packets at once, then one per tick: within a tick or two the buffer holds no more
    than 2 × depth again, and stays there; every packet is played exactly once, in order."""
    buffer = JitterBuffer(depth=3, capacity=25)
    played: list[RtpPacket] = []
    held_after_tick: list[int] = []
    burst, steady = 15, 100
    for i in range(burst):
        buffer.put(_packet(i))
    for i in range(burst, burst + steady):
        out = buffer.tick()
        assert out[0] is not None or len(out) == 1  # nothing lost here: only a packet, or nothing at all
        played += [p for p in out if p is not None]
        held_after_tick.append(len(buffer))
        buffer.put(_packet(i))
    assert all(held <= 2 * buffer.depth for held in held_after_tick[1:]), held_after_tick
    assert buffer.drained >= 1 and buffer.overflow == 0 and buffer.late == 0
    while len(buffer):
        played += [p for p in buffer.tick() if p is not None]
    assert [p.payload[0] for p in played] == _CODES[:burst + steady]


def test_a_fast_phone_clock_does_not_pile_up() -> None:
    """The phone sends 21 packets in the time of our 20 ticks: the buffer does not creep up to capacity."""
    buffer = JitterBuffer(depth=3, capacity=25)
    played: list[RtpPacket] = []
    sent = 0
    for tick in range(2000):
        while sent * 20 < (tick + 1) * 21 and sent < len(_CODES) * 10:
            buffer.put(RtpPacket(0, sent & 0xFFFF, sent * 160, 1, bytes([sent % 0x7F]) * 160))
            sent += 1
        played += [p for p in buffer.tick() if p is not None]
        assert len(buffer) <= 2 * buffer.depth
    assert buffer.overflow == 0
    assert [p.sequence for p in played] == list(range(len(played))) and len(played) >= sent - 2 * buffer.depth


def test_draining_keeps_a_lost_packet_as_one_frame_of_silence() -> None:
    """A packet missing from the backlog still takes its turn (None: one frame of silence), in its place."""
    buffer = JitterBuffer(depth=3, capacity=25)
    for i in range(15):
        if i != 5:
            buffer.put(_packet(i))
    out = buffer.tick()
    assert [None if p is None else p.payload[0] for p in out] == [0, 1, 2, 3, 4, None, 6, 7, 8, 9, 10, 11]
    assert buffer.lost == 1 and len(buffer) == buffer.depth
    assert [p.payload[0] for p in buffer.tick() if p is not None] == [12]  # then one per tick again


async def test_a_call_heard_after_a_burst_catches_up() -> None:
    """A real RtpSession on loopback UDP: the phone's 15 packets arrive at once, then one per playout tick
    (the sender waits for each tick, so the count holds however slow the machine). The backlog goes: what
    is held falls back to 2 × depth or less, and every packet's audio is played once, in order."""
    frames: list[np.ndarray] = []
    ticked = asyncio.Event()

    def on_audio(pcm: np.ndarray) -> None:
        frames.append(pcm)
        ticked.set()

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
        phone.bind(("127.0.0.1", 0))
        rtp = await bind_rtp(lambda: RtpSession("PCMU", 0, 101, phone.getsockname(), on_audio=on_audio,
                                                on_dtmf=lambda digit: None), "127.0.0.1", None)
        rtp.start()
        try:
            burst, steady = 15, 40
            for i in range(burst):
                phone.sendto(_packet(i).to_bytes(), ("127.0.0.1", rtp.local_port))
            held: list[int] = []
            for i in range(burst, burst + steady):
                ticked.clear()
                await asyncio.wait_for(ticked.wait(), 10)  # a tick played something: one more packet
                held.append(len(rtp.buffer))
                phone.sendto(_packet(i).to_bytes(), ("127.0.0.1", rtp.local_port))
            assert max(held[-20:]) <= 2 * rtp.buffer.depth, held
            assert rtp.buffer.drained >= 1

            def voiced() -> list[int]:
                return [_SAMPLE_TO_CODE[int(f[0])] for f in frames if f.any()]

            while len(voiced()) < burst + steady:  # the rest plays out
                ticked.clear()
                await asyncio.wait_for(ticked.wait(), 10)
            assert voiced() == _CODES[:burst + steady]
            assert all(f.size == 160 and (f == f[0]).all() for f in frames)  # whole frames, none mixed
            assert rtp.buffer.lost == rtp.buffer.late == rtp.buffer.overflow == 0
        finally:
            await rtp.close()


def _steady(ticks: int, first: int, skip_at: int, skipped: int, *,
            lose: bool) -> tuple[list[int], list[int | None], list[int], int]:
    """One packet per playout tick (put, then tick), numbered from `first`; at tick `skip_at` the numbering
    jumps `skipped` ahead. `lose`: those ticks pass with nothing arriving (an outage: the phone went on
    numbering, the network lost it all); otherwise packets keep coming every tick (a jump in the numbering
    with the same SSRC, within MAX_DROPOUT: not a resync). Returns the sequence numbers sent, what the
    ticks played (None: a frame of silence), for each frame how many packets were held before its tick, and
    how many the buffer counted lost."""
    buffer = JitterBuffer(depth=3, capacity=25)
    sent: list[int] = []
    played: list[int | None] = []
    held: list[int] = []
    sequence = first
    for tick in range(ticks):
        if tick == skip_at:
            sequence += skipped
        if not (lose and skip_at <= tick < skip_at + skipped):
            sent.append(sequence & 0xFFFF)
            buffer.put(RtpPacket(0, sequence & 0xFFFF, tick * 160, 1, b"\x55" * 160))
            sequence += 1
        before = len(buffer)
        out = buffer.tick()
        played += [None if p is None else p.sequence for p in out]
        held += [before] * len(out)
    while len(buffer):
        played += [None if p is None else p.sequence for p in buffer.tick()]
    return sent, played, held, buffer.lost


def _started(played: list[int | None]) -> int:
    """Where playback first started (before: the buffer filling to depth, as in every call)."""
    return next(i for i, p in enumerate(played) if p is not None)


def test_a_sequence_jump_is_one_gap_not_a_flood_of_silence() -> None:
    """The numbering jumps 1000 ahead, same SSRC, packets still one per tick (across the 16-bit wrap): the
    1000 numbers that never came are one gap, at most a couple of frames of silence, not 20 s of it (one
    per missing number, 25 a tick while draining); every packet is played once, in order."""
    sent, played, held, lost = _steady(200, 65000, 50, 1000, lose=False)
    silence = played[_started(played):].count(None)
    assert silence <= 2, silence
    assert lost == 1000  # still counted, each of them
    assert [p for p in played if p is not None] == sent
    assert max(held[60:]) <= 2 * 3  # and no backlog is left behind it


def test_an_outage_adds_no_silence_of_its_own() -> None:
    """A 2 s outage (100 packets lost on the way, the phone goes on numbering), then one packet per tick
    again. While the buffer holds packets, a tick plays silence only to fill it to depth again (depth - 1
    frames, as at the start of the call), not one frame per number lost (100, then drained 25 a tick):
    all the silence heard is the outage's own 100 ticks. Every packet is played once, in order."""
    outage = 100
    sent, played, held, lost = _steady(300, 100, 50, outage, lose=True)
    start = _started(played)
    silent_while_held = sum(p is None and h > 0 for p, h in zip(played[start:], held[start:], strict=False))
    assert silent_while_held <= 3 - 1, silent_while_held
    assert played[start:].count(None) == outage and lost == outage
    assert [p for p in played if p is not None] == sent


def test_a_renumbered_stream_is_played_from_its_first_packet_and_the_old_one_held_is_counted_lost() -> None:
    """Same SSRC, numbering 20,000 further on (a B2BUA re-INVITE): the first packet of the new numbering is
    kept until the second confirms it, then both are played; what was held of the old numbering is lost."""
    buffer = JitterBuffer(depth=3, capacity=25)
    old = [RtpPacket(0, 100 + i, i * 160, 1, b"\x01" * 160) for i in range(5)]
    new = [RtpPacket(0, 20100 + i, i * 160, 1, b"\x02" * 160) for i in range(5)]
    for packet in old:
        buffer.put(packet)
    assert [p.sequence for p in buffer.tick() if p is not None] == [100]
    assert not buffer.put(new[0]) and buffer.stray == 1  # alone, a stray
    assert buffer.put(new[1]) and buffer.resyncs == 1
    assert buffer.lost == 4  # 101-104, held when the numbering changed
    for packet in new[2:]:
        buffer.put(packet)
    played = [p.sequence for _ in range(6) for p in buffer.tick() if p is not None]
    assert played == [p.sequence for p in new]
