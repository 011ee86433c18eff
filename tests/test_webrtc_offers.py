"""Real-world WebRTC offers and media: crafted offers from an aiortc caller, as other browsers and clients send
them (inactive or one-way audio, rejected and bundle-only m= lines, no a=mid, missing attributes, junk), and a
two-input audio interface with the voice on one channel."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import aiohttp
import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection
from aiortc.sdp import grouplines
from helpers import settings_for_new_calls
from phone_peers import stored_call
from test_signaling import call_token, settle
from test_voice_call import words

from pono.context import SERVICES
from pono.signaling.api import MAX_CANDIDATES_PER_M_LINE, prepare_offer
from pono.testing.caller import Caller, MicrophoneTrack
from pono.testing.scripted_llm import Script

REPLY = "We are open from noon until midnight, every day of the week."


# -- SDP editing, line by line, the way a test crafts what another client would send --------------------------
def split(sdp: str) -> tuple[list[str], list[list[str]]]:
    """Session lines and one list of lines per m= section, in order."""
    return grouplines(sdp)


def join(session: list[str], media: list[list[str]]) -> str:
    return "\r\n".join([*session, *(line for section in media for line in section)]) + "\r\n"


def edit_sections(sdp: str, edit: Callable[[int, list[str]], list[str] | None],
                  session_edit: Callable[[list[str]], list[str]] = lambda s: s) -> str:
    """Apply `edit(index, lines)` to each m= section (None drops the section) and `session_edit` to the rest."""
    session, media = split(sdp)
    edited = [e for i, section in enumerate(media) if (e := edit(i, list(section))) is not None]
    return join(session_edit(list(session)), edited)


def kind_of(section: list[str]) -> str:
    return section[0][2:].split(" ", 1)[0]


def port_of(section: list[str]) -> int:
    return int(section[0].split(" ")[1])


def mid_of(section: list[str]) -> str | None:
    return next((line[6:] for line in section if line.startswith("a=mid:")), None)


def without(prefixes: tuple[str, ...]) -> Callable[[list[str]], list[str]]:
    return lambda lines: [line for line in lines if not line.startswith(prefixes)]


def bundle_groups(sdp: str) -> list[list[str]]:
    return [line.split()[1:] for line in split(sdp)[0] if line.startswith("a=group:BUNDLE")]


async def open_call(server, **kwargs) -> Caller:
    caller = Caller(server.url, mic=kwargs.pop("mic", None))
    await caller.connect(**kwargs)
    await caller.wait_open()
    return caller


# -- audio that is inactive, one-way or implied -------------------------------------------------------------------
@pytest.mark.parametrize(("direction", "spoken"), [
    ("inactive", False),  # neither way: a text call
    ("sendonly", False),  # the caller talks but will not listen: heard, answered in text
    ("recvonly", True),   # the caller never sends audio but listens: spoken answers
    (None, True),         # no direction attribute means sendrecv (RFC 8866 §6.7)
])
async def test_audio_direction_decides_whether_replies_are_spoken(server, script: Script, admin_token: str,
                                                                   question: np.ndarray, direction: str | None,
                                                                   spoken: bool) -> None:
    script.reply = REPLY
    directions = ("a=sendrecv", "a=sendonly", "a=recvonly", "a=inactive")

    def set_direction(i: int, lines: list[str]) -> list[str]:
        if kind_of(lines) != "audio":
            return lines
        lines = without(directions)(lines)
        return lines if direction is None else [*lines, f"a={direction}"]

    with settings_for_new_calls(server, speak_greeting=True):  # read when a call starts
        caller = await open_call(server, edit_offer=lambda sdp: edit_sections(sdp, set_direction))
    greeting = (await server.app[SERVICES].calls.persona(None)).greeting
    try:
        # The greeting and a reply each finish on their own, whole; nothing has to barge in to end them.
        hello = await caller.wait_for(lambda e: e["type"] == "agent.final", 30)
        assert hello["text"] == greeting and hello["interrupted"] is False
        caller.send_text("When are you open?")
        final = await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] > hello["turn"], 30)
        assert final["text"] == REPLY and final["interrupted"] is False
        if direction == "sendonly":  # the caller's speech still reaches the agent
            caller.speak(question)
            heard = await caller.wait_for(lambda e: e["type"] == "transcript.final" and e.get("source") != "text"
                                          and e.get("text"), 30)
            assert {"book", "table"} <= words(heard["text"])
            await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] > final["turn"], 30)
        await asyncio.sleep(0.5)
        loud = caller.recording().size > 0 and int(np.abs(caller.recording()).max()) > 2000
        assert loud is spoken
    finally:
        await caller.hang_up()
    stored = await stored_call(server, admin_token, caller.call_id)
    agent = [t for t in stored["turns"] if t["role"] == "agent"]
    assert agent and all(not t["interrupted"] for t in agent)
    assert [t["text"] for t in agent][:2] == [greeting, REPLY]


def session_level(prefixes: tuple[str, ...]) -> Callable[[str], str]:
    """Move these attributes from every m= section to the session, once (as Firefox does with a=fingerprint)."""
    def edit(sdp: str) -> str:
        session, media = split(sdp)
        moved = list(dict.fromkeys(line for section in media for line in section if line.startswith(prefixes)))
        return join([*session, *moved], [without(prefixes)(section) for section in media])
    return edit


@pytest.mark.parametrize("shape", ["rtcp-mux-without-a-rtcp", "session-level-transport"])
async def test_offers_other_clients_shape_make_calls_with_audio(server, script: Script, shape: str) -> None:
    """What other stacks write differently from aiortc reaches aiortc intact through the offer's rewrite."""
    script.reply = REPLY
    edit = (lambda sdp: edit_sections(sdp, lambda i, lines: without(("a=rtcp:",))(lines))) \
        if shape == "rtcp-mux-without-a-rtcp" else session_level(("a=fingerprint:", "a=setup:", "a=ice-ufrag:",
                                                                   "a=ice-pwd:"))
    caller = await open_call(server, edit_offer=edit)
    try:
        caller.send_text("When are you open?")
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 30)
        assert final["text"] == REPLY and final["interrupted"] is False
        await asyncio.sleep(0.5)
        assert int(np.abs(caller.recording()).max()) > 2000
    finally:
        await caller.hang_up()


# -- rejected and bundle-only m= lines (RFC 3264 §6, RFC 8843 §6) ---------------------------------------------------
FIREFOX_REJECTED_AUDIO = ["m=audio 0 UDP/TLS/RTP/SAVPF 0", "c=IN IP4 0.0.0.0", "a=inactive", "a=mid:1"]


@pytest.mark.parametrize("shape", ["firefox", "aiortc"])
async def test_rejected_audio_beside_a_data_channel_stays_rejected(server, script: Script, shape: str) -> None:
    """Firefox offers a rejected m= line with port 0 and no ICE attributes; an aiortc-made one that was set to port
    0 and taken out of BUNDLE keeps them and says sendrecv. Either way the answer rejects it too, at the same
    position with the same mid, outside BUNDLE, and the call is a text call whose data channel opens."""
    script.reply = REPLY
    if shape == "firefox":
        rejected = FIREFOX_REJECTED_AUDIO
    else:
        rejected = next(s for s in split(await real_offer())[1] if kind_of(s) == "audio")
        rejected = [re.sub(r"^m=audio \d+", "m=audio 0", rejected[0]),
                    *(re.sub(r"^a=mid:.*", "a=mid:1", line) for line in rejected[1:])]
        assert "a=sendrecv" in rejected and "a=mid:1" in rejected

    def edit_offer(sdp: str) -> str:  # this data-channel caller's offer (mid 0, BUNDLE 0), the audio first
        session, media = split(sdp)
        return join(session, [rejected, *media])

    offered: list[list[str]] = []

    def keep_offer(sdp: str) -> str:
        sdp = edit_offer(sdp)
        offered.extend(split(sdp)[1])
        return sdp

    def check_answer(sdp: str) -> str:
        answered = split(sdp)[1]
        assert [(kind_of(s), mid_of(s)) for s in answered] == [(kind_of(s), mid_of(s)) for s in offered]
        audio = next(s for s in answered if kind_of(s) == "audio")
        assert port_of(audio) == 0 and "a=sendrecv" not in audio
        assert bundle_groups(sdp) == [[mid_of(s) for s in answered if kind_of(s) == "application"]]
        # This caller offered the data channel only: hand it that (a browser takes the whole answer).
        return edit_sections(sdp, lambda i, lines: lines if port_of(lines) else None)

    caller = Caller(server.url)
    try:
        await caller.connect(audio=False, edit_offer=keep_offer, edit_answer=check_answer)
        await caller.wait_open()
        caller.send_text("When are you open?")
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 30)
        assert final["text"] == REPLY and final["interrupted"] is False
    finally:
        await caller.hang_up()


async def test_bundle_only_data_channel_is_bundled_not_rejected(server, script: Script) -> None:
    """With bundlePolicy max-bundle, browsers offer every m= line but the first with port 0 and a=bundle-only,
    and without ICE or DTLS attributes of their own: that is bundled, not rejected (RFC 8843 §6)."""
    script.reply = REPLY
    transport = ("a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:", "a=setup:", "a=candidate:", "a=end-of-candidates")

    def bundle_only(i: int, lines: list[str]) -> list[str]:
        if kind_of(lines) != "application":
            return lines
        lines = without(transport)(lines)
        lines[0] = re.sub(r"^m=application \d+", "m=application 0", lines[0])
        return [*lines, "a=bundle-only"]

    caller = Caller(server.url)
    try:
        answer = await caller.connect(edit_offer=lambda sdp: edit_sections(sdp, bundle_only))
        assert all(port_of(s) for s in split(answer["sdp"])[1])
        assert bundle_groups(answer["sdp"]) == [["0", "1"]]
        await caller.wait_open()
        caller.send_text("When are you open?")
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 30)
        assert final["text"] == REPLY
    finally:
        await caller.hang_up()


# -- offers without a=mid or without BUNDLE ------------------------------------------------------------------------
@pytest.mark.parametrize("strip", ["mids", "bundle"])
async def test_answer_bundles_only_what_the_offer_bundled(server, script: Script, strip: str) -> None:
    """Without a=mid nothing can be bundled, and without a=group:BUNDLE nothing was offered bundled: the answer
    then has no BUNDLE group (an empty one makes browsers refuse the answer; a made-up one makes them bundle
    what the server keeps apart) and no mids the offer did not have (RFC 5888 §9.2, RFC 8843 §7.3)."""
    script.reply = REPLY
    seen: list[str] = []

    def edit_offer(sdp: str) -> str:
        mids = without(("a=mid:",)) if strip == "mids" else (lambda lines: lines)
        return edit_sections(sdp, lambda i, lines: mids(lines), without(("a=group:",)))

    def edit_answer(sdp: str) -> str:  # this aiortc caller did use mids: put them back for it
        seen.append(sdp)
        return edit_sections(sdp, lambda i, lines: [*lines, f"a=mid:{i}"]) if strip == "mids" else sdp

    caller = await open_call(server, edit_offer=edit_offer, edit_answer=edit_answer)
    try:
        assert not [line for line in split(seen[0])[0] if line.startswith("a=group:")]
        assert [kind_of(s) for s in split(seen[0])[1]] == ["audio", "application"]
        assert [mid_of(s) for s in split(seen[0])[1]] == ([None, None] if strip == "mids" else ["0", "1"])
        caller.send_text("When are you open?")
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 30)
        assert final["text"] == REPLY and final["interrupted"] is False
        await asyncio.sleep(0.5)
        assert int(np.abs(caller.recording()).max()) > 2000  # a call with audio, unbundled
    finally:
        await caller.hang_up()


# -- offers missing what the connection needs, and junk: a 400 that names the problem, never a 500 ----------------
def _audio(edit: Callable[[list[str]], list[str]]) -> Callable[[str], str]:
    return lambda sdp: edit_sections(sdp, lambda i, lines: edit(lines) if kind_of(lines) == "audio" else lines)


def _data(edit: Callable[[list[str]], list[str]]) -> Callable[[str], str]:
    return lambda sdp: edit_sections(sdp, lambda i, lines: edit(lines) if kind_of(lines) == "application" else lines)


def _all(edit: Callable[[list[str]], list[str]]) -> Callable[[str], str]:
    return lambda sdp: edit_sections(sdp, lambda i, lines: edit(lines), edit)


def _replace(pattern: str, repl: str) -> Callable[[list[str]], list[str]]:
    return lambda lines: [re.sub(pattern, repl, line) for line in lines]


BAD_OFFERS: dict[str, tuple[Callable[[str], str], str]] = {
    "no-fingerprint": (_all(without(("a=fingerprint:",))), "a=fingerprint"),
    "unknown-fingerprint-hash": (_all(_replace(r"^a=fingerprint:sha-\d+", "a=fingerprint:md5")), "a=fingerprint"),
    "garbled-fingerprint": (_all(_replace(r"^a=fingerprint:(\S+) .*", r"a=fingerprint:\1 not-a-hash")),
                            "a=fingerprint"),
    "no-setup": (_all(without(("a=setup:",))), "a=setup"),
    "hostname-address": (_all(_replace(r"^c=IN IP4 .*", "c=IN IP4 host.example.com")), "IP addresses"),
    "holdconn-setup": (_all(_replace(r"^a=setup:.*", "a=setup:holdconn")), "a=setup"),
    "no-ice-ufrag-on-audio": (_audio(without(("a=ice-ufrag:",))), "a=ice-ufrag"),
    "no-ice-pwd-on-data": (_data(without(("a=ice-pwd:",))), "a=ice-pwd"),
    "no-rtcp-mux": (_audio(without(("a=rtcp-mux",))), "a=rtcp-mux"),
    "no-sctp-port": (_data(without(("a=sctp-port:",))), "a=sctp-port"),
    "duplicate-mid": (_all(_replace(r"^a=mid:1$", "a=mid:0")), "a=mid"),
    "bundle-names-no-mid": (_all(_replace(r"^a=group:BUNDLE .*", "a=group:BUNDLE 0 7")), "BUNDLE"),
    "bad-m-line": (_audio(_replace(r"^m=audio \d+", "m=audio nine")), "m="),
    "not-type-value": (_audio(lambda lines: [*lines, "hello world"]), "line"),
    "bad-candidate": (_audio(_replace(r"^a=candidate:.*", "a=candidate:garbage")), "invalid SDP"),
    "bad-rtpmap": (_audio(_replace(r"^a=rtpmap:(\d+) .*", r"a=rtpmap:\1")), "invalid SDP"),
    "fmtp-without-rtpmap": (_audio(lambda lines: [*lines, "a=fmtp:99 apt=96"]), "invalid SDP"),
    "bad-address": (_audio(_replace(r"^c=IN IP4 .*", "c=IN IP4")), "invalid SDP"),
    "audio-with-no-codec-alone": (
        lambda sdp: edit_sections(sdp, lambda i, lines: None if kind_of(lines) == "application" else [
            re.sub(r"^(m=audio \d+ \S+) .*", r"\1 98", lines[0]),
            *(x for x in lines[1:] if not x.startswith(("a=rtpmap:", "a=fmtp:", "a=rtcp-fb:")))],
            _replace(r"^a=group:BUNDLE .*", "a=group:BUNDLE 0")),
        "neither an audio nor a data channel"),
    "m-port-out-of-range": (_audio(_replace(r"^m=audio \d+", "m=audio 99999999999")), "port 99999999999"),
    "short-ice-pwd": (_all(_replace(r"^a=ice-pwd:.*", "a=ice-pwd:b")), "a=ice-pwd:b"),
    "short-ice-ufrag": (_all(_replace(r"^a=ice-ufrag:.*", "a=ice-ufrag:ab")), "a=ice-ufrag:ab"),
    "candidate-port-out-of-range": (_audio(lambda lines: [*lines, "a=candidate:1 1 UDP 1 10.0.0.1 99999 typ host"]),
                                    "a=candidate:1 1 UDP 1 10.0.0.1 99999 typ host"),
    "candidate-rport-out-of-range": (
        _audio(lambda lines: [*lines, "a=candidate:1 1 UDP 1 10.0.0.1 9 typ srflx raddr 0.0.0.0 rport 70000"]),
        "rport 70000"),
    "candidate-hostname": (_audio(lambda lines: [*lines, "a=candidate:1 1 UDP 1 victim.example.com 9 typ host"]),
                           "victim.example.com"),
    "candidate-component-zero": (_audio(lambda lines: [*lines, "a=candidate:1 0 UDP 1 10.0.0.1 9 typ host"]),
                                 "component"),
    "candidate-priority-too-big": (_audio(lambda lines: [*lines, "a=candidate:1 1 UDP 4294967296 10.0.0.1 9 typ host"]),
                                   "priority"),
    "a-thousand-candidates": (
        _audio(lambda lines: [*lines, *(f"a=candidate:{n} 1 UDP 1 10.{n // 256}.{n % 256}.1 9 typ host"
                                        for n in range(1000))]),
        "a=candidate lines; Pono takes at most 32"),
    "inactive-audio-alone": (
        lambda sdp: edit_sections(sdp, lambda i, lines: None if kind_of(lines) == "application"
                                  else _replace("^a=sendrecv$", "a=inactive")(lines),
                                  _replace(r"^a=group:BUNDLE .*", "a=group:BUNDLE 0")),
        "nothing to talk over"),
}


async def real_offer() -> str:
    """What an aiortc caller with a microphone and a data channel offers (audio mid 0, data mid 1)."""
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    try:
        pc.addTransceiver("audio", "sendrecv")
        pc.createDataChannel("pono")
        await pc.setLocalDescription(await pc.createOffer())
        return pc.localDescription.sdp
    finally:
        await pc.close()


@pytest.mark.parametrize("case", list(BAD_OFFERS))
async def test_offers_missing_what_the_connection_needs_get_a_clear_400(server, case: str) -> None:
    edit, message = BAD_OFFERS[case]
    offer = edit(await real_offer())
    base_pcs, base_tasks = await settle(server)
    async with aiohttp.ClientSession() as http:
        headers = await call_token(http, server.url)
        async with http.post(f"{server.url}/api/calls", json={"sdp": offer, "type": "offer"}, headers=headers) as r:
            body = await r.json()
            assert r.status == 400, body
            assert message in body["error"] and "invalid SDP offer" in body["error"], body
    pcs, tasks = await settle(server, base_tasks)
    assert pcs == base_pcs == 0
    assert tasks <= base_tasks
    assert not server.app[SERVICES].calls.calls


async def test_offers_with_mdns_candidates_or_32_per_m_line_are_taken() -> None:
    """aioice resolves mDNS .local candidates (draft-ietf-mmusic-mdns-ice-candidates), as browsers send them."""
    many = [f"a=candidate:{n} 1 UDP {n + 1} 10.0.0.{n + 1} 9 typ host" for n in range(MAX_CANDIDATES_PER_M_LINE - 1)]
    mdns = "a=candidate:x 1 udp 2 0a1b2c3d-ab12-cd34.local 5000 typ host"
    edit = _audio(lambda lines: [*without(("a=candidate:",))(lines), *many, mdns])
    prepared = prepare_offer(edit(await real_offer()))
    assert "0a1b2c3d-ab12-cd34.local 5000" in prepared.sdp


# -- stereo input --------------------------------------------------------------------------------------------------
async def test_voice_on_the_right_channel_of_a_stereo_microphone_is_heard(server, script: Script,
                                                                          question: np.ndarray) -> None:
    script.reply = REPLY
    caller = await open_call(server, mic=MicrophoneTrack(stereo_channel=1))
    try:
        await asyncio.sleep(0.3)
        caller.speak(question)
        final = await caller.wait_for(lambda e: e["type"] == "transcript.final" and e.get("text"), 30)
        assert {"book", "table"} <= words(final["text"])
    finally:
        await caller.hang_up()
