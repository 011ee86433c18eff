"""The operator console's live feed: one WebSocket per open console.

The console authenticates with its first message, gets a snapshot of live calls on every replica and then
deltas, follows one call's redacted event channel from Redis, and sends actions on it. Its token is checked
again before every watch and action and every PONO_CONSOLE_REAUTH_S; a revoked key, a deleted user or an expired
login closes the socket (4401; 4403 when the principal may no longer use the console). A later
{"type": "auth", "token"} (the console sends one after each refresh) replaces the token for the same user.
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

from pono import textsafe
from pono.context import SERVICES, Services
from pono.http import ApiError
from pono.storage.db import CONNECTION_ERRORS
from pono.storage.history import call_turns
from pono.storage.live import call_key, events_channel
from pono.storage.users import Principal
from pono.web.call_actions import ActionIn, act

log = logging.getLogger(__name__)

_AUTH_TIMEOUT_S = 10.0
_POLL_S = 0.5
_MAX_MESSAGE_BYTES = 96 * 1024
# Close codes: 4401 not (or no longer) authenticated, 4403 authenticated but not allowed, 1003 garbage.
_CLOSE_AUTH, _CLOSE_FORBIDDEN, _CLOSE_GARBAGE = 4401, 4403, 1003


class SessionEnded(Exception):
    """The socket must close: `code` (4401, 4403 or 1003) and a reason the console shows."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def _admit(who: Principal | None) -> Principal:
    """The principal if it may use the console; raises SessionEnded (4401 no principal, 4403 not allowed)."""
    if who is None:
        raise SessionEnded(_CLOSE_AUTH, "invalid, expired or revoked token (or the user was deleted)")
    if not who.may("calls"):
        raise SessionEnded(_CLOSE_FORBIDDEN, "this API key is not scoped for calls")
    if who.must_change_password:
        raise SessionEnded(_CLOSE_FORBIDDEN, "password change required: set a new one with POST /api/auth/password")
    return who


class ConsoleSession:
    def __init__(self, ws: web.WebSocketResponse, services: Services, who: Principal, token: str,
                 remote: str | None) -> None:
        self.ws = ws
        self.services = services
        self.who = who
        self.token = token  # what `who` was verified from; checked again before each action and periodically
        self.remote = remote
        self.watch_task: asyncio.Task[None] | None = None
        self.watching: str | None = None

    async def recheck(self) -> None:
        """Verify the session's token again and take the principal as it is now (role, deletion, revocation).

        Raises SessionEnded. While Postgres is unreachable the last principal is kept; a login's expiry is
        checked without it, so an expired one still ends the session.
        """
        try:
            who = await self.services.auth.verify(self.token)
        except CONNECTION_ERRORS:
            log.warning("console: the database is unavailable; keeping %s's session for now", self.who.name)
            return
        self.who = _admit(who)

    async def reauth(self, token: object) -> None:
        """{"type": "auth", "token"} on an open socket: a fresh token for the same user replaces the old one."""
        if not isinstance(token, str) or not token:
            raise SessionEnded(_CLOSE_AUTH, "an auth message needs a token")
        try:
            who = _admit(await self.services.auth.verify(token))
        except CONNECTION_ERRORS:
            await self.send({"type": "error", "error": "the database is unavailable; the token was not renewed"})
            return
        if who.user_id != self.who.user_id:
            raise SessionEnded(_CLOSE_AUTH, "a new token on an open console must be for the same user")
        self.who, self.token = who, token
        await self.send({"type": "auth.ok", "user": {"name": who.name, "role": who.role}})

    async def keep_checking(self) -> None:
        """Every PONO_CONSOLE_REAUTH_S, re-verify the token; close the socket when it no longer holds."""
        while not self.ws.closed:
            await asyncio.sleep(max(0.1, self.services.settings.console_reauth_s))
            try:
                await self.recheck()
            except SessionEnded as ended:
                log.info("console of %s closed: %s", self.who.name, ended.reason)
                await self.ws.close(code=ended.code, message=ended.reason.encode()[:120])
                return

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

    async def _exists(self, call_id: str) -> bool | None:
        """Whether the call is live on some replica or stored (and not deleted); None when neither store answers.
        Redis first: a call that just started may not be written to Postgres yet."""
        live, db = self.services.storage.live, self.services.storage.db
        assert live is not None and db is not None
        try:
            if await live.redis.exists(call_key(call_id)):
                return True
        except (RedisError, OSError):
            pass
        try:
            return await db.pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM calls WHERE id = $1 AND deleted_at IS NULL)", call_id)
        except CONNECTION_ERRORS:
            return None

    async def watch(self, call_id: str) -> None:
        exists = await self._exists(call_id)
        if not exists:  # the call watched before, if any, is still followed
            await self.send({"type": "error", "call_id": call_id, "error": f"no call {call_id!r} to watch"
                             if exists is False else "the database is unavailable; cannot watch a call now"})
            return
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

    async def handle(self, raw: str) -> None:
        """One message from the console. Raises SessionEnded when the socket must close."""
        try:
            message = textsafe.loads(raw)
        except (ValueError, RecursionError):
            raise SessionEnded(_CLOSE_GARBAGE, "messages must be JSON") from None
        if not isinstance(message, dict) or not isinstance(message.get("type"), str):
            raise SessionEnded(_CLOSE_GARBAGE, "messages must be JSON objects with a 'type'")
        kind = message["type"]
        if kind in ("watch", "action"):
            await self.recheck()  # what it may see and do is decided now, not at login
        if kind == "auth":
            await self.reauth(message.get("token"))
        elif kind == "watch":
            call_id = message.get("call_id")
            if not isinstance(call_id, str) or not 1 <= len(call_id) <= 64:
                raise SessionEnded(_CLOSE_GARBAGE, "watch needs a call_id string of 1 to 64 characters")
            await self.watch(call_id)
        elif kind == "unwatch":
            if self.watch_task is not None:
                self.watch_task.cancel()
            self.watching = None
        elif kind == "action":
            await self._action(message)
        elif kind == "ping":
            await self.send({"type": "pong"})
        else:
            raise SessionEnded(_CLOSE_GARBAGE, f"unknown message type {str(kind)[:40]!r}")

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


async def _authenticate(ws: web.WebSocketResponse, services: Services) -> tuple[Principal, str]:
    """The first message must be {"type": "auth", "token": ...}: (principal, token). Raises SessionEnded."""
    try:
        first = await ws.receive(timeout=_AUTH_TIMEOUT_S)
    except TimeoutError:
        raise SessionEnded(_CLOSE_AUTH, "authentication timed out") from None
    if first.type is not WSMsgType.TEXT:
        raise SessionEnded(_CLOSE_AUTH, "the first message must be an auth message")
    try:
        message = textsafe.loads(first.data)
        token = message["token"] if message.get("type") == "auth" else None
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        token = None
    if not isinstance(token, str):
        raise SessionEnded(_CLOSE_AUTH, "the first message must be {\"type\": \"auth\", \"token\": ...}")
    try:
        who = await services.auth.verify(token)
    except CONNECTION_ERRORS:
        raise SessionEnded(_CLOSE_AUTH, "the database is unavailable; try again shortly") from None
    return _admit(who), token


async def console_socket(request: web.Request) -> web.WebSocketResponse:
    """GET /api/console/ws: the console's WebSocket (authenticated by its first message, then the calls feed)."""
    services = request.app[SERVICES]
    ws = web.WebSocketResponse(heartbeat=20.0, max_msg_size=_MAX_MESSAGE_BYTES)
    await ws.prepare(request)
    try:
        who, token = await _authenticate(ws, services)
    except SessionEnded as refused:
        await ws.close(code=refused.code, message=refused.reason.encode()[:120])
        return ws
    session = ConsoleSession(ws, services, who, token, request.remote)
    ice_servers = [s.model_dump(exclude_none=True) for s in services.settings.ice_servers]
    await session.send({"type": "hello", "user": {"name": who.name, "role": who.role}, "ice_servers": ice_servers})
    tasks = [asyncio.create_task(session.live_list()), asyncio.create_task(session.keep_checking())]
    try:
        async for msg in ws:
            try:
                if msg.type is WSMsgType.TEXT:
                    await session.handle(msg.data)
                elif msg.type is WSMsgType.BINARY:
                    raise SessionEnded(_CLOSE_GARBAGE, "binary messages are not accepted")
            except SessionEnded as ended:
                await ws.close(code=ended.code, message=ended.reason.encode()[:120])
                break
    finally:
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await session.close()
    return ws
