"""Wait for a Pono server to answer /api/ready, for tests and benchmarks."""

from __future__ import annotations

import asyncio

import aiohttp


async def wait_until_ready(url: str, timeout_s: float = 120.0,
                           process: asyncio.subprocess.Process | None = None) -> None:
    """Return once GET /api/ready is 200. Raises RuntimeError when start-up failed (the server says so, or
    `process` exited) and TimeoutError when it is still not ready after `timeout_s`."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with aiohttp.ClientSession() as http:
        while asyncio.get_running_loop().time() < deadline:
            if process is not None and process.returncode is not None:
                raise RuntimeError(f"pono serve exited with {process.returncode}")
            try:
                async with http.get(f"{url}/api/ready") as r:
                    if r.status == 200:
                        return
                    error = (await r.json()).get("error")
                    if error:
                        raise RuntimeError(error)
            except aiohttp.ClientError:
                pass  # not listening yet
            await asyncio.sleep(0.1)
    raise TimeoutError(f"{url} did not become ready within {timeout_s:.0f} s")
