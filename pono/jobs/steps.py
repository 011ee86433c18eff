"""What each workflow step does: summarize (the LLM), email (SMTP), webhook (signed), http (JSON), condition.

Each step is `async (step: dict, env: StepEnv) -> output` (JSON). A step raises `Permanent` for a failure that
a retry would repeat (a 4xx, a refused host, a bad template, a condition's own error, no SMTP configured);
anything else it raises is retried by the runner, with backoff, within the step's retries. Templates and
conditions are evaluated in helper processes (`env.sandbox`), never on the event loop. URLs in errors are
shown without their query string (where credentials often hide). Every request carries the step's idempotency
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
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import aiosmtplib
import asyncpg

from pono.agent.llm import LLMError
from pono.agent.tools.netguard import AddressRefused, GuardedResolver, HostPolicy, refusal_in
from pono.agent.tools.webhook import check_secret_env, read_capped, sign
from pono.jobs.conditions import ConditionFailed
from pono.jobs.llm import JobLLM, LLMBusy
from pono.jobs.sandbox import Sandbox
from pono.jobs.templates import TemplateFailed
from pono.settings import Settings
from pono.storage.workflow_runs import save_summary


class Permanent(Exception):
    """A step failure that trying again would only repeat: not retried. `own`: the message holds only the
    workflow's own configuration (a host it names), so history shows it unredacted."""

    def __init__(self, message: str, *, own: bool = False) -> None:
        super().__init__(message)
        self.own = own


@dataclass
class StepEnv:
    """What a step may use: the run's `context` (templates read it), the step's `idempotency_key`, and the
    worker's services: `sandbox` evaluates templates and conditions; `llm` (None: not configured). `redact(text)`
    applies the call's DLP policy."""

    context: dict[str, Any]
    idempotency_key: str
    run_id: str
    call_id: str | None
    settings: Settings
    pool: asyncpg.Pool
    llm: JobLLM | None
    redact: Callable[[str], str]
    sandbox: Sandbox


def shown_url(url: str) -> str:
    """`url` as errors and history show it: no user info, query string or fragment (where secrets hide)."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        netloc = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            netloc += f":{parts.port}"
    except ValueError:
        return url.split("?", 1)[0].split("#", 1)[0][:200]
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))[:500]


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


def _plain_summary(text: str) -> str:
    """An answer that is not the JSON asked for (small models often write prose, or half an object) as a
    summary: fences, braces and quoting stripped, a "summary:" label dropped, at most 2000 characters."""
    text = re.sub(r"```[a-zA-Z]*", "", text)
    match = re.search(r'"summary"\s*:\s*"((?:[^"\\]|\\.)*)', text)  # half an object: its summary so far
    if match:
        text = match.group(1).replace('\\"', '"')
    text = re.sub(r"^\s*(summary|call summary)\s*[:\-]\s*", "", text.strip(" \n{}[]\""), flags=re.I)
    return " ".join(text.split())[:2000]


async def summarize(step: dict[str, Any], env: StepEnv) -> dict[str, Any]:
    """The LLM's summary of the (already redacted) transcript, redacted again, kept on the call. An answer that
    is not the JSON asked for is the summary itself (no action items; disposition "unknown")."""
    if env.llm is None:
        raise Permanent("no LLM is configured for this worker (set OPENAI_BASE_URL)")
    call = env.context.get("call") or {}
    transcript = call.get("transcript") or "(no transcript: the run has no call)"
    instructions = step.get("instructions") or ""
    messages = [{"role": "system", "content": f"{SUMMARY_PROMPT} {instructions}".strip()},
                {"role": "user", "content": transcript}]
    try:
        text = await env.llm.complete(messages, max_tokens=500, temperature=0.2,
                                      timeout_s=float(step.get("timeout_s", 30.0)))
    except LLMError as exc:
        raise RuntimeError(f"the LLM could not summarise: {exc}") from None
    except LLMBusy as exc:
        raise Permanent(str(exc)) from None
    parsed = _json_object(text) or {}
    summary = parsed.get("summary")
    if not isinstance(summary, str) or not summary.strip():
        parsed = {"summary": _plain_summary(text)}
    items = parsed.get("action_items")
    disposition = parsed.get("disposition")
    out = {"summary": env.redact(str(parsed["summary"]).strip()),
           "action_items": [env.redact(str(i)) for i in items if str(i).strip()] if isinstance(items, list) else [],
           "disposition": env.redact(str(disposition).strip()) if disposition and str(disposition).strip()
           else "unknown"}
    if env.call_id is not None:
        await save_summary(env.pool, env.call_id, env.run_id, out["summary"], out["action_items"],
                           out["disposition"])
    return out


async def email(step: dict[str, Any], env: StepEnv) -> dict[str, Any]:
    """An e-mail through PONO_SMTP_HOST: `to`, `subject` and `body` are templates over the context."""
    s = env.settings
    if not s.smtp_host:
        raise Permanent("e-mail is not configured: set PONO_SMTP_HOST (and PONO_SMTP_PORT, PONO_SMTP_FROM)")
    to = [step["to"]] if isinstance(step["to"], str) else list(step["to"])
    *rendered, subject, body = await env.sandbox.render([*to, step["subject"], step["body"]], env.context)
    recipients = [r.strip() for r in rendered if r.strip()]
    if not recipients:
        raise Permanent("the e-mail has no recipient")
    message = EmailMessage()
    try:
        message["From"], message["To"] = s.smtp_from, ", ".join(recipients)
        message["Subject"] = " ".join(subject.split())
    except ValueError as exc:  # a header with a line break in it
        raise Permanent(f"the e-mail's headers are not valid: {exc}") from None
    message["Message-ID"] = f"<{env.idempotency_key.replace(':', '.')}@pono>"  # the same on every try
    message.set_content(body)
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


async def _request(method: str, url: str, body: bytes | None, headers: dict[str, str], env: StepEnv, *,
                   own_host: bool) -> Any:
    """One request to an allow-listed host (PONO_WEBHOOK_ALLOWED_HOSTS), no redirects, answer capped: its JSON
    (or {"text"}). 5xx, 429 and no answer raise RuntimeError (retried); a refusal, 3xx or 4xx, Permanent.
    `own_host`: the URL's host is written in the workflow itself, so a refusal naming it is shown as it is."""
    policy = HostPolicy(env.settings.webhook_allowed_hosts)
    shown = shown_url(url)
    try:
        policy.check_host(urlsplit(url).hostname or "")
    except (AddressRefused, ValueError) as exc:
        raise Permanent(str(exc), own=own_host) from None
    connector = aiohttp.TCPConnector(resolver=GuardedResolver(policy), use_dns_cache=False)
    headers = {"Idempotency-Key": env.idempotency_key, **headers}
    if body is not None:
        headers.setdefault("Content-Type", "application/json")
    try:
        async with aiohttp.ClientSession(connector=connector) as http, \
                http.request(method, url, data=body, headers=headers, allow_redirects=False) as r:
            if 300 <= r.status < 400:
                raise Permanent(f"{shown} answered {r.status} (a redirect, which is not followed)")
            if r.status == 429 or r.status >= 500:
                raise RuntimeError(f"{shown} answered {r.status}")
            if r.status >= 400:
                detail = (await r.content.read(200)).decode(errors="replace")
                raise Permanent(f"{shown} answered {r.status}: {detail}")
            text = (await read_capped(r, env.settings.webhook_max_response_bytes)).decode(errors="replace")
    except aiohttp.ClientError as exc:
        refused = refusal_in(exc)
        if refused is not None:
            raise Permanent(str(refused), own=own_host) from None
        raise RuntimeError(f"{shown} unreachable: {type(exc).__name__}") from None
    except ValueError as exc:  # an answer over the cap, or a header value with a line break
        raise Permanent(f"{shown}: {exc}") from None
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
    payload = await env.sandbox.render_json(step["payload"], env.context) if step.get("payload") is not None \
        else {"event": "workflow.step", **env.context}
    body = json.dumps(payload, default=str).encode()
    timestamp = str(int(time.time()))
    answer = await _request("POST", step["url"], body, {"X-Pono-Timestamp": timestamp,
                                                        "X-Pono-Signature": sign(secret.encode(), timestamp, body)},
                            env, own_host=True)
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


def _own_host(source: str, url: str) -> bool:
    """Whether the host of `url` (rendered from the template `source`) is written in the template itself."""
    literal = source.split("{", 1)[0]
    try:
        written = urlsplit(literal)
        return bool(written.hostname) and written.hostname == urlsplit(url).hostname and (
            "/" in literal[len(written.scheme) + 3:] or literal == source)
    except ValueError:
        return False


def _secret_header(step: dict[str, Any]) -> dict[str, str]:
    """The header that carries the step's `secret_env` ("Authorization: Bearer <secret>", or the bare secret
    in `secret_header`); {} without one."""
    name = step.get("secret_env")
    if not name:
        return {}
    secret = os.environ.get(name)
    if not secret:
        raise Permanent(f"the secret {name} is not set")
    header = step.get("secret_header") or "Authorization"
    return {header: f"Bearer {secret}" if header.lower() == "authorization" else secret}


async def http(step: dict[str, Any], env: StepEnv) -> dict[str, Any]:
    """A JSON request (`method`, `url`, `body` and `headers` rendered, the `secret_env` header added); `map`
    {name: "dotted.path"} puts response fields into the context under `name`."""
    parts = await env.sandbox.render_json({"url": step["url"], "body": step.get("body"),
                                           "headers": step.get("headers") or {}}, env.context)
    url = parts["url"]
    if not re.match(r"^https?://", url):
        raise Permanent(f"not an http(s) URL: {shown_url(url)[:200]!r}")
    body = None if parts["body"] is None else json.dumps(parts["body"]).encode()
    headers = {"Accept": "application/json", **parts["headers"], **_secret_header(step)}
    answer = await _request(step.get("method", "POST"), url, body, headers, env,
                            own_host=_own_host(step["url"], url))
    mapped = {name: _dig(answer, path) for name, path in (step.get("map") or {}).items()}
    return {"response": answer, "mapped": mapped}


async def condition(step: dict[str, Any], env: StepEnv) -> dict[str, Any]:
    """{"result": bool}: whether the expression holds over the context (pono.jobs.conditions). Its failure
    (a missing name, an overflow, an index out of range, a limit) is the workflow's own: not retried."""
    try:
        result = await env.sandbox.holds(step["if"], env.context)
    except ConditionFailed as exc:
        raise Permanent(f"condition {step['if']!r} failed: {exc}") from None
    return {"result": result}


STEPS: dict[str, Callable[[dict[str, Any], StepEnv], Awaitable[dict[str, Any]]]] = {
    "summarize": summarize, "email": email, "webhook": webhook, "http": http, "condition": condition}
PERMANENT_ERRORS: tuple[type[BaseException], ...] = (Permanent, TemplateFailed, ConditionFailed)
