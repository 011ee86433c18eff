"""Wait for a Pono server (or a speech worker, or a peer's bot) to answer its readiness path, for tests and
benchmarks."""

from __future__ import annotations

import asyncio

import aiohttp


async def wait_until_ready(url: str, timeout_s: float = 120.0,
                           process: asyncio.subprocess.Process | None = None, path: str = "/api/ready") -> None:
    """Return once GET `path` is 200. Raises RuntimeError when start-up failed (the server says so, or
    `process` exited) and TimeoutError when it is still not ready after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with aiohttp.ClientSession() as http:
        while asyncio.get_running_loop().time() < deadline:
            if process is not None and process.returncode is not None:
                raise RuntimeError(f"{url}'s process exited with {process.returncode}")
            try:
                async with http.get(url + path) as r:
                    if r.status == 200:
                        return
                    error = (await r.json()).get("error")
                    if error:
                        raise RuntimeError(error)
            except aiohttp.ClientError:
                pass  # not listening yet
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not become ready within {timeout_s:.0f} s")
