"""The control bus: an operator action reaches the replica that holds the call, wherever it was asked.

Each replica listens on its own Redis channel. A sender looks the call up in the live registry, publishes
the action there (or runs it directly when the call is its own), and waits for the answer on a list.

Redis is not trusted to say who asked: every request is sealed with HMAC-SHA256 under a secret the replicas share
(kept in Postgres), names the replica it is for, a time and a random nonce. A replica runs only requests that are
signed, for it, at most MAX_AGE_S old (either way) and never seen before (the nonce is taken with SET NX); answers
are sealed too and name their request. Whatever fails is dropped, logged and counted (`on_refused(reason)`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from pono.storage.live import LiveState, call_key

log = logging.getLogger(__name__)

Executor = Callable[[str, str, dict[str, Any], str], Awaitable[dict[str, Any]]]
MAX_AGE_S = 30.0  # a request older (or further ahead) than this is refused; its nonce is kept twice as long
# Why a message was refused: the label of the refusals metric.
REFUSALS = ("malformed", "unsigned", "bad_signature", "wrong_replica", "stale", "replayed", "bad_reply")


class ActionError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Refused(Exception):
    """A control message that must not be acted on; `reason` is one of REFUSALS."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def control_channel(replica: str) -> str:
    return f"pono:control:{replica}"


class Sealer:
    """Seals and opens control messages: {"body": JSON text, "sig": hex HMAC-SHA256 of the body}."""

    def __init__(self, secret: bytes) -> None:
        self._key = hashlib.sha256(b"pono-control:" + secret).digest()

    def seal(self, fields: dict[str, Any]) -> str:
        """`fields` with the time ("ts", unix s) and a fresh "nonce", signed; the text to publish."""
        body = json.dumps({**fields, "ts": time.time(), "nonce": secrets.token_hex(16)}, separators=(",", ":"))
        return json.dumps({"body": body, "sig": self._sign(body)}, separators=(",", ":"))

    def open(self, raw: str) -> dict[str, Any]:
        """The signed fields of a sealed message. Raises Refused: malformed, unsigned or bad_signature."""
        try:
            envelope = json.loads(raw)
        except (ValueError, RecursionError):
            raise Refused("malformed") from None
        if not isinstance(envelope, dict):
            raise Refused("malformed")
        body, sig = envelope.get("body"), envelope.get("sig")
        if not isinstance(body, str) or not isinstance(sig, str):
            raise Refused("unsigned")
        if not hmac.compare_digest(sig, self._sign(body)):
            raise Refused("bad_signature")
        try:
            fields = json.loads(body)
        except (ValueError, RecursionError):
            raise Refused("malformed") from None
        if not isinstance(fields, dict):
            raise Refused("malformed")
        return fields

    def _sign(self, body: str) -> str:
        return hmac.new(self._key, body.encode(), hashlib.sha256).hexdigest()


class ControlBus:
    """`secret`: the key every replica shares; `on_refused(reason)` counts refused messages (a metric)."""

    def __init__(self, live: LiveState, execute: Executor, secret: bytes,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.live = live
        self.execute = execute
        self.sealer = Sealer(secret)
        self.on_refused = on_refused or (lambda reason: None)
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
        """Run an action on the call's replica; its result, or ActionError (404 when the call is not live,
        503 without Redis, 504 when no good answer came within `timeout_s` seconds)."""
        try:
            replica = await self.live.redis.hget(call_key(call_id), "replica")
        except (RedisError, OSError):
            raise ActionError(503, "the live call registry (Redis) is unavailable") from None
        if replica is None:
            raise ActionError(404, f"no live call {call_id}")
        if replica == self.live.replica:
            return await self.execute(call_id, action, args, actor)
        request_id = uuid.uuid4().hex
        message = self.sealer.seal({"id": request_id, "to": replica, "call_id": call_id, "action": action,
                                    "args": args, "actor": actor})
        deadline = time.monotonic() + timeout_s
        try:
            if await self.live.redis.publish(control_channel(replica), message) == 0:
                raise ActionError(404, f"no live call {call_id} (its replica is gone)")
            while (left := deadline - time.monotonic()) > 0:
                reply = await self.live.blocking.blpop([f"pono:reply:{request_id}"], timeout=max(0.01, left))
                if reply is None:
                    break
                try:
                    answer = self._answer(reply[1], request_id)
                except Refused as refused:
                    self._refuse(refused.reason, f"an answer about call {call_id}")
                    continue
                if "error" in answer:
                    raise ActionError(int(answer.get("status", 500)), str(answer["error"]))
                return dict(answer.get("result") or {})
        except (RedisError, OSError):
            raise ActionError(503, "the control bus (Redis) is unavailable") from None
        raise ActionError(504, f"the replica holding call {call_id} did not answer")

    def _answer(self, raw: str, request_id: str) -> dict[str, Any]:
        fields = self.sealer.open(raw)
        answer = fields.get("answer")
        if fields.get("id") != request_id or not isinstance(answer, dict):
            raise Refused("bad_reply")
        return answer

    def _refuse(self, reason: str, what: str) -> None:
        log.warning("control bus: refused %s (%s)", what, reason)
        self.on_refused(reason)

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

    async def _admit(self, raw: str) -> dict[str, Any]:
        """A request this replica may run. Raises Refused (see REFUSALS); RedisError when the nonce can't be kept."""
        request = self.sealer.open(raw)
        if request.get("to") != self.live.replica:
            raise Refused("wrong_replica")
        ts, nonce = request.get("ts"), request.get("nonce")
        if not isinstance(ts, int | float) or abs(time.time() - ts) > MAX_AGE_S:
            raise Refused("stale")
        if not isinstance(nonce, str) or not isinstance(request.get("id"), str):
            raise Refused("malformed")
        if not await self.live.redis.set(f"pono:control-nonce:{nonce}", "1", nx=True, ex=int(2 * MAX_AGE_S)):
            raise Refused("replayed")
        return request

    async def _handle(self, raw: str) -> None:
        try:
            request = await self._admit(raw)
        except Refused as refused:
            self._refuse(refused.reason, "a request")
            return
        except (RedisError, OSError) as exc:
            log.warning("control bus: a request dropped, its nonce could not be checked (%s)", type(exc).__name__)
            return
        request_id = request["id"]
        try:
            answer: dict[str, Any] = {"result": await self.execute(
                str(request.get("call_id")), str(request.get("action")), dict(request.get("args") or {}),
                str(request.get("actor", "?")))}
        except ActionError as exc:
            answer = {"error": exc.message, "status": exc.status}
        except Exception:
            log.exception("control action %s failed", request.get("action"))
            answer = {"error": "the action failed", "status": 500}
        with contextlib.suppress(RedisError, OSError):
            key = f"pono:reply:{request_id}"
            async with self.live.redis.pipeline(transaction=True) as pipe:
                pipe.rpush(key, self.sealer.seal({"id": request_id, "answer": answer}))
                pipe.expire(key, 60)
                await pipe.execute()
