"""The agent never talks over itself: a key press, an operator's "say" and the end of the caller's turn all
want the floor at once, and each is heard whole, one after another (regression for the double reply)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import numpy as np
from test_voice_call import open_call

from pono.context import SERVICES
from pono.testing.caller import RATE
from pono.testing.scripted_llm import Script

REPLY = "We open every day at noon and close at midnight. The kitchen serves fresh fish from the harbour."
OPERATOR_WORDS = "An operator is listening in on this call."


def call_tasks(call_id: str, prefixes: tuple[str, ...] = ("",)) -> list[str]:
    return sorted(t.get_name() for t in asyncio.all_tasks()
                  if call_id in t.get_name() and t.get_name().startswith(prefixes) and not t.done())


def utterances_overlap(events: list[dict[str, Any]]) -> list[str]:
    """Agent turns whose text events interleave: one turn's delta between another's first delta and final."""
    open_turn: int | None = None
    problems = []
    for e in events:
        if e["type"] not in ("agent.delta", "agent.final"):
            continue
        if open_turn is None and e["type"] == "agent.delta":
            open_turn = e["turn"]
        elif e["turn"] != open_turn:
            problems.append(f"turn {e['turn']} {e['type']} while turn {open_turn} was speaking")
        if e["type"] == "agent.final" and e["turn"] == open_turn:
            open_turn = None
    return problems


async def test_key_press_and_operator_say_while_caller_speaks_play_one_at_a_time(
        server, script: Script, question: np.ndarray, admin_token: str) -> None:
    script.reply = REPLY
    caller = await open_call(server)
    call_id = caller.call_id
    assert call_id is not None
    most_at_once = 0
    watching = True

    async def watch() -> None:
        nonlocal most_at_once
        while watching:
            most_at_once = max(most_at_once, len(call_tasks(call_id, ("reply-", "greeting-", "operator-"))))
            await asyncio.sleep(0.01)

    watcher = asyncio.create_task(watch())
    try:
        caller.speak(question)
        await caller.wait_for(lambda e: e["type"] == "speech.started", 20)
        caller.send_raw(json.dumps({"type": "dtmf", "digit": "5"}))
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
            async with http.post(f"{server.url}/api/calls/{call_id}/actions",
                                 json={"action": "say", "text": OPERATOR_WORDS}) as r:
                assert r.status == 200, await r.text()
        # The key press is answered, then the operator's words, then the spoken question: each whole.
        asked = await caller.wait_for(lambda e: e["type"] == "transcript.final" and "table" in e.get("text", ""), 30)
        finals = []
        for _ in range(3):
            seen = {e["turn"] for e in finals}
            finals.append(await caller.wait_for(
                lambda e, seen=seen: e["type"] == "agent.final" and e["turn"] not in seen, 40))
        # (A key press is answered once the caller stops pressing keys, so the operator's words may go first.)
        assert sorted(f["text"] for f in finals) == sorted([REPLY, OPERATOR_WORDS, REPLY])
        assert not any(f["interrupted"] for f in finals)
        assert finals[-1]["turn"] > asked["turn"]
        assert utterances_overlap(caller.events) == []
        assert most_at_once == 1

        # The caller talks over the next reply: it stops, and nothing else plays while they talk.
        caller.send_text("Tell me more")
        await caller.wait_for(lambda e: e["type"] == "call.state" and e["state"] == "speaking", 20)
        await asyncio.sleep(0.5)
        caller.speak(question)
        barge = await caller.wait_for(lambda e: e["type"] == "barge_in", 20)
        barge_at = asyncio.get_running_loop().time()
        await asyncio.sleep(1.0)  # the caller is still speaking
        audio = caller.recording()
        assert caller.first_arrival is not None
        start = int((barge_at + 0.4 - caller.first_arrival) * RATE)
        window = audio[start:start + RATE // 2]
        assert window.size == RATE // 2 and np.abs(window).max() < 500, "agent kept talking after barge-in"
        cut = next(e for e in caller.events if e["type"] == "agent.final" and e["turn"] == barge["turn"])
        assert cut["interrupted"] is True
        # Nothing new is said until the caller's words are transcribed (a queued reply would speak now).
        after = caller.events[caller.events.index(barge) + 1:]
        heard = next((i for i, e in enumerate(after) if e["type"] == "transcript.final"), len(after))
        assert [e for e in after[:heard] if e["type"] == "agent.delta"] == []
        # The caller's words are answered, and hang-up during that answer leaves nothing of the call running.
        await caller.wait_for(lambda e: e["type"] == "agent.delta" and e["turn"] > barge["turn"], 30)
    finally:
        watching = False
        await watcher
        await caller.hang_up()
    calls = server.app[SERVICES].calls
    for _ in range(100):
        if call_id not in calls.calls:
            break
        await asyncio.sleep(0.05)
    assert call_id not in calls.calls
    assert call_tasks(call_id) == []
