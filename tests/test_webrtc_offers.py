"""Real-world WebRTC offers and media: crafted offers from an aiortc caller, as other browsers and clients send
them (inactive or one-way audio, rejected and bundle-only m= lines, no a=mid, missing attributes, junk), and a
two-input audio interface with the voice on one channel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np
import pytest
from aiortc.sdp import grouplines
from phone_peers import stored_call
from test_voice_call import words

from pono.context import SERVICES
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

    settings = server.app[SERVICES].settings
    settings.speak_greeting = True  # read when a call starts
    try:
        caller = await open_call(server, edit_offer=lambda sdp: edit_sections(sdp, set_direction))
    finally:
        settings.speak_greeting = False
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
