"""Phone calls over SIP with real Debian peers (sipp, baresip, linphonec), all on loopback."""

from __future__ import annotations

import asyncio
import math
import re
import secrets
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from conftest import RunningServer
from helpers import settings_for_new_calls
from phone_peers import heard_the_question, latest_call, sipp, stored_call, ulaw_wav
from pydantic import SecretStr

from pono.agent.embedded import free_port
from pono.context import SERVICES
from pono.signaling.phone import g711
from pono.signaling.phone.dialog import Dialog
from pono.signaling.phone.rtp import RtpPacket
from pono.signaling.phone.server import SipServer
from pono.testing.scripted_llm import Script
from pono.testing.sip_caller import SipCaller


@pytest.fixture(scope="module")
def sip_port(server: RunningServer) -> int:
    sip = server.app[SERVICES].sip
    assert sip is not None and sip.port
    return sip.port


async def test_sipp_call_speech_persona_by_number_and_bye(server: RunningServer, sip_port: int, admin_token: str,
                                                         script: Script, phone_question: np.ndarray,
                                                         tmp_path: Path) -> None:
    script.reply = "Certainly, your table for two is booked."
    persona, number = await _persona_on_number(server, admin_token, number="+1 (555) 010-2000")
    assert number == "+15550102000"  # stored as dialed digits, however it was written
    started = time.time() - 1
    audio = ulaw_wav(np.concatenate([np.zeros(8000, np.int16), phone_question]), tmp_path, "question")
    code, output = await sipp("call.xml", sip_port, service=number,
                              keys={"audio": str(audio), "pause": "9000"})
    assert code == 0, output
    call = await latest_call(server, admin_token, started, "sip")
    assert call["persona"] == persona and call["caller"] == "+15550001111"
    assert call["end_reason"] == "caller_hangup"
    assert heard_the_question(call), call["turns"]
    assert any(t["role"] == "agent" and t["text"] == script.reply for t in call["turns"])


async def test_sipp_cancel_options_unsupported_and_busy(server: RunningServer, sip_port: int) -> None:
    code, output = await sipp("cancel.xml", sip_port)
    assert code == 0, output
    for transport in ("u1", "t1"):  # UDP, and TCP
        code, output = await sipp("options.xml", sip_port, extra=["-t", transport])
        assert code == 0, output
    code, output = await sipp("unsupported.xml", sip_port)
    assert code == 0, output
    with settings_for_new_calls(server, sip_max_calls=0):
        code, output = await sipp("busy.xml", sip_port)
        assert code == 0, output
    assert not server.app[SERVICES].sip.dialogs, "nothing is left behind"


async def test_sipp_dtmf_reaches_the_agent(server: RunningServer, sip_port: int, admin_token: str,
                                           script: Script) -> None:
    script.reply = "You chose option four."
    started = time.time() - 1
    code, output = await sipp("dtmf.xml", sip_port)
    assert code == 0, output
    call = await latest_call(server, admin_token, started, "sip")
    assert [t["text"] for t in call["turns"] if t["role"] == "user"] == ["the caller pressed 4"]
    assert script.requests and "the caller pressed 4" in str(script.requests[-1]["messages"])


def _udp_exchange(port: int, data: bytes, wait: float = 1.0, source: str = "127.0.0.1") -> bytes | None:
    """Send one datagram to Pono's SIP port from `source` and return the first answer (None: none came)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((source, 0))
        sock.settimeout(wait)
        sock.sendto(data, ("127.0.0.1", port))
        try:
            return sock.recv(65536)
        except TimeoutError:
            return None


async def test_malformed_sip_never_hurts(server: RunningServer, sip_port: int) -> None:
    """Garbage gets 400 or is dropped; the server keeps answering, and a call in progress keeps its audio."""
    phone = SipCaller(("127.0.0.1", sip_port))
    assert await phone.call() == 200
    headers = ("Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK-bad{n}\r\nFrom: <sip:x@127.0.0.1>;tag=1\r\n"
               "To: <sip:agent@127.0.0.1>\r\nCall-ID: bad-{n}\r\nCSeq: 1 OPTIONS\r\n")
    truncated = f"OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\n{headers.format(n=1)}Max-For".encode()
    bad_length = f"OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\n{headers.format(n=2)}Content-Length: 500\r\n\r\nhi".encode()
    no_cseq = b"INVITE sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/UDP 127.0.0.1;branch=z9hG4bKx\r\n\r\n"
    loop = asyncio.get_running_loop()
    # Garbage, a request we cannot even answer (no CSeq), and a stray response: dropped.
    for garbage in (b"\x00\xff\x13garbage" * 50, no_cseq, b"SIP/2.0 200 OK\r\n\r\n"):
        assert await loop.run_in_executor(None, _udp_exchange, sip_port, garbage, 0.5) is None
    # Answerable but broken: 400 with the reason.
    for broken, reason in ((truncated, b"truncated"), (bad_length, b"Content-Length")):
        answer = await loop.run_in_executor(None, _udp_exchange, sip_port, broken)
        assert answer is not None and answer.startswith(b"SIP/2.0 400 ") and reason in answer.split(b"\r\n")[0]
    good = f"OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\n{headers.format(n=3)}Content-Length: 0\r\n\r\n".encode()
    answer = await loop.run_in_executor(None, _udp_exchange, sip_port, good)
    assert answer is not None and answer.startswith(b"SIP/2.0 200 OK")
    heard = len(phone.received)
    await asyncio.sleep(0.5)
    assert len(phone.received) - heard >= 15, "the call in progress lost its audio"
    assert await phone.bye() == 200


async def _persona_on_number(server: RunningServer, token: str, tools: list[str] | None = None,
                             number: str | None = None) -> tuple[str, str]:
    """A persona with these tools answering `number` (a fresh one by default); (its name, the number stored)."""
    number = number or f"+1555{uuid.uuid4().int % 10**7:07d}"
    name = f"phone-{uuid.uuid4().hex[:6]}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:
        async with http.post(f"{server.url}/api/personas",
                             json={"name": name, "system_prompt": "You answer the phone.", "tools": tools or []}) as r:
            assert r.status == 201
        async with http.put(f"{server.url}/api/phone-numbers/{number}", json={"persona": name}) as r:
            assert r.status == 200
            return name, (await r.json())["number"]


def _dialog(server: RunningServer, phone: SipCaller, sip: SipServer | None = None) -> Dialog:
    """The server's dialog for this phone's call (found by its SIP Call-ID)."""
    dialogs = (sip or server.app[SERVICES].sip).dialogs.values()
    return next(d for d in dialogs if d.sip_call_id == phone.call_id)


async def _wait(condition: Callable[[], bool], timeout: float = 30) -> None:
    for _ in range(int(timeout * 10)):
        if condition():
            return
        await asyncio.sleep(0.1)
    raise AssertionError("timed out")


async def test_hold_stops_our_audio_and_resume_brings_it_back(server: RunningServer, sip_port: int,
                                                              admin_token: str) -> None:
    phone = SipCaller(("127.0.0.1", sip_port), caller="+15550007777")
    assert await phone.call() == 200
    try:
        await _wait(lambda: len(phone.received) > 10, 5)  # comfort silence flows from the start
        # Live like any call: in the registry (what the console shows) and in the metrics, under Pono's own
        # call id; the SIP Call-ID stays on the dialog.
        call_id = _dialog(server, phone).call_id
        assert call_id != phone.call_id and re.fullmatch(r"[0-9a-f]{32}", call_id)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
            async with http.get(f"{server.url}/api/calls", params={"state": "live"}) as r:
                live = [c for c in (await r.json())["calls"] if c["call_id"] == call_id]
            async with http.get(f"{server.url}/metrics") as r:
                metrics = await r.text()
            async with http.ws_connect(f"{server.url.replace('http', 'ws')}/api/console/ws") as console:
                await console.send_json({"type": "auth", "token": admin_token})
                while (message := await console.receive_json(timeout=10))["type"] != "calls":
                    pass
        on_console = [c for c in message["calls"] if c["call_id"] == call_id]
        assert on_console and on_console[0]["transport"] == "sip", message
        assert live and live[0]["transport"] == "sip" and live[0]["caller"] == "+15550007777", live
        assert 'pono_active_calls{transport="sip"} 1.0' in metrics
        held = await phone.hold(True)
        assert held.status == 200 and b"a=recvonly" in held.body
        await asyncio.sleep(0.3)
        count = len(phone.received)
        await asyncio.sleep(1.0)
        assert len(phone.received) - count <= 1, "Pono kept sending to a caller on hold"
        resumed = await phone.hold(False)
        assert resumed.status == 200 and b"a=sendrecv" in resumed.body
        count = len(phone.received)
        await asyncio.sleep(1.0)
        assert len(phone.received) - count >= 30
    finally:
        assert await phone.bye() == 200


async def test_transfer_refers_to_the_operator_then_leaves(server: RunningServer, sip_port: int, admin_token: str,
                                                           script: Script, phone_question: np.ndarray) -> None:
    _, number = await _persona_on_number(server, admin_token, ["transfer_to_operator"])
    script.responses = [{"tool_calls": [{"name": "transfer_to_operator", "arguments": {"reason": "billing"}}]},
                        {"text": "I am getting a colleague for you."}]
    phone = SipCaller(("127.0.0.1", sip_port), callee=number)
    started = time.time() - 1
    try:
        with settings_for_new_calls(server, sip_operator_uri="sip:desk@operators.example.com"):
            assert await phone.call() == 200
            phone.say(phone_question, 16000)
            await _wait(lambda: any(r.method == "REFER" for r in phone.requests))
            refer = next(r for r in phone.requests if r.method == "REFER")
            assert refer.get("refer-to") == "<sip:desk@operators.example.com>"
            assert await phone.notify("SIP/2.0 200 OK") == 200  # the operator picked up
            await asyncio.wait_for(phone.hung_up.wait(), 10)  # and Pono leaves the call with a BYE
    finally:
        await phone.close()
    call = await latest_call(server, admin_token, started, "sip")
    assert call["end_reason"] == "transferred"


async def test_end_call_sends_bye(server: RunningServer, sip_port: int, admin_token: str, script: Script,
                                  phone_question: np.ndarray) -> None:
    _, number = await _persona_on_number(server, admin_token, ["end_call"])
    script.responses = [{"tool_calls": [{"name": "end_call", "arguments": {"reason": "done"}}]},
                        {"text": "Goodbye!"}]
    phone = SipCaller(("127.0.0.1", sip_port), callee=number)
    try:
        assert await phone.call() == 200
        phone.say(phone_question, 16000)
        await asyncio.wait_for(phone.hung_up.wait(), 40)
        assert phone.first_sound_after(0) is not None, "the goodbye was not heard before the BYE"
    finally:
        await phone.close()
    await _wait(lambda: not server.app[SERVICES].sip.dialogs, 5)  # our BYE was answered: the media is freed


async def _guarded_sip_server(server: RunningServer, secret: bytes | None = None, **settings: object) -> SipServer:
    """A second SIP listener on the same call manager, with its own trunk settings (`secret`: the key the
    replicas share for digest nonces)."""
    services = server.app[SERVICES]
    sip = SipServer(services.settings.model_copy(update={"sip_port": free_port(), **settings}), services.calls,
                    services.calls.persona_for_number, secret=secret)
    await sip.start()
    return sip


async def test_digest_authentication_of_the_trunk(server: RunningServer) -> None:
    sip = await _guarded_sip_server(server, sip_auth_user="trunk", sip_auth_password=SecretStr("s3cret-trunk"))
    try:
        # sipp signs "sip:<remote ip>:<port>" unless told the Request-URI; Pono checks the digest's uri is it.
        uri = ["-auth_uri", f"agent@127.0.0.1:{sip.port}"]
        code, output = await sipp("auth.xml", sip.port, extra=["-au", "trunk", "-ap", "s3cret-trunk", *uri])
        assert code == 0, output
        code, output = await sipp("auth.xml", sip.port, extra=["-au", "trunk", "-ap", "wrong", *uri], timeout=8)
        assert code != 0 and "401" in output, output
        phone = SipCaller(("127.0.0.1", sip.port))
        assert await phone.call() == 401  # no credentials at all
        await phone.close()
    finally:
        await sip.close()


async def test_source_allow_list(server: RunningServer) -> None:
    refusing = await _guarded_sip_server(server, sip_allowed_sources=["10.0.0.0/8"])
    allowing = await _guarded_sip_server(server, sip_allowed_sources=["10.0.0.0/8", "127.0.0.0/8"])
    try:
        phone = SipCaller(("127.0.0.1", refusing.port))
        assert await phone.call() == 403
        await phone.close()
        phone = SipCaller(("127.0.0.1", allowing.port))
        assert await phone.call() == 200
        assert await phone.bye() == 200
    finally:
        await refusing.close()
        await allowing.close()


async def test_a_phone_that_vanishes_is_hung_up_through_the_proxy(server: RunningServer, admin_token: str) -> None:
    sip = await _guarded_sip_server(server, sip_media_timeout_s=1.5)
    # As if the INVITE came through a proxy that stays in the path (RFC 3261 §16.6): its Via and Record-Route.
    proxy = [("via", "SIP/2.0/UDP proxy.example.com;branch=z9hG4bKproxy1"),
             ("record-route", "<sip:proxy.example.com;lr>")]
    phone = SipCaller(("127.0.0.1", sip.port), invite_headers=proxy)
    started = time.time() - 1
    try:
        assert await phone.call() == 200
        assert phone.answer is not None and phone.answer.all("record-route") == ["<sip:proxy.example.com;lr>"]
        assert phone.answer.all("via")[0] == proxy[0][1] and len(phone.answer.all("via")) == 2
        await asyncio.sleep(0.5)
        phone.muted = True  # no BYE, no RTP: the network went away
        await asyncio.wait_for(phone.hung_up.wait(), 10)
    finally:
        await phone.close()
        await sip.close()
    bye = next(r for r in phone.requests if r.method == "BYE")
    assert bye.all("route") == ["<sip:proxy.example.com;lr>"]  # our BYE follows the route set
    call = await latest_call(server, admin_token, started, "sip")
    assert call["end_reason"] == "media_timeout"


async def test_rtp_from_a_stranger_is_ignored(server: RunningServer, sip_port: int) -> None:
    phone = SipCaller(("127.0.0.1", sip_port))
    assert await phone.call() == 200
    try:
        await _wait(lambda: len(phone.received) > 5, 5)
        rtp = _dialog(server, phone).rtp
        assert rtp is not None
        phone.muted = True  # from here on, whatever reaches the media socket comes from the stranger
        await asyncio.sleep(0.2)
        heard = rtp.stats.received
        loud = g711.encode((np.sin(np.arange(160) / 3) * 20000).astype(np.int16), "PCMU")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger:  # another port: not the caller
            stranger.setblocking(False)
            for seq in range(50):
                stranger.sendto(RtpPacket(0, seq, seq * 160, 99, loud).to_bytes(), ("127.0.0.1", rtp.local_port))
                await asyncio.sleep(0.005)
            await asyncio.sleep(0.3)
            with pytest.raises(BlockingIOError):
                stranger.recv(2048)  # and nothing is sent to it
        assert rtp.stats.ignored_sources >= 50
        assert rtp.stats.received == heard, "a stranger's packets were taken as the caller's"
    finally:
        await phone.bye()


async def test_the_answer_is_retransmitted_until_acked(server: RunningServer, sip_port: int) -> None:
    """RFC 3261 timer G: over UDP the 200 OK repeats at T1, 2·T1, 4·T1… until the ACK comes."""
    phone = SipCaller(("127.0.0.1", sip_port))
    assert await phone.call(ack=False) == 200
    try:
        await asyncio.sleep(2.0)  # sent at 0, 0.5 and 1.5 s; next at 3.5 and 7.5 s
        answers = lambda: [r for r in phone.responses if r.status == 200 and r.cseq == (1, "INVITE")]  # noqa: E731
        count = len(answers())
        assert count >= 3, count
        phone.ack()
        await asyncio.sleep(6.0)
        assert len(answers()) == count, "the 200 OK kept coming after the ACK"
    finally:
        assert await phone.bye() == 200


async def test_symmetric_rtp_follows_where_the_caller_really_sends_from(server: RunningServer,
                                                                         sip_port: int) -> None:
    """Behind NAT the SDP names a port the phone does not use: Pono answers to where the media comes from."""
    phone = SipCaller(("127.0.0.1", sip_port), advertised_rtp_port=9)  # the discard port: nothing there
    assert await phone.call() == 200
    try:
        await _wait(lambda: len(phone.received) > 10, 5)
    finally:
        assert await phone.bye() == 200


async def test_rtp_stays_in_its_configured_port_range(server: RunningServer) -> None:
    low = free_port() & ~1
    sip = await _guarded_sip_server(server, sip_rtp_ports=f"{low}-{low + 3}")  # two even ports: two calls
    phones = [SipCaller(("127.0.0.1", sip.port)) for _ in range(3)]
    try:
        assert [await p.call() for p in phones[:2]] == [200, 200]
        ports = {int(re.search(rb"m=audio (\d+)", p.answer.body).group(1)) for p in phones[:2]}  # type: ignore[union-attr]
        assert ports == {low, low + 2}
        assert await phones[2].call() == 503  # no media port left: refused cleanly, not half-answered
        await phones[2].close()
    finally:
        for phone in phones[:2]:
            await phone.bye()
        await sip.close()
    with pytest.raises(ValueError, match="PONO_SIP_RTP_PORTS"):
        SipServer(server.app[SERVICES].settings.model_copy(update={"sip_rtp_ports": "5000"}), None, None)  # type: ignore[arg-type]


# -- hardening: dialogs, SDP, RTP, digest, TCP, call ids ------------------------------------------------------

async def test_in_dialog_requests_need_the_dialog_and_its_peer(server: RunningServer, sip_port: int) -> None:
    """A re-INVITE is matched on Call-ID and both tags (RFC 3261 §12.2.2), and taken only from the dialog's
    peer: a stranger who learnt the Call-ID, even the tags, cannot move the call's audio to itself."""
    phone = SipCaller(("127.0.0.1", sip_port))
    assert await phone.call() == 200
    loop = asyncio.get_running_loop()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as stranger_rtp:
        stranger_rtp.bind(("127.0.0.2", 0))  # another host (all of 127/8 is loopback)
        stranger_rtp.setblocking(False)
        try:
            await _wait(lambda: len(phone.received) > 5, 5)
            offer = phone.offer(address="127.0.0.2", port=stranger_rtp.getsockname()[1])
            forged = phone.request("INVITE", offer)  # the right Call-ID and tags, from elsewhere
            answer = await loop.run_in_executor(None, _udp_exchange, sip_port, forged.to_bytes(), 2.0, "127.0.0.2")
            assert answer is not None and answer.startswith(b"SIP/2.0 403 "), answer
            guessed = phone.request("INVITE", offer)  # only the Call-ID known: a made-up To tag
            guessed.set("to", re.sub(r"tag=[^;>\s]+", "tag=guessed", guessed.get("to") or ""))
            answer = await loop.run_in_executor(None, _udp_exchange, sip_port, guessed.to_bytes(), 2.0)
            assert answer is not None and answer.startswith(b"SIP/2.0 481 "), answer
            heard = len(phone.received)
            await _wait(lambda: len(phone.received) >= heard + 25, 10)  # the caller still has the audio
            with pytest.raises(BlockingIOError):
                stranger_rtp.recv(2048)  # and the stranger got none of it
        finally:
            assert await phone.bye() == 200


async def test_a_reinvite_is_challenged_when_the_trunk_authenticates(server: RunningServer) -> None:
    sip = await _guarded_sip_server(server, sip_auth_user="trunk", sip_auth_password=SecretStr("s3cret-trunk"))
    phone = SipCaller(("127.0.0.1", sip.port), auth=("trunk", "s3cret-trunk"))
    try:
        assert await phone.call() == 200
        held = await phone.hold(True)
        assert held.status == 200 and b"a=recvonly" in held.body
        assert any(r.status == 401 and r.cseq == (3, "INVITE") for r in phone.responses), "not challenged"
        phone.auth = None  # without credentials the re-INVITE changes nothing
        assert (await phone.hold(False)).status == 401
        assert _dialog(server, phone, sip).rtp.sending is False  # type: ignore[union-attr]
    finally:
        assert await phone.bye() == 200
        await sip.close()


@pytest.mark.parametrize(("address", "why"), [
    ("pbx.example.com", "not an IP address"),  # would be resolved on the event loop, every 20 ms
    ("169.254.169.254", "link-local"),  # the cloud metadata service
    ("224.0.0.7", "multicast"),
    ("10.20.30.40", "not public"),
])
async def test_unusable_media_addresses_are_refused(server: RunningServer, sip_port: int, address: str,
                                                    why: str) -> None:
    phone = SipCaller(("127.0.0.1", sip_port), advertised_rtp_address=address)
    assert await phone.call() == 488
    assert phone.answer is not None and why in (phone.answer.get("warning") or "")
    await phone.close()


async def test_loopback_media_needs_a_loopback_listener_or_the_setting(server: RunningServer) -> None:
    everywhere = await _guarded_sip_server(server, sip_host="0.0.0.0")
    allowing = await _guarded_sip_server(server, sip_host="0.0.0.0", sip_media_networks=["127.0.0.0/8"])
    try:
        phone = SipCaller(("127.0.0.1", everywhere.port))  # offers 127.0.0.1
        assert await phone.call() == 488
        assert phone.answer is not None and "loopback" in (phone.answer.get("warning") or "")
        await phone.close()
        phone = SipCaller(("127.0.0.1", allowing.port))
        assert await phone.call() == 200
        await _wait(lambda: len(phone.received) > 5, 10)
        assert await phone.bye() == 200
    finally:
        await everywhere.close()
        await allowing.close()


async def test_0000_is_hold_never_a_destination(server: RunningServer, sip_port: int) -> None:
    """c=0.0.0.0 is RFC 2543's hold: nothing is sent (Linux would deliver packets sent to 0.0.0.0 locally)."""
    phone = SipCaller(("127.0.0.1", sip_port), advertised_rtp_address="0.0.0.0")
    assert await phone.call() == 200
    try:
        assert phone.answer is not None and b"a=recvonly" in phone.answer.body
        await _wait(lambda: phone.sent >= 50, 10)  # a second of our own media clock
        assert phone.received == [], "Pono sent media to 0.0.0.0"
        resumed = await phone.reinvite(phone.offer(address="127.0.0.1"))
        assert resumed.status == 200 and b"a=sendrecv" in resumed.body
        await _wait(lambda: len(phone.received) > 10, 10)
    finally:
        assert await phone.bye() == 200


async def test_every_offered_stream_is_answered(server: RunningServer, sip_port: int) -> None:
    """RFC 3264 §6: an audio+video offer gets an answer with both m= lines, the video refused with port 0."""
    phone = SipCaller(("127.0.0.1", sip_port), extra_media="m=video 9000 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\n")
    assert await phone.call() == 200
    try:
        assert phone.answer is not None
        media = re.findall(rb"^m=[^\r\n]*", phone.answer.body, re.MULTILINE)
        assert len(media) == 2 and media[0].startswith(b"m=audio ") and media[1] == b"m=video 0 RTP/AVP 96"
        await _wait(lambda: len(phone.received) > 5, 10)
    finally:
        assert await phone.bye() == 200


async def test_ipv6_offers_get_ipv6_answers_or_a_clear_refusal(server: RunningServer, sip_port: int) -> None:
    phone = SipCaller(("127.0.0.1", sip_port), advertised_rtp_address="::1")  # Pono's media address is IPv4
    assert await phone.call() == 488
    assert phone.answer is not None and "IPv6" in (phone.answer.get("warning") or "")
    await phone.close()
    sip6 = await _guarded_sip_server(server, sip_host="::1")
    phone = SipCaller(("::1", sip6.port), local_host="::1")
    try:
        assert await phone.call() == 200
        assert phone.answer is not None and b"c=IN IP6 ::1\r\n" in phone.answer.body
        assert b"IN IP4" not in phone.answer.body
        await _wait(lambda: len(phone.received) > 10, 10)  # and the media flows over IPv6
        assert await phone.bye() == 200
    finally:
        await sip6.close()


async def test_the_caller_is_heard_after_its_stream_restarts(server: RunningServer, sip_port: int, script: Script,
                                                            admin_token: str, phone_question: np.ndarray) -> None:
    """A B2BUA re-INVITE or a transfer restarts the caller's RTP: a new SSRC, the sequence far behind."""
    script.reply = "Certainly, your table for two is booked."
    phone = SipCaller(("127.0.0.1", sip_port))
    started = time.time() - 1
    assert await phone.call() == 200
    try:
        await _wait(lambda: len(phone.received) > 10, 5)
        phone.restart_stream(sequence_jump=-20000 % 65536)
        phone.say(phone_question, 16000)
        await asyncio.wait_for(phone.speech_sent.wait(), 30)
        await _wait(lambda: phone.first_sound_after(phone.speech_ended_at or math.inf) is not None, 40)
    finally:
        await phone.bye()
    call = await latest_call(server, admin_token, started, "sip")
    assert heard_the_question(call), call["turns"]


async def test_digest_credentials_cannot_be_replayed_or_moved(server: RunningServer) -> None:
    credentials = {"sip_auth_user": "trunk", "sip_auth_password": SecretStr("s3cret-trunk")}
    sip = await _guarded_sip_server(server, secret=b"the replicas' shared secret", **credentials)
    replica = await _guarded_sip_server(server, secret=b"the replicas' shared secret", **credentials)
    phones: list[SipCaller] = []
    try:
        first = SipCaller(("127.0.0.1", sip.port), auth=("trunk", "s3cret-trunk"))
        phones.append(first)
        assert await first.call() == 200 and first.authorization is not None
        # Its Authorization, replayed on a new call: the nonce count has not moved on.
        replay = SipCaller(("127.0.0.1", sip.port), invite_headers=[("authorization", first.authorization)])
        phones.append(replay)
        assert await replay.call() == 401
        # Credentials signed for another Request-URI (another dialed number, another persona).
        moved = SipCaller(("127.0.0.1", sip.port), callee="+15550009999", auth=("trunk", "s3cret-trunk"),
                          auth_uri=f"sip:agent@127.0.0.1:{sip.port}")
        phones.append(moved)
        assert await moved.call() == 401
        # A nonce one replica issued is good on another: they share the key.
        challenge = next(r.get("www-authenticate") for r in first.responses if r.status == 401)
        other = SipCaller(("127.0.0.1", replica.port), auth=("trunk", "s3cret-trunk"),
                          preemptive_challenge=challenge)
        phones.append(other)
        assert await other.call() == 200
        assert not any(r.status == 401 for r in other.responses), "the other replica refused the nonce"
        assert await other.bye() == 200 and await first.bye() == 200
    finally:
        for phone in phones:
            await phone.close()
        await sip.close()
        await replica.close()


def _options(n: int) -> bytes:
    return (f"OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\nVia: SIP/2.0/TCP 127.0.0.1:5999;branch=z9hG4bK-tcp{n}\r\n"
            f"From: <sip:x@127.0.0.1>;tag=1\r\nTo: <sip:agent@127.0.0.1>\r\nCall-ID: tcp-{n}\r\n"
            "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n").encode()


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)


async def test_sip_over_tcp_is_bounded(server: RunningServer) -> None:
    """Over TCP: a body cap, a header cap, a connection cap and an idle timeout."""
    sip = await _guarded_sip_server(server, sip_tcp=True, sip_tcp_max_connections=2)
    idle = await _guarded_sip_server(server, sip_tcp=True, sip_tcp_idle_timeout_s=0.5)
    open_ = lambda port: asyncio.open_connection("127.0.0.1", port)  # noqa: E731
    try:
        reader, writer = await open_(sip.port)  # a Content-Length far past the cap: 413, and the line closes
        writer.write(_options(1).replace(b"Content-Length: 0", b"Content-Length: 10000000"))
        assert (await asyncio.wait_for(reader.read(), 10)).startswith(b"SIP/2.0 413 ")
        reader, writer = await open_(sip.port)  # a header section that never ends: closed at the cap
        writer.write(b"OPTIONS sip:agent@127.0.0.1 SIP/2.0\r\nX-Padding: " + b"a" * 20_000)
        assert await asyncio.wait_for(reader.read(), 10) == b""
        both = [await open_(sip.port) for _ in range(2)]  # two connections at most
        for n, (reader, writer) in enumerate(both):
            assert (await _ask(reader, writer, _options(10 + n))).startswith(b"SIP/2.0 200 ")
        third, _ = await open_(sip.port)
        assert await asyncio.wait_for(third.read(), 10) == b""  # closed at once
        assert (await _ask(*both[0], _options(12))).startswith(b"SIP/2.0 200 ")  # the others still work
        for _, writer in both:
            writer.close()
        reader, writer = await open_(idle.port)  # a connection that says nothing more is closed
        assert (await _ask(reader, writer, _options(20))).startswith(b"SIP/2.0 200 ")
        assert await asyncio.wait_for(reader.read(), 10) == b""
    finally:
        await sip.close()
        await idle.close()


async def test_pono_mints_its_own_call_ids(server: RunningServer, sip_port: int, admin_token: str,
                                           script: Script) -> None:
    """A reused SIP Call-ID makes two calls with their own turns; an oversized one is refused, not stored."""
    script.reply = "Noted."
    reused = secrets.token_hex(8)
    caller = f"+1555{secrets.randbelow(10**7):07d}"  # to find this test's calls
    started = time.time() - 1
    for digit in "45":
        phone = SipCaller(("127.0.0.1", sip_port), call_id=reused, caller=caller)
        assert await phone.call() == 200
        assert await phone.info(digit) == 200
        await _wait(lambda: phone.first_sound_after(0) is not None, 30)  # noqa: B023 - the reply
        assert await phone.bye() == 200
    async with aiohttp.ClientSession() as http, http.get(
            f"{server.url}/api/calls", params={"since": str(started), "limit": "10"},
            headers={"Authorization": f"Bearer {admin_token}"}) as r:
        ids = [c["id"] for c in (await r.json())["calls"] if c["caller"] == caller]
    assert len(set(ids)) == 2 and reused not in ids, ids
    turns = [[t["text"] for t in (await stored_call(server, admin_token, i))["turns"] if t["role"] == "user"]
             for i in ids]
    assert sorted(turns) == [["the caller pressed 4"], ["the caller pressed 5"]], turns
    loop = asyncio.get_running_loop()
    sdp = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
           "m=audio 4000 RTP/AVP 0\r\n")
    for call_id, expected in (("c" * 300, b"SIP/2.0 400 "), ("c" * 60_000, None)):  # over the cap; too big to echo
        invite = (f"INVITE sip:agent@127.0.0.1:{sip_port} SIP/2.0\r\n"
                  f"Via: SIP/2.0/UDP 127.0.0.1:5999;branch=z9hG4bK{secrets.token_hex(6)}\r\n"
                  f"From: <sip:+15550001234@127.0.0.1>;tag=9\r\nTo: <sip:agent@127.0.0.1>\r\nCall-ID: {call_id}\r\n"
                  f"CSeq: 1 INVITE\r\nContent-Type: application/sdp\r\nContent-Length: {len(sdp)}\r\n\r\n{sdp}")
        answer = await loop.run_in_executor(None, _udp_exchange, sip_port, invite.encode(), 3.0)
        assert (answer or b"")[:12] == (expected or b"")[:12], (len(call_id), (answer or b"")[:40])
    assert not any(d.sip_call_id.startswith("ccc") for d in server.app[SERVICES].sip.dialogs.values())


async def test_a_draining_replica_answers_new_invites_503_and_frees_every_reserved_place(
        server: RunningServer, sip_port: int) -> None:
    calls = server.app[SERVICES].calls
    calls.start_draining()
    try:
        phone = SipCaller(("127.0.0.1", sip_port))
        assert await phone.call(ack=False) == 503
        await phone.close()
    finally:
        calls.resume()
    # Calls that were refused or never started hold no place: a full count of new calls can still start.
    assert calls._reserved == 0
    phone = SipCaller(("127.0.0.1", sip_port))
    try:
        assert await phone.call() == 200
    finally:
        await phone.bye()
        await phone.close()
    assert calls._reserved == 0
