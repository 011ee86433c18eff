"""`python -m pono jobs` as a child process on a database of the test's own, for tests: its log in a file,
its probes (pono.jobs.health) on a port of its own."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from pono.agent.embedded import free_port


class JobWorkerProcess:
    """`python -m pono jobs` on `url`, logging to `folder/name.log`. `env` adds to (or overrides) the worker's
    settings; OPENAI_BASE_URL and PONO_METRICS_PORT are dropped from the caller's environment unless given."""

    def __init__(self, url: str, folder: Path, name: str, **env: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.log = folder / f"{name}.log"
        self.port = free_port()
        self.env = {**os.environ, "DATABASE_URL": url, "PONO_DATA_DIR": str(folder / name),
                    "PONO_JOBS_HEALTH_PORT": str(self.port), "PONO_JOBS_HEARTBEAT_S": "2",
                    "PONO_JOBS_DRAIN_TIMEOUT_S": "30", "PONO_LOG_FORMAT": "console",
                    "PONO_WEBHOOK_ALLOWED_HOSTS": '["127.0.0.1"]', "PONO_WEBHOOK_SECRET": "s3cret-for-workers", **env}
        for inherited in ("OPENAI_BASE_URL", "PONO_METRICS_PORT"):
            if inherited not in env:
                self.env.pop(inherited, None)
        self.process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = await asyncio.create_subprocess_exec(sys.executable, "-m", "pono", "jobs", env=self.env,
                                                                stdout=log, stderr=asyncio.subprocess.STDOUT)

    async def probe(self, path: str) -> tuple[int, dict[str, Any]]:
        """(status, JSON body) of GET `path`; (0, {}) when nothing answers."""
        try:
            async with aiohttp.ClientSession() as http, \
                    http.get(self.url + path, timeout=aiohttp.ClientTimeout(total=5)) as r:
                return r.status, await r.json()
        except (aiohttp.ClientConnectionError, TimeoutError):
            return 0, {}

    async def until(self, path: str, status: int, within_s: float) -> dict[str, Any]:
        """Probe `path` every 0.1 s until it answers `status` (its body then); fails after `within_s`."""
        deadline = time.monotonic() + within_s
        seen: tuple[int, dict[str, Any]] = (0, {})
        while time.monotonic() < deadline:
            seen = await self.probe(path)
            if seen[0] == status:
                return seen[1]
            assert self.process is not None and self.process.returncode is None, self.tail()
            await asyncio.sleep(0.1)
        raise AssertionError(f"{path} never answered {status} (last: {seen}):\n{self.tail()}")

    async def wait_logged(self, text: str, within_s: float = 30) -> None:
        """Return once `text` is in the log; fails after `within_s`."""
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            if text in self.tail(None):
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"{text!r} never logged:\n{self.tail()}")

    def tail(self, chars: int | None = 3000) -> str:
        """The log's last `chars` characters (None: all of it)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return text if chars is None else text[-chars:]

    async def stop(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()
