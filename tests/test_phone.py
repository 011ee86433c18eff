"""Phone calls over SIP with real Debian peers (sipp, baresip, linphonec), all on loopback."""

from __future__ import annotations

import asyncio
import re
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from conftest import RunningServer
from phone_peers import heard_the_question, latest_call, sipp, ulaw_wav
from pydantic import SecretStr

from pono.agent.embedded import free_port
from pono.context import SERVICES
from pono.signaling.phone import g711
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
    settings = server.app[SERVICES].settings
    limit, settings.sip_max_calls = settings.sip_max_calls, 0
    try:
        code, output = await sipp("busy.xml", sip_port)
        assert code == 0, output
    finally:
        settings.sip_max_calls = limit
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


def _udp_exchange(port: int, data: bytes, wait: float = 1.0) -> bytes | None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
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
        # Live like any call: in the registry (what the console shows) and in the metrics.
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
            async with http.get(f"{server.url}/api/calls", params={"state": "live"}) as r:
                live = [c for c in (await r.json())["calls"] if c["call_id"] == phone.call_id]
            async with http.get(f"{server.url}/metrics") as r:
                metrics = await r.text()
            async with http.ws_connect(f"{server.url.replace('http', 'ws')}/api/console/ws") as console:
                await console.send_json({"type": "auth", "token": admin_token})
                while (message := await console.receive_json(timeout=10))["type"] != "calls":
                    pass
        on_console = [c for c in message["calls"] if c["call_id"] == phone.call_id]
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
    settings = server.app[SERVICES].settings
    settings.sip_operator_uri = "sip:desk@operators.example.com"
    phone = SipCaller(("127.0.0.1", sip_port), callee=number)
    started = time.time() - 1
    try:
        assert await phone.call() == 200
        phone.say(phone_question, 16000)
        await _wait(lambda: any(r.method == "REFER" for r in phone.requests))
        refer = next(r for r in phone.requests if r.method == "REFER")
        assert refer.get("refer-to") == "<sip:desk@operators.example.com>"
        assert await phone.notify("SIP/2.0 200 OK") == 200  # the operator picked up
        await asyncio.wait_for(phone.hung_up.wait(), 10)  # and Pono leaves the call with a BYE
    finally:
        settings.sip_operator_uri = None
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


async def _guarded_sip_server(server: RunningServer, **settings: object) -> SipServer:
    """A second SIP listener on the same call manager, with its own trunk settings."""
    services = server.app[SERVICES]
    sip = SipServer(services.settings.model_copy(update={"sip_port": free_port(), **settings}), services.calls,
                    services.calls.persona_for_number)
    await sip.start()
    return sip


async def test_digest_authentication_of_the_trunk(server: RunningServer) -> None:
    sip = await _guarded_sip_server(server, sip_auth_user="trunk", sip_auth_password=SecretStr("s3cret-trunk"))
    try:
        code, output = await sipp("auth.xml", sip.port, extra=["-au", "trunk", "-ap", "s3cret-trunk"])
        assert code == 0, output
        code, output = await sipp("auth.xml", sip.port, extra=["-au", "trunk", "-ap", "wrong"], timeout=8)
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
        rtp = server.app[SERVICES].sip.dialogs[phone.call_id].rtp
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
