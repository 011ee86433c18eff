"""Workflow runs as stored: made (with their job, in one transaction), started, finished, retried; each step's
attempts; the summaries they leave on calls. Outputs and errors arrive here already redacted (pono.jobs).

A run is {"id": str, "workflow_id": str, "workflow": name, "call_id": str | None, "trigger", "definition": dict,
"input": dict, "status": "queued" | "running" | "succeeded" | "failed", "execution": int (raised by each retry),
"attempts": int (times a worker started it), "error": str | None, "created_at", "started_at", "finished_at"}.
A step run is {"execution", "idx", "phase": "do" | "undo", "name", "type", "status": "running" | "succeeded" |
"failed" | "skipped", "attempts", "output": JSON | None, "error", "started_at", "finished_at"}.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import asyncpg

from pono.storage.audit import write_audit
from pono.storage.jobs import enqueue

RUN_WORKFLOW = "workflow.run"  # the job that runs one workflow run: payload {"run_id", "execution"}

_RUN = ("r.id, r.workflow_id, w.name AS workflow, r.call_id, r.trigger, r.definition, r.input, r.status, r.execution,"
        " r.attempts, r.error, r.created_at, r.started_at, r.finished_at")
_FROM = "workflow_runs r JOIN workflows w ON w.id = r.workflow_id"


class RunNotRetryable(Exception):
    """Only a failed run may be retried."""


def _run(row: asyncpg.Record) -> dict[str, Any]:
    run = dict(row)
    run["id"], run["workflow_id"] = str(run["id"]), str(run["workflow_id"])
    run["definition"], run["input"] = json.loads(run["definition"]), json.loads(run["input"])
    return run


async def create_run(db: asyncpg.Pool | asyncpg.Connection, workflow: dict[str, Any], trigger: str, key: str, *,
                     call_id: str | None = None, inputs: dict[str, Any] | None = None) -> str | None:
    """Make a run of `workflow` (its definition as of now) and enqueue its job, in one transaction (a savepoint
    when `db` is a connection already in one). `key` makes it once only: None when a run with that key exists
    already. Raises asyncpg errors (a ForeignKeyViolationError for a call that is not stored)."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            return await create_run(conn, workflow, trigger, key, call_id=call_id, inputs=inputs)
    conn = db
    async with conn.transaction():
        run_id = await conn.fetchval(
            "INSERT INTO workflow_runs (workflow_id, call_id, trigger, idempotency_key, definition, input)"
            " VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb) ON CONFLICT (idempotency_key) DO NOTHING RETURNING id",
            uuid.UUID(workflow["id"]), call_id, trigger, key, json.dumps(workflow["definition"]),
            json.dumps(inputs or {}))
        if run_id is None:
            return None
        await enqueue(conn, RUN_WORKFLOW, {"run_id": str(run_id), "execution": 1}, f"run:{run_id}:1")
    return str(run_id)


async def get_run(pool: asyncpg.Pool, run_id: str | uuid.UUID) -> dict[str, Any] | None:
    """One run, or None."""
    row = await pool.fetchrow(f"SELECT {_RUN} FROM {_FROM} WHERE r.id = $1", uuid.UUID(str(run_id)))
    return _run(row) if row is not None else None


async def list_runs(pool: asyncpg.Pool, *, workflow_id: uuid.UUID | None = None, call_id: str | None = None,
                    status: str | None = None, before: tuple[datetime, str] | None = None,
                    count: int = 50) -> list[dict[str, Any]]:
    """Up to `count` runs, newest first, of one workflow, of one call, in one status (each filter optional),
    continuing after the (created_at, id) position `before`."""
    rows = await pool.fetch(
        f"SELECT {_RUN} FROM {_FROM} WHERE ($1::uuid IS NULL OR r.workflow_id = $1)"
        " AND ($2::text IS NULL OR r.call_id = $2) AND ($3::text IS NULL OR r.status = $3)"
        " AND ($4::timestamptz IS NULL OR (r.created_at, r.id::text) < ($4, $5))"
        " ORDER BY r.created_at DESC, r.id DESC LIMIT $6",
        workflow_id, call_id, status, before[0] if before else None, before[1] if before else "", count)
    return [_run(r) for r in rows]


async def step_runs(pool: asyncpg.Pool, run_id: str) -> list[dict[str, Any]]:
    """A run's step runs, every execution, in the order they ran."""
    rows = await pool.fetch(
        "SELECT execution, idx, phase, name, type, status, attempts, output, error, started_at, finished_at"
        " FROM workflow_step_runs WHERE run_id = $1 ORDER BY execution, started_at, idx", uuid.UUID(run_id))
    return [{**dict(r), "output": None if r["output"] is None else json.loads(r["output"])} for r in rows]


async def start_run(pool: asyncpg.Pool, run_id: str, execution: int) -> dict[str, Any] | None:
    """Mark the run running (one more attempt) for `execution`; None when the run is gone, already finished, or
    on another execution (a stale job)."""
    row = await pool.fetchrow(
        "UPDATE workflow_runs SET status = 'running', attempts = attempts + 1, started_at = coalesce(started_at, now())"
        " WHERE id = $1 AND execution = $2 AND status IN ('queued', 'running') RETURNING id", uuid.UUID(run_id),
        execution)
    return None if row is None else await get_run(pool, run_id)


async def finish_run(pool: asyncpg.Pool, run_id: str, status: str, error: str | None) -> None:
    """Mark the run succeeded or failed (`error`, redacted)."""
    await pool.execute("UPDATE workflow_runs SET status = $2, error = $3, finished_at = now() WHERE id = $1",
                       uuid.UUID(run_id), status, error)


async def completed_steps(pool: asyncpg.Pool, run_id: str, execution: int) -> dict[int, dict[str, Any]]:
    """Steps of this execution already done (succeeded or skipped), by index: {"status", "output"}. A job
    picked again after a crash goes on from there instead of repeating them."""
    rows = await pool.fetch("SELECT idx, status, output FROM workflow_step_runs WHERE run_id = $1 AND execution = $2"
                            " AND phase = 'do' AND status IN ('succeeded', 'skipped')", uuid.UUID(run_id), execution)
    return {r["idx"]: {"status": r["status"], "output": None if r["output"] is None else json.loads(r["output"])}
            for r in rows}


async def step_attempts(pool: asyncpg.Pool, run_id: str, execution: int, idx: int, phase: str) -> int:
    """How often this step of this execution was tried already (by this worker or one that died)."""
    return int(await pool.fetchval("SELECT coalesce(max(attempts), 0) FROM workflow_step_runs WHERE run_id = $1"
                                   " AND execution = $2 AND idx = $3 AND phase = $4", uuid.UUID(run_id), execution,
                                   idx, phase))


async def record_step(pool: asyncpg.Pool, run_id: str, execution: int, idx: int, phase: str, *, name: str,
                      type_: str, status: str, attempts: int, output: Any = None, error: str | None = None) -> None:
    """Write a step run's state (a new attempt, or how it ended): redacted `output` and `error`."""
    await pool.execute(
        "INSERT INTO workflow_step_runs (run_id, execution, idx, phase, name, type, status, attempts, output, error,"
        " finished_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10,"
        " CASE WHEN $7 = 'running' THEN NULL ELSE now() END)"
        " ON CONFLICT (run_id, execution, idx, phase) DO UPDATE SET status = EXCLUDED.status,"
        " attempts = EXCLUDED.attempts, output = EXCLUDED.output, error = EXCLUDED.error,"
        " finished_at = EXCLUDED.finished_at",
        uuid.UUID(run_id), execution, idx, phase, name, type_, status, attempts,
        None if output is None else json.dumps(output, default=str), error)


async def retry_run(pool: asyncpg.Pool, run_id: uuid.UUID, actor: str, source_ip: str | None) -> dict[str, Any]:
    """Queue a failed run again as a new execution (every step runs anew, with new idempotency keys), and
    audit it. Raises LookupError (no such run), RunNotRetryable (it has not failed)."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow("SELECT status, execution FROM workflow_runs WHERE id = $1 FOR UPDATE", run_id)
        if row is None:
            raise LookupError(str(run_id))
        if row["status"] != "failed":
            raise RunNotRetryable(row["status"])
        execution = row["execution"] + 1
        await conn.execute("UPDATE workflow_runs SET status = 'queued', execution = $2, error = NULL,"
                           " finished_at = NULL WHERE id = $1", run_id, execution)
        await enqueue(conn, RUN_WORKFLOW, {"run_id": str(run_id), "execution": execution},
                      f"run:{run_id}:{execution}")
        await write_audit(conn, actor, "workflow.run.retry", str(run_id), source_ip, execution=execution)
    run = await get_run(pool, run_id)
    assert run is not None
    return run


async def save_summary(pool: asyncpg.Pool, call_id: str, run_id: str, summary: str, action_items: list[str],
                       disposition: str | None) -> None:
    """Keep a call's summary (redacted); a later one replaces it."""
    await pool.execute(
        "INSERT INTO call_summaries (call_id, summary, action_items, disposition, run_id)"
        " VALUES ($1, $2, $3::jsonb, $4, $5) ON CONFLICT (call_id) DO UPDATE SET summary = EXCLUDED.summary,"
        " action_items = EXCLUDED.action_items, disposition = EXCLUDED.disposition, run_id = EXCLUDED.run_id,"
        " created_at = now()", call_id, summary, json.dumps(action_items), disposition, uuid.UUID(run_id))


async def call_summary(pool: asyncpg.Pool, call_id: str) -> dict[str, Any] | None:
    """A call's summary: {"summary", "action_items": list[str], "disposition", "run_id", "created_at"}, or None."""
    row = await pool.fetchrow("SELECT summary, action_items, disposition, run_id, created_at FROM call_summaries"
                              " WHERE call_id = $1", call_id)
    if row is None:
        return None
    return {**dict(row), "action_items": json.loads(row["action_items"]),
            "run_id": None if row["run_id"] is None else str(row["run_id"])}
