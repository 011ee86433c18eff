"""One workflow run: its steps in order, each with a timeout and retries with backoff, compensations in reverse
order when a step fails for good or the run is cancelled, and every attempt, output and error kept (redacted) in
the run's history.

A run is at least once (a crashed worker's job is picked again): steps this execution already finished are
not run again, and each step's idempotency key ("<run>:<execution>:<index>") stays the same for every try, so
a receiver that keeps keys acts once. A retry of a failed run is a new execution with new keys.

Values: later steps see each output as the step returned it (a CRM's ticket id, not "[CREDIT_CARD]"); it is
redacted by the call's DLP policy only where it is stored and shown. So that a run picked up again after a crash
sees the same, the raw output is kept beside the shown one for the runner alone (pono.storage.workflow_runs).
Redaction runs in a thread (a 64 KB answer takes the DLP engine a second or two), and keeps what the workflow's
own definition writes out (a literal recipient, a host in a URL): that is the operator's configuration, not a
caller's data.

Limits: each wait before a retry is at most MAX_WAIT_S, all of a step's waits together at most MAX_BACKOFF_S,
so one run never holds a worker for days. A run is cancelled when an operator asks (POST
/api/workflow-runs/{id}/cancel) or its workflow is deleted: the runner looks every CANCEL_POLL_S, stops the
running step at its next await, runs the compensations of the steps done, and marks the run cancelled.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import asyncpg

from pono.agent.dlp.engine import DEFAULT_POLICY, DlpPolicy
from pono.agent.llm import LLMClient
from pono.jobs.definition import step_name
from pono.jobs.llm import JobLLM
from pono.jobs.sandbox import Sandbox
from pono.jobs.steps import PERMANENT_ERRORS, STEPS, StepEnv
from pono.jobs.templates import literal_parts
from pono.settings import Settings
from pono.storage.history import call_tool_calls, call_turns, find_call
from pono.storage.personas import find_persona
from pono.storage.workflow_runs import (
    cancel_reason,
    cancel_steps,
    completed_steps,
    finish_run,
    record_step,
    start_run,
    step_attempts,
)

log = logging.getLogger(__name__)

MAX_WAIT_S = 300.0  # the longest wait before one retry
MAX_BACKOFF_S = 3600.0  # all of one step's waits before retries, together
CANCEL_POLL_S = 1.0  # how often a running run looks for a cancel


class StepFailed(Exception):
    """A step failed for good (after its retries, or at once for a failure a retry would repeat). Its message
    is already redacted."""


def redact_text(text: str, policy: DlpPolicy, keep: tuple[str, ...] = ()) -> str:
    """`text` redacted by `policy`, except findings whose value is part of one of `keep` (the workflow's own
    literal text)."""
    if not keep:
        return policy.scan(text, "redact").text
    out, position = [], 0
    for match in policy.detect(text):
        value = text[match.start:match.end]
        if any(value in own for own in keep):
            continue
        out += [text[position:match.start], f"[{match.entity_type}]"]
        position = match.end
    return "".join(out) + text[position:]


def redact_value(value: Any, policy: DlpPolicy, keep: tuple[str, ...] = ()) -> Any:
    """Every string in a JSON value redacted by `policy` (keeping `keep`, as `redact_text`)."""
    if isinstance(value, str):
        return redact_text(value, policy, keep)
    if isinstance(value, list):
        return [redact_value(v, policy, keep) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(v, policy, keep) for k, v in value.items()}
    return value


def own_literals(step: dict[str, Any]) -> tuple[str, ...]:
    """What the step's definition writes out itself (template text outside `{{ }}`, whole plain strings): the
    operator's own configuration, shown as it is."""
    found: list[str] = []

    def walk(value: Any) -> None:
        if isinstance(value, str):
            found.extend(literal_parts(value) if "{" in value else [value])
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, dict):
            for k, v in value.items():
                if k not in ("compensate", "if", "instructions"):
                    walk(v)

    walk(step)
    return tuple(found)


def _shown(output: Any, policy: DlpPolicy, keep: tuple[str, ...]) -> tuple[Any, Any]:
    """(the output as history shows it, the raw output to keep for the runner or None when the same)."""
    shown = redact_value(output, policy, keep)
    return shown, (None if shown == output else output)


async def policy_for_call(pool: asyncpg.Pool, call_id: str | None) -> DlpPolicy:
    """The DLP policy of the call's persona (the default one without a call, a persona, or a valid policy)."""
    if call_id is None:
        return DEFAULT_POLICY
    call = await find_call(pool, call_id)
    persona = await find_persona(pool, call["persona"]) if call and call["persona"] else None
    if persona is None:
        return DEFAULT_POLICY
    try:
        return DlpPolicy.from_config(persona["dlp_policy"])
    except ValueError:
        return DEFAULT_POLICY


async def call_facts(pool: asyncpg.Pool, call_id: str) -> dict[str, Any] | None:
    """What a workflow sees of a stored call (texts as stored: redacted), or None when there is none:
    {"id", "caller", "persona", "transport", "started_at", "ended_at" (ISO 8601), "end_reason", "duration_s",
    "transcript" ("caller: ...\\nagent: ..." lines), "turns": [{"role", "text"}], "tools": [names],
    "tool_calls": [{"name", "arguments", "result", "error"}]}."""
    call = await find_call(pool, call_id)
    if call is None:
        return None
    turns = await call_turns(pool, call_id)
    tools = await call_tool_calls(pool, call_id)
    ended = call["ended_at"]
    return {
        "id": call["id"], "caller": call["caller"], "persona": call["persona"], "transport": call["transport"],
        "started_at": call["started_at"].isoformat(), "ended_at": ended.isoformat() if ended else None,
        "end_reason": call["end_reason"],
        "duration_s": round(((ended or call["started_at"]) - call["started_at"]).total_seconds(), 3),
        "transcript": "\n".join(f"{'caller' if t['role'] == 'user' else 'agent'}: {t['text']}" for t in turns),
        "turns": [{"role": t["role"], "text": t["text"]} for t in turns],
        "tools": sorted({t["name"] for t in tools}),
        "tool_calls": [{"name": t["name"], "arguments": t["arguments"], "result": t["result"], "error": t["error"]}
                       for t in tools],
    }


@dataclass
class _Run:
    id: str
    execution: int
    call_id: str | None
    policy: DlpPolicy
    context: dict[str, Any]
    completed: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # steps done, in order
    cancelled: str | None = None  # why the run is being cancelled
    stopping: bool = False  # compensating already: a cancel no longer interrupts


class WorkflowRunner:
    """Runs workflow runs on `pool`; `llm` (None: summarize steps fail with that reason) for summaries, giving
    way to live calls while `llm_busy()` says they need it (pono.jobs.llm). Templates and conditions run in
    `sandbox` processes. `close()` stops them."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, llm: LLMClient | None,
                 llm_busy: Callable[[], bool] | None = None) -> None:
        self.pool = pool
        self.settings = settings
        self.llm = JobLLM(llm, llm_busy) if llm is not None else None
        self.sandbox = Sandbox(limit_s=settings.jobs_eval_timeout_s)

    async def close(self) -> None:
        """Stop the sandbox's helper processes."""
        await self.sandbox.close()

    async def run(self, run_id: str, execution: int) -> str | None:
        """Run (or go on with) one execution of a run; its final status, or None when there was nothing to do
        (finished already, cancelled or retried since). Raises asyncpg errors when Postgres fails (the job is
        retried)."""
        stored = await start_run(self.pool, run_id, execution)
        if stored is None:
            return None
        run = await self._prepare(stored)
        steps: list[dict[str, Any]] = stored["definition"]["steps"]
        done = await completed_steps(self.pool, run_id, execution)
        reason = stored["cancel_reason"] or ("its workflow was deleted" if stored["workflow_deleted"] else None)
        if reason is not None:  # cancelled while no worker ran it: undo what an earlier worker did
            for idx, step in enumerate(steps):
                if done.get(idx, {}).get("status") == "succeeded":
                    self._merge(run, step, step_name(step, idx), done[idx]["output"])
                    run.completed.append((idx, step))
            return await self._cancelled(run, reason)
        work = asyncio.ensure_future(self._steps(run, steps, done))
        watch = asyncio.ensure_future(self._watch(run, work))
        try:
            return await work
        except asyncio.CancelledError:
            me = asyncio.current_task()
            if run.cancelled is None or (me is not None and me.cancelling()):
                raise  # the worker itself is stopping: the job goes back to the queue
            watch.cancel()
            return await self._cancelled(run, run.cancelled)
        finally:
            watch.cancel()

    async def _steps(self, run: _Run, steps: list[dict[str, Any]], done: dict[int, dict[str, Any]]) -> str:
        skipping = False
        for idx, step in enumerate(steps):
            name = step_name(step, idx)
            if idx in done:
                if done[idx]["status"] == "succeeded":
                    self._merge(run, step, name, done[idx]["output"])
                    run.completed.append((idx, step))
                    skipping = skipping or (step["type"] == "condition" and not done[idx]["output"]["result"])
                continue
            if skipping:
                await record_step(self.pool, run.id, run.execution, idx, "do", name=name, type_=step["type"],
                                  status="skipped", attempts=0)
                continue
            try:
                output = await self._attempts(run, idx, "do", step, name)
            except StepFailed as exc:
                run.stopping = True
                await self._compensate(run)
                await finish_run(self.pool, run.id, "failed", f"step {name}: {exc}")
                log.info("workflow run %s failed at step %s", run.id, name)
                return "failed"
            self._merge(run, step, name, output)
            run.completed.append((idx, step))
            skipping = step["type"] == "condition" and not output["result"]
        await finish_run(self.pool, run.id, "succeeded", None)
        return "succeeded"

    async def _watch(self, run: _Run, work: asyncio.Future[str]) -> None:
        """Cancel `work` when the run is to stop (a cancel asked for, its workflow deleted)."""
        while not work.done():
            await asyncio.sleep(CANCEL_POLL_S)
            try:
                reason = await cancel_reason(self.pool, run.id)
            except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
                continue  # Postgres away: look again later
            if reason is not None and not run.stopping:
                run.cancelled = reason
                work.cancel()
                return

    async def _cancelled(self, run: _Run, reason: str) -> str:
        run.stopping = True
        await cancel_steps(self.pool, run.id, run.execution, reason)
        await self._compensate(run)
        await finish_run(self.pool, run.id, "cancelled", reason)
        log.info("workflow run %s cancelled", run.id)
        return "cancelled"

    async def _prepare(self, stored: dict[str, Any]) -> _Run:
        policy, call = DEFAULT_POLICY, None
        if stored["call_id"] is not None:
            call = await call_facts(self.pool, stored["call_id"])
            policy = await policy_for_call(self.pool, stored["call_id"])
        context = {"call": call or {}, "input": stored.get("raw_input", stored["input"]), "steps": {},
                   "run": {"id": stored["id"], "trigger": stored["trigger"], "workflow": stored["workflow"]}}
        return _Run(stored["id"], stored["execution"], stored["call_id"], policy, context)

    @staticmethod
    def _merge(run: _Run, step: dict[str, Any], name: str, output: Any) -> None:
        """Later steps see each output under steps.<name>; a summary's fields and an http step's mapped
        fields also at the top (`{{summary}}`, `{{ticket_id}}`)."""
        run.context["steps"][name] = output
        if step["type"] == "summarize" and isinstance(output, dict):
            run.context.update(output)
        elif step["type"] == "http" and isinstance(output, dict):
            run.context.update(output.get("mapped") or {})

    async def _attempts(self, run: _Run, idx: int, phase: str, step: dict[str, Any], name: str) -> Any:
        """The step's output (raw) once a try succeeds. Raises StepFailed (redacted) when it fails for good."""
        retries, backoff = int(step.get("retries", 2)), float(step.get("backoff_s", 1.0))
        timeout_s = float(step.get("timeout_s", 30.0))
        key = f"{run.id}:{run.execution}:{idx}{':undo' if phase == 'undo' else ''}"
        env = StepEnv(run.context, key, run.id, run.call_id, self.settings, self.pool, self.llm,
                      lambda text: redact_text(text, run.policy), self.sandbox)
        # Pono's own: what the step's definition writes out, and the ids it sends (a receiver may echo them;
        # a UUID's digits can look like a card number).
        keep = (*own_literals(step), key, run.id, *([run.call_id] if run.call_id else []))
        # Tries by a worker that died count: the budget is the step's, not each worker's.
        attempt = await step_attempts(self.pool, run.id, run.execution, idx, phase)
        waited = 0.0
        while True:
            attempt += 1
            await record_step(self.pool, run.id, run.execution, idx, phase, name=name, type_=step["type"],
                              status="running", attempts=attempt)
            own_error = False
            try:
                if step["type"] == "summarize":  # it bounds the LLM's answer itself, not its wait for live calls
                    output = await STEPS[step["type"]](step, env)
                else:
                    async with asyncio.timeout(timeout_s):
                        output = await STEPS[step["type"]](step, env)
            except PERMANENT_ERRORS as exc:
                error, final, own_error = str(exc), True, bool(getattr(exc, "own", False))
            except TimeoutError:
                error, final = f"timed out after {timeout_s:g} s", attempt > retries
            except Exception as exc:  # a failure that may pass: retried
                error, final = str(exc) or type(exc).__name__, attempt > retries
            else:
                shown, raw = await asyncio.to_thread(_shown, output, run.policy, keep)
                await record_step(self.pool, run.id, run.execution, idx, phase, name=name, type_=step["type"],
                                  status="succeeded", attempts=attempt, output=shown, raw_output=raw)
                return output
            wait = min(backoff * 2 ** (attempt - 1), MAX_WAIT_S)
            if not final and waited + wait > MAX_BACKOFF_S:
                final = True
                error += f" (no more tries: a step waits at most {MAX_BACKOFF_S / 60:g} min in all between tries)"
            if not own_error:
                error = await asyncio.to_thread(redact_text, error, run.policy, keep)
            await record_step(self.pool, run.id, run.execution, idx, phase, name=name, type_=step["type"],
                              status="failed" if final else "running", attempts=attempt, error=error)
            if final:
                raise StepFailed(error)
            await asyncio.sleep(wait)
            waited += wait

    async def _compensate(self, run: _Run) -> None:
        """Each finished step's compensation, last step first; one failing does not stop the others."""
        for idx, step in reversed(run.completed):
            undo = step.get("compensate")
            if not undo:
                continue
            try:
                await self._attempts(run, idx, "undo", undo, f"undo_{step_name(step, idx)}")
            except StepFailed as exc:
                log.warning("compensation of step %d of run %s failed: %s", idx, run.id, exc)
