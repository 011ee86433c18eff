"""DLP: quality on the labelled corpus, spoken forms, policies, and redaction wherever data leaves a call."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import pytest
import redis.asyncio as aioredis

from pono.agent.dlp.apply import redact_records
from pono.agent.dlp.engine import DEFAULT_POLICY, DlpPolicy
from pono.agent.dlp.evaluate import evaluate, load_corpus
from pono.context import SERVICES
from pono.storage.journal import Journal
from pono.storage.records import record
from pono.storage.writer import Writer
from pono.testing.caller import Caller
from pono.testing.scripted_llm import Script
from pono.voice.call import BLOCKED_WARNING

CORPUS = Path(__file__).parent / "fixtures" / "dlp_corpus.jsonl"
CARD = "4111 1111 1111 1111"
# Floors for every entity type on the fixture corpus. The corpus was written alongside the recognizers,
# so these are floors against regressions, not claims about real-world transcripts.
PRECISION_FLOOR = 0.9
RECALL_FLOOR = 0.9


def test_corpus_precision_and_recall_per_entity() -> None:
    corpus = load_corpus(CORPUS)
    assert len(corpus) >= 200
    assert sum(1 for line in corpus if not line["entities"]) >= 60  # hard negatives
    assert sum(1 for line in corpus if " dot " in str(line["text"]) or " four " in f" {line['text']} ") >= 20
    scores, errors = evaluate(DEFAULT_POLICY, corpus)
    assert set(scores) >= {"US_SSN", "CREDIT_CARD", "EMAIL_ADDRESS", "PHONE_NUMBER", "IBAN_CODE", "IP_ADDRESS",
                           "SECRET", "CONNECTION_STRING", "PASSWORD"}
    for kind, score in scores.items():
        assert score.precision >= PRECISION_FLOOR, (kind, score, errors)
        assert score.recall >= RECALL_FLOOR, (kind, score, errors)


def test_spoken_forms_are_redacted_on_the_original_words() -> None:
    text = "sure, my social is one two three, four five, six seven eight nine, thanks"
    result = DEFAULT_POLICY.scan(text)
    assert result.text == "sure, my social is [US_SSN], thanks"
    (finding,) = result.findings
    assert text[finding.start:finding.end] == "one two three, four five, six seven eight nine"
    email = DEFAULT_POLICY.scan("it's john dot smith at example dot com ok")
    assert email.text == "it's [EMAIL_ADDRESS] ok"
    card = DEFAULT_POLICY.scan("four one one one one one one one one one one one one one one one is my card")
    assert card.text == "[CREDIT_CARD] is my card"
    # Heard with a digit too many (Whisper, in a real call): the checksum fails, the words around say card.
    misheard = DEFAULT_POLICY.scan("my card is 4111111111111111111 thanks")
    assert misheard.text == "my card is [CREDIT_CARD] thanks"


def test_policies_mask_custom_patterns_and_reject_bad_regex() -> None:
    masked = DlpPolicy.from_config({"action": "mask_last4"}).scan(f"card {CARD}")
    assert masked.text == "card [CREDIT_CARD ending 1111]"
    custom = DlpPolicy.from_config({"custom": [{"name": "EMPLOYEE_ID", "pattern": r"EMP-\d{6}"}]})
    assert custom.scan("I am EMP-123456").text == "I am [EMPLOYEE_ID]"
    only_email = DlpPolicy.from_config({"entities": ["EMAIL_ADDRESS"]})
    assert only_email.scan(f"a@b.io and {CARD}").text == f"[EMAIL_ADDRESS] and {CARD}"
    for bad in ({"custom": [{"name": "X1", "pattern": "("}]}, {"action": "shout"}, {"entities": ["DNA"]}):
        with pytest.raises(ValueError):
            DlpPolicy.from_config(bad)
    # Hard negatives stay as they are.
    for text in ("order 4829 1133 shipped", "the total is $1,299.99", "zip 94110", "meet at 7:45 on 2024-05-12"):
        assert DEFAULT_POLICY.scan(text).text == text


@pytest.mark.timeout(60)  # a guard, not a measurement: RE2 takes microseconds, backtracking takes years
def test_persona_patterns_scan_in_linear_time() -> None:
    """`(\\d+)+#` backtracks exponentially in Python's re on a digit run with no `#` (24 digits took 1.36 s
    holding the GIL; 60 digits would take longer than the age of the universe). Persona patterns run on RE2."""
    policy = DlpPolicy.from_config({"custom": [{"name": "TICKET", "pattern": r"(\d+)+#"}]})
    text = "my number is " + "1" * 60 + " thanks"
    assert policy.scan(text).text == text
    assert policy.scan("ticket 123# ok").text == "ticket [TICKET] ok"


@pytest.mark.timeout(60)  # a guard, not a measurement: linear is milliseconds, quadratic is minutes
def test_email_recognizer_is_linear_on_dotted_runs() -> None:
    """The built-in email pattern, on Python's re, rescanned a dotted run from every start (8,000 chars: 0.4 s;
    200,000: minutes); a 64 KiB webhook answer is redacted before storage. It runs on RE2."""
    from pono.agent.dlp.recognizers import email

    assert email("1." * 100_000) == []
    assert [(m.start, m.end) for m in email("write to Ann.Lee@Example.co.uk today")] == [(9, 30)]


def test_persona_patterns_that_need_backtracking_are_refused() -> None:
    for pattern in (r"(\d)\1", r"\d+(?= dollars)", r"(?<!x)y", "a" * 1001):
        with pytest.raises(ValueError, match="custom: X1") as refused:
            DlpPolicy.from_config({"custom": [{"name": "X1", "pattern": pattern}]})
        assert "RE2" in str(refused.value) or "at most" in str(refused.value)


def test_dlp_scan_command() -> None:
    lines = f"my card is {CARD}\nno secrets here\nmy key is sk-proj-{'a1B2' * 10}\n"
    out = subprocess.run([sys.executable, "-m", "pono", "dlp", "scan"], input=lines, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    rows = [json.loads(line) for line in out]
    assert [r["text"] for r in rows] == ["my card is [CREDIT_CARD]", "no secrets here", "my key is [SECRET]"]
    assert rows[0]["findings"][0] == {"entity_type": "CREDIT_CARD", "start": 11, "end": 30, "action": "redact",
                                      "recognizer": "luhn"}
    assert "4111" not in "\n".join(out)
    bad = subprocess.run([sys.executable, "-m", "pono", "dlp", "scan", "--policy-json", '{"action": "shout"}'],
                         input="x\n", capture_output=True, text=True)
    assert bad.returncode != 0 and "action" in bad.stderr


async def test_journal_holds_only_redacted_text(tmp_path: Path) -> None:
    writer = Writer(None, Journal(tmp_path), redact=redact_records)  # type: ignore[arg-type]
    writer.db_up = False  # Postgres is away: everything goes to the journal
    await writer._handle([record("turn", "c1", 0, role="user", text=f"card {CARD}", source="text",
                                 started_at=0.0, ended_at=0.0, interrupted=False, latency={})])
    content = await asyncio.to_thread(lambda: "".join(p.read_text() for p in tmp_path.glob("*.jsonl")))
    assert "[CREDIT_CARD]" in content and "4111" not in content
    assert '"kind":"dlp_finding"' in content


async def test_call_stores_and_streams_only_redacted_text(server, script: Script, admin_token: str,
                                                          redis_url: str) -> None:
    script.reply = f"Thanks, I have the card {CARD} on file."
    caller = Caller(server.url)
    await caller.connect(audio=False)
    operator = aioredis.from_url(redis_url, decode_responses=True)
    pubsub = operator.pubsub()
    await pubsub.subscribe(f"pono:events:{caller.call_id}")
    try:
        await caller.wait_open()
        caller.send_text(f"my card is {CARD} and my email is john dot smith at example dot com")
        await caller.wait_for(lambda e: e["type"] == "agent.final", 10)
        # The caller's own view is redacted like the operator feed (the security review: nothing on the data
        # channel may carry the number, whoever else sees that screen or its traffic).
        finals = [e.get("text", "") for e in caller.events if e["type"] == "transcript.final"]
        assert finals and all(CARD not in t for t in finals) and "[CREDIT_CARD]" in finals[0]
        published: list[str] = []
        for _ in range(50):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.2)
            if message:
                published.append(message["data"])
            if any('"agent.final"' in m for m in published):
                break
    finally:
        await caller.hang_up()
        await pubsub.aclose()
        await operator.aclose()
    operator_view = "\n".join(published)
    assert '"transcript.final"' in operator_view and "[CREDIT_CARD]" in operator_view
    assert "4111" not in operator_view and "smith" not in operator_view

    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
        for _ in range(50):
            async with http.get(f"{server.url}/api/calls/{caller.call_id}") as r:
                stored = await r.json()
            if len(stored.get("turns", [])) == 2 and stored["dlp_findings"]:
                break
            await asyncio.sleep(0.1)
    assert stored["turns"][0]["text"] == "my card is [CREDIT_CARD] and my email is [EMAIL_ADDRESS]"
    assert stored["turns"][1]["text"] == "Thanks, I have the card [CREDIT_CARD] on file."
    kinds = sorted((f["turn"], f["entity_type"]) for f in stored["dlp_findings"])
    assert kinds == [(0, "CREDIT_CARD"), (0, "EMAIL_ADDRESS"), (1, "CREDIT_CARD")]
    pool = server.app[SERVICES].storage.db.pool
    rows = await pool.fetch("SELECT t.text, f.recognizer FROM turns t LEFT JOIN dlp_findings f"
                            " ON f.call_id = t.call_id AND f.turn_idx = t.idx WHERE t.call_id = $1", caller.call_id)
    assert rows and all("4111" not in r["text"] and "smith" not in r["text"] for r in rows)
    assert {r["recognizer"] for r in rows} == {"luhn", "email+spoken"}


async def persona_with_policy(server, admin_token: str, policy: dict[str, object]) -> str:
    name = f"dlp-{uuid.uuid4().hex[:6]}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
        async with http.post(f"{server.url}/api/personas", json={"name": name, "system_prompt": "Be brief.",
                                                                 "dlp_policy": policy}) as r:
            assert r.status == 201, await r.text()
    return name


async def test_policy_before_llm_redacts_or_blocks(server, script: Script, admin_token: str) -> None:
    redacting = await persona_with_policy(server, admin_token, {"before_llm": True})
    blocking = await persona_with_policy(server, admin_token, {"before_llm": True, "action": "block_and_warn"})
    script.reply = "Noted."
    caller = Caller(server.url)
    try:
        await caller.connect(audio=False, persona=redacting)
        await caller.wait_open()
        caller.send_text(f"charge {CARD} please")
        await caller.wait_for(lambda e: e["type"] == "agent.final", 10)
        assert script.requests[-1]["messages"][-1]["content"] == "charge [CREDIT_CARD] please"
    finally:
        await caller.hang_up()
    asked = len(script.requests)
    caller = Caller(server.url)
    try:
        await caller.connect(audio=False, persona=blocking)
        await caller.wait_open()
        caller.send_text(f"charge {CARD} please")
        final = await caller.wait_for(lambda e: e["type"] == "agent.final", 10)
        assert final["text"] == BLOCKED_WARNING
        assert len(script.requests) == asked  # the LLM never saw it
    finally:
        await caller.hang_up()


async def test_persona_with_invalid_dlp_regex_is_rejected(server, admin_token: str) -> None:
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as http:
        body = {"name": "bad-dlp", "system_prompt": "x", "dlp_policy": {"custom": [{"name": "X1", "pattern": "(["}]}}
        async with http.post(f"{server.url}/api/personas", json=body) as r:
            assert r.status == 422
            fields = (await r.json())["fields"]
            assert fields[0]["field"] == "dlp_policy" and "not a valid regex" in fields[0]["message"]
