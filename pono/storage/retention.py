"""Retention: soft-deleted rows are kept for a while (undo, audits), then purged for good."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

log = logging.getLogger(__name__)

# Tables with a deleted_at column; children (turns, chunks, ...) go with their parents by ON DELETE CASCADE.
SOFT_DELETED = ("calls", "personas", "documents", "users")


async def purge(pool: asyncpg.Pool, retention_days: int) -> dict[str, int]:
    removed: dict[str, int] = {}
    for table in SOFT_DELETED:
        status = await pool.execute(
            f"DELETE FROM {table} WHERE deleted_at < now() - make_interval(days => $1)", retention_days)
        removed[table] = int(status.split()[-1])
    if any(removed.values()):
        log.info("purged rows past %d days of retention: %s", retention_days, removed)
    return removed


async def purge_daily(pool: asyncpg.Pool, retention_days: int) -> None:
    while True:
        try:
            await purge(pool, retention_days)
        except Exception as exc:  # an outage delays the purge; the next day catches up
            log.warning("retention purge failed: %s", type(exc).__name__)
        await asyncio.sleep(24 * 3600)
