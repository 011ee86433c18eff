"""What real PBXes and carriers send that a textbook call does not: a codec-changing re-INVITE, an INVITE
without an offer (delayed offer), `Require` option tags, and multipart bodies. Driven by the project's scripted
SIP phone (pono/testing/sip_caller.py) and raw datagrams, all on loopback."""

from __future__ import annotations

import asyncio
import base64
import math
import re
import secrets
import socket
import time
from collections.abc import Callable

import numpy as np
import pytest
from conftest import RunningServer
from phone_peers import heard_the_question, latest_call

from pono.context import SERVICES
from pono.testing.scripted_llm import Script
from pono.testing.sip_caller import SipCaller


@pytest.fixture(scope="module")
def sip_port(server: RunningServer) -> int:
    sip = server.app[SERVICES].sip
    assert sip is not None and sip.port
    return sip.port


async def _wait(condition: Callable[[], bool], timeout: float = 30, what: str = "timed out") -> None:
    for _ in range(int(timeout * 10)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError(what)


def _calls_of(server: RunningServer, phone: SipCaller) -> list[object]:
    return [d for d in server.app[SERVICES].sip.dialogs.values() if d.sip_call_id == phone.call_id]


async def _ask_and_hear_the_reply(phone: SipCaller, question: np.ndarray) -> None:
    """Say the question; wait until an audible reply comes back."""
    phone.say(question, 16000)
    await asyncio.wait_for(phone.speech_sent.wait(), 30)
    await _wait(lambda: phone.first_sound_after(phone.speech_ended_at or math.inf) is not None, 40,
                "no audible reply came back")


# -- a re-INVITE that changes the codec -------------------------------------------------------------------------

async def test_a_codec_changing_reinvite_switches_both_ways(server: RunningServer, sip_port: int, script: Script,
                                                            admin_token: str, phone_question: np.ndarray) -> None:
    """A PCMU call re-INVITEd with only PCMA (8 101): the answer says PCMA, Pono sends PCMA from then on, and
    hears the caller's PCMA (RFC 3264 §8.3.2)."""
    script.reply = "Certainly, your table for two is booked."
    phone = SipCaller(("127.0.0.1", sip_port))
    started = time.time() - 1
    assert await phone.call() == 200
    try:
        await _wait(lambda: len(phone.received) > 5, 10)
        assert {p.payload_type for p in phone.received} == {0}
        phone.codec = "PCMA"
        switched = await phone.reinvite(phone.offer(formats=[8, 101]))
        assert switched.status == 200 and re.search(rb"m=audio \d+ RTP/AVP 8 101\r\n", switched.body), switched
        assert phone.sending_codec == "PCMA"
        heard = len(phone.received)
        await _wait(lambda: len(phone.received) > heard + 20, 10)
        last = [p.payload_type for p in phone.received[-10:]]
        assert last == [8] * 10, f"Pono answered PCMA but sends payload types {last}"
        await _ask_and_hear_the_reply(phone, phone_question)
    finally:
        await phone.bye()
    call = await latest_call(server, admin_token, started, "sip")
    assert heard_the_question(call), call["turns"]


async def test_a_reinvite_without_an_offer_gets_one_and_the_ack_answers(server: RunningServer,
                                                                      sip_port: int) -> None:
    """RFC 3261 §14.2: a re-INVITE without SDP gets our offer (the codec in use first) and the ACK answers; the
    answer can change the codec. An ACK without an answer leaves the session as it was."""
    phone = SipCaller(("127.0.0.1", sip_port))
    assert await phone.call() == 200
    try:
        await _wait(lambda: len(phone.received) > 5, 10)
        phone.codec = "PCMA"
        offered = await phone.reinvite(b"")
        assert offered.status == 200 and re.search(rb"m=audio \d+ RTP/AVP 0 8 101\r\n", offered.body), offered
        heard = len(phone.received)
        await _wait(lambda: len(phone.received) > heard + 20, 10)
        last = [p.payload_type for p in phone.received[-10:]]
        assert last == [8] * 10, f"the ACK answered PCMA, but Pono sends payload types {last}"
        phone.ack_answer = lambda offer: b""
        again = await phone.reinvite(b"")
        assert again.status == 200 and re.search(rb"m=audio \d+ RTP/AVP 8 0 101\r\n", again.body), again
        heard = len(phone.received)
        await _wait(lambda: len(phone.received) > heard + 20, 10, "an ACK without an answer stopped the media")
        assert [p.payload_type for p in phone.received[-10:]] == [8] * 10
    finally:
        assert await phone.bye() == 200


# -- delayed offer: an INVITE without SDP -----------------------------------------------------------------------

def _no_offer(sdp: bytes) -> tuple[str, bytes]:
    return "", b""


async def test_an_invite_without_an_offer_gets_one_in_the_200(server: RunningServer, sip_port: int, script: Script,
                                                              admin_token: str, phone_question: np.ndarray) -> None:
    """RFC 3261 §13.3.1 / RFC 3264: the 200 carries Pono's offer, the ACK the caller's answer (here PCMA)."""
    script.reply = "Certainly, your table for two is booked."
    phone = SipCaller(("127.0.0.1", sip_port), codec="PCMA", wrap_offer=_no_offer)
    started = time.time() - 1
    assert await phone.call() == 200, phone.answer
    try:
        offer = phone.offer_received or ""
        media = re.search(r"^m=audio (\d+) RTP/AVP ([\d ]+)\r$", offer, re.MULTILINE)
        assert media and {"0", "8"} <= set(media.group(2).split()), offer
        assert re.search(r"^a=rtpmap:\d+ telephone-event/8000\r$", offer, re.MULTILINE), offer
        assert "a=sendrecv" in offer and phone.answer is not None and \
            phone.answer.get("content-type") == "application/sdp"
        await _wait(lambda: len(phone.received) > 10, 10, "no media after the answer in the ACK")
        assert {p.payload_type for p in phone.received} == {8}, "Pono does not send the codec the answer chose"
        await _ask_and_hear_the_reply(phone, phone_question)
    finally:
        await phone.bye()
    call = await latest_call(server, admin_token, started, "sip")
    assert heard_the_question(call), call["turns"]


def _unusable_answer(kind: str) -> Callable[[str], bytes]:
    def answer(offer: str) -> bytes:
        port = re.search(r"^m=audio (\d+)", offer, re.MULTILINE)
        assert port is not None
        sdp = "v=0\r\no=caller 1 1 IN IP4 {a}\r\ns=-\r\nc=IN IP4 {a}\r\nt=0 0\r\nm=audio 40000 RTP/AVP {f}\r\n"
        if kind == "no answer":
            return b""
        if kind == "no codec of ours":
            return (sdp.format(a="127.0.0.1", f="18") + "a=rtpmap:18 G729/8000\r\n").encode()
        if kind == "refused address":
            return (sdp.format(a="169.254.169.254", f="0") + "a=rtpmap:0 PCMU/8000\r\n").encode()
        return b"this is not SDP"
    return answer


@pytest.mark.parametrize("kind", ["no answer", "no codec of ours", "refused address", "not SDP"])
async def test_an_ack_without_a_usable_answer_hangs_up(server: RunningServer, sip_port: int, kind: str) -> None:
    """The 200 carried our offer and the ACK brings no answer we can use: the session cannot work, so Pono
    sends a BYE (RFC 3261 §13.2.2.4 asks the same of a UAC) with the reason, and keeps nothing."""
    phone = SipCaller(("127.0.0.1", sip_port), wrap_offer=_no_offer, ack_answer=_unusable_answer(kind))
    try:
        assert await phone.call() == 200
        await asyncio.wait_for(phone.hung_up.wait(), 10)
        bye = next(r for r in phone.requests if r.method == "BYE")
        assert "488" in (bye.get("reason") or ""), bye
        await _wait(lambda: not _calls_of(server, phone), 5, "the dialog was kept")
        assert not [p for p in phone.received], "media was sent without an answer"
    finally:
        await phone.close()


# -- Require ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("require", "unsupported"), [("100rel", "100rel"),
                                                      ("100rel, x-pono-test", "100rel, x-pono-test")])
async def test_a_required_extension_we_lack_gets_420(server: RunningServer, sip_port: int, require: str,
                                                     unsupported: str) -> None:
    """RFC 3261 §8.2.2.3: 420 Bad Extension naming the option tags in Unsupported, and nothing else."""
    phone = SipCaller(("127.0.0.1", sip_port), invite_headers=[("require", require), ("supported", "100rel")])
    try:
        assert await phone.call() == 420
        assert phone.answer is not None and phone.answer.get("unsupported") == unsupported
        assert {r.status for r in phone.responses} == {420}, "the call rang or was answered"
        assert not _calls_of(server, phone)
    finally:
        await phone.close()


async def test_supported_100rel_is_no_requirement(server: RunningServer, sip_port: int) -> None:
    phone = SipCaller(("127.0.0.1", sip_port), invite_headers=[("supported", "100rel, timer")])
    assert await phone.call() == 200
    await _wait(lambda: len(phone.received) > 5, 10)
    assert await phone.bye() == 200


def _udp_exchange(port: int, data: bytes, wait: float = 2.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(wait)
        sock.sendto(data, ("127.0.0.1", port))
        try:
            return sock.recv(65536)
        except TimeoutError:
            return None


async def test_require_is_checked_on_every_request(server: RunningServer, sip_port: int) -> None:
    """Not only the INVITE: an OPTIONS or a BYE with an unknown Require gets 420 and changes nothing."""
    branch = secrets.token_hex(6)
    options = (f"OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK{branch}"
               "\r\nFrom: <sip:x@127.0.0.1>;tag=1\r\nTo: <sip:agent@127.0.0.1>\r\nCall-ID: require-options\r\n"
               "CSeq: 1 OPTIONS\r\nRequire: x-unknown\r\nContent-Length: 0\r\n\r\n").encode()
    answer = await asyncio.get_running_loop().run_in_executor(None, _udp_exchange, sip_port, options)
    assert answer is not None and answer.startswith(b"SIP/2.0 420 ") and b"\r\nUnsupported: x-unknown\r\n" in answer
    phone = SipCaller(("127.0.0.1", sip_port))
    assert await phone.call() == 200
    try:
        bye = phone.request("BYE")
        bye.headers.append(("require", "x-unknown"))
        phone._send(bye)
        await _wait(lambda: any(r.status == 420 and r.cseq[1] == "BYE" for r in phone.responses), 5)
        heard = len(phone.received)
        await _wait(lambda: len(phone.received) > heard + 10, 10, "the BYE with an unknown Require ended the call")
    finally:
        assert await phone.bye() == 200


# -- multipart bodies -------------------------------------------------------------------------------------------

ISUP = bytes.fromhex("0100600a000207039010700a0790133355551111") + b"\r\n\x00\xff"  # binary, as ISUP is
PIDF = (b'<?xml version="1.0" encoding="UTF-8"?>\r\n<presence xmlns="urn:ietf:params:xml:ns:pidf" '
        b'entity="pres:caller@example.com"><tuple id="t1"><status/></tuple></presence>\r\n')


def _multipart(*parts: tuple[str, bytes]) -> tuple[str, bytes]:
    """A multipart/mixed body (RFC 2046 §5.1) of these (part headers, content) pairs."""
    boundary = "unique-boundary-" + secrets.token_hex(4)
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + headers.encode() + b"\r\n\r\n" + content + b"\r\n"
                    for headers, content in parts)
    return f'multipart/mixed;boundary="{boundary}"', body + b"--" + boundary.encode() + b"--\r\n"


BESIDE_ISUP: Callable[[bytes], tuple[str, bytes]] = lambda sdp: _multipart(  # noqa: E731
    ("Content-Type: application/sdp", sdp),
    ("Content-Type: application/isup;version=itu-t92+\r\nContent-Disposition: signal;handling=optional", ISUP))
AFTER_PIDF_BASE64: Callable[[bytes], tuple[str, bytes]] = lambda sdp: _multipart(  # noqa: E731
    ("Content-Type: application/pidf+xml\r\nContent-ID: <target123@example.com>", PIDF),
    ("Content-Type: application/sdp\r\nContent-Transfer-Encoding: base64", base64.encodebytes(sdp)))


@pytest.mark.parametrize("wrap", [BESIDE_ISUP, AFTER_PIDF_BASE64], ids=["sdp-and-isup", "pidf-lo-then-base64-sdp"])
async def test_the_sdp_part_of_a_multipart_body_is_the_offer(server: RunningServer, sip_port: int,
                                                             wrap: Callable[[bytes], tuple[str, bytes]]) -> None:
    phone = SipCaller(("127.0.0.1", sip_port), wrap_offer=wrap)
    assert await phone.call() == 200, phone.answer
    try:
        assert phone.answer is not None and phone.offer_received is None  # answered, not a counter-offer
        await _wait(lambda: len(phone.received) > 10, 10)
        await _wait(lambda: bool(_calls_of(server, phone)) and _calls_of(server, phone)[0].rtp.stats.received > 10,  # type: ignore[attr-defined]
                    10, "Pono does not take the caller's media")
    finally:
        assert await phone.bye() == 200


async def test_bodies_without_an_sdp_offer(server: RunningServer, sip_port: int) -> None:
    """Only optional parts (RFC 5621 handling=optional): no offer, so Pono makes one. A part that must be
    understood, or a body of another type, gets 415 with Accept (RFC 3261 §8.2.3)."""
    optional = SipCaller(("127.0.0.1", sip_port), delayed_offer=True, wrap_offer=lambda sdp: _multipart(
        ("Content-Type: application/isup;version=itu-t92+\r\nContent-Disposition: signal;handling=optional", ISUP)))
    assert await optional.call() == 200
    try:
        assert optional.offer_received and "m=audio" in optional.offer_received
        await _wait(lambda: len(optional.received) > 5, 10)
    finally:
        assert await optional.bye() == 200
    for wrap in (lambda sdp: _multipart(("Content-Type: application/isup\r\nContent-Disposition: signal;"
                                         "handling=required", ISUP)),
                 lambda sdp: ("text/plain", b"hello")):
        refused = SipCaller(("127.0.0.1", sip_port), wrap_offer=wrap)
        try:
            assert await refused.call() == 415
            assert refused.answer is not None and "application/sdp" in (refused.answer.get("accept") or "")
            assert not _calls_of(server, refused)
        finally:
            await refused.close()
