"""The operator feed of one call, as a console on any replica sees it: the call's Redis event channel."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis

from pono.context import SERVICES
from pono.storage.live import events_channel


class OperatorFeed:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._added = asyncio.Event()

    def add(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._added.set()

    async def wait_for(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 10.0) -> dict[str, Any]:
        """The first event (already received or still to come) that matches."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for event in self.events:
                if predicate(event):
                    return event
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TimeoutError(f"no matching operator event; got {[e['type'] for e in self.events]}")
            self._added.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._added.wait(), remaining)


@contextlib.asynccontextmanager
async def operator_feed(server: Any, call_id: str) -> AsyncIterator[OperatorFeed]:
    """Collect the call's redacted operator events from Redis while the block runs."""
    settings = server.app[SERVICES].settings
    client = aioredis.from_url(settings.redis_url.get_secret_value())
    pubsub = client.pubsub()
    await pubsub.subscribe(events_channel(call_id))
    feed = OperatorFeed()

    async def read() -> None:
        async for message in pubsub.listen():
            if message.get("type") == "message":
                feed.add(json.loads(message["data"]))

    reader = asyncio.create_task(read())
    try:
        yield feed
    finally:
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await reader
        await pubsub.aclose()
        await client.aclose()
