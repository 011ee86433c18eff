"""Workflows as stored: create, replace, (softly) delete, page through; the ones a trigger wakes; due schedules.

A workflow is a plain dict: {"id": str (UUID), "name", "definition": dict (the workflow JSON), "trigger_type":
"call.ended" | "schedule" | "manual", "enabled": bool, "next_fire_at": datetime | None (schedules),
"created_at", "updated_at": datetime}. What a definition may hold is checked above storage (pono.jobs.definition).
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import asyncpg

from pono.storage.audit import save_audited, write_audit
from pono.storage.db import live_rows_oldest_first
from pono.storage.workflow_runs import request_cancel

_COLUMNS = "id, name, definition, trigger_type, enabled, next_fire_at, created_at, updated_at"


class WorkflowNotFound(LookupError):
    """No workflow with that id (or it was deleted)."""


def workflow_of(row: asyncpg.Record) -> dict[str, Any]:
    """A workflows row as the plain dict this module's docstring describes."""
    workflow = dict(row)
    workflow["id"] = str(workflow["id"])
    workflow["definition"] = json.loads(workflow["definition"])
    return workflow


async def save_workflow(pool: asyncpg.Pool, workflow_id: uuid.UUID | None, values: dict[str, Any], actor: str,
                        source_ip: str | None) -> dict[str, Any]:
    """Create (`workflow_id` None) or replace a workflow and audit it, in one transaction; the saved workflow.

    `values`: {"name", "definition": dict, "trigger_type", "enabled", "next_fire_at": datetime | None}.
    Raises WorkflowNotFound, asyncpg.UniqueViolationError when the name is taken.
    """
    fields = {f: values[f] for f in ("name", "definition", "trigger_type", "enabled", "next_fire_at")}
    async with pool.acquire() as conn, conn.transaction():
        row = await save_audited(conn, "workflows", workflow_id, fields, _COLUMNS, jsonb=("definition",), actor=actor,
                                 kind="workflow", source_ip=source_ip, name=values["name"])
    if row is None:
        raise WorkflowNotFound(str(workflow_id))
    return workflow_of(row)


async def delete_workflow(pool: asyncpg.Pool, workflow_id: uuid.UUID, actor: str, source_ip: str | None) -> None:
    """Mark a workflow deleted (its runs stay readable until retention purges it), cancel its queued and running
    runs (a running one stops at its next await, after its compensations), and audit it. Raises
    WorkflowNotFound."""
    async with pool.acquire() as conn, conn.transaction():
        status = await conn.execute("UPDATE workflows SET deleted_at = now(), enabled = false"
                                    " WHERE id = $1 AND deleted_at IS NULL", workflow_id)
        if status.endswith(" 0"):
            raise WorkflowNotFound(str(workflow_id))
        cancelled = await request_cancel(conn, "its workflow was deleted", workflow_id=workflow_id)
        await write_audit(conn, actor, "workflow.delete", str(workflow_id), source_ip, runs_cancelled=len(cancelled))


async def get_workflow(pool: asyncpg.Pool | asyncpg.Connection, workflow_id: uuid.UUID | str) \
        -> dict[str, Any] | None:
    """The workflow with this id, or None (also when deleted)."""
    row = await pool.fetchrow(f"SELECT {_COLUMNS} FROM workflows WHERE id = $1 AND deleted_at IS NULL",
                              uuid.UUID(str(workflow_id)))
    return workflow_of(row) if row is not None else None


async def list_workflows(pool: asyncpg.Pool, after: tuple[datetime, str] | None, count: int) -> list[dict[str, Any]]:
    """Up to `count` workflows, oldest first, continuing after the (created_at, id) position `after`."""
    return [workflow_of(r) for r in await live_rows_oldest_first(pool, "workflows", _COLUMNS, after, count)]


async def enabled_workflows(pool: asyncpg.Pool | asyncpg.Connection, trigger_type: str) -> list[dict[str, Any]]:
    """Every enabled, live workflow with this trigger type, oldest first."""
    rows = await pool.fetch(f"SELECT {_COLUMNS} FROM workflows WHERE trigger_type = $1 AND enabled"
                            " AND deleted_at IS NULL ORDER BY created_at", trigger_type)
    return [workflow_of(r) for r in rows]


async def take_due_schedules(conn: asyncpg.Connection, now: datetime) -> list[dict[str, Any]]:
    """Schedule workflows whose `next_fire_at` is at or before `now`, locked for this transaction (others skip
    them): call inside a transaction, then `set_next_fire` for each."""
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM workflows WHERE trigger_type = 'schedule' AND enabled AND deleted_at IS NULL"
        " AND next_fire_at <= $1 ORDER BY next_fire_at FOR UPDATE SKIP LOCKED", now)
    return [workflow_of(r) for r in rows]


async def set_next_fire(conn: asyncpg.Connection, workflow_id: str, at: datetime | None) -> None:
    """When the schedule workflow fires next."""
    await conn.execute("UPDATE workflows SET next_fire_at = $2 WHERE id = $1", uuid.UUID(workflow_id), at)
