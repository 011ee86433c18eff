"""Users and API keys. Keys are random, shown once, and stored only as a SHA-256 hash."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

import asyncpg

ROLES = ("viewer", "operator", "admin")  # each role can do everything the ones before it can
TOKEN_PREFIX = "pono_"


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    name: str
    role: str
    key_id: str

    def has(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)


def hash_token(token: str) -> str:
    # API keys carry 256 bits of randomness: a fast hash is enough, a slow KDF would only cost latency.
    return hashlib.sha256(token.encode()).hexdigest()


async def create_user(pool: asyncpg.Pool, name: str, role: str) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    return str(await pool.fetchval(
        "INSERT INTO users (name, role) VALUES ($1, $2) RETURNING id", name, role))


async def create_api_key(pool: asyncpg.Pool, user_id: str, role: str, name: str) -> str:
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    await pool.execute(
        "INSERT INTO api_keys (user_id, name, prefix, token_hash, role) VALUES ($1, $2, $3, $4, $5)",
        user_id, name, token[:12], hash_token(token), role)
    return token


class KeyVerifier:
    """Checks bearer API keys against Postgres, with a short cache so a request costs no query."""

    def __init__(self, pool_getter: object, cache_s: float = 30.0) -> None:
        self._pool_getter = pool_getter
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._touched: dict[str, float] = {}

    async def verify(self, token: str) -> Principal | None:
        if not token.startswith(TOKEN_PREFIX):
            return None
        digest = hash_token(token)
        now = time.monotonic()
        cached = self._cache.get(digest)
        if cached and now - cached[0] < self.cache_s:
            principal = cached[1]
        else:
            pool: asyncpg.Pool = self._pool_getter()  # type: ignore[operator]
            row = await pool.fetchrow(
                "SELECT k.id, k.role, u.id AS user_id, u.name FROM api_keys k JOIN users u ON u.id = k.user_id"
                " WHERE k.token_hash = $1 AND k.revoked_at IS NULL AND u.deleted_at IS NULL", digest)
            principal = Principal(str(row["user_id"]), row["name"], row["role"], str(row["id"])) if row else None
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[digest] = (now, principal)
        if principal is not None and now - self._touched.get(principal.key_id, -1e9) > 60:
            self._touched[principal.key_id] = now
            pool = self._pool_getter()  # type: ignore[operator]
            await pool.execute("UPDATE api_keys SET last_used_at = now() WHERE id = $1", principal.key_id)
        return principal
