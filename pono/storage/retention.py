"""Retention: calls are kept for PONO_RETENTION_DAYS, soft-deleted rows (undo, audits) as long; then both are
deleted for good, with everything that references them (turns, tool calls, DLP findings, summaries and workflow
runs, chunks, keys, refresh tokens, phone numbers) by ON DELETE CASCADE. Workflow runs that finished that long ago
go too, with or without a call (a schedule's or a manual run's history would otherwise grow for ever)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import asyncpg

from pono.storage.recordings import RecordingStore, purge_recordings

log = logging.getLogger(__name__)

# Tables with a deleted_at column; what references them goes with them by ON DELETE CASCADE.
SOFT_DELETED = ("calls", "personas", "documents", "users", "workflows")
# Beyond deleted_at, what makes a row old enough to purge: a call's transcript lasts as long as a deleted row.
_AGED = {"calls": " OR started_at < now() - make_interval(days => $1)"}
_BATCH = 1000  # rows per DELETE, so one purge never holds long locks over a big table


@dataclass
class PurgeResult:
    """What one purge did: rows removed per table, and for each table whose purge failed, why."""

    removed: dict[str, int] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, dict[str, int] | dict[str, str]]:
        """{"removed": {table: rows}, "failed": {table: "ErrorType: message"}} for `pono purge`'s output."""
        return {"removed": self.removed, "failed": self.failed}


async def _purge_table(pool: asyncpg.Pool, table: str, retention_days: int) -> int:
    removed = 0
    while True:
        status = await pool.execute(
            f"DELETE FROM {table} WHERE id IN (SELECT id FROM {table}"
            f" WHERE deleted_at < now() - make_interval(days => $1){_AGED.get(table, '')} LIMIT {_BATCH})",
            retention_days)
        count = int(status.split()[-1])
        removed += count
        if count < _BATCH:
            return removed


async def _purge_runs(pool: asyncpg.Pool, retention_days: int) -> int:
    """Finished workflow runs made more than `retention_days` ago (their step runs go by cascade)."""
    removed = 0
    while True:
        status = await pool.execute(
            "DELETE FROM workflow_runs WHERE id IN (SELECT id FROM workflow_runs"
            " WHERE created_at < now() - make_interval(days => $1) AND status NOT IN ('queued', 'running')"
            f" LIMIT {_BATCH})", retention_days)
        count = int(status.split()[-1])
        removed += count
        if count < _BATCH:
            return removed


async def purge(pool: asyncpg.Pool, retention_days: int, recordings: RecordingStore | None = None) -> PurgeResult:
    """Delete calls that started more than `retention_days` days ago and rows soft-deleted that long ago, with
    what references them. Each table is purged on its own: a failure (an unknown reference, a lost connection)
    is logged and reported in `failed`, and the other tables are still purged. Never raises for a table.
    Recordings go first, file and row (`recordings`: where their files are; None: rows only, by cascade)."""
    result = PurgeResult()
    if recordings is not None:
        try:
            result.removed["recordings"] = await purge_recordings(pool, recordings, retention_days)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            result.failed["recordings"] = f"{type(exc).__name__}: {exc}"
            log.warning("retention purge of recordings failed: %s", result.failed["recordings"])
    for table in SOFT_DELETED:
        try:
            result.removed[table] = await _purge_table(pool, table, retention_days)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
            result.failed[table] = f"{type(exc).__name__}: {exc}"
            log.warning("retention purge of %s failed: %s", table, result.failed[table])
    try:
        result.removed["workflow_runs"] = await _purge_runs(pool, retention_days)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError) as exc:
        result.failed["workflow_runs"] = f"{type(exc).__name__}: {exc}"
        log.warning("retention purge of workflow_runs failed: %s", result.failed["workflow_runs"])
    if any(result.removed.values()):
        log.info("purged rows past %d days of retention: %s", retention_days, result.removed)
    return result


async def purge_daily(pool: asyncpg.Pool, retention_days: int) -> None:
    """Run `purge` now and then every 24 hours, until cancelled; a failed day is logged and retried the next."""
    while True:
        try:
            await purge(pool, retention_days)
        except Exception as exc:  # not expected (purge reports table failures); the next day catches up
            log.warning("retention purge failed: %s", type(exc).__name__)
        await asyncio.sleep(24 * 3600)
