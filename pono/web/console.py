"""The operator console's live feed: one WebSocket per open console.

The console authenticates with its first message, gets a snapshot of live calls on every replica and then
deltas, follows one call's redacted event channel from Redis, and sends actions on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from aiohttp import WSMsgType, web
from pydantic import ValidationError
from redis.exceptions import RedisError

from pono.context import SERVICES, Services
from pono.http import ApiError
from pono.storage.history import call_turns
from pono.storage.live import events_channel
from pono.storage.users import Principal
from pono.web.call_actions import ActionIn, act

log = logging.getLogger(__name__)

_AUTH_TIMEOUT_S = 10.0
_POLL_S = 0.5
_MAX_MESSAGE_BYTES = 96 * 1024
# Close codes: 1008 policy violation (auth), 1003 unsupported data (garbage), 1009 too big.
_CLOSE_AUTH, _CLOSE_GARBAGE = 4401, 1003


class ConsoleSession:
    def __init__(self, ws: web.WebSocketResponse, services: Services, who: Principal, remote: str | None) -> None:
        self.ws = ws
        self.services = services
        self.who = who
        self.remote = remote
        self.watch_task: asyncio.Task[None] | None = None
        self.watching: str | None = None

    async def send(self, message: dict[str, Any]) -> None:
        if not self.ws.closed:
            await self.ws.send_str(json.dumps(message, separators=(",", ":")))

    async def live_list(self) -> None:
        """Snapshot first, then only what changed."""
        live = self.services.storage.live
        assert live is not None
        known: dict[str, dict[str, str]] | None = None
        while not self.ws.closed:
            try:
                current = {c["call_id"]: c for c in await live.live_calls()}
            except (RedisError, OSError):
                await self.send({"type": "error", "error": "the live call registry (Redis) is unavailable"})
                await asyncio.sleep(2.0)
                continue
            if known is None:
                await self.send({"type": "calls", "calls": list(current.values())})
            else:
                for call_id, call in current.items():
                    if call_id not in known:
                        await self.send({"type": "call.added", "call": call})
                    elif call != known[call_id]:
                        await self.send({"type": "call.updated", "call": call})
                for call_id in known.keys() - current.keys():
                    await self.send({"type": "call.removed", "call_id": call_id})
            known = current
            await asyncio.sleep(_POLL_S)

    async def watch(self, call_id: str) -> None:
        if self.watch_task is not None:
            self.watch_task.cancel()
        self.watching = call_id
        self.watch_task = asyncio.create_task(self._follow(call_id))

    async def _follow(self, call_id: str) -> None:
        live = self.services.storage.live
        assert live is not None and self.services.storage.db is not None
        try:
            async with live.blocking.pubsub() as pubsub:
                await pubsub.subscribe(events_channel(call_id))
                # What was said before the console looked: the stored (redacted) turns so far.
                turns = await call_turns(self.services.storage.db.pool, call_id)
                await self.send({"type": "watching", "call_id": call_id, "turns": [
                    {"turn": t["idx"], "role": t["role"], "text": t["text"], "latency": t["latency"]}
                    for t in turns]})
                async for message in pubsub.listen():
                    if message.get("type") == "message":
                        await self.ws.send_str(
                            f'{{"type":"event","call_id":{json.dumps(call_id)},"event":{message["data"]}}}')
        except (RedisError, OSError):
            await self.send({"type": "error", "error": "lost the call's event channel (Redis)"})

    async def handle(self, raw: str) -> str | None:
        """One message from the console; returns a reason to close the socket, or None."""
        try:
            message = json.loads(raw)
        except ValueError:
            return "messages must be JSON"
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            return "messages must be JSON objects with a 'type'"
        kind = message["type"]
        if kind == "watch" and isinstance(message.get("call_id"), str) and len(message["call_id"]) <= 64:
            await self.watch(message["call_id"])
        elif kind == "unwatch":
            if self.watch_task is not None:
                self.watch_task.cancel()
            self.watching = None
        elif kind == "action":
            await self._action(message)
        elif kind == "ping":
            await self.send({"type": "pong"})
        else:
            return f"unknown message type {str(kind)[:40]!r}"
        return None

    async def _action(self, message: dict[str, Any]) -> None:
        ref = message.get("ref")
        call_id = message.get("call_id")
        try:
            if not isinstance(call_id, str):
                raise ApiError(422, "an action needs a call_id")
            body = ActionIn.model_validate({k: v for k, v in message.items() if k in ("action", "text", "sdp")})
            result = await act(self.services, self.who, call_id, body, self.remote)
            await self.send({"type": "action.result", "ref": ref, "call_id": call_id, "action": body.action,
                             **result})
        except ValidationError as exc:
            await self.send({"type": "action.error", "ref": ref, "status": 422,
                             "error": "; ".join(e["msg"] for e in exc.errors())})
        except ApiError as exc:
            await self.send({"type": "action.error", "ref": ref, "status": exc.status,
                             "error": json.loads(exc.text or "{}").get("error")})

    async def close(self) -> None:
        if self.watch_task is not None:
            self.watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.watch_task


async def _authenticate(ws: web.WebSocketResponse, services: Services) -> Principal | str:
    """The first message must be {"type": "auth", "token": ...}; a principal, or why not."""
    try:
        first = await ws.receive(timeout=_AUTH_TIMEOUT_S)
    except TimeoutError:
        return "authentication timed out"
    if first.type is not WSMsgType.TEXT:
        return "the first message must be an auth message"
    try:
        message = json.loads(first.data)
        token = message["token"] if message.get("type") == "auth" else None
    except (ValueError, KeyError, TypeError, AttributeError):
        token = None
    if not isinstance(token, str):
        return "the first message must be {\"type\": \"auth\", \"token\": ...}"
    who = await services.auth.verify(token)
    if who is None:
        return "invalid, expired or revoked token"
    if not who.may("calls"):
        return "this API key is not scoped for calls"
    return who


async def console_socket(request: web.Request) -> web.WebSocketResponse:
    """GET /api/console/ws: the console's WebSocket (authenticated by its first message, then the calls feed)."""
    services = request.app[SERVICES]
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=_MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    who = await _authenticate(ws, services)
    if isinstance(who, str):
        await ws.close(code=_CLOSE_AUTH, message=who.encode())
        return ws
    session = ConsoleSession(ws, services, who, request.remote)
    ice_servers = [s.model_dump(exclude_none=True) for s in services.settings.ice_servers]
    await session.send({"type": "hello", "user": {"name": who.name, "role": who.role}, "ice_servers": ice_servers})
    lister = asyncio.create_task(session.live_list())
    try:
        async for msg in ws:
            if msg.type is WSMsgType.TEXT:
                reason = await session.handle(msg.data)
            else:
                reason = "binary messages are not accepted" if msg.type is WSMsgType.BINARY else None
            if reason is not None:
                await ws.close(code=_CLOSE_GARBAGE, message=reason.encode()[:120])
                break
    finally:
        lister.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await lister
        await session.close()
    return ws
