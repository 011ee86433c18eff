"""The receive jitter buffer (pono.signaling.jitter): a caller's audio reaches the VAD as it arrives, a lost
packet delays it once and briefly, never for the rest of the call, and nothing received is lost or reordered.

Real Opus from aiortc's own encoder, decoded by aiortc's own decoder (libopus through PyAV); packets are counted,
never timed. The call test drops packets at the caller's side of a real WebRTC call.
"""

from __future__ import annotations

import fractions
import re
from collections import Counter

import av
import numpy as np
import pytest
from aiortc.codecs.g711 import PcmuDecoder, PcmuEncoder
from aiortc.codecs.opus import OpusDecoder, OpusEncoder
from aiortc.jitterbuffer import JitterFrame
from aiortc.rtp import RtpPacket, is_rtcp
from conftest import QUESTION, espeak
from helpers import after_line_silence, stored_turns
from test_voice_call import open_call, trim

from pono.context import SERVICES
from pono.signaling import opus_packets
from pono.signaling.audio_out import int16_frame
from pono.signaling.jitter import OPUS, AudioJitterBuffer, PayloadFormat, join_samples, received_audio_buffers
from pono.testing.codec import SpeechPacketLoss, opus_round_trip

OPUS_PT = 111
WIRE_RATE = 48_000
WIRE_FRAME = 960  # 20 ms


def sound(frames: int, rate: int = WIRE_RATE) -> np.ndarray:
    """A gliding tone with an amplitude swell, 20 ms frames: every frame encodes to different bytes."""
    t = np.arange(frames * rate // 50) / rate
    tone = np.sin(2 * np.pi * (300 + 400 * t / t[-1]) * t) * (0.3 + 0.2 * np.sin(2 * np.pi * 3 * t))
    return (tone * 20000).astype(np.int16)


def encoded_packets(frames: int, first_seq: int = 1000, *, packet_ms: int = 20, ssrc: int = 1) -> list[RtpPacket]:
    """`frames` 20 ms of Opus, in packets of `packet_ms` from libopus (20 ms: aiortc's own encoder; 40 and 60 ms:
    what a sender with that ptime sends, code 1/2/3 packets), as aiortc's receiver hands them to its jitter
    buffer (payload in `_data`)."""
    if packet_ms == 20:
        encoder = OpusEncoder()
        payloads = []
        for i, samples in enumerate(sound(frames).reshape(-1, WIRE_FRAME)):
            frame = int16_frame(samples, WIRE_RATE)
            frame.pts, frame.time_base = i * WIRE_FRAME, fractions.Fraction(1, WIRE_RATE)
            payloads += encoder.encode(frame)[0]
    else:
        codec = av.CodecContext.create("libopus", "w")
        codec.bit_rate, codec.format, codec.layout, codec.sample_rate = 32000, "s16", "mono", WIRE_RATE
        codec.time_base = fractions.Fraction(1, WIRE_RATE)
        codec.options = {"frame_duration": str(packet_ms), "application": "voip"}
        size = packet_ms * WIRE_RATE // 1000
        audio = sound(frames)
        payloads = []
        for i in range(0, audio.size - size + 1, size):
            frame = int16_frame(audio[i:i + size], WIRE_RATE)
            frame.pts, frame.time_base = i, fractions.Fraction(1, WIRE_RATE)
            payloads += [bytes(p) for p in codec.encode(frame)]
    packets = []
    for i, payload in enumerate(payloads):
        packet = RtpPacket(payload_type=OPUS_PT, sequence_number=(first_seq + i) % 65536,
                           timestamp=i * packet_ms * WIRE_RATE // 1000, ssrc=ssrc, payload=payload)
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
    packets = encoded_packets(50, first_seq=65530)  # across the 16-bit wrap
    jitter = buffer()
    for packet in packets:
        _, frame = jitter.add(packet)
        assert frame is not None and frame.data == packet._data  # type: ignore[attr-defined]
        assert frame.timestamp == packet.timestamp
    assert (jitter.lost, jitter.late) == (0, 0)


def test_a_steady_stream_is_let_out_without_joining_anything() -> None:
    """The hot path: a packet in sequence, with nothing waiting, is let out as it came (no Opus parsing)."""
    def join(payloads: list[bytes]) -> list[tuple[int, bytes]]:
        raise AssertionError(f"joined {len(payloads)} packets")

    jitter = AudioJitterBuffer({OPUS_PT: PayloadFormat(join, OPUS.conceal)})
    for packet in encoded_packets(20):
        assert jitter.add(packet)[1] is not None


def stand_in(packet: RtpPacket) -> JitterFrame:
    """What a lost Opus packet's turn is decoded from: its TOC byte alone, a zero-length frame that libopus
    conceals (RFC 6716 §3.2.2)."""
    return JitterFrame(opus_packets.lost_packet(packet._data), packet.timestamp)  # type: ignore[attr-defined]


def one_by_one(packets: list[RtpPacket], lost: set[int]) -> list[JitterFrame]:
    return [stand_in(p) if i in lost else JitterFrame(p._data, p.timestamp)  # type: ignore[attr-defined]
            for i, p in enumerate(packets)]


def test_a_lost_packet_delays_the_audio_once_and_never_for_the_rest_of_the_call() -> None:
    packets = encoded_packets(300, first_seq=65400)
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
    packets = encoded_packets(100)
    # 0, 2, 1, 4, 3, ...: the first packet is where the stream starts, one before it would be too late
    swapped = packets[:1] + [packets[1 + (i ^ 1)] for i in range(98)] + packets[99:]
    jitter = buffer()
    frames = [f for p in swapped if (f := jitter.add(p)[1]) is not None]
    assert np.array_equal(decoded(frames), decoded([JitterFrame(p._data, p.timestamp) for p in packets]))
    assert (jitter.lost, jitter.late) == (0, 0)


def test_a_packet_after_its_turn_was_skipped_is_dropped_not_played_late() -> None:
    packets = encoded_packets(10)
    jitter = buffer()
    frames = [f for p in packets[:3] + packets[4:7] if (f := jitter.add(p)[1]) is not None]
    assert jitter.lost == 1
    assert jitter.add(packets[3]) == (False, None)  # came after 4, 5, 6 were let out
    assert jitter.late == 1
    frames += [f for p in packets[7:] if (f := jitter.add(p)[1]) is not None]
    assert np.array_equal(decoded(frames), decoded(one_by_one(packets, {3})))


def test_a_long_wait_comes_out_in_packets_of_at_most_120_ms_and_loses_nothing() -> None:
    packets = encoded_packets(20)
    jitter = AudioJitterBuffer({OPUS_PT: OPUS}, max_wait=9)
    arrived = packets[:2] + packets[3:]  # packet 2 lost: nine more must come before it is concealed
    frames = [f for p in arrived if (f := jitter.add(p)[1]) is not None]
    sizes = [f.samples for frame in frames for f in OpusDecoder().decode(frame)]  # fresh decoder: sizes only
    assert max(sizes) == 6 * WIRE_FRAME  # 120 ms, RFC 6716's largest packet
    assert np.array_equal(decoded(frames), decoded(one_by_one(packets, {2})))


def test_joined_opus_frames_decode_to_the_same_samples_as_one_by_one() -> None:
    payloads = [p._data for p in encoded_packets(14)]  # type: ignore[attr-defined]
    joined = opus_packets.join_packets(payloads)
    assert [first for first, _ in joined] == [0, 6, 12]  # 120 ms, 120 ms, 40 ms
    assert np.array_equal(decoded([JitterFrame(data, 0) for _, data in joined]),
                          decoded([JitterFrame(p, 0) for p in payloads]))
    big = bytes([payloads[0][0]]) + bytes(range(256)) * 2  # a frame over 252 bytes: two-byte length
    packet = opus_packets.join_packets([big, payloads[1]])[0][1]
    assert packet[2:4] == bytes([252 + (512 & 3), (512 - 252) >> 2]) and len(packet) == 4 + 512 + len(payloads[1]) - 1
    assert opus_packets.split(packet) == [big[1:], payloads[1][1:]]


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
    packets = encoded_packets(4)
    packets[1]._data = b""  # type: ignore[attr-defined]
    jitter = buffer()
    frames = [jitter.add(p)[1] for p in packets]
    assert frames[1] is None and all(f is not None and f.data for f in frames[:1] + frames[2:])


def test_max_wait_is_bounded() -> None:
    with pytest.raises(ValueError, match="max_wait"):
        AudioJitterBuffer(max_wait=0)


async def test_a_call_that_loses_one_packet_in_twenty_is_heard(server, script, audio_dir, admin_token: str) -> None:
    """A real call whose caller loses every twentieth RTP packet of its speech (5 %): the server's buffer counts them
    lost and conceals them, and the question is heard as the same model hears it offline with the same losses."""
    script.reply = "Certainly."
    caller = await open_call(server)
    try:
        (sender,) = caller.pc.getSenders()
        dtls = sender.transport
        send_rtp, loss = dtls._send_rtp, SpeechPacketLoss(20, phase=10)

        async def lossy(data: bytes) -> None:
            if is_rtcp(data) or not loss.loses(RtpPacket.parse(data).payload):  # RTCP goes this way too
                await send_rtp(data)

        dtls._send_rtp = lossy
        clip = trim(espeak(QUESTION, audio_dir / "question.wav"))
        caller.speak(after_line_silence(clip))  # the lead-in's pre-roll, as the offline reference has
        await caller.wait_for(lambda e: e["type"] == "agent.final", 40)
        transport = server.app[SERVICES].calls.calls[caller.call_id].transport
        while hasattr(transport, "inner"):  # the call's wrappers (tap, pausable output) around the WebRTC one
            transport = transport.inner
        (jitter,) = received_audio_buffers(transport.pc)
        assert jitter.lost > 0
    finally:
        await caller.hang_up()
    (turn,) = [t for t in await stored_turns(server, admin_token, caller.call_id, 2) if t["role"] == "user"]
    # Offline, the same audio with the same packets lost (counted from the first speech packet) and concealed
    # as the buffer conceals them, starting where the lead-in may start the turn (0.2-0.44 s before the first
    # word): with these losses Whisper base heard "2 at 7 to 9" at a 0.3 s lead and "2 months and run to night"
    # at 0.25 s, as the live turn did. The model's edge, not a word the buffer lost.
    assert loss.lost >= 5
    heard = Counter(words(turn["text"]))
    models = server.app[SERVICES].models
    offline = {lead: await models.run_stt(opus_round_trip(clip, lead_s=lead, loss=SpeechPacketLoss(20, phase=10)))
               for lead in (0.2, 0.26, 0.3, 0.36, 0.44)}
    missed = {lead: len(words(text)) - sum((Counter(words(text)) & heard).values()) for lead, text in offline.items()}
    assert min(missed.values()) <= 2, f"heard {turn['text']!r}; offline with the same losses: {offline}"


@pytest.mark.parametrize("packet_ms", [40, 60])
def test_packets_of_several_frames_are_joined_too_so_losses_never_add_up(packet_ms: int) -> None:
    """A sender with a 40 or 60 ms ptime sends code 1/2/3 packets: they are split and joined by frame, so a gap
    costs its wait once, as with 20 ms packets."""
    packets = encoded_packets(600, packet_ms=packet_ms)
    assert {p._data[0] & 3 for p in packets} - {0}  # type: ignore[attr-defined]  # multi-frame packets
    lost = set(range(7, len(packets), 13))
    jitter = buffer()
    out: list[JitterFrame] = []
    per_packet = packet_ms * WIRE_RATE // 1000
    for i, packet in enumerate(packets):
        if i in lost:
            continue
        if (frame := jitter.add(packet)[1]) is not None:
            out.append(frame)
        # At most the gap's wait, and one packet more when the encoder changed its configuration at the gap
        # (the stand-in, in the configuration before, cannot join the packets after): never more, never growing.
        held = (i + 1) - len(decoded(out)) // (per_packet * 2)
        assert held <= jitter.max_wait + 1, f"packet {i}: {held} packets held"
    assert np.array_equal(decoded(out), decoded(one_by_one(packets, lost)))


def test_a_sender_that_renumbers_is_followed_and_a_stray_packet_is_dropped() -> None:
    packets = encoded_packets(60, first_seq=20000)
    renumbered = encoded_packets(60, first_seq=10000)[30:]  # goes on 10,000 lower: a restarted sender
    stray = encoded_packets(1, first_seq=50000)[0]
    jitter = buffer()
    frames = [f for p in [*packets[:10], stray, *packets[10:30], *renumbered] if (f := jitter.add(p)[1]) is not None]
    assert jitter.late == 2 and jitter.restarts == 2  # the stray, and the renumbered stream's first packet
    heard = len(decoded(frames)) // (2 * WIRE_FRAME)
    assert heard == 60  # all of both numberings: the new one's first packet is kept until the second confirms it


def test_a_stray_packet_a_little_ahead_does_not_skip_the_stream() -> None:
    packets = encoded_packets(60, first_seq=1000)
    stray = encoded_packets(1, first_seq=1030, ssrc=1)[0]  # 20 ahead: within the dropout, past the capacity
    jitter = buffer()
    frames = [f for p in [*packets[:10], stray, *packets[10:]] if (f := jitter.add(p)[1]) is not None]
    assert jitter.lost == 0 and jitter.late == 1  # the real packet 1030, after its turn went to the stray
    assert len(decoded(frames)) // (2 * WIRE_FRAME) == 60


def test_a_new_source_starts_a_new_numbering() -> None:
    first, second = encoded_packets(10, first_seq=100, ssrc=1), encoded_packets(10, first_seq=40000, ssrc=2)
    jitter = buffer()
    frames = [f for p in first + second if (f := jitter.add(p)[1]) is not None]
    assert len(frames) == 20 and jitter.late == 0


def test_a_malformed_packet_is_passed_alone_and_takes_no_good_one_with_it() -> None:
    packets = encoded_packets(8)
    oversize = RtpPacket(payload_type=OPUS_PT, sequence_number=packets[3].sequence_number,
                         timestamp=packets[3].timestamp, ssrc=1, payload=b"")
    oversize._data = bytes([packets[0]._data[0]]) + bytes(1400)  # type: ignore[attr-defined]  # R2: > 1275 bytes
    jitter = buffer()
    arrived = [*packets[:2], packets[4], oversize, packets[5], *packets[6:]]  # 2 lost, 3 late and oversized
    frames = [f for p in arrived if (f := jitter.add(p)[1]) is not None]
    assert oversize._data in [f.data for f in frames]  # type: ignore[attr-defined]
    assert sum(f.data == oversize._data for f in frames) == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("packet, frames", [
    (bytes([0x78]) + b"abc", [b"abc"]),  # code 0
    (bytes([0x79]) + b"abcd", [b"ab", b"cd"]),  # code 1: two equal frames
    (bytes([0x7A, 1]) + b"abc", [b"a", b"bc"]),  # code 2: the first's length, then the rest
    (bytes([0x7B, 0x83, 1, 2]) + b"abcdef", [b"a", b"bc", b"def"]),  # code 3 VBR
    (bytes([0x7B, 0x02]) + b"abcd", [b"ab", b"cd"]),  # code 3 CBR
    (bytes([0x7B, 0x42, 2]) + b"abcd" + b"\0\0", [b"ab", b"cd"]),  # code 3 CBR with 2 bytes of padding
    (bytes([0x7B, 0x02]), [b"", b""]),  # two lost frames (what lost_packet sends for a 2-frame packet)
    (b"", None), (bytes([0x79]) + b"abc", None),  # empty; code 1 with an odd length
    (bytes([0x7A, 9]) + b"abc", None), (bytes([0x7B, 0x00]), None),  # a length past the end; no frames
    (bytes([0x7B, 0x07]) + bytes(7), None),  # 7 x 20 ms: over 120 ms
    (bytes([0x7B, 0x42, 9]) + b"ab", None),  # padding past the end
])
def test_opus_packets_are_split_by_rfc_6716(packet: bytes, frames: list[bytes] | None) -> None:
    assert opus_packets.split(packet) == frames
