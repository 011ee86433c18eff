"""Personal data that arrives in pieces: keys pressed one at a time, a number said over two turns. DLP reads
the caller's recent turns together, redacts every piece in storage and the operator feed, and keeps the
joined number from the LLM when the persona says so."""

from __future__ import annotations

import json

from feeds import operator_feed
from helpers import stored_findings, stored_turns, text_call
from test_dlp import persona_with_policy

from pono.agent.dlp.engine import DEFAULT_POLICY
from pono.agent.dlp.window import SpeakerWindow
from pono.testing.scripted_llm import Script
from pono.voice.call import BLOCKED_WARNING

CARD = "4111111111111111"


def test_a_number_said_over_two_turns_is_found_in_both() -> None:
    window = SpeakerWindow(DEFAULT_POLICY)
    assert window.add(0, "my card is four one one one one one one one", 0.0) is None
    found = window.add(1, "one one one one one one one one", 1.0)
    assert found is not None and found.texts == {0: "my card is [CREDIT_CARD]", 1: "[CREDIT_CARD]"}
    assert {(turn, f.entity_type) for turn, f in found.findings} == {(0, "CREDIT_CARD"), (1, "CREDIT_CARD")}
    assert window.add(2, "thank you", 2.0) is None  # reported once


def test_turns_far_apart_are_not_joined() -> None:
    window = SpeakerWindow(DEFAULT_POLICY, max_age_s=60)
    window.add(0, "my card is 4111 1111", 0.0)
    assert window.add(1, "1111 1111", 500.0) is None


async def test_a_card_typed_on_the_keypad_is_one_entry_kept_from_the_llm(server, script: Script,
                                                                         admin_token: str) -> None:
    blocking = await persona_with_policy(server, admin_token, {"before_llm": True, "action": "block_and_warn"})
    script.reply = "Noted."
    asked = len(script.requests)
    async with text_call(server.url, blocking) as caller:
        for digit in CARD:
            caller.send_raw(json.dumps({"type": "dtmf", "digit": digit}))
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 20)
        assert final["text"] == BLOCKED_WARNING
        assert len(script.requests) == asked  # the LLM never saw a digit of it
        assert len([e for e in caller.events if e["type"] == "dtmf"]) == 16
    users = [t["text"] for t in await stored_turns(server, admin_token, caller.call_id, 2) if t["role"] == "user"]
    assert users == ["the caller pressed [CREDIT_CARD]"]


async def test_a_card_in_two_messages_is_redacted_in_both_everywhere(server, script: Script,
                                                                     admin_token: str) -> None:
    redacting = await persona_with_policy(server, admin_token, {"before_llm": True})
    script.reply = "Thanks."
    async with text_call(server.url, redacting) as caller:
        async with operator_feed(server, caller.call_id) as feed:
            caller.send_text("my card is 4111 1111")
            first = await caller.wait_for(lambda e: e["type"] == "agent.final", 20)
            caller.send_text("1111 1111")
            await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] > first["turn"], 20)
            redacted = await feed.wait_for(lambda e: e["type"] == "dlp.redacted", 10)
        assert list(redacted["turns"].values()) == ["my card is [CREDIT_CARD]"]
        assert "1111" not in json.dumps(redacted)
        # The LLM's copy of the first piece was redacted before it was asked again.
        asked = " ".join(m["content"] or "" for m in script.requests[-1]["messages"] if m["role"] == "user")
        assert "4111" not in asked and "1111" not in asked
    users = [t["text"] for t in await stored_turns(server, admin_token, caller.call_id, 4) if t["role"] == "user"]
    assert users == ["my card is [CREDIT_CARD]", "[CREDIT_CARD]"]
    findings = await stored_findings(server, admin_token, caller.call_id)
    assert {f["entity_type"] for f in findings} == {"CREDIT_CARD"} and len({f["turn"] for f in findings}) == 2
