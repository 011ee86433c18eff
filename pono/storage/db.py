"""Postgres through asyncpg: connect with retries and backoff, migrate, then a bounded pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import asyncpg

from pono.storage.embedded import EmbeddedPostgres
from pono.storage.migrate import apply_migrations

if TYPE_CHECKING:
    from datetime import datetime

    from pono.settings import Settings

log = logging.getLogger(__name__)

# Errors that mean "the server is unreachable or went away", as opposed to a bad statement.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)


class StorageError(RuntimeError):
    """Storage cannot start (wrong URL, server unreachable): a message for one clear log line."""


def describe(dsn: str) -> str:
    """The DSN without its password, for logs."""
    parts = urlsplit(dsn)
    host = parts.hostname or parts.query or "local socket"
    return f"{parts.scheme}://{parts.username or ''}@{host}:{parts.port or ''}{parts.path}"


async def connect_with_retry(dsn: str, attempts: int, timeout_s: float = 5.0) -> asyncpg.Connection:
    delay = 0.25
    for attempt in range(1, attempts + 1):
        try:
            return await asyncpg.connect(dsn, timeout=timeout_s)
        except asyncpg.InvalidPasswordError as exc:
            raise StorageError(f"cannot log in to Postgres at {describe(dsn)}: {exc}") from None
        except asyncpg.InvalidCatalogNameError as exc:
            raise StorageError(f"Postgres at {describe(dsn)} has no such database: {exc}") from None
        except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            if attempt == attempts:
                raise StorageError(
                    f"cannot reach Postgres at {describe(dsn)} after {attempts} attempts: "
                    f"{type(exc).__name__}: {exc}"
                ) from None
            log.warning("Postgres not reachable yet (%s); retrying in %.1f s", type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


async def _init_connection(conn: asyncpg.Connection) -> None:
    from pgvector.asyncpg import register_vector

    await register_vector(conn)


class Database:
    def __init__(self, dsn: str, *, min_size: int = 1, max_size: int = 10, attempts: int = 5) -> None:
        self.dsn = dsn
        self.min_size = min_size
        self.max_size = max_size
        self.attempts = attempts
        self._pool: asyncpg.Pool | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise StorageError("the database is not connected")
        return self._pool

    async def connect(self) -> None:
        # Migrate on a plain connection first: the pool registers the pgvector codec, which needs the
        # extension the first migration creates.
        conn = await connect_with_retry(self.dsn, self.attempts)
        try:
            await apply_migrations(conn)
        finally:
            await conn.close()
        self._pool = await asyncpg.create_pool(
            self.dsn, min_size=self.min_size, max_size=self.max_size, init=_init_connection,
            command_timeout=10, timeout=5,
        )

    async def reachable(self) -> bool:
        try:
            async with asyncio.timeout(2):
                await self.pool.fetchval("SELECT 1")
            return True
        except Exception:
            return False

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except TimeoutError:
                pool.terminate()


async def live_rows_oldest_first(pool: asyncpg.Pool, table: str, columns: str, after: tuple[datetime, str] | None,
                                 count: int) -> list[asyncpg.Record]:
    """Up to `count` rows of `table` not soft-deleted, oldest first, continuing after the (created_at, id)
    position `after` (None: from the first): a page of a list endpoint. `table` and `columns` are named by code,
    never by a request (they go into the SQL)."""
    return await pool.fetch(
        f"SELECT {columns} FROM {table} WHERE deleted_at IS NULL"
        " AND ($1::timestamptz IS NULL OR (created_at, id::text) > ($1, $2))"
        " ORDER BY created_at, id::text LIMIT $3",
        after[0] if after else None, after[1] if after else "", count)


@contextlib.asynccontextmanager
async def open_database(settings: Settings, *, max_size: int) -> AsyncIterator[Database]:
    """The configured Postgres (DATABASE_URL), or else an embedded one started in the data dir, connected (so
    migrated) with a pool of 1 to `max_size` connections, for one process or command: on the way out the pool is
    closed and the embedded server stopped. Its `dsn` is where it connected. Raises StorageError."""
    embedded = None
    if settings.database_url is not None:
        dsn = settings.database_url.get_secret_value()
    else:
        embedded = EmbeddedPostgres(settings.data_dir)
        dsn = await embedded.start()
    db = Database(dsn, min_size=1, max_size=max_size, attempts=settings.db_connect_attempts)
    try:
        await db.connect()
        yield db
    finally:
        await db.close()
        if embedded is not None:
            await embedded.stop()
