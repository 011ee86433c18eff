"""Bearer tokens to principals: JWT logins and API keys, checked against Postgres with a short cache."""

from __future__ import annotations

import time
from typing import Any

import asyncpg

from pono.storage.logins import Logins
from pono.storage.users import LOGIN_COLUMNS, ROLES, TOKEN_PREFIX, Principal, hash_token, login_principal

_CACHE_S = 30.0  # a revoked key or deleted user stops working within this long on every replica


class Authenticator:
    """Turns a bearer token into a Principal, with a short cache so most requests cost no query."""

    def __init__(self, pool_getter: object) -> None:
        self._pool_getter = pool_getter
        self.logins: Logins | None = None  # set at start-up, once the shared secret is read from Postgres
        self._cache: dict[str, tuple[float, Principal | None]] = {}
        self._touched: dict[str, float] = {}

    @property
    def _pool(self) -> asyncpg.Pool:
        return self._pool_getter()  # type: ignore[operator,no-any-return]

    async def verify(self, token: str) -> Principal | None:
        """The principal behind a login's access token or an API key as things stand (role, deletion, revocation,
        password changes), or None. Cached for up to _CACHE_S. Raises asyncpg/OS errors when Postgres is away."""
        if token.startswith(TOKEN_PREFIX):
            return await self._verify_key(token)
        if self.logins is None:
            return None
        claims = self.logins.verify_access(token)
        if claims is None:
            return None
        # The token's role is what it was at login; the user's current role and existence decide now, and a
        # password changed since the token was issued ends it (its generation is older).
        who = await self._cached(f"user:{claims['sub']}", self._load_user, str(claims["sub"]))
        return who if who is not None and claims.get("gen", 0) == who.generation else None

    async def _verify_key(self, token: str) -> Principal | None:
        principal = await self._cached(f"key:{hash_token(token)}", self._load_key, hash_token(token))
        now = time.monotonic()
        if principal is not None and principal.key_id and now - self._touched.get(principal.key_id, -1e9) > 60:
            self._touched[principal.key_id] = now
            await self._pool.execute("UPDATE api_keys SET last_used_at = now() WHERE id = $1", principal.key_id)
        return principal

    async def _cached(self, cache_key: str, load: Any, arg: str) -> Principal | None:
        now = time.monotonic()
        cached = self._cache.get(cache_key)
        if cached and now - cached[0] < _CACHE_S:
            return cached[1]
        principal = await load(arg)
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[cache_key] = (now, principal)
        return principal

    def forget(self) -> None:
        """Drop the cache: this replica changed a key or user and must see it at once."""
        self._cache.clear()

    async def _load_key(self, digest: str) -> Principal | None:
        row = await self._pool.fetchrow(
            "SELECT k.id, k.role, k.scopes, u.id AS user_id, u.name, u.role AS user_role, u.must_change_password"
            " FROM api_keys k"
            " JOIN users u ON u.id = k.user_id WHERE k.token_hash = $1 AND k.revoked_at IS NULL"
            " AND u.deleted_at IS NULL", digest)
        if row is None:
            return None
        # A key never does more than its user can now.
        role = min(row["role"], row["user_role"], key=ROLES.index)
        return Principal(str(row["user_id"]), row["name"], role, str(row["id"]), tuple(row["scopes"]),
                         must_change_password=row["must_change_password"])

    async def _load_user(self, user_id: str) -> Principal | None:
        row = await self._pool.fetchrow(f"SELECT id, {LOGIN_COLUMNS} FROM users WHERE id = $1 AND deleted_at IS NULL",
                                        user_id)
        return login_principal(row) if row else None
