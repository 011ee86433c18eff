"""Post-call workflows against real parts: a server on its own Postgres, a real SMTP server (aiosmtpd), a real
HTTP target; only the LLM is scripted. The outage test stops this module's Postgres, so it runs last."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import re
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from conftest import RunningServer
from helpers import server_on_own_stores, text_call
from jobs_peers import Mailbox, Target
from playwright.async_api import async_playwright
from servers import PostgresProcess
from test_browser import CHROMIUM, chromium_args

from pono.context import SERVICES
from pono.jobs import runner as runner_module
from pono.jobs.steps import SUMMARY_PROMPT
from pono.jobs.triggers import fire_due_schedules
from pono.jobs.worker import JobWorker
from pono.storage.reports import daily_report
from pono.storage.workflow_runs import completed_steps
from pono.testing.scripted_llm import Script, ScriptedLLM

CARD = "4111 1111 1111 1111"
SECRET = "workflow-test-secret"
CRM_TOKEN = "crm-token-for-tests"
README = Path(__file__).resolve().parent.parent / "README.md"
SUMMARY = ('{"summary": "The caller gave card ' + CARD + ' to pay for an order.", '
           '"action_items": ["Ship the order"], "disposition": "resolved"}')


class Stack:
    def __init__(self, server: RunningServer, pg: PostgresProcess, token: str, mailbox: Mailbox,
                 target: Target) -> None:
        self.server, self.pg, self.token, self.mailbox, self.target = server, pg, token, mailbox, target
        self.http = aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"})

    async def api(self, method: str, path: str, body: Any = None, status: int | None = None) -> Any:
        async with self.http.request(method, self.server.url + path, json=body) as r:
            payload = await r.json() if r.content_type == "application/json" else None
            assert status is None or r.status == status, (r.status, payload)
            return payload

    async def workflow(self, body: dict[str, Any]) -> dict[str, Any]:
        return await self.api("POST", "/api/workflows", {"name": f"wf-{uuid.uuid4().hex[:8]}", **body}, 201)

    async def persona(self) -> str:
        name = f"p-{uuid.uuid4().hex[:8]}"
        await self.api("POST", "/api/personas", {"name": name, "system_prompt": "Be brief."}, 201)
        return name

    async def finished_run(self, workflow_id: str, count: int = 1, tries: int = 300) -> list[dict[str, Any]]:
        """The workflow's runs once `count` of them have finished (newest first)."""
        runs: list[dict[str, Any]] = []
        for _ in range(tries):
            runs = (await self.api("GET", f"/api/workflows/{workflow_id}/runs", status=200))["runs"]
            if sum(r["status"] in ("succeeded", "failed") for r in runs) >= count:
                return runs
            await asyncio.sleep(0.1)
        raise AssertionError(f"runs did not finish: {runs}")


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory, scripted_llm: ScriptedLLM) -> AsyncIterator[Stack]:
    mailbox, target = Mailbox(), Target()
    await mailbox.start()
    await target.start()
    os.environ["PONO_WEBHOOK_SECRET"], os.environ["PONO_HTTP_SECRET_CRM"] = SECRET, CRM_TOKEN
    try:
        # jobs_llm_yield=always: summaries give the scripted LLM up to live calls, as with the bundled model.
        async with server_on_own_stores(tmp_path_factory, scripted_llm, "workflows", smtp_host="127.0.0.1",
                                        smtp_port=mailbox.port, smtp_from="pono@example.com",
                                        webhook_allowed_hosts=["127.0.0.1"], jobs_heartbeat_s=2,
                                        jobs_drain_timeout_s=2, jobs_eval_timeout_s=1.5,
                                        jobs_llm_yield="always", jobs_in_process=True) as (running, pg, _valkey, token):
            s = Stack(running, pg, token, mailbox, target)
            yield s
            await s.http.close()
    finally:
        os.environ.pop("PONO_WEBHOOK_SECRET", None)
        os.environ.pop("PONO_HTTP_SECRET_CRM", None)
        await target.stop()
        await mailbox.stop()


def signed(request: dict[str, Any]) -> bool:
    headers = request["headers"]
    expected = hmac.new(SECRET.encode(), headers["X-Pono-Timestamp"].encode() + b"." + request["raw"],
                        hashlib.sha256).hexdigest()
    return hmac.compare_digest(headers["X-Pono-Signature"], f"sha256={expected}")


async def test_call_end_sends_the_summary_by_email_without_raw_pii(stack: Stack, script: Script) -> None:
    persona = await stack.persona()
    workflow = await stack.workflow({
        "trigger": {"type": "call.ended", "persona": persona},
        "steps": [{"type": "summarize"},
                  {"type": "email", "to": "ops@example.com", "subject": "Call {{call.id}}",
                   "body": "{{summary}}\n\nDisposition: {{disposition}}\n\n{{call.transcript}}"}]})
    script.responses = [{"text": "Thanks, your order is paid."}]
    script.reply = SUMMARY  # the summary: the scripted LLM repeats the card number, which must not get out
    async with text_call(stack.server.url, persona) as caller:
        caller.send_text(f"I want to pay with my card {CARD} please")
        await caller.wait_for(lambda e: e["type"] == "agent.final", 10)
    (run,) = await stack.finished_run(workflow["id"])
    assert run["status"] == "succeeded", run
    assert run["call_id"] == caller.call_id and run["trigger"] == "call.ended"
    mail = next(m for m in stack.mailbox.messages if m["Subject"] == f"Call {caller.call_id}")
    body = mail.get_content()
    assert mail["To"] == "ops@example.com" and mail["From"] == "pono@example.com"
    assert "The caller gave card [CREDIT_CARD] to pay for an order." in body and "Disposition: resolved" in body
    assert "caller: I want to pay with my card [CREDIT_CARD] please" in body
    assert "4111" not in body
    summary_request = script.requests[-1]
    assert "[CREDIT_CARD]" in str(summary_request["messages"]) and "4111" not in str(summary_request["messages"])
    call = await stack.api("GET", f"/api/calls/{caller.call_id}", status=200)
    assert call["summary"]["summary"] == "The caller gave card [CREDIT_CARD] to pay for an order."
    assert call["summary"]["action_items"] == ["Ship the order"] and call["summary"]["disposition"] == "resolved"
    assert [r["id"] for r in call["workflow_runs"]] == [run["id"]]
    assert [(s["type"], s["status"]) for s in run["steps"]] == [("summarize", "succeeded"), ("email", "succeeded")]
    assert "4111" not in str(run)
    # The recipient is the workflow's own configuration, not a caller's data: history shows it as configured.
    assert run["steps"][1]["output"]["to"] == ["ops@example.com"]

    # A call of another persona does not match the filter: no run, no e-mail.
    sent = len(stack.mailbox.messages)
    async with text_call(stack.server.url) as other:
        other.send_text("hello")
        await other.wait_for(lambda e: e["type"] == "agent.final", 10)
    other_call = await stack.api("GET", f"/api/calls/{other.call_id}", status=200)
    assert other_call["workflow_runs"] == [] and len(stack.mailbox.messages) == sent


async def test_webhook_failing_twice_is_retried_and_succeeds_once(stack: Stack) -> None:
    stack.target.plans["flaky"] = [503, 500]
    workflow = await stack.workflow({"trigger": {"type": "manual"}, "steps": [
        {"type": "webhook", "name": "notify", "url": f"{stack.target.url}/flaky", "backoff_s": 0.1, "retries": 3}]})
    await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {"input": {"order": 7}}, 202)
    (run,) = await stack.finished_run(workflow["id"])
    assert run["status"] == "succeeded"
    (step,) = run["steps"]
    assert step["status"] == "succeeded" and step["attempts"] == 3
    assert step["output"]["response"]["ok"] is True
    sent = stack.target.sent("flaky")
    assert len(sent) == 3 and all(signed(r) for r in sent)
    assert len({r["headers"]["Idempotency-Key"] for r in sent}) == 1  # one key for every try of the step
    assert sent[0]["body"]["run"]["id"] == run["id"] and sent[0]["body"]["input"] == {"order": 7}


async def test_a_step_that_fails_for_good_rolls_back_in_reverse(stack: Stack) -> None:
    stack.target.plans["broken"] = [400]
    url = stack.target.url
    workflow = await stack.workflow({"trigger": {"type": "manual"}, "steps": [
        {"type": "http", "name": "ticket", "url": f"{url}/crm-create", "body": {"subject": "call {{run.id}}"},
         "map": {"ticket_id": "id"}, "compensate": {"type": "http", "url": f"{url}/undo-ticket",
                                                    "body": {"ticket": "{{ticket_id}}"}}},
        {"type": "webhook", "name": "notify", "url": f"{url}/notify",
         "compensate": {"type": "webhook", "url": f"{url}/undo-notify", "payload": {"ticket": "{{ticket_id}}"}}},
        {"type": "http", "name": "crm_update", "url": f"{url}/broken", "retries": 3, "backoff_s": 0.1},
        {"type": "email", "to": "nobody@example.com", "subject": "never", "body": "never"}]})
    await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {}, 202)
    (run,) = await stack.finished_run(workflow["id"])
    assert run["status"] == "failed" and "crm_update" in run["error"] and "400" in run["error"]
    ticket = stack.target.sent("crm-create")[0]
    ticket_id = f"T-{stack.target.requests.index(ticket) + 1}"
    undone = [r["name"] for r in stack.target.requests if r["name"].startswith("undo-")]
    assert undone == ["undo-notify", "undo-ticket"]  # the last step done is undone first
    assert stack.target.sent("undo-ticket")[0]["body"] == {"ticket": ticket_id}
    assert len(stack.target.sent("broken")) == 1  # a 4xx is not retried
    steps = [(s["name"], s["phase"], s["status"]) for s in run["steps"]]
    assert ("crm_update", "do", "failed") in steps and ("undo_notify", "undo", "succeeded") in steps
    assert ("undo_ticket", "undo", "succeeded") in steps and all(s[0] != "email_3" for s in steps)


async def test_bad_workflows_get_clear_errors(stack: Stack) -> None:
    async with stack.http.post(f"{stack.server.url}/api/workflows", data="{not json",
                               headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400 and "not valid JSON" in (await r.json())["error"]
    cases = {
        "steps.0": {"trigger": {"type": "manual"}, "steps": [{"type": "teleport"}]},
        "trigger.schedule.cron": {"trigger": {"type": "schedule", "cron": "61 * * * *"},
                                  "steps": [{"type": "summarize"}]},
        "trigger.schedule.timezone": {"trigger": {"type": "schedule", "cron": "0 9 * * *", "timezone": "Mars/Base"},
                                      "steps": [{"type": "summarize"}]},
        "steps.0.email.body": {"trigger": {"type": "manual"}, "steps": [
            {"type": "email", "to": "a@example.com", "subject": "s", "body": "{{ call.__class__.__mro__ }}"}]},
        "steps.0.condition.if": {"trigger": {"type": "manual"}, "steps": [{"type": "condition", "if": "1 +"}]},
    }
    for field, body in cases.items():
        answer = await stack.api("POST", "/api/workflows", {"name": "bad", **body}, 422)
        assert field in [f["field"] for f in answer["fields"]], (field, answer)
    # What a run would refuse is refused when saved (it was accepted, or a 500), naming the field.
    manual, http = {"type": "manual"}, "steps.0.http.url"
    refused: list[tuple[str, dict[str, Any]]] = [
        ("steps.0.email.body", {"trigger": manual, "steps": [
            {"type": "email", "to": "a@example.com", "subject": "s", "body": "{{ ''|attr('__class__') }}"}]}),
        *[("steps.0.condition.if", {"trigger": manual, "steps": [{"type": "condition", "if": expression}]})
          for expression in ("call.__class__", "__import__('os')", "'x'.ljust(10**9).count('y') == 0")],
        ("steps.0.webhook.secret_env", {"trigger": manual, "steps": [
            {"type": "webhook", "url": f"{stack.target.url}/x", "secret_env": "OPENAI_API_KEY"}]}),
        ("steps.0.http.secret_env", {"trigger": manual, "steps": [
            {"type": "http", "url": f"{stack.target.url}/x", "secret_env": "OPENAI_API_KEY"}]}),
        (http, {"trigger": manual, "steps": [{"type": "http", "url": "file:///etc/passwd"}]}),
        (http, {"trigger": manual, "steps": [{"type": "http", "url": "gopher://127.0.0.1:25/x"}]}),
        ("trigger.schedule.cron", {"trigger": {"type": "schedule", "cron": "0 0 31 2 *"},
                                   "steps": [{"type": "summarize"}]}),
        *[("trigger.schedule.timezone", {"trigger": {"type": "schedule", "cron": "0 9 * * *", "timezone": zone},
                                         "steps": [{"type": "summarize"}]})
          for zone in ("Europe", "__pycache__", "x" * 256)]]
    for field, body in refused:
        answer = await stack.api("POST", "/api/workflows", {"name": "bad", **body}, 422)
        assert field in [f["field"] for f in answer["fields"]], (field, answer)
    for zone in ("Europe", "__pycache__", "x" * 256):  # a persona's time zone: the same check (was a 500)
        answer = await stack.api("POST", "/api/personas", {"name": f"tz-{uuid.uuid4().hex[:6]}", "system_prompt": "x",
                                                           "timezone": zone}, 422)
        assert "timezone" in str(answer["fields"])
    # A template that gets past the check reaches the sandbox, which refuses it: the run fails, nothing leaks.
    workflow = await stack.workflow({"trigger": {"type": "manual"}, "steps": [
        {"type": "email", "to": "a@example.com", "subject": "s",
         "body": "{% set n = '__cla' ~ 'ss__' %}{{ run[n] }}"}]})
    await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {}, 202)
    (run,) = await stack.finished_run(workflow["id"])
    assert run["status"] == "failed" and "sandbox" in run["error"] and run["steps"][0]["attempts"] == 1
    await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {"call_id": "no-such-call"}, 422)
    answer = await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {"inputs": {"x": 1}}, 422)
    assert answer["fields"][0]["field"] == "inputs"  # a misspelt field is refused, not ignored

    # A condition's own error (an index out of range, an overflow) fails the run at once, saying which.
    for expression, error in (("[1][3] == 1", "IndexError"), ("10.0 ** 400 > 1", "OverflowError")):
        workflow = await stack.workflow({"trigger": manual, "steps": [{"type": "condition", "if": expression}]})
        await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {}, 202)
        (run,) = await stack.finished_run(workflow["id"])
        assert run["status"] == "failed" and run["steps"][0]["attempts"] == 1, run
        assert f"condition {expression!r} failed: {error}" in run["error"]
    # A host the workflow names itself is shown as written in a refusal (was [IP_ADDRESS]).
    workflow = await stack.workflow({"trigger": manual, "steps": [{"type": "http", "url": "http://10.9.8.7/crm"}]})
    await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {}, 202)
    (run,) = await stack.finished_run(workflow["id"])
    assert run["status"] == "failed" and "'10.9.8.7' is not on the tool host allow-list" in run["error"], run


async def test_dead_llm_and_smtp_down_fail_then_retry_succeeds(stack: Stack, script: Script) -> None:
    # Earlier tests stored calls; run a summary by hand on one of them with the LLM failing.
    call_id = (await stack.api("GET", "/api/calls?state=ended&limit=1", status=200))["calls"][0]["id"]
    workflow = await stack.workflow({"trigger": {"type": "manual"}, "steps": [
        {"type": "summarize", "retries": 1, "backoff_s": 0.1},
        {"type": "email", "to": "ops@example.com", "subject": "Retried {{call.id}}", "body": "{{summary}}",
         "retries": 6, "backoff_s": 0.3}]})
    script.failure = "http_500"
    await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {"call_id": call_id}, 202)
    (run,) = await stack.finished_run(workflow["id"])
    assert run["status"] == "failed" and "LLM" in run["error"]
    assert [(s["type"], s["status"], s["attempts"]) for s in run["steps"]] == [("summarize", "failed", 2)]

    # The LLM is back, the SMTP server is down for the first tries: the retry delivers, once.
    script.failure, script.reply = "none", SUMMARY
    await stack.mailbox.stop()
    retried = await stack.api("POST", f"/api/workflows/{workflow['id']}/runs/{run['id']}/retry", None, 202)
    assert retried["execution"] == 2
    for _ in range(100):
        steps = (await stack.api("GET", f"/api/workflows/{workflow['id']}/runs", status=200))["runs"][0]["steps"]
        if any(s["type"] == "email" and s["execution"] == 2 and s["attempts"] >= 2 for s in steps):
            break
        await asyncio.sleep(0.1)
    await stack.mailbox.start()
    (run,) = await stack.finished_run(workflow["id"])
    assert run["status"] == "succeeded" and run["execution"] == 2
    email = next(s for s in run["steps"] if s["type"] == "email")
    assert email["attempts"] >= 2 and email["status"] == "succeeded"
    assert [m["Subject"] for m in stack.mailbox.messages].count(f"Retried {call_id}") == 1
    await stack.api("POST", f"/api/workflows/{workflow['id']}/runs/{run['id']}/retry", None, 409)


async def test_a_cron_schedule_fires_in_its_time_zone(stack: Stack) -> None:
    workflow = await stack.workflow({"trigger": {"type": "schedule", "cron": "30 9 * * *",
                                                 "timezone": "Pacific/Honolulu"},
                                     "steps": [{"type": "webhook", "url": f"{stack.target.url}/daily"}]})
    fire_at = datetime.fromisoformat(workflow["next_fire_at"])
    assert (fire_at.hour, fire_at.minute) == (19, 30)  # 09:30 in Honolulu (UTC-10) is 19:30 UTC
    assert timedelta(0) < fire_at - datetime.now(UTC) <= timedelta(days=1)
    pool = stack.server.app[SERVICES].storage.db.pool
    assert await fire_due_schedules(pool, fire_at - timedelta(seconds=1)) == []  # not yet
    made = await fire_due_schedules(pool, fire_at + timedelta(seconds=1))  # the controllable clock
    assert len(made) == 1
    assert await fire_due_schedules(pool, fire_at + timedelta(seconds=2)) == []  # fires once
    (run,) = await stack.finished_run(workflow["id"])
    assert run["trigger"] == "schedule" and run["status"] == "succeeded"
    assert run["input"] == {"fired_at": fire_at.isoformat()}
    assert stack.target.sent("daily")[0]["body"]["run"]["trigger"] == "schedule"
    after = await stack.api("GET", f"/api/workflows/{workflow['id']}", status=200)
    assert datetime.fromisoformat(after["next_fire_at"]) == fire_at + timedelta(days=1)


async def test_workflows_crud_is_audited(stack: Stack) -> None:
    workflow = await stack.workflow({"trigger": {"type": "manual"}, "steps": [{"type": "summarize"}]})
    changed = await stack.api("PUT", f"/api/workflows/{workflow['id']}", {
        "name": workflow["name"], "enabled": False, "trigger": {"type": "manual"},
        "steps": [{"type": "condition", "if": "input.n > 1"}]}, 200)
    assert changed["steps"][0]["if"] == "input.n > 1" and changed["enabled"] is False
    listed = (await stack.api("GET", "/api/workflows?limit=200", status=200))["workflows"]
    assert workflow["id"] in [w["id"] for w in listed]
    await stack.api("POST", "/api/workflows", {"name": workflow["name"], "trigger": {"type": "manual"},
                                               "steps": [{"type": "summarize"}]}, 409)
    await stack.api("DELETE", f"/api/workflows/{workflow['id']}", None, 204)
    await stack.api("GET", f"/api/workflows/{workflow['id']}", None, 404)
    audit = (await stack.api("GET", "/api/audit?action=workflow", status=200))["entries"]
    mine = [e["action"] for e in audit if e["target"] == workflow["id"]]
    assert {"workflow.create", "workflow.update", "workflow.delete"} <= set(mine)
    # The README's complete example is a workflow the API takes as written.
    readme = await asyncio.to_thread(README.read_text)
    example = json.loads(re.search(r"<<'JSON'\n(.*?)\nJSON", readme, re.S).group(1))  # type: ignore[union-attr]
    saved = await stack.api("POST", "/api/workflows", example, 201)
    assert [s["type"] for s in saved["steps"]] == ["summarize", "condition", "http", "email", "webhook"]
    await stack.api("DELETE", f"/api/workflows/{saved['id']}", None, 204)


async def test_console_lists_runs_and_an_operator_retries_a_failed_one(stack: Stack) -> None:
    name, password = f"op-{uuid.uuid4().hex[:6]}", "correct horse battery"
    await stack.api("POST", "/api/users", {"name": name, "role": "operator", "password": password}, 201)
    stack.target.plans["console-crm"] = [400]
    workflow = await stack.workflow({"trigger": {"type": "manual"}, "steps": [
        {"type": "http", "name": "crm", "url": f"{stack.target.url}/console-crm"}]})
    await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {}, 202)
    (run,) = await stack.finished_run(workflow["id"])
    assert run["status"] == "failed"
    async with async_playwright() as p:
        ctx = await p.chromium.launch_persistent_context(
            tempfile.mkdtemp(prefix="pono-runs-"), executable_path=CHROMIUM, headless=True,
            args=chromium_args("/dev/null"), viewport={"width": 1280, "height": 900})
        try:
            page = await ctx.new_page()
            await page.goto(f"{stack.server.url}/console")
            await page.fill("#login-name", name)
            await page.fill("#login-password", password)
            await page.click("#login button[type=submit]")
            await page.click("#tab-workflows")
            row = page.locator(f"#runs tbody tr[data-run-id='{run['id']}']")
            await row.wait_for(timeout=15000)
            text = await row.text_content() or ""
            assert workflow["name"] in text and "failed" in text and "crm: failed" in text
            await row.locator("button", has_text="Retry").click()
            await stack.finished_run(workflow["id"])  # the retry was queued, and ran
            for _ in range(50):
                await page.click("#runs-filter button[type=submit]")
                if "succeeded" in (await row.text_content() or ""):
                    break
                await asyncio.sleep(0.2)
            assert "crm: succeeded" in (await row.text_content() or "")
            assert await row.locator("button", has_text="Retry").count() == 0
        finally:
            await ctx.close()
    (run,) = (await stack.api("GET", f"/api/workflows/{workflow['id']}/runs", status=200))["runs"]
    assert run["status"] == "succeeded" and run["execution"] == 2
    audit = (await stack.api("GET", "/api/audit?action=workflow.run.retry", status=200))["entries"]
    assert any(e["actor"] == name and e["target"] == run["id"] for e in audit)


async def test_built_in_schedules_report_and_metrics(stack: Stack) -> None:
    services = stack.server.app[SERVICES]
    pool = services.storage.db.pool
    scheduled = {r["entrypoint"]: r["expression"] for r in await pool.fetch(
        "SELECT entrypoint, expression FROM pgqueuer_schedules")}
    assert scheduled["pono.purge"] == "17 3 * * *" and scheduled["pono.report"] == "5 0 * * *"
    assert scheduled["workflow.schedules"] == "* * * * *"
    report = await daily_report(pool, datetime.now(UTC).date())  # what the nightly job stores for a day
    assert report["calls"] >= 2 and report["minutes"] > 0 and report["failed_workflow_runs"] >= 1
    assert isinstance(report["barge_ins"], int)
    stored = await pool.fetchval("SELECT body FROM reports WHERE kind = 'nightly' AND period = $1",
                                 datetime.now(UTC).date())
    assert json.loads(stored) == report
    async with stack.http.get(f"{stack.server.url}/metrics") as r:
        page = await r.text()
    assert 'pono_jobs_total{kind="workflow.run",status="succeeded"}' in page
    assert 'pono_jobs_total{kind="workflow.run",status="failed"}' in page
    assert 'pono_jobs_total{kind="workflow.call_ended",status="succeeded"}' in page
    assert "pono_jobs_queue_depth" in page and "pono_jobs_oldest_queued_seconds" in page
    assert 'pono_job_duration_seconds_count{kind="workflow.run"}' in page


async def test_later_steps_get_raw_values_and_only_history_is_redacted(stack: Stack,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A CRM answers with a value DLP would redact: later steps and the compensation send it as it is, history
    shows it redacted, and a worker picking the run up again would read it raw (runner-only column). A manual
    run's input is stored and shown redacted, and used as given. Redaction runs off the event loop."""
    threads: list[bool] = []
    original = runner_module.redact_value

    def spy(*args: Any) -> Any:
        threads.append(threading.current_thread() is threading.main_thread())
        return original(*args)

    monkeypatch.setattr(runner_module, "redact_value", spy)
    target, url = stack.target, stack.target.url
    target.replies["card-ticket"] = {"id": CARD, "note": "x" * 60_000}
    target.plans["card-broken"] = [400]
    target.hold_first, target.held, target.release = True, asyncio.Event(), asyncio.Event()
    workflow = await stack.workflow({"trigger": {"type": "manual"}, "steps": [
        {"type": "http", "name": "ticket", "url": f"{url}/card-ticket", "map": {"ticket_id": "id"},
         "compensate": {"type": "http", "url": f"{url}/card-undo", "body": {"ticket": "{{ticket_id}}"}}},
        {"type": "webhook", "name": "hold", "url": f"{url}/once/card-hold", "payload": {}},
        {"type": "webhook", "name": "notify", "url": f"{url}/card-notify",
         "payload": {"ticket": "{{ticket_id}}", "card": "{{input.card}}"}},
        {"type": "http", "name": "broken", "url": f"{url}/card-broken"}]})
    try:
        started = await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {"input": {"card": CARD}}, 202)
        assert started["input"] == {"card": "[CREDIT_CARD]"}
        await asyncio.wait_for(target.held.wait(), 30)
        pool = stack.server.app[SERVICES].storage.db.pool
        done = await completed_steps(pool, started["id"], 1)  # what a worker resuming the run would read
        assert done[0]["output"]["mapped"] == {"ticket_id": CARD}
        (running,) = (await stack.api("GET", f"/api/workflows/{workflow['id']}/runs", status=200))["runs"]
        assert running["steps"][0]["output"]["mapped"] == {"ticket_id": "[CREDIT_CARD]"}
    finally:
        target.hold_first = False
        target.release.set()
    (run,) = await stack.finished_run(workflow["id"])
    assert run["status"] == "failed" and "card-broken answered 400" in run["error"]
    assert target.sent("card-notify")[0]["body"] == {"ticket": CARD, "card": CARD}
    assert target.sent("card-undo")[0]["body"] == {"ticket": CARD}  # the compensation hits the right ticket
    assert "4111" not in json.dumps(run) and run["input"] == {"card": "[CREDIT_CARD]"}
    assert await pool.fetchval("SELECT count(*) FROM workflow_step_runs WHERE run_id = $1 AND raw_output IS NOT"
                               " NULL", uuid.UUID(run["id"])) == 0  # dropped once the run ended
    assert threads and not any(threads)  # the 60 KB answer was redacted in a thread


async def test_heavy_templates_stop_at_a_limit_while_the_server_answers(stack: Stack) -> None:
    """A template that would render for a minute is stopped at PONO_JOBS_EVAL_TIMEOUT_S in its helper process,
    while the server keeps answering; one over a range cap fails at once. Neither succeeds."""
    loops = "{% for i in range(10000) %}{% for j in range(10000) %}{% endfor %}{% endfor %}"
    workflow = await stack.workflow({"trigger": {"type": "manual"}, "steps": [
        {"type": "email", "to": "ops@example.com", "subject": "s", "body": loops, "retries": 0}]})
    await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {}, 202)
    for _ in range(100):  # while it renders
        runs = (await stack.api("GET", f"/api/workflows/{workflow['id']}/runs", status=200))["runs"]
        if runs[0]["steps"] and runs[0]["status"] == "running":
            break
        await asyncio.sleep(0.05)
    async with stack.http.get(f"{stack.server.url}/api/health") as r:
        assert r.status == 200
    (run,) = await stack.finished_run(workflow["id"])
    assert run["status"] == "failed" and "stopped after 1.5 s" in run["error"], run
    workflow = await stack.workflow({"trigger": {"type": "manual"}, "steps": [
        {"type": "email", "to": "ops@example.com", "subject": "s",
         "body": "{% for i in range(100000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}"}]})
    await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {}, 202)
    (run,) = await stack.finished_run(workflow["id"])
    assert run["status"] == "failed" and "range() of 100000 items" in run["error"], run


async def test_summaries_give_the_llm_up_to_live_calls(stack: Stack, scripted_llm: ScriptedLLM,
                                                       script: Script) -> None:
    """With a one-slot LLM, a summary being written is dropped when a call starts, waits while the call is live
    (the call's turns get the LLM at once), and is written once the call ends."""
    call_id = (await stack.api("GET", "/api/calls?state=ended&limit=1", status=200))["calls"][0]["id"]
    workflow = await stack.workflow({"trigger": {"type": "manual"}, "steps": [{"type": "summarize"}]})

    def summaries() -> int:
        return sum(SUMMARY_PROMPT[:40] in str(r.get("messages")) for r in script.requests)

    script.reply, script.token_interval_s = SUMMARY, 0.5  # a slow summary: about 10 s
    before, dropped = summaries(), scripted_llm.chats_dropped
    try:
        await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {"call_id": call_id}, 202)
        for _ in range(200):
            if summaries() > before and scripted_llm.chats_open:
                break
            await asyncio.sleep(0.05)
        async with text_call(stack.server.url) as caller:
            for _ in range(200):  # the call started: the summary's request is dropped
                if scripted_llm.chats_dropped > dropped:
                    break
                await asyncio.sleep(0.05)
            assert scripted_llm.chats_dropped > dropped
            script.token_interval_s = 0.01
            script.responses = [{"text": "Hello there."}]
            caller.send_text("hello")
            await caller.wait_for(lambda e: e["type"] == "agent.final", 10)
            assert summaries() == before + 1  # not asked again while the call is live
    finally:
        script.token_interval_s = 0.01
    (run,) = await stack.finished_run(workflow["id"])
    assert run["status"] == "succeeded" and summaries() == before + 2
    assert run["steps"][0]["output"]["disposition"] == "resolved"


async def test_summary_without_json_is_the_plain_answer(stack: Stack, script: Script) -> None:
    """A small model that answers in prose (the bundled SmolLM2) still gives a summary, and the README's subject
    renders a disposition, not "None"."""
    call_id = (await stack.api("GET", "/api/calls?state=ended&limit=1", status=200))["calls"][0]["id"]
    workflow = await stack.workflow({"trigger": {"type": "manual"}, "steps": [
        {"type": "summarize"},
        {"type": "email", "to": "ops@example.com", "subject": "Call {{call.id}}: {{disposition}}",
         "body": "{{summary}}"}]})
    script.reply = "Summary: The caller asked when the order ships; the agent said Monday."
    await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {"call_id": call_id}, 202)
    (run,) = await stack.finished_run(workflow["id"])
    assert run["status"] == "succeeded", run
    mails = {m["Subject"]: m.get_content().strip() for m in stack.mailbox.messages}
    assert mails.get(f"Call {call_id}: unknown") == "The caller asked when the order ships; the agent said Monday."


async def test_cancel_runs_compensations_and_deleting_a_workflow_cancels_its_runs(stack: Stack) -> None:
    target, url = stack.target, stack.target.url
    target.hold_first, target.held, target.release = True, asyncio.Event(), asyncio.Event()
    workflow = await stack.workflow({"trigger": {"type": "manual"}, "steps": [
        {"type": "http", "name": "ticket", "url": f"{url}/c-ticket", "map": {"ticket_id": "id"},
         "compensate": {"type": "http", "url": f"{url}/c-undo", "body": {"ticket": "{{ticket_id}}"}}},
        {"type": "webhook", "name": "hold", "url": f"{url}/once/c-hold", "timeout_s": 120}]})

    async def cancelled(run_id: str) -> dict[str, Any]:
        for _ in range(300):
            found = (await stack.api("GET", "/api/workflow-runs?status=cancelled&limit=200", status=200))["runs"]
            if any(r["id"] == run_id for r in found):
                return next(r for r in found if r["id"] == run_id)
            await asyncio.sleep(0.1)
        raise AssertionError(f"run {run_id} was not cancelled")

    try:
        run = await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {}, 202)
        await asyncio.wait_for(target.held.wait(), 30)
        asked = await stack.api("POST", f"/api/workflow-runs/{run['id']}/cancel", None, 202)
        assert asked["cancel_reason"].startswith("cancelled by")
        done = await cancelled(run["id"])
        assert done["error"].startswith("cancelled by")
        assert target.sent("c-undo")[0]["body"] == {"ticket": done["steps"][0]["output"]["mapped"]["ticket_id"]}
        assert ("hold", "cancelled") in [(s["name"], s["status"]) for s in done["steps"]]
        await stack.api("POST", f"/api/workflow-runs/{run['id']}/cancel", None, 409)
        audit = (await stack.api("GET", "/api/audit?action=workflow.run.cancel", status=200))["entries"]
        assert any(e["target"] == run["id"] for e in audit)

        # A cancelled run may be retried; deleting its workflow while it runs cancels it, and no retry follows.
        target.held = asyncio.Event()
        await stack.api("POST", f"/api/workflows/{workflow['id']}/runs/{run['id']}/retry", None, 202)
        await asyncio.wait_for(target.held.wait(), 30)
        await stack.api("DELETE", f"/api/workflows/{workflow['id']}", None, 204)
        done = await cancelled(run["id"])
        assert done["execution"] == 2 and done["error"] == "its workflow was deleted"
        assert len(target.sent("c-undo")) == 2
        answer = await stack.api("POST", f"/api/workflows/{workflow['id']}/runs/{run['id']}/retry", None, 409)
        assert "deleted workflow" in answer["error"]
    finally:
        target.hold_first = False
        target.release.set()


async def test_a_step_waits_at_most_its_backoff_budget(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each wait before a retry is capped, and all of a step's waits together: then the step fails for good
    (10 retries of backoff 300 s would have held a worker for 85 h). The caps are shrunk here to keep it short."""
    monkeypatch.setattr(runner_module, "MAX_WAIT_S", 0.1)
    monkeypatch.setattr(runner_module, "MAX_BACKOFF_S", 0.25)
    stack.target.plans["always-503"] = [503] * 20
    workflow = await stack.workflow({"trigger": {"type": "manual"}, "steps": [
        {"type": "webhook", "url": f"{stack.target.url}/always-503", "retries": 10, "backoff_s": 0.05}]})
    await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {}, 202)
    (run,) = await stack.finished_run(workflow["id"])
    assert run["status"] == "failed" and "no more tries" in run["error"]
    assert run["steps"][0]["attempts"] == 4  # waits 0.05, 0.1, 0.1; a fourth 0.1 would pass 0.25


async def test_http_steps_authenticate_and_urls_in_errors_lose_their_query(stack: Stack) -> None:
    url = stack.target.url
    stack.target.plans["crm-denied"] = [401]
    workflow = await stack.workflow({"trigger": {"type": "manual"}, "steps": [
        {"type": "http", "name": "crm", "url": f"{url}/crm-auth?view=full", "headers": {"X-Run": "{{run.id}}"},
         "secret_env": "PONO_HTTP_SECRET_CRM"},
        {"type": "http", "name": "other", "url": f"{url}/crm-denied?api_key=leaked", "secret_env":
         "PONO_HTTP_SECRET_CRM", "secret_header": "X-Api-Key"}]})
    await stack.api("POST", f"/api/workflows/{workflow['id']}/runs", {}, 202)
    (run,) = await stack.finished_run(workflow["id"])
    (sent,) = stack.target.sent("crm-auth")
    assert sent["headers"]["Authorization"] == f"Bearer {CRM_TOKEN}" and sent["headers"]["X-Run"] == run["id"]
    assert stack.target.sent("crm-denied")[0]["headers"]["X-Api-Key"] == CRM_TOKEN
    assert run["status"] == "failed" and f"{url}/crm-denied answered 401" in run["error"]
    assert "leaked" not in json.dumps(run) and CRM_TOKEN not in json.dumps(run)


async def test_history_is_purged_by_age_and_a_call_shows_where_its_other_runs_are(stack: Stack) -> None:
    services = stack.server.app[SERVICES]
    pool = services.storage.db.pool
    workflow = await stack.workflow({"trigger": {"type": "manual"}, "steps": [{"type": "summarize"}]})
    call_id = (await stack.api("GET", "/api/calls?state=ended&limit=1", status=200))["calls"][0]["id"]
    await pool.execute(
        "INSERT INTO workflow_runs (workflow_id, call_id, trigger, idempotency_key, definition, status, created_at)"
        " SELECT $1, $2, 'manual', 'bulk-' || g || $3, '{}', 'succeeded', now() - g * interval '1 s'"
        " FROM generate_series(1, 51) g", uuid.UUID(workflow["id"]), call_id, uuid.uuid4().hex)
    call = await stack.api("GET", f"/api/calls/{call_id}", status=200)
    total = await pool.fetchval("SELECT count(*) FROM workflow_runs WHERE call_id = $1", call_id)
    assert len(call["workflow_runs"]) == 50 and call["workflow_runs_next"].startswith("/api/workflow-runs?")
    rest = await stack.api("GET", call["workflow_runs_next"], status=200)
    assert len(rest["runs"]) == total - 50 and all(r["call_id"] == call_id for r in rest["runs"])
    assert not {r["id"] for r in rest["runs"]} & {r["id"] for r in call["workflow_runs"]}

    # A live workflow's old runs without a call, and pgqueuer's old log rows, go with the purge job.
    days = services.settings.retention_days
    old = await pool.fetchval(
        "INSERT INTO workflow_runs (workflow_id, trigger, idempotency_key, definition, status, created_at)"
        " VALUES ($1, 'schedule', $2, '{}', 'succeeded', now() - make_interval(days => $3 + 1)) RETURNING id",
        uuid.UUID(workflow["id"]), f"old-{uuid.uuid4()}", days)
    await pool.execute("INSERT INTO pgqueuer_log (created, job_id, status, priority, entrypoint)"
                       " VALUES (now() - interval '2 days', 0, 'successful', 0, 'old.job')")
    worker = JobWorker(pool, services.storage.db.dsn, services.settings, services.metrics, None)
    await worker._purge()
    assert await pool.fetchval("SELECT count(*) FROM workflow_runs WHERE id = $1", old) == 0
    assert await pool.fetchval("SELECT count(*) FROM workflow_runs WHERE call_id = $1", call_id) == total
    assert await pool.fetchval("SELECT count(*) FROM pgqueuer_log WHERE entrypoint = 'old.job'") == 0


async def test_postgres_down_when_a_call_ends_loses_no_trigger(stack: Stack, script: Script) -> None:
    persona = await stack.persona()
    workflow = await stack.workflow({"trigger": {"type": "call.ended", "persona": persona},
                                     "steps": [{"type": "webhook", "url": f"{stack.target.url}/after-outage"}]})
    script.reply = "Noted."
    async with text_call(stack.server.url, persona) as caller:
        caller.send_text("please call me back tomorrow")
        await caller.wait_for(lambda e: e["type"] == "agent.final", 10)
        await stack.pg.astop()
    writer = stack.server.app[SERVICES].storage.writer
    for _ in range(100):  # the call's end (and its trigger) reach the journal
        if not writer.db_up and writer.journal.has_pending():
            break
        await asyncio.sleep(0.1)
    assert not writer.db_up and writer.journal.has_pending()
    assert stack.target.sent("after-outage") == []
    await stack.pg.astart()
    (run,) = await stack.finished_run(workflow["id"], tries=600)
    assert run["status"] == "succeeded" and run["call_id"] == caller.call_id
    (delivered,) = stack.target.sent("after-outage")
    assert delivered["body"]["call"]["id"] == caller.call_id
    assert "please call me back tomorrow" in delivered["body"]["call"]["transcript"]
