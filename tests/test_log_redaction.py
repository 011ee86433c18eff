"""Log redaction redacts what callers said, not what the server says about itself (pono/agent/dlp/logfilter.py):
read through the production handler (pono.logs.log_handler), from a real SIP listener and a real call."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import io
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import numpy as np
from conftest import RunningServer
from helpers import settings_for_new_calls

import pono
from pono.agent.embedded import free_port
from pono.context import SERVICES
from pono.logs import log_handler
from pono.settings import Settings
from pono.signaling.phone.server import SipServer
from pono.testing.scripted_llm import Script
from pono.testing.sip_caller import SipCaller

CARD = "4111 1111 1111 1111"


@contextlib.contextmanager
def captured_logs() -> Iterator[io.StringIO]:
    """What is logged (at INFO and up) inside the block, as the production handler writes it: JSON, redacted."""
    stream = io.StringIO()
    handler = log_handler("json", stream)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


def test_every_pono_log_call_has_a_literal_template() -> None:
    """The filter never redacts our own templates, because they are constant text: no f-string, no
    concatenation, no .format() as the first argument of a logging call in pono/."""
    package = Path(pono.__file__).parent
    found = []
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("debug", "info", "warning", "error", "exception", "critical", "log")):
                continue
            target = node.func.value
            if "log" not in (target.id if isinstance(target, ast.Name) else getattr(target, "attr", "")).lower():
                continue
            args = node.args[1:] if node.func.attr == "log" else node.args
            if not args or not (isinstance(args[0], ast.Constant) and isinstance(args[0].value, str)):
                found.append(f"{path.relative_to(package.parent)}:{node.lineno}")
    assert not found, f"log calls without a literal template: {found}"


async def test_the_sip_listener_says_where_it_listens(tmp_path: Path) -> None:
    """A startup line is the server's own configuration: "SIP listening on 127.0.0.1:PORT", not [IP_ADDRESS]."""
    port = free_port()
    settings = Settings(sip_host="127.0.0.1", sip_port=port, data_dir=tmp_path)
    sip = SipServer(settings, None, lookup=lambda number: None)  # type: ignore[arg-type, return-value]
    with captured_logs() as stream:
        try:
            await sip.start()
        finally:
            await sip.close()
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert f"SIP listening on 127.0.0.1:{port} (udp)" in events, events


async def test_what_a_caller_said_is_still_redacted(server: RunningServer, admin_token: str, script: Script,
                                                    phone_question: np.ndarray) -> None:
    """A transfer reason the agent took from the caller (a call event's details, logged as an extra) and a
    caller-chosen value in a message argument (a media stream's close reason) lose the card number; the
    call id on the same line stays."""
    name = f"logs-{uuid.uuid4().hex[:6]}"
    number = f"+1555{uuid.uuid4().int % 10**7:07d}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
        async with http.post(f"{server.url}/api/personas", json={
                "name": name, "system_prompt": "You answer the phone.", "tools": ["transfer_to_operator"]}) as r:
            assert r.status == 201
        async with http.put(f"{server.url}/api/phone-numbers/{number}", json={"persona": name}) as r:
            assert r.status == 200
    script.responses = [{"tool_calls": [{"name": "transfer_to_operator",
                                         "arguments": {"reason": f"my card {CARD} was declined"}}]},
                        {"text": "I am getting a colleague for you."}]
    phone = SipCaller(("127.0.0.1", server.app[SERVICES].sip.port), callee=number)
    with captured_logs() as stream:
        try:
            with settings_for_new_calls(server, sip_operator_uri="sip:desk@operators.example.com"):
                assert await phone.call() == 200
                phone.say(phone_question, 16000)
                for _ in range(400):
                    if any(r.method == "REFER" for r in phone.requests):
                        break
                    await asyncio.sleep(0.1)
                url = server.url.replace("http://", "ws://") + "/api/phone/twilio?token=provider-secret"
                async with aiohttp.ClientSession() as http, http.ws_connect(url) as ws:
                    await ws.send_str(json.dumps({"event": "start", "start": {
                        "streamSid": "MZ" + uuid.uuid4().hex, "customParameters": {"persona": f"card {CARD}"}}}))
                    await ws.receive(timeout=10)
        finally:
            await phone.bye()
    text = stream.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    transfers = [line for line in lines if isinstance(line.get("details"), dict) and "reason" in line["details"]]
    assert transfers, text[-3000:]
    assert transfers[0]["details"]["reason"] == "my card [CREDIT_CARD] was declined", transfers[0]
    assert len(transfers[0]["call_id"]) == 32
    closed = [line["event"] for line in lines if "closed: unknown persona" in line["event"]]
    assert closed and "[CREDIT_CARD]" in closed[0], closed
    assert "4111" not in text, [line for line in text.splitlines() if "4111" in line]


def test_third_party_lines_are_redacted_whole() -> None:
    """A library may interpolate anything into its own template (a DSN in a driver error): all of its line is
    scanned. Our own lines keep their words around a redacted value, whatever the conversion."""
    with captured_logs() as stream:
        logging.getLogger("asyncpg.pool").warning("cannot connect to postgresql://pono:s3cret-pw@db:5432/pono")
        logging.getLogger("pono.tests").warning("caller %s said %r", "+1 415 555 2671", f"my card {CARD}")
        logging.getLogger("pono.tests").warning("%(kind)s at %(where)s", {"kind": "card", "where": CARD})
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events[0] == "cannot connect to [CONNECTION_STRING]", events
    assert events[1] == "caller [PHONE_NUMBER] said 'my card [CREDIT_CARD]'", events
    assert events[2] == "card at [CREDIT_CARD]", events
