"""The control bus: an operator action reaches the replica that holds the call, wherever it was asked.

Each replica listens on its own Redis channel. A sender looks the call up in the live registry, publishes
the action there (or runs it directly when the call is its own), and waits for the answer on a list.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from pono.storage.live import LiveState, call_key

log = logging.getLogger(__name__)

Executor = Callable[[str, str, dict[str, Any], str], Awaitable[dict[str, Any]]]


class ActionError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def control_channel(replica: str) -> str:
    return f"pono:control:{replica}"


class ControlBus:
    def __init__(self, live: LiveState, execute: Executor) -> None:
        self.live = live
        self.execute = execute
        self._task: asyncio.Task[None] | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        self._task = asyncio.create_task(self._listen(), name="control-bus")

    async def close(self) -> None:
        for task in [t for t in (self._task, *self._handlers) if t is not None]:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def send(self, call_id: str, action: str, args: dict[str, Any], actor: str,
                   timeout_s: float = 15.0) -> dict[str, Any]:
        """Run an action on the call's replica; its result, or ActionError (404 when the call is not live)."""
        try:
            replica = await self.live.redis.hget(call_key(call_id), "replica")
        except (RedisError, OSError):
            raise ActionError(503, "the live call registry (Redis) is unavailable") from None
        if replica is None:
            raise ActionError(404, f"no live call {call_id}")
        if replica == self.live.replica:
            return await self.execute(call_id, action, args, actor)
        request_id = uuid.uuid4().hex
        message = json.dumps({"id": request_id, "call_id": call_id, "action": action, "args": args, "actor": actor})
        try:
            if await self.live.redis.publish(control_channel(replica), message) == 0:
                raise ActionError(404, f"no live call {call_id} (its replica is gone)")
            reply = await self.live.blocking.blpop([f"pono:reply:{request_id}"], timeout=timeout_s)
        except (RedisError, OSError):
            raise ActionError(503, "the control bus (Redis) is unavailable") from None
        if reply is None:
            raise ActionError(504, f"the replica holding call {call_id} did not answer")
        answer = json.loads(reply[1])
        if "error" in answer:
            raise ActionError(int(answer.get("status", 500)), str(answer["error"]))
        return dict(answer.get("result") or {})

    async def _listen(self) -> None:
        while True:
            try:
                async with self.live.blocking.pubsub() as pubsub:
                    await pubsub.subscribe(control_channel(self.live.replica))
                    async for message in pubsub.listen():
                        if message.get("type") == "message":
                            task = asyncio.create_task(self._handle(message["data"]))
                            self._handlers.add(task)
                            task.add_done_callback(self._handlers.discard)
            except (RedisError, OSError) as exc:
                log.warning("control bus lost Redis (%s); retrying", type(exc).__name__)
                await asyncio.sleep(1.0)

    async def _handle(self, raw: str) -> None:
        try:
            request = json.loads(raw)
            request_id = str(request["id"])
        except (ValueError, KeyError, TypeError, RecursionError):
            log.warning("control bus: dropped a malformed message")
            return
        try:
            answer: dict[str, Any] = {"result": await self.execute(
                str(request["call_id"]), str(request["action"]), dict(request.get("args") or {}),
                str(request.get("actor", "?")))}
        except ActionError as exc:
            answer = {"error": exc.message, "status": exc.status}
        except Exception:
            log.exception("control action %s failed", request.get("action"))
            answer = {"error": "the action failed", "status": 500}
        with contextlib.suppress(RedisError, OSError):
            key = f"pono:reply:{request_id}"
            async with self.live.redis.pipeline(transaction=True) as pipe:
                pipe.rpush(key, json.dumps(answer))
                pipe.expire(key, 60)
                await pipe.execute()
