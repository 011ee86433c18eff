"""The phone media pieces on their own: G.711 tables, the jitter buffer, RFC 4733 DTMF, SDP offer/answer."""

from __future__ import annotations

import numpy as np
import pytest

from pono.signaling.phone import g711
from pono.signaling.phone.rtp import DtmfReceiver, JitterBuffer, RtpPacket
from pono.signaling.phone.sdp import SdpError, answer, parse_offer


def test_g711_matches_the_standard_and_round_trips() -> None:
    # ITU-T G.711 reference points: μ-law 0xFF/0x7F are zero, 0x00/0x80 the extremes; A-law 0xD5/0x55 ±8.
    assert g711.decode(bytes([0xFF, 0x7F, 0x00, 0x80]), "PCMU").tolist() == [0, 0, -32124, 32124]
    assert g711.decode(bytes([0xD5, 0x55]), "PCMA").tolist() == [8, -8]
    ramp = np.linspace(-30000, 30000, 4001).astype(np.int16)
    for codec in ("PCMU", "PCMA"):
        back = g711.decode(g711.encode(ramp, codec), codec).astype(np.int32)
        # Logarithmic quantisation: the error grows with the level but stays within a few percent.
        assert np.all(np.abs(back - ramp) <= np.maximum(40, np.abs(ramp.astype(np.int32)) * 0.07)), codec


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
