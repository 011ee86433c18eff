"""One workflow run: its steps in order, each with a timeout and retries with backoff, compensations in reverse
order when a step fails for good, and every attempt, output and error kept (redacted) in the run's history.

A run is at least once (a crashed worker's job is picked again): steps this execution already finished are
not run again, and each step's idempotency key ("<run>:<execution>:<index>") stays the same for every try, so
a receiver that keeps keys acts once. A retry of a failed run is a new execution with new keys.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import asyncpg

from pono.agent.dlp.engine import DEFAULT_POLICY, DlpPolicy
from pono.agent.llm import LLMClient
from pono.jobs.definition import step_name
from pono.jobs.steps import PERMANENT_ERRORS, STEPS, StepEnv
from pono.settings import Settings
from pono.storage.history import call_tool_calls, call_turns, find_call
from pono.storage.personas import find_persona
from pono.storage.workflow_runs import completed_steps, finish_run, record_step, start_run, step_attempts

log = logging.getLogger(__name__)


class StepFailed(Exception):
    """A step failed for good (after its retries, or at once for a failure a retry would repeat)."""


def redact_value(value: Any, policy: DlpPolicy) -> Any:
    """Every string in a JSON value redacted by `policy`."""
    if isinstance(value, str):
        return policy.scan(value, "redact").text
    if isinstance(value, list):
        return [redact_value(v, policy) for v in value]
    if isinstance(value, dict):
        return {k: redact_value(v, policy) for k, v in value.items()}
    return value


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


class WorkflowRunner:
    """Runs workflow runs on `pool`; `llm` (None: summarize steps fail with that reason) for summaries."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, llm: LLMClient | None) -> None:
        self.pool = pool
        self.settings = settings
        self.llm = llm

    async def run(self, run_id: str, execution: int) -> str | None:
        """Run (or go on with) one execution of a run; its final status, or None when there was nothing to do
        (finished already, or retried since). Raises asyncpg errors when Postgres fails (the job is retried)."""
        stored = await start_run(self.pool, run_id, execution)
        if stored is None:
            return None
        run = await self._prepare(stored)
        steps: list[dict[str, Any]] = stored["definition"]["steps"]
        done = await completed_steps(self.pool, run_id, execution)
        completed: list[tuple[int, dict[str, Any]]] = []
        skipping = False
        for idx, step in enumerate(steps):
            name = step_name(step, idx)
            if idx in done:
                if done[idx]["status"] == "succeeded":
                    self._merge(run, step, name, done[idx]["output"])
                    completed.append((idx, step))
                    skipping = skipping or (step["type"] == "condition" and not done[idx]["output"]["result"])
                continue
            if skipping:
                await record_step(self.pool, run_id, execution, idx, "do", name=name, type_=step["type"],
                                  status="skipped", attempts=0)
                continue
            try:
                output = await self._attempts(run, idx, "do", step, name)
            except StepFailed as exc:
                await self._compensate(run, completed)
                await finish_run(self.pool, run_id, "failed", run.policy.scan(f"step {name}: {exc}", "redact").text)
                log.info("workflow run %s failed at step %s", run_id, name)
                return "failed"
            self._merge(run, step, name, output)
            completed.append((idx, step))
            skipping = step["type"] == "condition" and not output["result"]
        await finish_run(self.pool, run_id, "succeeded", None)
        return "succeeded"

    async def _prepare(self, stored: dict[str, Any]) -> _Run:
        policy, call = DEFAULT_POLICY, None
        if stored["call_id"] is not None:
            call = await call_facts(self.pool, stored["call_id"])
            persona = await find_persona(self.pool, call["persona"]) if call and call["persona"] else None
            if persona is not None:
                try:
                    policy = DlpPolicy.from_config(persona["dlp_policy"])
                except ValueError:
                    policy = DEFAULT_POLICY
        context = {"call": call or {}, "input": stored["input"], "steps": {},
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
        retries, backoff = int(step.get("retries", 2)), float(step.get("backoff_s", 1.0))
        key = f"{run.id}:{run.execution}:{idx}{':undo' if phase == 'undo' else ''}"
        env = StepEnv(run.context, key, run.id, run.call_id, self.settings, self.pool, self.llm,
                      lambda text: run.policy.scan(text, "redact").text)
        # Tries by a worker that died count: the budget is the step's, not each worker's.
        attempt = await step_attempts(self.pool, run.id, run.execution, idx, phase)
        while True:
            attempt += 1
            await record_step(self.pool, run.id, run.execution, idx, phase, name=name, type_=step["type"],
                              status="running", attempts=attempt)
            try:
                async with asyncio.timeout(float(step.get("timeout_s", 30.0))):
                    output = await STEPS[step["type"]](step, env)
            except PERMANENT_ERRORS as exc:
                error, final = str(exc), True
            except TimeoutError:
                error, final = f"timed out after {step.get('timeout_s', 30.0)} s", attempt > retries
            except Exception as exc:  # a failure that may pass: retried
                error, final = str(exc) or type(exc).__name__, attempt > retries
            else:
                output = redact_value(output, run.policy)
                await record_step(self.pool, run.id, run.execution, idx, phase, name=name, type_=step["type"],
                                  status="succeeded", attempts=attempt, output=output)
                return output
            error = run.policy.scan(error, "redact").text
            await record_step(self.pool, run.id, run.execution, idx, phase, name=name, type_=step["type"],
                              status="failed" if final else "running", attempts=attempt, error=error)
            if final:
                raise StepFailed(error)
            await asyncio.sleep(backoff * 2 ** (attempt - 1))

    async def _compensate(self, run: _Run, completed: list[tuple[int, dict[str, Any]]]) -> None:
        """Each finished step's compensation, last step first; one failing does not stop the others."""
        for idx, step in reversed(completed):
            undo = step.get("compensate")
            if not undo:
                continue
            try:
                await self._attempts(run, idx, "undo", undo, f"undo_{step_name(step, idx)}")
            except StepFailed as exc:
                log.warning("compensation of step %d of run %s failed: %s", idx, run.id, exc)
