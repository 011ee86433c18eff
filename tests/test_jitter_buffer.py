"""The receive jitter buffer (pono.signaling.jitter): a caller's audio reaches the VAD as it arrives, a lost
packet delays it once and briefly, never for the rest of the call, and nothing received is lost or reordered.

Real Opus from aiortc's own encoder, decoded by aiortc's own decoder (libopus through PyAV); packets are counted,
never timed. The call test drops packets at the caller's side of a real WebRTC call.
"""

from __future__ import annotations

import fractions
import re
from collections import Counter

import numpy as np
import pytest
from aiortc.codecs.g711 import PcmuDecoder, PcmuEncoder
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtp import RtpPacket
from conftest import QUESTION, espeak
from helpers import stored_turns
from test_voice_call import open_call, trim

from pono.context import SERVICES
from pono.signaling.audio_out import int16_frame
from pono.signaling.jitter import OPUS, AudioJitterBuffer, join_opus, join_samples, received_audio_buffers
from pono.testing.codec import opus_round_trip

OPUS_PT = 111
WIRE_RATE = 48_000
WIRE_FRAME = 960  # 20 ms


def sound(frames: int, rate: int = WIRE_RATE) -> np.ndarray:
    """A gliding tone with an amplitude swell, 20 ms frames: every frame encodes to different bytes."""
    t = np.arange(frames * rate // 50) / rate
    tone = np.sin(2 * np.pi * (300 + 400 * t / t[-1]) * t) * (0.3 + 0.2 * np.sin(2 * np.pi * 3 * t))
    return (tone * 20000).astype(np.int16)


def opus_packets(frames: int, first_seq: int = 1000) -> list[RtpPacket]:
    """`frames` 20 ms Opus packets as aiortc's receiver hands them to its jitter buffer (payload in `_data`)."""
    encoder = OpusEncoder()
    packets = []
    for i, samples in enumerate(sound(frames).reshape(-1, WIRE_FRAME)):
        frame = int16_frame(samples, WIRE_RATE)
        frame.pts, frame.time_base = i * WIRE_FRAME, fractions.Fraction(1, WIRE_RATE)
        payloads, timestamp = encoder.encode(frame)
        for payload in payloads:
            packet = RtpPacket(payload_type=OPUS_PT, sequence_number=(first_seq + i) % 65536,
                               timestamp=timestamp, payload=payload)
            packet._data = payload  # type: ignore[attr-defined]
            packets.append(packet)
    return packets


def decoded(frames: list[JitterFrame]) -> np.ndarray:
    """What aiortc's OpusDecoder makes of the frames, in order: 48 kHz stereo interleaved int16."""
    decoder = OpusDecoder()
    out = [f.to_ndarray().reshape(-1) for frame in frames for f in decoder.decode(frame)]
    return np.concatenate(out) if out else np.zeros(0, np.int16)


def words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def buffer() -> AudioJitterBuffer:
    return AudioJitterBuffer({OPUS_PT: OPUS}, max_wait=2)


def test_each_packet_in_sequence_comes_out_as_it_arrives() -> None:
    packets = opus_packets(50, first_seq=65530)  # across the 16-bit wrap
    jitter = buffer()
    for packet in packets:
        _, frame = jitter.add(packet)
        assert frame is not None and frame.data == packet._data  # type: ignore[attr-defined]
        assert frame.timestamp == packet.timestamp
    assert (jitter.lost, jitter.late) == (0, 0)


def stand_in(packet: RtpPacket) -> JitterFrame:
    """What a lost Opus packet's turn is decoded from: its TOC byte alone, a zero-length frame that libopus
    conceals (RFC 6716 §3.2.2)."""
    return JitterFrame(bytes([packet._data[0] & 0xFC]), packet.timestamp)  # type: ignore[attr-defined]


def one_by_one(packets: list[RtpPacket], lost: set[int]) -> list[JitterFrame]:
    return [stand_in(p) if i in lost else JitterFrame(p._data, p.timestamp)  # type: ignore[attr-defined]
            for i, p in enumerate(packets)]


def test_a_lost_packet_delays_the_audio_once_and_never_for_the_rest_of_the_call() -> None:
    packets = opus_packets(300, first_seq=65400)
    lost = set(range(10, 300, 7))  # one in seven, across the wrap
    jitter = buffer()
    out: list[JitterFrame] = []
    for i, packet in enumerate(packets):
        if i in lost:
            continue
        _, frame = jitter.add(packet)
        if frame is not None:
            out.append(frame)
        # Every packet's turn up to this one has come out (a lost one concealed), but for at most the two
        # packets a gap waits for: the delay of a loss does not stay, nor add up.
        heard = len(decoded(out)) // (2 * WIRE_FRAME)
        assert heard >= i + 1 - jitter.max_wait, f"packet {i}: {i + 1 - heard} packets still held"
        if i - 1 not in lost and i - 2 not in lost:
            assert heard == i + 1, f"packet {i}: {i + 1 - heard} packets held after a gap was over"
    assert jitter.lost == len(lost)
    audio = decoded(out)
    assert np.array_equal(audio, decoded(one_by_one(packets, lost)))  # joined or not, the same samples
    concealed = audio.reshape(-1, 2 * WIRE_FRAME)[sorted(lost)]
    assert np.sqrt(np.mean(concealed.astype(np.float64) ** 2)) > 1000  # the tone goes on through the losses


def test_packets_out_of_order_decode_to_exactly_the_audio_sent() -> None:
    packets = opus_packets(100)
    # 0, 2, 1, 4, 3, ...: the first packet is where the stream starts, one before it would be too late
    swapped = packets[:1] + [packets[1 + (i ^ 1)] for i in range(98)] + packets[99:]
    jitter = buffer()
    frames = [f for p in swapped if (f := jitter.add(p)[1]) is not None]
    assert np.array_equal(decoded(frames), decoded([JitterFrame(p._data, p.timestamp) for p in packets]))
    assert (jitter.lost, jitter.late) == (0, 0)


def test_a_packet_after_its_turn_was_skipped_is_dropped_not_played_late() -> None:
    packets = opus_packets(10)
    jitter = buffer()
    frames = [f for p in packets[:3] + packets[4:7] if (f := jitter.add(p)[1]) is not None]
    assert jitter.lost == 1
    assert jitter.add(packets[3]) == (False, None)  # came after 4, 5, 6 were let out
    assert jitter.late == 1
    frames += [f for p in packets[7:] if (f := jitter.add(p)[1]) is not None]
    assert np.array_equal(decoded(frames), decoded(one_by_one(packets, {3})))


def test_a_long_wait_comes_out_in_packets_of_at_most_120_ms_and_loses_nothing() -> None:
    packets = opus_packets(20)
    jitter = AudioJitterBuffer({OPUS_PT: OPUS}, max_wait=9)
    arrived = packets[:2] + packets[3:]  # packet 2 lost: nine more must come before it is concealed
    frames = [f for p in arrived if (f := jitter.add(p)[1]) is not None]
    sizes = [f.samples for frame in frames for f in OpusDecoder().decode(frame)]  # fresh decoder: sizes only
    assert max(sizes) == 6 * WIRE_FRAME  # 120 ms, RFC 6716's largest packet
    assert np.array_equal(decoded(frames), decoded(one_by_one(packets, {2})))


def test_joined_opus_frames_decode_to_the_same_samples_as_one_by_one() -> None:
    payloads = [p._data for p in opus_packets(14)]  # type: ignore[attr-defined]
    joined = join_opus(payloads)
    assert [first for first, _ in joined] == [0, 6, 12]  # 120 ms, 120 ms, 40 ms
    assert np.array_equal(decoded([JitterFrame(data, 0) for _, data in joined]),
                          decoded([JitterFrame(p, 0) for p in payloads]))
    big = bytes([payloads[0][0]]) + bytes(range(256)) * 2  # a frame over 252 bytes: two-byte length
    packet = join_opus([big, payloads[1]])[0][1]
    assert packet[2:4] == bytes([252 + (512 & 3), (512 - 252) >> 2]) and len(packet) == 4 + 512 + len(payloads[1]) - 1


def test_g711_frames_are_joined_by_their_samples() -> None:
    encoder, decoder = PcmuEncoder(), PcmuDecoder()
    payloads = []
    for i, samples in enumerate(sound(5, 8000).reshape(-1, 160)):
        frame = int16_frame(samples, 8000)
        frame.pts, frame.time_base = i * 160, fractions.Fraction(1, 8000)
        payloads += encoder.encode(frame)[0]
    (first, data), = join_samples(payloads)
    assert first == 0 and data == b"".join(payloads)
    assert len(decoder.decode(JitterFrame(data, 0))[0].to_ndarray().reshape(-1)) == 5 * 160


def test_empty_payloads_carry_no_audio_and_do_not_reach_the_decoder() -> None:
    packets = opus_packets(4)
    packets[1]._data = b""  # type: ignore[attr-defined]
    jitter = buffer()
    frames = [jitter.add(p)[1] for p in packets]
    assert frames[1] is None and all(f is not None and f.data for f in frames[:1] + frames[2:])


def test_max_wait_is_bounded() -> None:
    with pytest.raises(ValueError, match="max_wait"):
        AudioJitterBuffer(max_wait=0)


async def test_a_call_that_loses_one_packet_in_twenty_is_heard(server, script, audio_dir, admin_token: str) -> None:
    """A real call whose caller loses every twentieth RTP packet it sends (5 %): the server's buffer counts them
    lost and conceals them, and the question is still heard."""
    script.reply = "Certainly."
    caller = await open_call(server)
    try:
        (sender,) = caller.pc.getSenders()
        dtls = sender.transport
        send_rtp, sent = dtls._send_rtp, 0

        async def lossy(data: bytes) -> None:
            nonlocal sent
            sent += 1
            if sent % 20:
                await send_rtp(data)

        dtls._send_rtp = lossy
        clip = trim(espeak(QUESTION, audio_dir / "question.wav"))
        caller.speak(clip)
        await caller.wait_for(lambda e: e["type"] == "agent.final", 40)
        transport = server.app[SERVICES].calls.calls[caller.call_id].transport
        while hasattr(transport, "inner"):  # the call's wrappers (tap, pausable output) around the WebRTC one
            transport = transport.inner
        (jitter,) = received_audio_buffers(transport.pc)
        assert jitter.lost > 0
    finally:
        await caller.hang_up()
    (turn,) = [t for t in await stored_turns(server, admin_token, caller.call_id, 2) if t["role"] == "user"]
    clean = await server.app[SERVICES].models.run_stt(opus_round_trip(clip))  # the same words, none lost
    said, heard = words(clean), words(turn["text"])
    kept = sum((Counter(said) & Counter(heard)).values())
    assert kept >= len(said) - 2, f"heard {turn['text']!r} of {clean!r}"
