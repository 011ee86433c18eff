"""Users, passwords and API keys.

Passwords are hashed with argon2id. API keys are random, shown once, and stored only as a SHA-256 hash.
"""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from pono.storage.audit import write_audit

ROLES = ("viewer", "operator", "admin")  # each role can do everything the ones before it can
# What an API key may be limited to; a key with no scopes may touch every area its role allows.
SCOPES = ("calls", "personas", "knowledge", "users", "keys", "audit", "metrics", "workflows")
TOKEN_PREFIX = "pono_"
_hasher = PasswordHasher()
# Verified against when the user does not exist, so a wrong name costs as long as a wrong password.
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


@dataclass(frozen=True, slots=True)
class Principal:
    user_id: str
    name: str
    role: str
    key_id: str | None = None  # None for a login (JWT)
    scopes: tuple[str, ...] = ()
    must_change_password: bool = False  # a one-time password: nothing but POST /api/auth/password until changed
    generation: int = 0  # the user's token generation: a password change bumps it and older access tokens stop

    def has(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    def may(self, area: str) -> bool:
        return not self.scopes or area in self.scopes

    @property
    def limit_key(self) -> str:
        return f"key:{self.key_id}" if self.key_id else f"user:{self.user_id}"


# The users columns a login principal is made of (login_principal); a query selecting them can name this.
LOGIN_COLUMNS = "name, role, must_change_password, token_generation"


def login_principal(row: Mapping[str, Any], user_id: str = "id") -> Principal:
    """The login principal of a users row with LOGIN_COLUMNS and the user's id (in column `user_id`)."""
    return Principal(str(row[user_id]), row["name"], row["role"], must_change_password=row["must_change_password"],
                     generation=row["token_generation"])


def hash_token(token: str) -> str:
    # API keys and refresh tokens carry 256 bits of randomness: a fast hash is enough.
    return hashlib.sha256(token.encode()).hexdigest()


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")


async def hash_password(password: str) -> str:
    if len(password) < 10:
        raise ValueError("a password needs at least 10 characters")
    return await asyncio.to_thread(_hasher.hash, password)


async def create_user(pool: asyncpg.Pool | asyncpg.Connection, name: str, role: str,
                      password: str | None = None) -> str:
    _check_role(role)
    password_hash = await hash_password(password) if password is not None else None
    return str(await pool.fetchval(
        "INSERT INTO users (name, role, password_hash) VALUES ($1, $2, $3) RETURNING id", name, role, password_hash))


async def set_password(pool: asyncpg.Pool, user_id: str, password: str, *, must_change: bool = False) \
        -> Principal | None:
    """Set a user's password and end every session they have, in one transaction.

    Every refresh token of the user is revoked and their token generation bumped, so access tokens issued before
    stop too (API keys stay). `must_change`: the password is one-time and must be changed at the next login.
    Returns the user as a login principal now (None when there is no such user); ValueError for a short password.
    """
    password_hash = await hash_password(password)
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE users SET password_hash = $1, token_generation = token_generation + 1,"
            " must_change_password = $3 WHERE id = $2 AND deleted_at IS NULL"
            f" RETURNING id, {LOGIN_COLUMNS}", password_hash, user_id, must_change)
        if row is None:
            return None
        await conn.execute("UPDATE refresh_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
                           row["id"])
    return login_principal(row)


async def check_password(pool: asyncpg.Pool, name: str, password: str) -> Principal | None:
    """The user `name` as a login principal when `password` is theirs, else None (as slow for unknown names)."""
    row = await pool.fetchrow(
        f"SELECT id, password_hash, {LOGIN_COLUMNS} FROM users WHERE name = $1 AND deleted_at IS NULL", name)
    stored = row["password_hash"] if row is not None and row["password_hash"] else _DUMMY_HASH

    def verify() -> bool:
        try:
            return _hasher.verify(stored, password)
        except (VerificationError, InvalidHashError):
            return False

    ok = await asyncio.to_thread(verify)
    if not ok or row is None or not row["password_hash"]:
        return None
    return login_principal(row)


async def create_api_key(pool: asyncpg.Pool | asyncpg.Connection, user_id: str, role: str, name: str,
                         scopes: list[str] | None = None) -> tuple[str, str]:
    """A new key for the user; returns (key id, token). The token is not kept anywhere."""
    _check_role(role)
    unknown = set(scopes or ()) - set(SCOPES)
    if unknown:
        raise ValueError(f"unknown scopes {sorted(unknown)}; scopes are {', '.join(SCOPES)}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    key_id = await pool.fetchval(
        "INSERT INTO api_keys (user_id, name, prefix, token_hash, role, scopes) VALUES ($1, $2, $3, $4, $5, $6)"
        " RETURNING id", user_id, name, token[:12], hash_token(token), role, list(scopes or ()))
    return str(key_id), token


async def may_still_act(pool: asyncpg.Pool, who: dict[str, Any], role: str) -> bool:
    """Whether a principal that was allowed to act still has `role`: `who` is {"user_id", "key_id" (None for a
    login), "generation" (a login's token generation)}. False once the user is deleted or demoted, the key revoked,
    or the login's password changed. Raises asyncpg/OS errors when Postgres is unreachable."""
    row = await pool.fetchrow(
        "SELECT u.role, u.token_generation, k.role AS key_role, k.revoked_at FROM users u"
        " LEFT JOIN api_keys k ON k.id = $2::uuid AND k.user_id = u.id WHERE u.id = $1::uuid AND u.deleted_at IS NULL",
        who["user_id"], who.get("key_id"))
    if row is None:
        return False
    if who.get("key_id"):
        if row["key_role"] is None or row["revoked_at"] is not None:
            return False
        granted = min(row["role"], row["key_role"], key=ROLES.index)
    else:
        if row["token_generation"] != who.get("generation", 0):
            return False
        granted = row["role"]
    return ROLES.index(granted) >= ROLES.index(role)


async def list_users(pool: asyncpg.Pool) -> list[dict[str, Any]]:
    """Users not deleted, oldest first: [{"id": str (UUID), "name", "role", "created_at": datetime}]."""
    rows = await pool.fetch("SELECT id, name, role, created_at FROM users WHERE deleted_at IS NULL ORDER BY created_at")
    return [{**dict(r), "id": str(r["id"])} for r in rows]


async def delete_user(pool: asyncpg.Pool, user_id: uuid.UUID, actor: str, source_ip: str | None) -> bool:
    """Mark a user deleted, revoke their API keys and login sessions, and audit it, in one transaction.

    False (nothing changed) when there is no such user.
    """
    async with pool.acquire() as conn, conn.transaction():
        done = await conn.fetchval("UPDATE users SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL"
                                   " RETURNING id", user_id)
        if done is None:
            return False
        await conn.execute("UPDATE api_keys SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
                           user_id)
        await conn.execute("UPDATE refresh_tokens SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
                           user_id)
        await write_audit(conn, actor, "user.delete", str(user_id), source_ip)
    return True


async def list_keys(pool: asyncpg.Pool, user_id: str, everyone: bool) -> list[dict[str, Any]]:
    """API keys, oldest first: the user's own, or everyone's. Never the token or its hash.

    Each is {"id": str (UUID), "name", "prefix", "role", "scopes": list[str], "user": owner's name,
    "created_at": datetime, "last_used_at", "revoked_at": datetime | None}.
    """
    rows = await pool.fetch(
        "SELECT k.id, k.name, k.prefix, k.role, k.scopes, k.created_at, k.last_used_at, k.revoked_at, u.name AS user"
        " FROM api_keys k JOIN users u ON u.id = k.user_id WHERE ($1::boolean OR k.user_id = $2::uuid)"
        " ORDER BY k.created_at", everyone, user_id)
    return [{**dict(r), "id": str(r["id"])} for r in rows]


async def revoke_key(pool: asyncpg.Pool, key_id: uuid.UUID, user_id: str, any_owner: bool) -> bool:
    """Revoke a key of `user_id` (of anyone's with `any_owner`); False when there is no such live key."""
    done = await pool.fetchval(
        "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL"
        " AND ($2::boolean OR user_id = $3::uuid) RETURNING id", key_id, any_owner, user_id)
    return done is not None


async def shared_secret(pool: asyncpg.Pool, name: str) -> bytes:
    """A random secret kept in Postgres, made by whichever replica asks first, the same for all."""
    await pool.execute("INSERT INTO server_secrets (name, value) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
                       name, secrets.token_urlsafe(48))
    return str(await pool.fetchval("SELECT value FROM server_secrets WHERE name = $1", name)).encode()


async def bootstrap_admin(pool: asyncpg.Pool) -> tuple[str, str] | None:
    """With no users at all, create an admin with a random one-time password; (name, password) to print once.

    The password must be changed at the first login (POST /api/auth/password) before anything else is allowed.
    """
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("LOCK TABLE users IN EXCLUSIVE MODE")  # two replicas starting at once make one admin
        if await conn.fetchval("SELECT count(*) FROM users") > 0:
            return None
        password = secrets.token_urlsafe(15)
        user_id = await create_user(conn, "admin", "admin", password)
        await conn.execute("UPDATE users SET must_change_password = true WHERE id = $1", user_id)
        await conn.execute("INSERT INTO audit_log (actor, action, target) VALUES ('pono', 'user.bootstrap', 'admin')")
    return "admin", password
