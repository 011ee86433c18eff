"""The audit log: who did what to which thing, from where. Rows are only ever added."""

from __future__ import annotations

import json
from typing import Any

import asyncpg


async def write_audit(db: asyncpg.Pool | asyncpg.Connection, actor: str, action: str, target: str | None,
                      source_ip: str | None, **details: Any) -> None:
    """Add one entry. `db` may be a connection inside a transaction, so the entry lands with the change it
    records. `details` must be JSON-serialisable. Raises asyncpg errors (connection errors when Postgres is away)."""
    await db.execute("INSERT INTO audit_log (actor, action, target, source_ip, details) VALUES ($1, $2, $3, $4, $5)",
                     actor, action, target, source_ip, json.dumps(details))


async def recent_audit(pool: asyncpg.Pool, action_prefix: str | None, limit: int) -> list[dict[str, Any]]:
    """The newest `limit` entries first, optionally only actions starting with `action_prefix`.

    Each is {"at": datetime (UTC), "actor", "action", "target", "source_ip": str | None, "details": dict}.
    """
    rows = await pool.fetch(
        "SELECT at, actor, action, target, source_ip, details FROM audit_log"
        " WHERE ($1::text IS NULL OR starts_with(action, $1)) ORDER BY id DESC LIMIT $2", action_prefix, limit)
    return [{**dict(r), "details": json.loads(r["details"])} for r in rows]
