"""Login sessions: short-lived JWT access tokens and rotating, revocable refresh tokens (stored hashed).

A login (one refresh family) ends `max_age_s` after the password was given, however often it is refreshed;
access tokens carry the user's token generation, which a password change bumps (see users.set_password).
"""

from __future__ import annotations

import secrets
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import jwt

from pono.storage.users import Principal, hash_token, login_principal

_ALGORITHM = "HS256"
REFRESH_PREFIX = "ponor_"


@dataclass(frozen=True, slots=True)
class TokenPair:
    access_token: str
    refresh_token: str
    expires_in: int

    def to_json(self) -> dict[str, object]:
        return {"access_token": self.access_token, "refresh_token": self.refresh_token,
                "token_type": "Bearer", "expires_in": self.expires_in}


class RefreshReused(Exception):
    """A refresh token was used twice: someone else holds a copy. Its whole family is now revoked."""


class Logins:
    """`access_ttl_s`, `refresh_ttl_s`: each token's lifetime; `max_age_s`: a whole login's (seconds)."""

    def __init__(self, pool_getter: object, secret: bytes, access_ttl_s: int, refresh_ttl_s: int,
                 max_age_s: int = 30 * 24 * 3600) -> None:
        self._pool_getter = pool_getter
        self._secret = secret
        self.access_ttl_s = access_ttl_s
        self.refresh_ttl_s = refresh_ttl_s
        self.max_age_s = max_age_s

    @property
    def _pool(self) -> asyncpg.Pool:
        return self._pool_getter()  # type: ignore[operator,no-any-return]

    def access_token(self, who: Principal, not_after: float | None = None) -> str:
        """A signed access token for `who` (with their token generation, "gen"), expiring after access_ttl_s
        or at `not_after` (unix s, the login's end), whichever is first."""
        now = int(time.time())
        exp = now + self.access_ttl_s if not_after is None else min(now + self.access_ttl_s, int(not_after))
        claims = {"sub": who.user_id, "name": who.name, "role": who.role, "typ": "access", "gen": who.generation,
                  "iat": now, "exp": exp, "jti": secrets.token_urlsafe(8)}
        return jwt.encode(claims, self._secret, algorithm=_ALGORITHM)

    def verify_access(self, token: str) -> dict[str, object] | None:
        try:
            claims = jwt.decode(token, self._secret, algorithms=[_ALGORITHM],
                                options={"require": ["exp", "sub", "typ"]})
        except jwt.PyJWTError:
            return None
        return claims if claims.get("typ") == "access" else None

    async def issue(self, who: Principal, family: uuid.UUID | None = None,
                    conn: asyncpg.Connection | None = None, login_at: datetime | None = None) -> TokenPair:
        """A token pair for `who`: a new login (family None, `login_at` now), or the next of a family that began
        at `login_at`. Neither token outlives the login's max age."""
        now = datetime.now(UTC)
        login_at = login_at or now
        ends = login_at + timedelta(seconds=self.max_age_s)
        refresh = REFRESH_PREFIX + secrets.token_urlsafe(32)
        expires = min(now + timedelta(seconds=self.refresh_ttl_s), ends)
        await (conn or self._pool).execute(
            "INSERT INTO refresh_tokens (user_id, family, token_hash, expires_at, login_at)"
            " VALUES ($1, $2, $3, $4, $5)", who.user_id, family or uuid.uuid4(), hash_token(refresh), expires, login_at)
        access = self.access_token(who, ends.timestamp())
        expires_in = int(min(self.access_ttl_s, (ends - now).total_seconds()))
        return TokenPair(access, refresh, expires_in)

    async def rotate(self, refresh: str) -> tuple[Principal, TokenPair] | None:
        """Spend a refresh token for a new pair. None if unknown or expired; RefreshReused if spent before."""
        async with self._pool.acquire() as conn, conn.transaction():
            rotated = await self._rotate(conn, refresh)
        if isinstance(rotated, RefreshReused):
            raise rotated  # raised only now: the family's revocation above must commit
        return rotated

    async def _rotate(self, conn: asyncpg.Connection, refresh: str) \
            -> tuple[Principal, TokenPair] | RefreshReused | None:
        row = await conn.fetchrow(
            "SELECT r.id, r.family, r.expires_at, r.revoked_at, r.login_at, u.id AS user_id, u.name, u.role,"
            " u.must_change_password, u.token_generation FROM refresh_tokens r JOIN users u ON u.id = r.user_id"
            " WHERE r.token_hash = $1 AND u.deleted_at IS NULL FOR UPDATE OF r", hash_token(refresh))
        now = datetime.now(UTC)
        if row is None or row["expires_at"] < now or row["login_at"] + timedelta(seconds=self.max_age_s) < now:
            return None
        if row["revoked_at"] is not None:
            await conn.execute("UPDATE refresh_tokens SET revoked_at = now() WHERE family = $1"
                               " AND revoked_at IS NULL", row["family"])
            return RefreshReused(str(row["user_id"]))
        await conn.execute("UPDATE refresh_tokens SET revoked_at = now() WHERE id = $1", row["id"])
        who = login_principal(row, "user_id")
        return who, await self.issue(who, row["family"], conn, row["login_at"])

    async def revoke(self, refresh: str) -> str | None:
        """Log out: revoke the token's whole family. Returns the user id, or None for an unknown token."""
        async with self._pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow("SELECT family, user_id FROM refresh_tokens WHERE token_hash = $1",
                                      hash_token(refresh))
            if row is None:
                return None
            await conn.execute("UPDATE refresh_tokens SET revoked_at = now() WHERE family = $1"
                               " AND revoked_at IS NULL", row["family"])
            return str(row["user_id"])
