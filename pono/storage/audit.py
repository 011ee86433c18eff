"""The audit log: who did what to which thing, from where. Rows are only ever added."""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection
from typing import Any

import asyncpg


async def write_audit(db: asyncpg.Pool | asyncpg.Connection, actor: str, action: str, target: str | None,
                      source_ip: str | None, **details: Any) -> None:
    """Add one entry. `db` may be a connection inside a transaction, so the entry lands with the change it
    records. `details` must be JSON-serialisable. Raises asyncpg errors (connection errors when Postgres is away)."""
    await db.execute("INSERT INTO audit_log (actor, action, target, source_ip, details) VALUES ($1, $2, $3, $4, $5)",
                     actor, action, target, source_ip, json.dumps(details))


async def save_audited(conn: asyncpg.Connection, table: str, row_id: uuid.UUID | None, values: dict[str, Any],
                       returning: str, *, jsonb: Collection[str], actor: str, kind: str, source_ip: str | None,
                       **details: Any) -> asyncpg.Record | None:
    """Insert a row into `table` (`row_id` None) or replace the fields `values` names of its live row `row_id`
    (deleted_at NULL; updated_at set to now), and audit it as "<kind>.create" or "<kind>.update" with the row's
    id and `details`. Call it inside a transaction, so the entry lands with the change.

    `values`: column → value, the columns named by code, never by a request (they go into the SQL); those in
    `jsonb` are stored as JSON. Returns the `returning` columns of the saved row, or None when there is no live
    row `row_id` (nothing is changed or audited then). Raises asyncpg errors (UniqueViolationError, ...).
    """
    columns = list(values)
    params = [f"${i}::jsonb" if c in jsonb else f"${i}" for i, c in enumerate(columns, 1)]
    args = [json.dumps(values[c]) if c in jsonb else values[c] for c in columns]
    if row_id is None:
        row = await conn.fetchrow(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join(params)})"
                                  f" RETURNING {returning}", *args)
    else:
        assignments = ", ".join(f"{c} = {p}" for c, p in zip(columns, params, strict=True))
        row = await conn.fetchrow(f"UPDATE {table} SET {assignments}, updated_at = now()"
                                  f" WHERE id = ${len(columns) + 1} AND deleted_at IS NULL RETURNING {returning}",
                                  *args, row_id)
        if row is None:
            return None
    await write_audit(conn, actor, f"{kind}.create" if row_id is None else f"{kind}.update", str(row["id"]),
                      source_ip, **details)
    return row


async def recent_audit(pool: asyncpg.Pool, action_prefix: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` entries first, optionally only actions starting with `action_prefix`.

    Each is {"at": datetime (UTC), "actor", "action", "target", "source_ip": str | None, "details": dict}.
    """
    rows = await pool.fetch(
        "SELECT at, actor, action, target, source_ip, details FROM audit_log"
        " WHERE ($1::text IS NULL OR starts_with(action, $1)) ORDER BY id DESC LIMIT $2", action_prefix, limit)
    return [{**dict(r), "details": json.loads(r["details"])} for r in rows]
