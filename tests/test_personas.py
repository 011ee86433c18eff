"""A call takes its persona (prompt, greeting, LLM settings) from Postgres when it starts."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
from helpers import settings_for_new_calls, text_call

from pono.context import SERVICES
from pono.testing.caller import Caller
from pono.testing.scripted_llm import Script


async def test_call_uses_the_persona_it_asked_for(server, script: Script, admin_token: str) -> None:
    name = f"barista-{uuid.uuid4().hex[:6]}"
    persona = {"name": name, "system_prompt": "You are a barista at Blue Door Coffee.", "greeting": "Coffee time!",
               "llm_model": "barista-model", "llm_params": {"temperature": 0.2, "max_tokens": 40}}
    headers = {"Authorization": f"Bearer {admin_token}"}
    async with aiohttp.ClientSession(headers=headers) as http:
        async with http.post(f"{server.url}/api/personas", json=persona) as r:
            assert r.status == 201
            persona_id = (await r.json())["id"]

    with settings_for_new_calls(server, speak_greeting=True):
        caller = Caller(server.url)
        await caller.connect(audio=False, persona=name)
    try:
        await caller.wait_open()
        greeting = await caller.wait_for(lambda e: e["type"] == "agent.final", 10)
        assert greeting["text"] == "Coffee time!"
        started = next(e for e in caller.events if e["type"] == "call.started")
        assert started["persona"] == name

        # Editing the persona mid-call changes new calls only.
        async with aiohttp.ClientSession(headers=headers) as http:
            async with http.put(f"{server.url}/api/personas/{persona_id}",
                                json={**persona, "system_prompt": "You are a tea sommelier."}) as r:
                assert r.status == 200
        script.reply = "A flat white, coming up."
        caller.send_text("What do you recommend?")
        await caller.wait_for(lambda e: e["type"] == "agent.final" and e["text"] == script.reply, 10)
        request = script.requests[-1]
        assert request["messages"][0] == {"role": "system", "content": persona["system_prompt"]}
        assert request["model"] == "barista-model"
        assert request["temperature"] == 0.2 and request["max_tokens"] == 40
        # The greeting is part of the conversation the LLM sees.
        assert {"role": "assistant", "content": "Coffee time!"} in request["messages"]
    finally:
        await caller.hang_up()

    async with text_call(server.url, persona_id) as by_id:
        by_id.send_text("Hi")
        await by_id.wait_for(lambda e: e["type"] == "agent.final", 10)
        assert script.requests[-1]["messages"][0]["content"] == "You are a tea sommelier."


async def test_unknown_persona_is_refused_and_default_is_used_otherwise(server, script: Script) -> None:
    caller = Caller(server.url)
    try:
        try:
            await caller.connect(audio=False, persona="nobody-by-this-name")
        except RuntimeError as exc:
            assert "404" in str(exc) and "nobody-by-this-name" in str(exc)
        else:
            raise AssertionError("an unknown persona was accepted")
    finally:
        await caller.close()
    caller = Caller(server.url)
    try:
        await caller.connect(audio=False)
        await caller.wait_open()
        caller.send_text("Hello")
        await caller.wait_for(lambda e: e["type"] == "agent.final", 10)
        assert next(e for e in caller.events if e["type"] == "call.started")["persona"] == "default"
        assert script.requests[-1]["messages"][0]["content"].startswith("You are Pono")
    finally:
        await caller.hang_up()


async def test_persona_voice_that_cannot_be_had_falls_back_to_the_default(server, script: Script,
                                                                          admin_token: str) -> None:
    name = f"voice-{uuid.uuid4().hex[:6]}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
        async with http.post(f"{server.url}/api/personas", json={"name": name, "system_prompt": "x",
                                                                 "tts_voice": "kore"}) as r:
            assert r.status == 201
    script.reply = "You still hear me."
    caller = Caller(server.url)
    try:
        await caller.connect(audio=True, persona=name)
        await caller.wait_open()
        caller.send_text("Can you hear me?")
        await caller.wait_for(lambda e: e["type"] == "agent.final", 20)
        for _ in range(30):
            if caller.received and abs(caller.recording()).max() > 2000:
                break
            await asyncio.sleep(0.1)
        assert abs(caller.recording()).max() > 2000  # spoken in the default voice: "kore" is not bundled
    finally:
        await caller.hang_up()


async def test_credentials_saved_in_a_persona_before_the_rules_are_never_shown(server, admin_token: str) -> None:
    # A row written before tools had to name operator-side servers (no API accepts this any more).
    pool = server.app[SERVICES].storage.db.pool
    name = f"legacy-{uuid.uuid4().hex[:6]}"
    legacy = [{"type": "mcp", "name": "crm", "command": "crm-mcp", "env": {"CRM_TOKEN": "s3cret-value"}},
              {"type": "webhook", "name": "book", "url": "https://example.com/book",
               "headers": {"Authorization": "Bearer s3cret-value"}}]
    persona_id = await pool.fetchval(
        "INSERT INTO personas (name, system_prompt, tools) VALUES ($1, 'x', $2::jsonb) RETURNING id",
        name, json.dumps(legacy))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
        async with http.get(f"{server.url}/api/personas/{persona_id}") as r:
            shown = await r.text()
        async with http.get(f"{server.url}/api/personas", params={"limit": "200"}) as r:
            listed = await r.text()
    assert r.status == 200 and "s3cret-value" not in shown and "s3cret-value" not in listed
    assert json.loads(shown)["tools"][0]["env"] == "[redacted]"
