"""What callers really send, through a real call: odd text, bursts and floods of messages, speech that
starts as the agent stops, and monologues longer than one utterance. Nothing the caller says is lost."""

from __future__ import annotations

import json
import re
import uuid

import aiohttp
import numpy as np
from helpers import settings_for_new_calls, stored_turns, text_call
from test_voice_call import open_call, trim

from pono.testing.scripted_llm import Script

MONOLOGUE = ("My name is Robert and I am calling about the order I placed last week. "
             "The parcel arrived yesterday but the blue jacket inside was the wrong size. "
             "I would like to exchange it for a larger one, and please send it to my office address.")


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


async def test_lone_surrogate_is_repaired_and_later_replies_work(server, script: Script, admin_token: str) -> None:
    script.reply = "Hello there."
    caller = await open_call(server, audio=False)
    try:
        caller.send_raw('{"type": "text", "text": "\\ud800 hi"}')
        first = await caller.wait_for(lambda e: e["type"] == "agent.final", 20)
        assert first["text"] == "Hello there." and not first["interrupted"]
        caller.send_text("are you still there?")
        second = await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] > first["turn"], 20)
        assert second["text"] == "Hello there."
        assert not [e for e in caller.events if e["type"] == "error"]
        heard = [e["text"] for e in caller.events if e["type"] == "transcript.final"]
        assert heard == ["\ufffd hi", "are you still there?"]
    finally:
        await caller.hang_up()
    turns = await stored_turns(server, admin_token, caller.call_id, 4)
    assert [t["text"] for t in turns if t["role"] == "user"] == ["\ufffd hi", "are you still there?"]


async def test_a_burst_of_messages_is_all_heard_and_stored(server, script: Script, admin_token: str) -> None:
    script.reply = "Noted, all of it."
    caller = await open_call(server, audio=False)
    sent = [f"item number {n}" for n in range(10)]
    try:
        for text in sent:
            caller.send_text(text)
        await caller.wait_for(lambda e: e["type"] == "agent.final" and not e["interrupted"], 30)
        heard = [e["text"] for e in caller.events if e["type"] == "transcript.final"]
        assert heard == sent
        # The answer that completed was asked with every message in the conversation.
        asked = " ".join(m["content"] or "" for m in script.requests[-1]["messages"] if m["role"] == "user")
        assert all(text in asked for text in sent)
    finally:
        await caller.hang_up()
    turns = await stored_turns(server, admin_token, caller.call_id, 11)
    assert [t["text"] for t in turns if t["role"] == "user"] == sent


async def test_a_text_flood_is_refused_and_the_conversation_stays_bounded(server, script: Script) -> None:
    script.reply = "Please slow down."
    caller = await open_call(server, audio=False)
    try:
        for n in range(200):
            caller.send_raw(json.dumps({"type": "text", "text": f"spam {n} " + "x" * 1900}))
        await caller.wait_for(lambda e: e["type"] == "error" and e.get("kind") == "rate_limited", 20)
        await caller.wait_for(lambda e: e["type"] == "agent.final" and not e["interrupted"], 30)
        accepted = [e for e in caller.events if e["type"] == "transcript.final"]
        assert 0 < len(accepted) < 50
        longest = max(len(m["content"] or "") for r in script.requests for m in r["messages"])
        assert longest <= 4000
    finally:
        await caller.hang_up()


async def test_speech_that_starts_as_the_agent_stops_is_a_turn(server, script: Script, question: np.ndarray) -> None:
    script.reply = "Okay."
    caller = await open_call(server)
    try:
        caller.send_text("hi")
        await caller.wait_for(lambda e: e["type"] == "call.state" and e["state"] == "speaking", 20)
        caller.speak(trim(question))  # starts while the short reply still plays, and outlives it
        asked = await caller.wait_for(lambda e: e["type"] == "transcript.final" and "table" in e.get("text", ""), 30)
        answer = await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] > asked["turn"], 30)
        assert answer["text"] == "Okay."
        assert not [e for e in caller.events if e["type"] == "speech.stopped" and e.get("ignored")]
    finally:
        await caller.hang_up()


async def test_a_monologue_longer_than_one_utterance_is_kept_whole(server, script: Script, audio_dir,
                                                                   admin_token: str) -> None:
    from conftest import espeak

    speech = trim(espeak(MONOLOGUE, audio_dir / "monologue.wav"))
    # The monologue (about 12 s) is cut into segments. Silence alone ends the turn here: the end-of-turn model
    # may rightly end it at a finished sentence, which is another test's subject.
    with settings_for_new_calls(server, max_utterance_s=4.0, end_of_turn_model=False):
        caller = await open_call(server)
    script.reply = "I can exchange that jacket for you."
    try:
        caller.speak(speech)
        answer = await caller.wait_for(lambda e: e["type"] == "agent.final", 60)
        assert answer["text"] == script.reply and not answer["interrupted"]
        pieces = [e["text"] for e in caller.events if e["type"] == "transcript.final" and e.get("text")]
        assert len(pieces) >= 2
        heard = words(" ".join(pieces))
        assert {"robert", "order", "jacket", "office"} <= heard, heard
        # One reply, asked with the whole monologue. (A preemptive request started at a pause and dropped when the
        # caller went on is by design, PONO_PREEMPTIVE_REPLY: under load one may reach the LLM before the drop.)
        assert [e["text"] for e in caller.events if e["type"] == "agent.final"] == [script.reply]
        asked = words(script.requests[-1]["messages"][-1]["content"])
        assert {"robert", "office"} <= asked
    finally:
        await caller.hang_up()
    turns = await stored_turns(server, admin_token, caller.call_id, len(pieces) + 1)
    assert [t["text"] for t in turns if t["role"] == "user"] == pieces


async def test_the_caller_sees_its_own_subset_redacted(server, script: Script, admin_token: str) -> None:
    script.reply = "Thanks, noted."
    caller = await open_call(server, audio=False)
    try:
        caller.send_text("my card is 4111 1111 1111 1111")
        heard = await caller.wait_for(lambda e: e["type"] == "transcript.final", 20)
        assert "4111" not in heard["text"] and "card" in heard["text"]
        await caller.wait_for(lambda e: e["type"] == "agent.final", 20)
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
            async with http.post(f"{server.url}/api/calls/{caller.call_id}/actions",
                                 json={"action": "say", "text": "An operator is here."}) as r:
                assert r.status == 200
        await caller.wait_for(lambda e: e["type"] == "agent.final" and e["text"] == "An operator is here.", 20)
        # Who the operators are is not the caller's business.
        assert not [e for e in caller.events if e["type"] == "operator.action"]
        assert {e["type"] for e in caller.events} <= {
            "call.started", "call.state", "transcript.final", "agent.delta", "agent.final", "latency"}
    finally:
        await caller.hang_up()


async def test_an_answer_that_breaks_off_is_owned_up_to_and_marked(server, script: Script, admin_token: str) -> None:
    from pono.voice.reply import TRUNCATED_APOLOGY

    for failure in ("truncate", "drop"):  # the body just ends; the connection drops
        script.reply = "The store opens at nine in the morning tomorrow and closes at six."
        script.failure = failure  # type: ignore[assignment]
        caller = await open_call(server, audio=False)
        try:
            caller.send_text("When do you open?")
            final = await caller.wait_for(lambda e: e["type"] == "agent.final", 20)
            assert final["text"].startswith("The store opens") and final["text"].endswith(TRUNCATED_APOLOGY)
            assert final["truncated"] is True and final["interrupted"] is False
            assert [e["kind"] for e in caller.events if e["type"] == "error"] == ["llm_truncated"]
        finally:
            script.failure = "none"
            await caller.hang_up()
        turns = await stored_turns(server, admin_token, caller.call_id, 2)
        assert turns[-1]["role"] == "agent" and turns[-1]["truncated"] is True, failure


async def test_an_empty_answer_is_asked_again_then_the_caller_hears_why(server, script: Script) -> None:
    from pono.voice.reply import EMPTY_ANSWER

    caller = await open_call(server, audio=False)
    try:
        script.responses = [{"text": ""}, {"text": "We open at nine."}]
        caller.send_text("When do you open?")
        first = await caller.wait_for(lambda e: e["type"] == "agent.final", 20)
        assert first["text"] == "We open at nine." and len(script.requests) >= 2
        latency = await caller.wait_for(lambda e: e["type"] == "latency" and e["turn"] == first["turn"], 5)
        assert latency["llm_endpoint"] == "primary"  # which endpoint answered the turn
        script.responses = [{"text": ""}, {"text": ""}]
        caller.send_text("And on Sunday?")
        second = await caller.wait_for(lambda e: e["type"] == "agent.final" and e["turn"] > first["turn"], 20)
        assert second["text"] == EMPTY_ANSWER
        assert [e["kind"] for e in caller.events if e["type"] == "error"] == ["llm_empty"]
    finally:
        script.responses = []
        await caller.hang_up()


async def test_a_bad_key_is_named_and_an_interrupted_text_reply_keeps_what_was_sent(server, script: Script) -> None:
    script.reply = "Let me tell you all about our long history, our cooks, and our garden. " * 6
    script.token_interval_s = 0.05
    try:
        async with text_call(server.url) as caller:
            caller.send_raw(json.dumps({"type": "dtmf", "digit": "Z"}))
            bad = await caller.wait_for(lambda e: e["type"] == "error", 10)
            assert bad["kind"] == "bad_message" and "'digit'" in bad["message"]
            caller.send_text("Tell me about the restaurant")
            await caller.wait_for(lambda e: e["type"] == "agent.delta", 20)
            caller.send_text("Stop, when do you open?")
            cut = await caller.wait_for(lambda e: e["type"] == "agent.final" and e["interrupted"], 20)
            sent = "".join(e["text"] for e in caller.events if e["type"] == "agent.delta" and e["turn"] == cut["turn"])
            assert cut["text"] and cut["text"] == sent.strip()
    finally:
        script.token_interval_s = 0.01


async def test_the_caller_never_sees_how_a_tool_is_configured(server, script: Script, admin_token: str) -> None:
    name = f"mcp-{uuid.uuid4().hex[:6]}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
        async with http.post(f"{server.url}/api/personas", json={
                "name": name, "system_prompt": "x",
                "tools": [{"type": "mcp", "name": "meta", "url": "http://169.254.169.254/latest"}]}) as r:
            assert r.status == 201, await r.text()
        async with http.post(f"{server.url}/api/personas", json={
                "name": f"{name}-hot", "system_prompt": "x", "llm_params": {"temperature": "hot"}}) as r:
            assert r.status == 422 and "llm_params" in await r.text()
    async with text_call(server.url, name) as caller:
        told = await caller.wait_for(lambda e: e["type"] == "error" and e.get("kind") == "mcp", 20)
    # The caller learns that something failed, never the operator's hosts or settings (operators and logs do).
    assert told["message"] and "169.254" not in json.dumps(caller.events)
    assert "ALLOWED" not in json.dumps(caller.events)
