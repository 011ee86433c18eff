"""Last-known copies of personas, for when Postgres is unreachable.

A persona decides who may call (call_tokens_enabled, call_tokens_per_minute) and what a call may say (DLP, tools,
before_llm blocking). During a database outage a call must get the persona as it was last seen, not a guess. Each
successful load and each change through the API is kept here, in Redis (shared by the replicas, so a persona one
replica saw is known to all) and in this process's memory (for when Redis is away too).

Records are plain dicts as pono.storage.personas gives them (times become ISO strings on the way through Redis).
Redis: the hash PERSONAS (id → JSON record), REFS (name → id, and "" → the default's id) and NUMBERS (a normalised
dialed number → persona id, "" for the default). Nothing expires: a copy is replaced by a newer one or forgotten
when its persona is deleted. Redis is not trusted to keep them honest: every value is signed (HMAC-SHA256 with a
secret the replicas share, given by `use_secret`, over where it is kept and what it says), and one that does not
verify is ignored. Until `use_secret` is called, only this process's memory is used.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import RedisError

from pono.storage.live import LiveState

log = logging.getLogger(__name__)

PERSONAS, REFS, NUMBERS = "pono:personas:known", "pono:personas:refs", "pono:personas:numbers"
_DEFAULT = ""  # the default persona's entry in REFS and NUMBERS
_REDIS_ERRORS = (RedisError, OSError)


class PersonaCache:
    """`live` gives the Redis live state (None before start-up); the memory tier works without it."""

    def __init__(self, live: Callable[[], LiveState | None]) -> None:
        self._live = live
        self._key: bytes | None = None
        self._records: dict[str, dict[str, Any]] = {}  # id → record
        self._refs: dict[str, str] = {}  # name, or "" for the default → id
        self._numbers: dict[str, str] = {}  # dialed number → id, or "" for the default

    def use_secret(self, secret: bytes) -> None:
        """The secret every replica shares (from Postgres): copies in Redis are signed with it and checked."""
        self._key = hashlib.sha256(b"pono-persona-cache:" + secret).digest()

    async def remember(self, persona: dict[str, Any]) -> None:
        """Keep `persona` (a stored record with "id", "name", "is_default") as the last-known copy of it, under
        its id and name, and as the default when it is. Never raises: a cache that cannot be written is skipped."""
        persona_id = str(persona["id"])
        record = json.loads(json.dumps(persona, default=str))
        refs = {record["name"]: persona_id, **({_DEFAULT: persona_id} if record.get("is_default") else {})}
        self._records[persona_id] = record
        self._refs.update(refs)
        await self._write(lambda pipe: (
            pipe.hset(PERSONAS, persona_id, self._seal(PERSONAS, persona_id, json.dumps(record))),
            pipe.hset(REFS, mapping={ref: self._seal(REFS, ref, value) for ref, value in refs.items()})))

    async def forget(self, persona_id: str) -> None:
        """Drop the copy of a deleted persona, so an outage never brings it back. Never raises."""
        self._records.pop(persona_id, None)
        await self._write(lambda pipe: (pipe.hdel(PERSONAS, persona_id),))

    async def remember_number(self, number: str, persona_id: str | None) -> None:
        """Keep which persona a dialed `number` reaches: its id, or None for the default. Never raises."""
        value = self._numbers[number] = persona_id or _DEFAULT
        await self._write(lambda pipe: (pipe.hset(NUMBERS, number, self._seal(NUMBERS, number, value)),))

    async def recall(self, ref: str | None) -> dict[str, Any] | None:
        """The last-known copy of the persona `ref` (an id or a name; None: the default), or None when unknown.

        Redis first (another replica may have seen a newer copy), then this process's memory.
        """
        key = _DEFAULT if ref is None else ref
        live = self._live() if self._key is not None else None
        if live is not None:
            try:
                persona_id = key if key and await live.redis.hexists(PERSONAS, key) else self._open(
                    REFS, key, await live.redis.hget(REFS, key))
                raw = self._open(PERSONAS, persona_id, await live.redis.hget(PERSONAS, persona_id)) \
                    if persona_id else None
                found = _matching(json.loads(raw), ref) if raw else None
                if found is not None:
                    return found
            except _REDIS_ERRORS as exc:
                log.warning("persona cache: Redis unavailable (%s); using this replica's copies", type(exc).__name__)
            except ValueError:
                log.warning("persona cache: a copy in Redis is not JSON; ignored")
        persona_id = key if key in self._records else self._refs.get(key)
        record = self._records.get(persona_id) if persona_id else None
        return _matching(record, ref) if record is not None else None

    async def recall_number(self, number: str) -> tuple[bool, str | None]:
        """(known, persona id or None for the default) for a dialed number; (False, None) when never seen."""
        live = self._live() if self._key is not None else None
        if live is not None:
            try:
                value = self._open(NUMBERS, number, await live.redis.hget(NUMBERS, number))
                if value is not None:
                    return True, value or None
            except _REDIS_ERRORS:
                pass
        if number in self._numbers:
            return True, self._numbers[number] or None
        return False, None

    def _seal(self, where: str, field: str, value: str) -> str:
        """`value` as kept in Redis hash `where` under `field`: "<hex HMAC>.<value>"."""
        assert self._key is not None
        return f"{hmac.new(self._key, f'{where}/{field}/{value}'.encode(), hashlib.sha256).hexdigest()}.{value}"

    def _open(self, where: str, field: str, stored: str | None) -> str | None:
        """The value of a signed entry, or None when there is none or it is not signed by a replica."""
        if stored is None:
            return None
        value = stored.partition(".")[2]
        if not hmac.compare_digest(stored.encode(), self._seal(where, field, value).encode()):
            log.warning("persona cache: an entry in Redis (%s) is not signed by a replica; ignored", where)
            return None
        return value

    async def _write(self, commands: Callable[[Any], tuple[Any, ...]]) -> None:
        live = self._live() if self._key is not None else None
        if live is None:
            return
        try:
            async with live.redis.pipeline(transaction=True) as pipe:
                commands(pipe)
                await pipe.execute()
        except _REDIS_ERRORS as exc:
            log.warning("persona cache: not written to Redis (%s)", type(exc).__name__)


def _matching(record: dict[str, Any], ref: str | None) -> dict[str, Any] | None:
    """The record if it still answers to `ref`: its id or its current name (a renamed persona's old name
    no longer does); any record answers to None (the default pointer was checked by the caller)."""
    if ref is None or ref in (record.get("id"), record.get("name")):
        return record
    return None
