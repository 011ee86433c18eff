"""Property-based fuzzing of the parsers that take outside input: SIP messages, SDP (phone offers and WebRTC
offers), RTP headers and the jitter buffer, RFC 4733 DTMF payloads, JSON bodies, Twilio media-stream frames.

The property everywhere: only the parser's documented error escapes, and nothing is left running. Hypothesis runs
derandomized (the same examples on every run, in CI too), with no example database and no deadline (a loaded
machine is not a bug); `max_examples` keeps the whole file well under a minute on 2 cores.
"""

from __future__ import annotations

import asyncio
import json
import string
from typing import Any

import aiohttp
from aiohttp import streams, web
from aiohttp.test_utils import make_mocked_request
from conftest import RunningServer
from helpers import server_tasks
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from pono.context import SERVICES
from pono.http import ApiError, read_json_model
from pono.signaling.api import prepare_offer
from pono.signaling.phone import message as sip
from pono.signaling.phone.rtp import DtmfReceiver, JitterBuffer, RtpPacket
from pono.signaling.phone.sdp import SdpError, answer, parse_offer
from pono.signaling.phone.sdp_policy import MediaPolicy

FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=300,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# Text with what breaks parsers: separators, quotes, NUL, CR/LF, non-ASCII, lone surrogates.
_ODD = st.sampled_from(["", " ", ":", ";", ",", "=", "<", ">", "@", '"', "\\", "\x00", "\r", "\n", "\r\n", "\t",
                        "/", "*", "é", "\ud800", "0", "-1", "99999999999999999999", "sip:", ";tag=", ";branch=",
                        "\u00b2", "\u0661", "\U0001d7d7"])  # digits to str.isdigit() that int() refuses or reads
_TEXT = st.lists(st.one_of(_ODD, st.text(string.printable, max_size=12), st.text(max_size=6)), max_size=8).map(
    "".join)


# -- SIP ------------------------------------------------------------------------------------------------------
_START = st.one_of(
    st.sampled_from(["INVITE sip:agent@127.0.0.1 SIP/2.0", "OPTIONS sip:x SIP/2.0", "BYE sip:a@b SIP/2.0",
                     "SIP/2.0 200 OK", "SIP/2.0 180 Ringing", "ACK * SIP/2.0", "SIP/2.0 999 ", "HTTP/1.1 200 OK"]),
    _TEXT)
_HEADER_NAMES = st.one_of(st.sampled_from([
    "Via", "v", "From", "f", "To", "t", "Call-ID", "i", "CSeq", "Content-Length", "l", "Contact", "m",
    "Content-Type", "c", "Max-Forwards", "Authorization", "Record-Route", "Route"]), _TEXT)
# Numbers as a peer may write them: signs, exponents, huge, and digits that are not ASCII.
_NUMBERS = st.sampled_from(["0", "-1", "+1", "1e3", "99999999999999999999", "\u00b2", "\u0661", "\U0001d7d7", "0x10"])
_HEADER_VALUES = st.one_of(_NUMBERS, st.builds("{} {}".format, _NUMBERS, st.sampled_from(["INVITE", "BYE", "x"])),
                           st.sampled_from([
    "SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1", "<sip:a@b>;tag=1", "<sip:agent@127.0.0.1>", "c1@host",
    "1 INVITE", "2 BYE", "0", "5", "999999", "-3", "abc", "application/sdp", "70"]), _TEXT)


def _mutated(draw: st.DrawFn, lines: list[str], extra: st.SearchStrategy[str], most: int = 5,
             values: st.SearchStrategy[str] | None = None, separator: str = ":") -> list[str]:
    """`lines` with up to `most` edits: a line dropped, added, replaced, swapped with another or given odd text,
    or (with `values`) what follows its first `separator` replaced."""
    lines = list(lines)
    actions = ["drop", "insert", "replace", "swap", "append", *(["value"] * 2 if values is not None else [])]
    for _ in range(draw(st.integers(0, most))):
        at = draw(st.integers(0, len(lines)))
        action = draw(st.sampled_from(actions))
        if action == "insert" or not lines:
            lines.insert(at, draw(extra))
            continue
        at = min(at, len(lines) - 1)
        if action == "drop":
            del lines[at]
        elif action == "replace":
            lines[at] = draw(extra)
        elif action == "swap":
            other = draw(st.integers(0, len(lines) - 1))
            lines[at], lines[other] = lines[other], lines[at]
        elif action == "value" and values is not None:
            lines[at] = lines[at].split(separator, 1)[0] + separator + " " + draw(values)
        else:
            lines[at] += draw(_TEXT)
    return lines


_SIP_REQUEST = ["INVITE sip:agent@127.0.0.1 SIP/2.0", "Via: SIP/2.0/UDP 127.0.0.1:5060;branch=z9hG4bK1",
                "From: <sip:a@b>;tag=1", "To: <sip:agent@127.0.0.1>", "Call-ID: c1@host", "CSeq: 1 INVITE",
                "Contact: <sip:a@127.0.0.1:5062>", "Max-Forwards: 70", "Content-Type: application/sdp",
                "Content-Length: 4"]
_SIP_LINES = st.one_of(_START, st.builds(lambda k, sep, v: f"{k}{sep}{v}", _HEADER_NAMES,
                                         st.sampled_from([":", ": ", " : ", "", " "]), _HEADER_VALUES))


@st.composite
def sip_messages(draw: st.DrawFn) -> bytes:
    """A request or response shaped like SIP with a few lines dropped, added or garbled, or plain bytes."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=600))
    lines = list(_SIP_REQUEST)
    if draw(st.booleans()):
        lines[0] = draw(st.sampled_from(["SIP/2.0 200 OK", "SIP/2.0 180 Ringing", "BYE sip:a@b SIP/2.0"]))
    newline = draw(st.sampled_from(["\r\n", "\n"]))
    head = newline.join(_mutated(draw, lines, _SIP_LINES, values=_HEADER_VALUES))
    text = head + newline + newline + draw(st.sampled_from(["v=0\n", "", "x" * 10])) + draw(_TEXT)
    return text.encode("utf-8", "surrogatepass") + draw(st.binary(max_size=8))


@FUZZ
@given(sip_messages())
def test_sip_parse_raises_only_sip_parse_error(data: bytes) -> None:
    try:
        msg = sip.parse(data)
    except sip.SipParseError as exc:
        assert 400 <= exc.status < 600
        return
    # What the server reads of every message it accepts, and the responses it builds from it.
    assert msg.cseq[0] >= 0 and isinstance(msg.call_id, str) and isinstance(msg.branch, str)
    sip.tag(msg.get("from"))
    sip.uri_user(msg.uri or "")
    sip.response(msg, 200, "OK", to_tag="x").to_bytes()
    msg.to_bytes()


# -- SDP for phones ---------------------------------------------------------------------------------------------
_PHONE_LINES = st.one_of(st.sampled_from([
    "o=- 1 1 IN IP4 203.0.113.7", "s=-", "c=IN IP4 203.0.113.7", "c=IN IP6 2001:db8::7", "c=IN IP4 0.0.0.0",
    "c=IN IP4 host.example.com", "t=0 0", "m=audio 40000 RTP/AVP 0 8 101", "m=audio 0 RTP/AVP 0",
    "m=audio 40000/2 RTP/AVP 0", "m=video 40002 RTP/AVP 96", "m=image 40004 udptl t38", "m=audio 40000 RTP/SAVP 0",
    "m=audio 70000 RTP/AVP 0", "m=audio 40000 RTP/AVP", "m=audio x RTP/AVP 0", "a=rtpmap:101 telephone-event/8000",
    "a=rtpmap:0 PCMU/8000", "a=rtpmap:96 opus/48000/2", "a=rtpmap:x PCMU/8000", "a=rtpmap:8", "a=sendonly",
    "a=inactive", "a=recvonly", "a=fmtp:101 0-15", "a=ptime:20", "a=rtcp:40001"]),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from("vosctmab"), _TEXT))


_PHONE_OFFER = ["v=0", "o=- 1 1 IN IP4 203.0.113.7", "s=-", "c=IN IP4 203.0.113.7", "t=0 0",
                "m=audio 40000 RTP/AVP 0 8 101", "a=rtpmap:0 PCMU/8000", "a=rtpmap:8 PCMA/8000",
                "a=rtpmap:101 telephone-event/8000", "a=fmtp:101 0-15", "a=ptime:20", "a=sendrecv"]


@st.composite
def phone_offers(draw: st.DrawFn) -> str:
    """A phone's offer (PCMU, PCMA, telephone-event) with a few lines dropped, added, garbled or moved."""
    newline = draw(st.sampled_from(["\r\n", "\n"]))
    return newline.join(_mutated(draw, _PHONE_OFFER, _PHONE_LINES)) + newline


@FUZZ
@given(phone_offers(), st.sampled_from(["203.0.113.5", "2001:db8::5", "127.0.0.1"]))
def test_phone_sdp_raises_only_sdp_error(sdp: str, our_address: str) -> None:
    try:
        offer = parse_offer(sdp)
    except SdpError:
        return
    answer(offer, our_address, 40000)
    for policy in (MediaPolicy(), MediaPolicy.build(["10.0.0.0/8", "2001:db8::/32"], "127.0.0.1")):
        try:
            policy.destination(offer, our_address)
        except SdpError:
            pass


# -- SDP offers from browsers ------------------------------------------------------------------------------------
_FINGERPRINT = "a=fingerprint:sha-256 " + ":".join(["AB"] * 32)
_WEBRTC_SESSION = ["v=0", "o=- 4611731400430051336 2 IN IP4 127.0.0.1", "s=-", "t=0 0", "a=group:BUNDLE 0 1",
                   "a=msid-semantic: WMS"]
_WEBRTC_AUDIO = ["m=audio 9 UDP/TLS/RTP/SAVPF 111 0", "c=IN IP4 0.0.0.0", "a=rtcp:9 IN IP4 0.0.0.0",
                 "a=ice-ufrag:abcd", "a=ice-pwd:abcdefghijklmnopqrstuv", _FINGERPRINT, "a=setup:actpass", "a=mid:0",
                 "a=sendrecv", "a=rtcp-mux", "a=rtpmap:111 opus/48000/2", "a=rtpmap:0 PCMU/8000",
                 "a=candidate:1 1 udp 2130706431 127.0.0.1 50000 typ host"]
_WEBRTC_DATA = ["m=application 9 UDP/DTLS/SCTP webrtc-datachannel", "c=IN IP4 0.0.0.0", "a=ice-ufrag:abcd",
                "a=ice-pwd:abcdefghijklmnopqrstuv", _FINGERPRINT, "a=setup:actpass", "a=mid:1", "a=sctp-port:5000"]
_WEBRTC_EXTRA = st.one_of(st.sampled_from([
    "m=video 9 UDP/TLS/RTP/SAVPF 96", "m=audio 0 UDP/TLS/RTP/SAVPF 0", "m=application 9 DTLS/SCTP",
    "m=application 9 DTLS/SCTP 5000", "a=bundle-only", "a=mid:0", "a=mid:", "a=group:BUNDLE 7", "a=group:BUNDLE",
    "a=fingerprint:sha-1 AB:CD", "a=fingerprint:sha-256 zz", "a=setup:holdconn", "a=inactive", "a=rtcp-mux",
    "a=sctp-port:x", "a=rtpmap:111 opus", "a=rtpmap:abc opus/48000", "a=candidate:x", "a=ssrc:1 cname:x",
    "a=extmap:1/sendrecv urn:x a b", "a=msid:- -", "c=IN IP6 ::", "m=audio 9 RTP/AVP 0"]),
    st.builds(lambda k, v: f"{k}={v}", st.sampled_from("vosctmab"), _TEXT))


@st.composite
def webrtc_offers(draw: st.DrawFn) -> str:
    """A browser-like offer (audio and a data channel) with a few lines dropped, added, garbled or moved."""
    return "\r\n".join(_mutated(draw, [*_WEBRTC_SESSION, *_WEBRTC_AUDIO, *_WEBRTC_DATA], _WEBRTC_EXTRA)) + "\r\n"


@settings(FUZZ, max_examples=400)
@given(webrtc_offers())
def test_webrtc_offer_check_raises_only_a_400(sdp: str) -> None:
    try:
        offer = prepare_offer(sdp)
    except ApiError as exc:
        assert exc.status == 400
        return
    assert offer.taken and offer.sdp.startswith("v=0")


# -- RTP and RFC 4733 DTMF ----------------------------------------------------------------------------------------
@st.composite
def rtp_datagrams(draw: st.DrawFn) -> bytes:
    """Datagrams with an RTP-looking first byte (version, padding, extension, CSRC count drawn) or any bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=80))
    first = draw(st.integers(0, 255)) & 0x3F | 0x80
    return bytes([first]) + draw(st.binary(min_size=0, max_size=80))


@settings(FUZZ, max_examples=1000)
@given(rtp_datagrams())
def test_rtp_parse_returns_a_packet_or_none(data: bytes) -> None:
    packet = RtpPacket.parse(data)
    if packet is not None:
        assert 0 <= packet.payload_type < 128 and len(packet.payload) <= len(data) - 12
        assert RtpPacket.parse(packet.to_bytes()) == RtpPacket(packet.payload_type, packet.sequence, packet.timestamp,
                                                               packet.ssrc, packet.payload, packet.marker)


_PACKETS = st.builds(lambda pt, seq, ts, ssrc, payload: RtpPacket(pt, seq, ts, ssrc, payload),
                     st.sampled_from([0, 101, 13]), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF),
                     st.sampled_from([1, 2]), st.binary(max_size=8))


@settings(FUZZ, max_examples=200)
@given(st.lists(st.tuples(_PACKETS, st.integers(0, 3)), max_size=120))
def test_jitter_buffer_and_dtmf_take_any_stream(stream: list[tuple[RtpPacket, int]]) -> None:
    """Any order, numbering, source changes and payloads: bounded, no exception, digits only from the set."""
    buffer, dtmf = JitterBuffer(), DtmfReceiver()
    for packet, pops in stream:
        buffer.put(packet)
        assert len(buffer) <= buffer.capacity
        for _ in range(pops):
            buffer.pop()
        digit = dtmf.digit(packet)
        assert digit is None or (len(digit) == 1 and digit in "0123456789*#ABCD")


# -- JSON bodies ---------------------------------------------------------------------------------------------------
class _Body(BaseModel):
    name: str
    count: int = 0
    tags: list[str] = []
    extra: dict[str, Any] = {}


_JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                     lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                 max_size=4), max_leaves=20)
_BODIES = st.one_of(
    st.binary(max_size=200),
    _JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"name": _JSON}, optional={"count": _JSON, "tags": _JSON, "extra": _JSON}).map(
        lambda v: json.dumps(v).encode()),
    st.builds(lambda depth, open_, close: (open_ * depth + close * depth).encode(), st.integers(1, 5000),
              st.sampled_from(["[", '{"a":', '{"extra":']), st.sampled_from(["]", "}"])),
    st.sampled_from([b'{"name": "\\ud800"}', b'{"name": "\\u0000"}', b'{"name": "x"', b"\xff\xfe", b"NaN",
                     b'{"name": 1e999}', b'{"name": "a", "count": 1e400}', b"{}" * 3]))


async def _read(body: bytes, content_type: str) -> None:
    request = make_mocked_request("POST", "/", headers={"Content-Type": content_type})
    reader = streams.StreamReader(request.protocol, 2**16, loop=asyncio.get_running_loop())
    reader.feed_data(body)
    reader.feed_eof()
    request = make_mocked_request("POST", "/", headers={"Content-Type": content_type}, payload=reader,
                                  client_max_size=100_000)
    before = asyncio.all_tasks()
    try:
        model = await read_json_model(request, _Body)
        assert isinstance(model.name, str) and "\x00" not in model.name
    except ApiError as exc:
        assert exc.status in (400, 415, 422), exc.text
    except web.HTTPRequestEntityTooLarge:  # documented: errors_as_json answers it as a JSON 413
        pass
    assert asyncio.all_tasks() == before


@settings(FUZZ, max_examples=400)
@given(_BODIES, st.sampled_from(["application/json", "application/json; charset=utf-8", "text/plain", ""]))
def test_read_json_model_raises_only_api_errors(body: bytes, content_type: str) -> None:
    asyncio.run(_read(body, content_type))


# -- Twilio media-stream frames, through a real WebSocket -----------------------------------------------------------
_B64 = st.sampled_from(["", "////", "AAAA" * 40, "not base64!", "=", "AA=A", "\u00e9\u00e9"])
_TWILIO = st.one_of(
    st.text(max_size=60),
    st.builds(json.dumps, _JSON),
    st.builds(lambda event, body: json.dumps({"event": event, **body}),
              st.sampled_from(["connected", "start", "media", "dtmf", "mark", "stop", "", None, 7, "x"]),
              st.fixed_dictionaries({}, optional={
                  "start": st.one_of(_JSON, st.fixed_dictionaries(
                      {"streamSid": st.sampled_from(["MZ1", "", "x" * 100, "a b", "MZ\u00e9"])},
                      optional={"callSid": _JSON, "customParameters": st.one_of(_JSON, st.fixed_dictionaries(
                          {}, optional={"persona": st.sampled_from(["nobody", "default"]) | _JSON,
                                        "to": _JSON, "caller": _JSON}))})),
                  "streamSid": _JSON,
                  "media": st.one_of(_JSON, st.fixed_dictionaries({"payload": _B64 | _JSON},
                                                                  optional={"track": _JSON})),
                  "dtmf": st.one_of(_JSON, st.fixed_dictionaries({"digit": _JSON | st.sampled_from(["1", "#"])})),
                  "mark": _JSON})))


_START_FRAME = json.dumps({"event": "start", "start": {"streamSid": "MZfuzz", "callSid": "CAfuzz",
                                                         "customParameters": {"caller": "+15550100"}}})
# Mostly a well-begun stream (connected, a valid start: a real call starts), then fuzzed frames; sometimes not.
_TWILIO_STREAMS = st.builds(lambda head, frames: [*head, *frames],
                            st.sampled_from([[json.dumps({"event": "connected"}), _START_FRAME], [_START_FRAME],
                                             [_START_FRAME], []]),
                            st.lists(_TWILIO, min_size=1, max_size=5))


def _examples(strategy: st.SearchStrategy[Any], count: int) -> list[Any]:
    """`count` derandomized examples of `strategy`, for a property that must run on the test's event loop."""
    found: list[Any] = []

    @settings(FUZZ, max_examples=count, phases=[Phase.generate])
    @given(strategy)
    def collect(example: Any) -> None:
        found.append(example)

    collect()
    return found


async def test_twilio_frames_close_with_a_reason_and_leave_nothing_running(server: RunningServer) -> None:
    """Each case is one stream: a few frames, then the stream closes. Whatever the frames, the server answers
    with a close code (never an error), /api/health stays up, and no task outlives the streams."""
    sequences = _examples(_TWILIO_STREAMS, 60)
    url = server.url.replace("http://", "ws://") + "/api/phone/twilio?token=provider-secret"
    registry = server.app[SERVICES].metrics.registry

    def calls_started() -> float:
        return registry.get_sample_value("pono_calls_total", {"transport": "twilio"}) or 0.0

    started_before = calls_started()
    before = asyncio.all_tasks()
    codes: dict[int, int] = {}
    async with aiohttp.ClientSession() as http:
        for frames in sequences:
            ws = await http.ws_connect(url)
            for frame in frames:
                if ws.closed:
                    break
                await ws.send_str(frame)
            await ws.close()
            assert ws.close_code in (1000, 1003), (frames, ws.close_code)
            codes[ws.close_code] = codes.get(ws.close_code, 0) + 1
        async with http.get(f"{server.url}/api/health") as r:
            assert r.status == 200
    calls = server.app[SERVICES].calls.calls
    for _ in range(100):  # a started call ends when its stream closes; give its tasks a moment to finish
        if not calls:
            break
        await asyncio.sleep(0.1)
    leaked = await server_tasks(server, before) - before
    assert not calls and not leaked, (list(calls), sorted(t.get_name() for t in leaked))
    assert calls_started() - started_before >= 10, "too few cases got past 'start': the fuzz misses the call path"
    assert codes.get(1003, 0) >= 10 and codes.get(1000, 0) >= 1, codes  # refused streams, and clean ones
