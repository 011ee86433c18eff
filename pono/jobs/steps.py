"""What each workflow step does: summarize (the LLM), email (SMTP), webhook (signed), http (JSON), condition.

Each step is `async (step: dict, env: StepEnv) -> output` (JSON). A step raises `Permanent` for a failure that
a retry would repeat (a 4xx, a refused host, a bad template, no SMTP configured); anything else it raises is
retried by the runner, with backoff, within the step's retries. Every request carries the step's idempotency
key (`Idempotency-Key`; an e-mail's Message-ID), the same each time the step is tried again, so a receiver
that keeps keys does the work once however often a crashed worker's job is picked up again.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aiosmtplib
import asyncpg
from simpleeval import EvalWithCompoundTypes, InvalidExpression

from pono.agent.llm import LLMClient, LLMError
from pono.agent.tools.netguard import AddressRefused, GuardedResolver, HostPolicy, refusal_in
from pono.agent.tools.webhook import check_secret_env, read_capped, sign
from pono.jobs.templates import TemplateFailed, render, render_json
from pono.settings import Settings
from pono.storage.workflow_runs import save_summary


class Permanent(Exception):
    """A step failure that trying again would only repeat: not retried."""


@dataclass
class StepEnv:
    """What a step may use: the run's `context` (templates read it), the step's `idempotency_key`, and the
    worker's services. `redact(text)` applies the call's DLP policy."""

    context: dict[str, Any]
    idempotency_key: str
    run_id: str
    call_id: str | None
    settings: Settings
    pool: asyncpg.Pool
    llm: LLMClient | None
    redact: Callable[[str], str]


SUMMARY_PROMPT = (
    "You summarise a phone call between a caller and a voice agent for the business that runs the agent. "
    "Personal data in the transcript is already replaced by placeholders such as [CREDIT_CARD]; keep them as they "
    "are. Answer with one JSON object and nothing else: {\"summary\": \"two or three sentences\", "
    "\"action_items\": [\"short imperative items\"], \"disposition\": \"one word or two: resolved, follow_up, "
    "escalated, no_answer...\"}.")


def _json_object(text: str) -> dict[str, Any] | None:
    """The first JSON object in an LLM's answer (it may wrap it in prose or a code fence)."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return None
    try:
        value = json.loads(text[start:end + 1])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def summarize(step: dict[str, Any], env: StepEnv) -> dict[str, Any]:
    """The LLM's summary of the (already redacted) transcript, redacted again, kept on the call."""
    if env.llm is None:
        raise Permanent("no LLM is configured for this worker (set OPENAI_BASE_URL)")
    call = env.context.get("call") or {}
    transcript = call.get("transcript") or "(no transcript: the run has no call)"
    instructions = step.get("instructions") or ""
    messages = [{"role": "system", "content": f"{SUMMARY_PROMPT} {instructions}".strip()},
                {"role": "user", "content": transcript}]
    try:
        async with env.llm.stream(messages, max_tokens=500, temperature=0.2) as stream:
            text = "".join([part async for part in stream if isinstance(part, str)])
    except LLMError as exc:
        raise RuntimeError(f"the LLM could not summarise: {exc}") from None
    parsed = _json_object(text) or {"summary": text.strip()}
    items = parsed.get("action_items")
    out = {"summary": env.redact(str(parsed.get("summary") or "").strip()),
           "action_items": [env.redact(str(i)) for i in items] if isinstance(items, list) else [],
           "disposition": env.redact(str(parsed["disposition"])) if parsed.get("disposition") else None}
    if env.call_id is not None:
        await save_summary(env.pool, env.call_id, env.run_id, out["summary"], out["action_items"],
                           out["disposition"])
    return out


async def email(step: dict[str, Any], env: StepEnv) -> dict[str, Any]:
    """An e-mail through PONO_SMTP_HOST: `to`, `subject` and `body` are templates over the context."""
    s = env.settings
    if not s.smtp_host:
        raise Permanent("e-mail is not configured: set PONO_SMTP_HOST (and PONO_SMTP_PORT, PONO_SMTP_FROM)")
    recipients = [render(t, env.context).strip() for t in ([step["to"]] if isinstance(step["to"], str)
                                                           else step["to"])]
    recipients = [r for r in recipients if r]
    if not recipients:
        raise Permanent("the e-mail has no recipient")
    message = EmailMessage()
    message["From"], message["To"] = s.smtp_from, ", ".join(recipients)
    message["Subject"] = " ".join(render(step["subject"], env.context).split())
    message["Message-ID"] = f"<{env.idempotency_key.replace(':', '.')}@pono>"  # the same on every try
    message.set_content(render(step["body"], env.context))
    try:
        await aiosmtplib.send(message, hostname=s.smtp_host, port=s.smtp_port, username=s.smtp_user,
                              password=s.smtp_password.get_secret_value() if s.smtp_password else None,
                              start_tls=s.smtp_starttls, timeout=s.smtp_timeout_s)
    except aiosmtplib.SMTPResponseException as exc:
        if 500 <= exc.code < 600:
            raise Permanent(f"the SMTP server refused the e-mail: {exc.code} {exc.message}") from None
        raise RuntimeError(f"the SMTP server answered {exc.code} {exc.message}") from None
    except aiosmtplib.SMTPException as exc:
        raise RuntimeError(f"SMTP failed: {type(exc).__name__}: {exc}") from None
    return {"to": recipients, "subject": message["Subject"], "message_id": message["Message-ID"]}


async def _request(method: str, url: str, body: bytes | None, headers: dict[str, str], env: StepEnv) -> Any:
    """One request to an allow-listed host (PONO_WEBHOOK_ALLOWED_HOSTS), no redirects, answer capped: its JSON
    (or {"text"}). 5xx, 429 and no answer raise RuntimeError (retried); a refusal, 3xx or 4xx, Permanent."""
    policy = HostPolicy(env.settings.webhook_allowed_hosts)
    try:
        policy.check_host(urlsplit(url).hostname or "")
    except AddressRefused as exc:
        raise Permanent(str(exc)) from None
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy), use_dns_cache=False)
    headers = {"Idempotency-Key": env.idempotency_key, **headers}
    if body is not None:
        headers.setdefault("Content-Type", "application/json")
    try:
        async with aiohttp.ClientSession(connector=connector) as http, \
                http.request(method, url, data=body, headers=headers, allow_redirects=False) as r:
            if 300 <= r.status < 400:
                raise Permanent(f"{url} answered {r.status} (a redirect, which is not followed)")
            if r.status == 429 or r.status >= 500:
                raise RuntimeError(f"{url} answered {r.status}")
            if r.status >= 400:
                detail = (await r.content.read(200)).decode(errors="replace")
                raise Permanent(f"{url} answered {r.status}: {detail}")
            text = (await read_capped(r, env.settings.webhook_max_response_bytes)).decode(errors="replace")
    except aiohttp.ClientError as exc:
        refused = refusal_in(exc)
        if refused is not None:
            raise Permanent(str(refused)) from None
        raise RuntimeError(f"{url} unreachable: {type(exc).__name__}") from None
    except ValueError as exc:  # an answer over the cap
        raise Permanent(str(exc)) from None
    try:
        return json.loads(text) if text.strip() else {}
    except ValueError:
        return {"text": text[:2000]}


async def webhook(step: dict[str, Any], env: StepEnv) -> dict[str, Any]:
    """POST the context (or the step's `payload`, rendered) signed as webhook tools are: X-Pono-Timestamp and
    X-Pono-Signature (HMAC-SHA256 of "<timestamp>.<body>" with the `secret_env` variable)."""
    secret_env = step.get("secret_env", "PONO_WEBHOOK_SECRET")
    try:
        secret = os.environ.get(check_secret_env(secret_env))
    except ValueError as exc:
        raise Permanent(str(exc)) from None
    if not secret:
        raise Permanent(f"the webhook secret {secret_env} is not set")
    payload = render_json(step["payload"], env.context) if step.get("payload") is not None else {
        "event": "workflow.step", **env.context}
    body = json.dumps(payload, default=str).encode()
    timestamp = str(int(time.time()))
    answer = await _request("POST", step["url"], body, {"X-Pono-Timestamp": timestamp,
                                                        "X-Pono-Signature": sign(secret.encode(), timestamp, body)},
                            env)
    return {"response": answer}


def _dig(value: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(value, dict):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


async def http(step: dict[str, Any], env: StepEnv) -> dict[str, Any]:
    """A JSON request (`method`, `url` and `body` rendered); `map` {name: "dotted.path"} puts response fields
    into the context under `name`."""
    url = render(step["url"], env.context)
    if not re.match(r"^https?://", url):
        raise Permanent(f"not an http(s) URL: {url[:200]!r}")
    body = None if step.get("body") is None else json.dumps(render_json(step["body"], env.context)).encode()
    answer = await _request(step.get("method", "POST"), url, body, {"Accept": "application/json"}, env)
    mapped = {name: _dig(answer, path) for name, path in (step.get("map") or {}).items()}
    return {"response": answer, "mapped": mapped}


async def condition(step: dict[str, Any], env: StepEnv) -> dict[str, Any]:
    """{"result": bool}: whether the expression holds over the context (simpleeval; no eval, no dunders)."""
    try:
        result = EvalWithCompoundTypes(names=env.context).eval(step["if"])
    except (InvalidExpression, SyntaxError, TypeError, ValueError, KeyError, ZeroDivisionError) as exc:
        raise Permanent(f"condition {step['if']!r} failed: {exc}") from None
    return {"result": bool(result)}


STEPS: dict[str, Callable[[dict[str, Any], StepEnv], Awaitable[dict[str, Any]]]] = {
    "summarize": summarize, "email": email, "webhook": webhook, "http": http, "condition": condition}
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (Permanent, TemplateFailed)
