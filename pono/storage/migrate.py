"""Plain numbered SQL migrations, applied in order, each in a transaction, recorded in schema_migrations; then the
job queue's tables (pgqueuer's installer).

An advisory lock serialises migrators, so running twice or from two replicas at once is safe.
"""

from __future__ import annotations

import logging
from importlib import resources

import asyncpg

from pono.storage.jobs import install_queue

log = logging.getLogger(__name__)

_LOCK_KEY = 0x706F6E6F  # "pono"


def migration_files() -> list[tuple[str, str]]:
    folder = resources.files("pono.storage") / "migrations"
    files = sorted(f for f in folder.iterdir() if f.name.endswith(".sql"))
    return [(f.name.removesuffix(".sql"), f.read_text()) for f in files]


async def apply_migrations(conn: asyncpg.Connection) -> list[str]:
    """Apply what is missing; return the versions applied now."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute("INSERT INTO schema_migrations (version) VALUES ($1)", version)
            log.info("applied migration %s", version)
            applied_now.append(version)
        await install_queue(conn)  # pgqueuer's own tables, kept in step with the installed pgqueuer
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _LOCK_KEY)
    return applied_now
