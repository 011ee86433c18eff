"""The phone media pieces on their own: G.711 tables, the jitter buffer, RFC 4733 DTMF, SDP offer/answer."""

from __future__ import annotations

import asyncio
import socket
import warnings

import numpy as np
import pytest

from pono.signaling.phone import g711
from pono.signaling.phone.rtp import DtmfReceiver, JitterBuffer, RtpPacket, RtpSession, bind_rtp
from pono.signaling.phone.sdp import Offer, SdpError, answer, parse_offer
from pono.signaling.phone.sdp_policy import MediaPolicy


def _reference_g711():  # type: ignore[no-untyped-def]
    """The reference: CPython's audioop (3.11, 3.12) or audioop-lts (3.13+), both Sun/ITU-T g711.c."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import audioop
    return audioop


def test_g711_matches_the_reference_for_every_sample_and_code() -> None:
    reference = _reference_g711()
    every_sample = np.arange(-32768, 32768, dtype=np.int16)
    every_code = bytes(range(256))
    for codec, to_law, from_law in (("PCMU", reference.lin2ulaw, reference.ulaw2lin),
                                    ("PCMA", reference.lin2alaw, reference.alaw2lin)):
        expected = np.frombuffer(to_law(every_sample.tobytes(), 2), np.uint8)
        ours = np.frombuffer(g711.encode(every_sample, codec), np.uint8)
        differing = np.flatnonzero(ours != expected)
        assert differing.size == 0, (codec, differing.size, every_sample[differing[:5]].tolist())
        assert np.array_equal(g711.decode(every_code, codec), np.frombuffer(from_law(every_code, 2), np.int16)), codec
    # Silence is the standard's zero code, as the comfort-noise sender assumes.
    assert g711.encode(np.zeros(2, np.int16), "PCMU") == bytes([g711.SILENCE["PCMU"]] * 2) == b"\xff\xff"
    assert g711.encode(np.zeros(2, np.int16), "PCMA") == bytes([g711.SILENCE["PCMA"]] * 2) == b"\xd5\xd5"


def _packet(sequence: int, payload: bytes = b"\xff" * 160, pt: int = 0, timestamp: int = 0) -> RtpPacket:
    return RtpPacket(pt, sequence & 0xFFFF, timestamp or sequence * 160, 1234, payload)


def test_jitter_buffer_reorders_waits_for_depth_and_reports_loss() -> None:
    buffer = JitterBuffer(depth=3, capacity=25)
    for seq in (65534, 0, 65535):  # out of order, across the 16-bit wrap
        buffer.put(_packet(seq))
    assert [p.sequence for p in (buffer.pop(), buffer.pop(), buffer.pop())] == [65534, 65535, 0]  # type: ignore[union-attr]
    buffer.put(_packet(2))  # 1 never comes
    buffer.put(_packet(3))
    assert buffer.pop() is None and buffer.lost == 1
    assert buffer.pop().sequence == 2  # type: ignore[union-attr]
    buffer.put(_packet(1))  # too late now: dropped, not played out of order
    assert buffer.late == 1 and buffer.pop().sequence == 3  # type: ignore[union-attr]


def test_jitter_buffer_stays_bounded() -> None:
    buffer = JitterBuffer(depth=3, capacity=25)
    for seq in range(1000):  # a burst with nobody popping
        buffer.put(_packet(seq))
        assert len(buffer) <= 25
    assert buffer.overflow > 0 and buffer.pop().sequence == 975  # type: ignore[union-attr]


def _played(buffer: JitterBuffer, packets: list[RtpPacket]) -> list[RtpPacket]:
    """What comes out when each packet arrives just before its playout tick."""
    out = []
    for packet in packets:
        buffer.put(packet)
        if (popped := buffer.pop()) is not None:
            out.append(popped)
    return out


@pytest.mark.parametrize("new_ssrc", [5678, 1234], ids=["new-ssrc", "same-ssrc"])
def test_jitter_buffer_follows_a_restarted_stream(new_ssrc: int) -> None:
    """Stream A at sequence 40000, then stream B at 10000 (a B2BUA re-INVITE, a transfer, hold/resume):
    B is played, with or without a new SSRC, and the late counter does not swallow it."""
    buffer = JitterBuffer(depth=3, capacity=25)
    stream_a = [RtpPacket(0, 40000 + i, i * 160, 1234, bytes([1]) * 160) for i in range(500)]
    stream_b = [RtpPacket(0, 10000 + i, i * 160, new_ssrc, bytes([2]) * 160) for i in range(3000)]
    assert len(_played(buffer, stream_a)) >= 490
    played_b = [p for p in _played(buffer, stream_b) if p.payload[0] == 2]  # after what was left of A
    assert len(played_b) >= 2990
    assert [p.sequence for p in played_b] == sorted(p.sequence for p in played_b)  # in order
    assert buffer.resyncs == 1


def test_jitter_buffer_ignores_a_single_stray_packet() -> None:
    """One packet from far away in the numbering (a corrupt or forged one) does not restart the stream."""
    buffer = JitterBuffer(depth=3, capacity=25)
    for seq in range(100, 110):
        buffer.put(_packet(seq))
    assert not buffer.put(_packet(30000))
    assert buffer.put(_packet(110)) and buffer.resyncs == 0 and buffer.stray == 1
    assert buffer.pop().sequence == 100  # type: ignore[union-attr]


async def test_media_nobody_plays_does_not_keep_a_dead_line_alive() -> None:
    """Packets of a payload type nobody negotiated (or that the jitter buffer throws away) are not media:
    the media timeout still hangs up a line that carries nothing else."""
    timed_out = asyncio.Event()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as phone:
        phone.bind(("127.0.0.1", 0))
        phone.setblocking(False)
        rtp = await bind_rtp(lambda: RtpSession("PCMU", 0, 101, phone.getsockname(), on_audio=lambda pcm: None,
                                                on_dtmf=lambda digit: None, media_timeout_s=0.3,
                                                on_media_timeout=timed_out.set), "127.0.0.1", None)
        rtp.start()
        try:
            for seq in range(500):  # up to 10 s of packets every 20 ms, none of them PCMU
                phone.sendto(RtpPacket(96, seq, seq * 160, 7, b"\x00" * 160).to_bytes(), ("127.0.0.1", rtp.local_port))
                if timed_out.is_set():
                    break
                await asyncio.sleep(0.02)
            assert timed_out.is_set(), "the junk kept the line alive"
            assert rtp.stats.received > 0
        finally:
            await rtp.close()


def test_dtmf_one_digit_per_event() -> None:
    receiver = DtmfReceiver()
    event = bytes([4, 0x0A, 0x00, 0xA0])  # digit 4, volume 10, duration 160
    end = bytes([4, 0x8A, 0x03, 0x20])  # the end bit, sent three times by the RFC
    digits = [receiver.digit(_packet(s, p, pt=101, timestamp=8000)) for s, p in
              enumerate([event, event, end, end, end])]
    assert [d for d in digits if d] == ["4"]
    assert receiver.digit(_packet(9, bytes([11, 0x8A, 0, 0xA0]), pt=101, timestamp=9600)) == "#"
    assert receiver.digit(_packet(10, b"\x04", pt=101, timestamp=11200)) is None  # truncated


RICH_OFFER = """v=0\r
o=linphone 1 1 IN IP4 192.0.2.10\r
s=Talk\r
c=IN IP4 192.0.2.10\r
t=0 0\r
m=audio 7078 RTP/AVP 96 97 98 8 0 18 101\r
a=rtpmap:96 opus/48000/2\r
a=rtpmap:97 speex/16000\r
a=rtpmap:98 speex/8000\r
a=rtpmap:101 telephone-event/8000\r
a=sendrecv\r
"""


def test_sdp_picks_the_first_g711_and_answers_with_ptime_20() -> None:
    offer = parse_offer(RICH_OFFER)
    assert (offer.codec, offer.payload_type, offer.dtmf_type, offer.address, offer.port) == \
        ("PCMA", 8, 101, "192.0.2.10", 7078)
    text = answer(offer, "198.51.100.1", 40000)
    assert "m=audio 40000 RTP/AVP 8 101" in text and "a=rtpmap:8 PCMA/8000" in text
    assert "a=ptime:20" in text and "a=rtpmap:101 telephone-event/8000" in text and "a=sendrecv" in text
    held = parse_offer(RICH_OFFER.replace("a=sendrecv", "a=sendonly"))
    assert "a=recvonly" in answer(held, "198.51.100.1", 40000)


@pytest.mark.parametrize("sdp", [
    RICH_OFFER.replace(" 8 0 18 101", " 18"),  # G.729 only
    RICH_OFFER.replace("RTP/AVP", "RTP/SAVP"),  # SRTP
    "garbage",
    "",
])
def test_sdp_without_a_usable_codec_is_refused(sdp: str) -> None:
    with pytest.raises(SdpError):
        parse_offer(sdp)


def test_sdp_answers_every_offered_m_line() -> None:
    """RFC 3264 §6: one m= line per offered one, in order; the refused ones with port 0."""
    offer = parse_offer(RICH_OFFER.replace("m=audio", "m=video 9000 RTP/AVP 96 97\r\na=rtpmap:96 VP8/90000\r\n"
                                           "a=rtpmap:97 H264/90000\r\nm=audio", 1)
                        + "m=image 9002 udptl t38\r\n")
    text = answer(offer, "198.51.100.1", 40000)
    assert [line for line in text.split("\r\n") if line.startswith("m=")] == [
        "m=video 0 RTP/AVP 96 97", "m=audio 40000 RTP/AVP 8 101", "m=image 0 udptl t38"]
    assert text.index("a=rtpmap:8 PCMA/8000") > text.index("m=audio")


def test_sdp_answers_ipv6_with_ipv6() -> None:
    offer = parse_offer(RICH_OFFER.replace("IN IP4 192.0.2.10", "IN IP6 2001:db8::10"))
    assert offer.address == "2001:db8::10"
    text = answer(offer, "2001:db8::1", 40000)
    assert "c=IN IP6 2001:db8::1" in text and "IN IP4" not in text


PUBLIC = MediaPolicy.build([], "0.0.0.0")  # a listener on every interface, no private media networks


@pytest.mark.parametrize(("address", "why"), [
    ("pbx.example.com", "not an IP address"),  # a hostname: would be resolved on the event loop
    ("169.254.169.254", "link-local"),  # the cloud metadata service
    ("fe80::1", "link-local"),
    ("224.0.0.1", "multicast"),
    ("255.255.255.255", "broadcast"),
    ("127.0.0.1", "loopback"),
    ("10.1.2.3", "not public"),
    ("::ffff:169.254.169.254", "link-local"),
])
def test_media_policy_refuses_unusable_destinations(address: str, why: str) -> None:
    family = "IP6" if ":" in address else "IP4"
    offer = parse_offer(RICH_OFFER.replace("IN IP4 192.0.2.10", f"IN {family} {address}"))
    with pytest.raises(SdpError, match=why):
        PUBLIC.destination(offer, "2001:db8::1" if family == "IP6" else "198.51.100.1")


def test_media_policy_accepts_public_and_listed_and_reads_0000_as_hold() -> None:
    def offer(address: str) -> Offer:
        return parse_offer(RICH_OFFER.replace("192.0.2.10", address))

    assert PUBLIC.destination(offer("93.184.216.34"), "198.51.100.1") == ("93.184.216.34", 7078)
    assert PUBLIC.destination(offer("0.0.0.0"), "198.51.100.1") is None  # hold
    lan = MediaPolicy.build(["10.0.0.0/8"], "0.0.0.0")
    assert lan.destination(offer("10.1.2.3"), "198.51.100.1") == ("10.1.2.3", 7078)
    with pytest.raises(SdpError, match="link-local"):
        MediaPolicy.build(["169.254.0.0/16"], "0.0.0.0").destination(offer("169.254.169.254"), "198.51.100.1")
    on_loopback = MediaPolicy.build([], "127.0.0.1")  # the listener itself is on loopback (tests, a local proxy)
    assert on_loopback.destination(offer("127.0.0.1"), "127.0.0.1") == ("127.0.0.1", 7078)
    with pytest.raises(SdpError, match="IPv6 media offered"):
        PUBLIC.destination(parse_offer(RICH_OFFER.replace("IN IP4 192.0.2.10", "IN IP6 2001:4860::1")),
                           "198.51.100.1")
