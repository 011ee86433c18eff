"""Live state in Redis: the call registry across replicas, one event channel per call, rate limits.

Nothing here is needed for a call to go on: when Redis is away, publishes are dropped, the registry is
rebuilt by the next heartbeat after it returns, and `up` says so for /api/ready and metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from pono.events import CallEvent, EventType
from pono.logs import own

log = logging.getLogger(__name__)

# The operators' copy of one event: (event as a JSON dict, the call's DLP policy or None for the default,
# the agent text so far per turn, which it updates) → the event redacted. Blocking: it runs in a worker thread.
# A policy is opaque here. The composition root passes pono.agent.dlp.apply.redact_event.
RedactEvent = Callable[[dict[str, Any], Any, dict[int, str]], dict[str, Any]]

LIVE_SET = "pono:calls:live"  # sorted set: call id → last heartbeat (unix time)


def call_key(call_id: str) -> str:
    return f"pono:call:{call_id}"


def events_channel(call_id: str) -> str:
    return f"pono:events:{call_id}"


def _token_key(token_id: str) -> str:
    return f"pono:call-token:{token_id}"


# Since when (unix s) this Redis has kept spent call tokens: set once, again only if Redis lost it (a restart of the
# embedded Valkey, a flush). A token issued before it may have been spent and forgotten, so it is refused.
TOKENS_SINCE = "pono:call-tokens:since"


def _delta_follows(items: list[tuple[str, str, dict[str, Any] | None]], i: int) -> bool:
    """Whether items[i] is an agent delta that the next item (a delta of the same turn) supersedes."""
    event = items[i][2]
    if event is None or event.get("type") != "agent.delta" or i + 1 >= len(items):
        return False
    following = items[i + 1][2]
    return (items[i + 1][1] == items[i][1] and following is not None and following.get("type") == "agent.delta"
            and following.get("turn") == event.get("turn"))


class LiveState:
    """This replica's calls in the shared registry, and their events on each call's channel, redacted first.

    `redact` runs on every published event in a worker thread (see RedactEvent).
    """

    def __init__(self, url: str, replica: str, ttl_s: int = 15, *, redact: RedactEvent) -> None:
        self.url = url
        self.redact = redact
        self.replica = replica
        self.ttl_s = ttl_s
        self.redis = aioredis.from_url(url, socket_timeout=1.0, socket_connect_timeout=1.0, decode_responses=True)
        # Subscriptions and blocking pops wait for as long as they like: no read timeout on this one.
        self.blocking = aioredis.from_url(url, socket_connect_timeout=1.0, decode_responses=True,
                                          health_check_interval=15)
        self.up = False
        self.calls: dict[str, dict[str, str]] = {}  # this replica's live calls, as registered
        self.draining = False  # this replica takes no new calls
        # (what, call id, event): "event" to publish, "state" to update, "unregister" to remove
        self._outbox: deque[tuple[str, str, dict[str, Any] | None]] = deque(maxlen=10_000)
        self._redaction: dict[str, tuple[Any, dict[int, str]]] = {}  # call id → (policy, agent text per turn)
        self._wake = asyncio.Event()
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        await self._ping()
        self._tasks = [asyncio.create_task(self._heartbeat(), name="registry-heartbeat"),
                       asyncio.create_task(self._publisher(), name="event-publisher")]

    async def _ping(self) -> bool:
        try:
            await self.redis.ping()
            await self.redis.set(TOKENS_SINCE, f"{time.time():.3f}", nx=True)
            if not self.up:
                log.info("Redis reachable at %s", own(self.url.split("@")[-1]))  # never the password
            self.up = True
        except (RedisError, OSError) as exc:
            if self.up:
                log.warning("Redis unreachable (%s): calls go on; registry will reconverge", type(exc).__name__)
            self.up = False
        return self.up

    # -- registry -----------------------------------------------------------------------------
    def register(self, call_id: str, transport: str, persona: str | None, caller: str | None) -> None:
        self.calls[call_id] = {"call_id": call_id, "replica": self.replica, "transport": transport,
                               "persona": persona or "", "caller": caller or "", "state": "listening",
                               "started": f"{time.time():.3f}"}
        if self.draining:
            self.calls[call_id]["replica_draining"] = "yes"
        self._wake.set()

    def mark_draining(self, draining: bool = True) -> None:
        """This replica takes no new calls (or takes them again): its live calls say so in the registry,
        which operators see."""
        self.draining = draining
        for call_id, entry in self.calls.items():
            entry["replica_draining"] = "yes" if draining else ""
            self._outbox.append(("state", call_id, None))
        self._wake.set()

    def unregister(self, call_id: str) -> None:
        if self.calls.pop(call_id, None) is not None:
            self._outbox.append(("unregister", call_id, None))
            self._wake.set()

    def observer(self, call_id: str, policy: Any = None) -> Callable[[CallEvent], None]:
        """An observer for one call's event stream: keeps its registry entry current and queues its events
        for publishing (never blocks). `policy` is the call's DLP policy for `redact`; None: the default."""
        self._redaction[call_id] = (policy, {})

        def observe(event: CallEvent) -> None:
            if event.type is EventType.STATE and call_id in self.calls:
                self.calls[call_id]["state"] = str(event.data.get("state"))
                self._outbox.append(("state", call_id, None))
            elif event.type is EventType.TRANSFER and call_id in self.calls:
                self.calls[call_id]["operator_requested"] = str(event.data.get("reason") or "yes")
                self._outbox.append(("state", call_id, None))
            elif event.type is EventType.LATENCY and call_id in self.calls:
                marks = event.data.get("marks", {})
                sent = marks.get("first_audio_sent")
                if sent is not None and "llm_first_token" in marks:  # answers, not greetings or operator lines
                    self.calls[call_id]["last_latency_ms"] = str(round(sent * 1000))
                    self._outbox.append(("state", call_id, None))
            self._outbox.append(("event", call_id, event.to_json()))
            self._wake.set()

        return observe

    def _prepare(self, items: list[tuple[str, str, dict[str, Any] | None]]) -> list[tuple[str, str, str]]:
        """Blocking: redact event texts for operators and serialise them. Runs in a worker thread."""
        prepared = []
        for i, (what, call_id, event) in enumerate(items):
            if what == "event" and event is not None:
                policy, agent_text = self._redaction.get(call_id, (None, {}))
                if _delta_follows(items, i):
                    # Operators get agent text cumulatively: of a run of deltas only the last is published,
                    # so the text is scanned once per batch, not once per token.
                    turn = event.get("turn") or 0
                    agent_text[turn] = agent_text.get(turn, "") + str(event.get("text", ""))
                    continue
                message = json.dumps(self.redact(event, policy, agent_text), separators=(",", ":"))
                prepared.append((what, call_id, message))
                if event.get("type") == "call.ended":
                    self._redaction.pop(call_id, None)
            else:
                prepared.append((what, call_id, ""))
        return prepared

    async def _heartbeat(self) -> None:
        interval = max(1.0, self.ttl_s / 3)
        while not self._closed:
            if await self._ping():
                try:
                    await self._refresh_all()
                except (RedisError, OSError):
                    self.up = False
            await asyncio.sleep(interval)

    async def _refresh_all(self) -> None:
        if not self.calls:
            return
        now = time.time()
        async with self.redis.pipeline(transaction=False) as pipe:
            for call_id, fields in self.calls.items():
                pipe.hset(call_key(call_id), mapping=fields)
                pipe.expire(call_key(call_id), self.ttl_s)
                pipe.zadd(LIVE_SET, {call_id: now})
            await pipe.execute()

    async def _publisher(self) -> None:
        while not self._closed:
            await self._wake.wait()
            self._wake.clear()
            if not self.up:
                continue  # the heartbeat re-registers everything once Redis is back
            items = [self._outbox.popleft() for _ in range(len(self._outbox))]
            prepared = await asyncio.to_thread(self._prepare, items)
            try:
                await self._refresh_all()  # new calls appear at once, not at the next heartbeat
                async with self.redis.pipeline(transaction=False) as pipe:
                    for what, call_id, message in prepared:
                        if what == "unregister":
                            pipe.delete(call_key(call_id))
                            pipe.zrem(LIVE_SET, call_id)
                        elif what == "state":
                            if call_id in self.calls:
                                pipe.hset(call_key(call_id), mapping=self.calls[call_id])
                        else:
                            pipe.publish(events_channel(call_id), message)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                log.warning("Redis publish failed (%s)", type(exc).__name__)
                self.up = False

    async def live_calls(self) -> list[dict[str, str]]:
        """Every live call on every replica (raises RedisError when Redis is down)."""
        cutoff = time.time() - self.ttl_s
        await self.redis.zremrangebyscore(LIVE_SET, "-inf", cutoff)  # replicas that died stop counting
        ids = await self.redis.zrangebyscore(LIVE_SET, cutoff, "+inf")
        async with self.redis.pipeline(transaction=False) as pipe:
            for call_id in ids:
                pipe.hgetall(call_key(call_id))
            rows = await pipe.execute()
        return [row for row in rows if row]

    # -- single-use call tokens ----------------------------------------------------------------
    async def spend_call_token(self, token_id: str, call_id: str, ttl_s: int, issued_at: float) -> bool:
        """Mark a call token (its `jti`, issued at `issued_at`, unix s) spent on `call_id`, for every replica and
        across restarts of any.

        True the first time only (SET NX); the mark expires after `ttl_s` seconds, once the token no longer
        verifies anyway. False too for a token issued before Redis began keeping marks (TOKENS_SINCE): it may
        have been spent and forgotten. Raises RedisError or OSError when Redis is unreachable.
        """
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(TOKENS_SINCE, f"{time.time():.3f}", nx=True)
            pipe.get(TOKENS_SINCE)
            _, since = await pipe.execute()
        if issued_at < float(since):
            return False
        return bool(await self.redis.set(_token_key(token_id), call_id, nx=True, ex=max(1, ttl_s)))

    async def call_of_token(self, token_id: str) -> str | None:
        """The call a spent call token opened, or None. Raises RedisError or OSError."""
        return await self.redis.get(_token_key(token_id))  # type: ignore[no-any-return]

    # -- rate limits --------------------------------------------------------------------------
    async def hit(self, key: str, limit: int, window_s: int) -> tuple[bool, int]:
        """Count one request in a fixed window; (allowed, seconds until the window resets).

        Fails open when Redis is down: a cache outage must not lock every caller out.
        """
        bucket = f"pono:rl:{key}:{int(time.time()) // window_s}"
        try:
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.incr(bucket)
                pipe.expire(bucket, window_s)
                count, _ = await pipe.execute()
        except (RedisError, OSError):
            return True, 0
        retry_after = window_s - int(time.time()) % window_s
        return int(count) <= limit, retry_after

    async def close(self) -> None:
        # The flag as well as the cancel: in tests a cancelled publisher was seen still waiting on its wake
        # event (the cancel lost inside a Redis call, most likely to a socket timeout firing at the same time),
        # which held shutdown for minutes. The flag ends the loop either way; the wait is bounded.
        self._closed = True
        self._wake.set()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)
        with contextlib.suppress(RedisError, OSError):
            if self.calls and self.up:
                async with self.redis.pipeline(transaction=False) as pipe:
                    for call_id in self.calls:
                        pipe.delete(call_key(call_id))
                        pipe.zrem(LIVE_SET, call_id)
                    await pipe.execute()
        await self.redis.aclose()
        await self.blocking.aclose()
