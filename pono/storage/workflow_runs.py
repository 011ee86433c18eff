"""Workflow runs as stored: made (with their job, in one transaction), started, finished, retried, cancelled;
each step's attempts; the summaries they leave on calls. Outputs, errors and inputs arrive here already redacted
(pono.jobs), and only those are ever read back for the API.

A run is {"id": str, "workflow_id": str, "workflow": name, "call_id": str | None, "trigger", "definition": dict,
"input": dict (redacted), "status": "queued" | "running" | "succeeded" | "failed" | "cancelled", "execution": int
(raised by each retry), "attempts": int (times a worker started it), "error": str | None, "cancel_reason": str |
None (set when a cancel was asked for), "workflow_deleted": bool, "created_at", "started_at", "finished_at"}.
A step run is {"execution", "idx", "phase": "do" | "undo", "name", "type", "status": "running" | "succeeded" |
"failed" | "skipped" | "cancelled", "attempts", "output": JSON | None, "error", "started_at", "finished_at"}.

Raw values, for the runner alone: a run's `raw_input` (a manual run's input as given) and a step run's
`raw_output` (its output before redaction, where that differs) are kept in columns of their own so that a run
picked up again after a crash sends what the earlier steps really returned (a CRM's ticket id, not
"[CREDIT_CARD]"). No query the API uses reads them; `raw_output` is cleared when the run ends, `raw_input` when
it succeeds (a failed or cancelled run keeps it for a retry), and retention deletes the run in the end.
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
        " r.attempts, r.error, r.cancel_reason, w.deleted_at IS NOT NULL AS workflow_deleted, r.created_at,"
        " r.started_at, r.finished_at")
_FROM = "workflow_runs r JOIN workflows w ON w.id = r.workflow_id"


class RunNotRetryable(Exception):
    """Only a failed or cancelled run of a live workflow may be retried."""


class RunNotCancellable(Exception):
    """Only a queued or running run may be cancelled."""


def _run(row: asyncpg.Record) -> dict[str, Any]:
    run = dict(row)
    run["id"], run["workflow_id"] = str(run["id"]), str(run["workflow_id"])
    run["definition"], run["input"] = json.loads(run["definition"]), json.loads(run["input"])
    return run


async def create_run(db: asyncpg.Pool | asyncpg.Connection, workflow: dict[str, Any], trigger: str, key: str, *,
                     call_id: str | None = None, inputs: dict[str, Any] | None = None,
                     raw_inputs: dict[str, Any] | None = None) -> str | None:
    """Make a run of `workflow` (its definition as of now) and enqueue its job, in one transaction (a savepoint
    when `db` is a connection already in one). `inputs`: as shown (redacted); `raw_inputs`: as given, for the
    runner only (None when the same). `key` makes it once only: None when a run with that key exists already.
    Raises asyncpg errors (a ForeignKeyViolationError for a call that is not stored)."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn:
            return await create_run(conn, workflow, trigger, key, call_id=call_id, inputs=inputs,
                                    raw_inputs=raw_inputs)
    conn = db
    async with conn.transaction():
        run_id = await conn.fetchval(
            "INSERT INTO workflow_runs (workflow_id, call_id, trigger, idempotency_key, definition, input, raw_input)"
            " VALUES ($1, $2, $3, $4, $5::jsonb, $6::jsonb, $7::jsonb) ON CONFLICT (idempotency_key) DO NOTHING"
            " RETURNING id",
            uuid.UUID(workflow["id"]), call_id, trigger, key, json.dumps(workflow["definition"]),
            json.dumps(inputs or {}), None if raw_inputs is None else json.dumps(raw_inputs))
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
    """Mark the run running (one more attempt) for `execution`; None when the run is gone, already finished
    (or cancelled), or on another execution (a stale job). The run comes with its "raw_input" (for the runner
    only: the input as given)."""
    row = await pool.fetchrow(
        "UPDATE workflow_runs SET status = 'running', attempts = attempts + 1, started_at = coalesce(started_at, now())"
        " WHERE id = $1 AND execution = $2 AND status IN ('queued', 'running') RETURNING raw_input",
        uuid.UUID(run_id), execution)
    if row is None:
        return None
    run = await get_run(pool, run_id)
    if run is not None and row["raw_input"] is not None:
        run["raw_input"] = json.loads(row["raw_input"])
    return run


async def finish_run(pool: asyncpg.Pool, run_id: str, status: str, error: str | None) -> None:
    """Mark the run succeeded, failed or cancelled (`error`, redacted), and drop the raw values it kept while
    it ran (its raw input only when it succeeded: a retry of a failed or cancelled run needs it)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("UPDATE workflow_runs SET status = $2, error = $3, finished_at = now(),"
                           " raw_input = CASE WHEN $2 = 'succeeded' THEN NULL ELSE raw_input END WHERE id = $1",
                           uuid.UUID(run_id), status, error)
        await conn.execute("UPDATE workflow_step_runs SET raw_output = NULL WHERE run_id = $1 AND raw_output IS NOT"
                           " NULL", uuid.UUID(run_id))


async def completed_steps(pool: asyncpg.Pool, run_id: str, execution: int) -> dict[int, dict[str, Any]]:
    """Steps of this execution already done (succeeded or skipped), by index: {"status", "output"}, the output
    as the step returned it (its raw output where one was kept: for the runner only). A job picked again after a
    crash goes on from there instead of repeating them."""
    rows = await pool.fetch("SELECT idx, status, coalesce(raw_output, output) AS output FROM workflow_step_runs"
                            " WHERE run_id = $1 AND execution = $2 AND phase = 'do'"
                            " AND status IN ('succeeded', 'skipped')", uuid.UUID(run_id), execution)
    return {r["idx"]: {"status": r["status"], "output": None if r["output"] is None else json.loads(r["output"])}
            for r in rows}


async def step_attempts(pool: asyncpg.Pool, run_id: str, execution: int, idx: int, phase: str) -> int:
    """How often this step of this execution was tried already (by this worker or one that died)."""
    return int(await pool.fetchval("SELECT coalesce(max(attempts), 0) FROM workflow_step_runs WHERE run_id = $1"
                                   " AND execution = $2 AND idx = $3 AND phase = $4", uuid.UUID(run_id), execution,
                                   idx, phase))


async def record_step(pool: asyncpg.Pool, run_id: str, execution: int, idx: int, phase: str, *, name: str,
                      type_: str, status: str, attempts: int, output: Any = None, error: str | None = None,
                      raw_output: Any = None) -> None:
    """Write a step run's state (a new attempt, or how it ended): redacted `output` and `error`; `raw_output`,
    the output before redaction where it differs (None: the same), for the runner alone."""
    await pool.execute(
        "INSERT INTO workflow_step_runs (run_id, execution, idx, phase, name, type, status, attempts, output, error,"
        " raw_output, finished_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9::jsonb, $10, $11::jsonb,"
        " CASE WHEN $7 = 'running' THEN NULL ELSE now() END)"
        " ON CONFLICT (run_id, execution, idx, phase) DO UPDATE SET status = EXCLUDED.status,"
        " attempts = EXCLUDED.attempts, output = EXCLUDED.output, error = EXCLUDED.error,"
        " raw_output = EXCLUDED.raw_output, finished_at = EXCLUDED.finished_at",
        uuid.UUID(run_id), execution, idx, phase, name, type_, status, attempts,
        None if output is None else json.dumps(output, default=str), error,
        None if raw_output is None else json.dumps(raw_output, default=str))


async def cancel_steps(pool: asyncpg.Pool, run_id: str, execution: int, reason: str) -> None:
    """Mark this execution's steps still running as cancelled (`reason`)."""
    await pool.execute("UPDATE workflow_step_runs SET status = 'cancelled', error = $3, finished_at = now()"
                       " WHERE run_id = $1 AND execution = $2 AND status = 'running'", uuid.UUID(run_id), execution,
                       reason)


async def request_cancel(conn: asyncpg.Pool | asyncpg.Connection, reason: str, *, run_id: uuid.UUID | None = None,
                         workflow_id: uuid.UUID | None = None) -> list[str]:
    """Ask for a run (or every run of a workflow) to be cancelled: one still queued is cancelled now; one that
    is running is cancelled by its runner at its next await (which then runs the compensations). The statuses
    of the runs concerned, after the change ([] when none was queued or running)."""
    rows = await conn.fetch(
        "UPDATE workflow_runs SET cancel_reason = $1,"
        " status = CASE WHEN status = 'queued' THEN 'cancelled' ELSE status END,"
        " error = CASE WHEN status = 'queued' THEN $1 ELSE error END,"
        " finished_at = CASE WHEN status = 'queued' THEN now() ELSE finished_at END"
        " WHERE (id = $2 OR workflow_id = $3) AND status IN ('queued', 'running') RETURNING status",
        reason, run_id, workflow_id)
    return [r["status"] for r in rows]


async def cancel_run(pool: asyncpg.Pool, run_id: uuid.UUID, actor: str, source_ip: str | None) -> dict[str, Any]:
    """An operator's cancel of a queued or running run, audited. Raises LookupError, RunNotCancellable."""
    async with pool.acquire() as conn, conn.transaction():
        status = await conn.fetchval("SELECT status FROM workflow_runs WHERE id = $1 FOR UPDATE", run_id)
        if status is None:
            raise LookupError(str(run_id))
        if not await request_cancel(conn, f"cancelled by {actor}", run_id=run_id):
            raise RunNotCancellable(status)
        await write_audit(conn, actor, "workflow.run.cancel", str(run_id), source_ip, was=status)
    run = await get_run(pool, run_id)
    assert run is not None
    return run


async def cancel_reason(pool: asyncpg.Pool, run_id: str) -> str | None:
    """Why the run is to stop now, or None: a cancel was asked for, or its workflow was deleted."""
    row = await pool.fetchrow("SELECT r.cancel_reason, w.deleted_at IS NOT NULL AS deleted FROM workflow_runs r"
                              " JOIN workflows w ON w.id = r.workflow_id WHERE r.id = $1", uuid.UUID(run_id))
    if row is None:
        return "the run was deleted"
    return row["cancel_reason"] or ("its workflow was deleted" if row["deleted"] else None)


async def retry_run(pool: asyncpg.Pool, run_id: uuid.UUID, actor: str, source_ip: str | None) -> dict[str, Any]:
    """Queue a failed or cancelled run again as a new execution (every step runs anew, with new idempotency
    keys), and audit it. Raises LookupError (no such run), RunNotRetryable (it has not failed, or its workflow
    was deleted)."""
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "SELECT r.status, r.execution, w.deleted_at IS NOT NULL AS deleted FROM workflow_runs r"
            " JOIN workflows w ON w.id = r.workflow_id WHERE r.id = $1 FOR UPDATE OF r", run_id)
        if row is None:
            raise LookupError(str(run_id))
        if row["deleted"]:
            raise RunNotRetryable("of a deleted workflow")
        if row["status"] not in ("failed", "cancelled"):
            raise RunNotRetryable(row["status"])
        execution = row["execution"] + 1
        await conn.execute("UPDATE workflow_runs SET status = 'queued', execution = $2, error = NULL,"
                           " cancel_reason = NULL, finished_at = NULL WHERE id = $1", run_id, execution)
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
